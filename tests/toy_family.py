"""A policy family from outside vlajax's packages, for the family interface's tests: a linear Gaussian
policy over continuous actions (`family=linear-gaussian`, `path=preset:linear`).

Why this one: it is the opposite of OFT in everything the rest of vlajax must not assume: float
samples instead of 256-bin tokens, a closed-form log-likelihood and entropy instead of logits, no
vision tower. The mean of each of the chunk x action_dim outputs is linear in a bag of the prompt's
token ids (hashed to `buckets`), the normalised robot state and the image average-pooled to 4 x 4;
the standard deviation is a learned per-output parameter, scaled by the sampling temperature.
On the anchored tabletop task "move to the <colour> block" is close to linear in these: a bias per
colour word (where that block sits) minus the gripper's position.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlajax.model.family import HostPolicy, IOAdapter, PolicyFamily, PolicySpec, SpecError, register_family
from vlajax.model.preprocess import preprocess_images
from vlajax.model.tokenizer import load_tokenizer

NAME = "linear-gaussian"
POOL = 4  # images are average-pooled to POOL x POOL per channel


@dataclasses.dataclass(frozen=True)
class LinearGaussianConfig:
    chunk: int = 8
    action_dim: int = 7
    num_images: int = 1
    image_size: int = 16
    proprio_dim: int | None = None
    buckets: int = 512  # prompt token ids are hashed (id % buckets) into a bag of words
    init_std: float = 0.3
    sample_dtype: str = "float32"

    @property
    def num_action_tokens(self) -> int:
        return self.chunk * self.action_dim

    @property
    def num_features(self) -> int:
        return 6 * self.num_images * POOL * POOL + (self.proprio_dim or 0)


class LinearGaussian(nnx.Module):
    """mean = W x + bag(prompt) + b, log_std per output (module docstring)."""

    LORA_TARGETS = r"w"

    def __init__(self, cfg: LinearGaussianConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        t = cfg.num_action_tokens
        self.w = nnx.Param(jnp.zeros((cfg.num_features, t), jnp.float32))
        self.words = nnx.Param(jnp.zeros((cfg.buckets, t), jnp.float32))
        self.b = nnx.Param(jnp.zeros((t,), jnp.float32))
        self.log_std = nnx.Param(jnp.full((t,), math.log(cfg.init_std), jnp.float32))

    def _mean_std(self, pixel_values, input_ids, attention_mask, proprio):
        b, c, s, _ = pixel_values.shape
        pooled = pixel_values.reshape(b, c, POOL, s // POOL, POOL, s // POOL).mean(axis=(3, 5)).reshape(b, -1)
        x = pooled if proprio is None else jnp.concatenate([pooled, proprio.astype(jnp.float32)], axis=-1)
        bag = jnp.einsum("bp,bpt->bt", attention_mask.astype(jnp.float32), self.words[input_ids % self.cfg.buckets])
        return x @ self.w + bag + self.b, jnp.exp(self.log_std)[None, :]

    def preprocess_images(self, images, *, flip, center_crop, crop_offsets=None):
        return preprocess_images(images, flip=flip, center_crop=center_crop, resize_to=self.cfg.image_size,
                                 crop_offsets=crop_offsets)

    def sample_actions(self, pixel_values, input_ids, attention_mask, proprio, keys, *, temperature, dtype=None):
        mean, std = self._mean_std(pixel_values, input_ids, attention_mask, proprio)
        if temperature == 0:
            return mean, _normal_logp(jnp.zeros_like(mean), std)
        eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(keys)
        return mean + temperature * std * eps, _normal_logp(eps, temperature * std)

    def log_prob(self, pixel_values, input_ids, attention_mask, proprio, samples, *, temperature, dtype=None):
        mean, std = self._mean_std(pixel_values, input_ids, attention_mask, proprio)
        scale = temperature * std
        entropy = jnp.broadcast_to(0.5 + 0.5 * math.log(2 * math.pi) + jnp.log(scale), mean.shape)
        return _normal_logp((samples - mean) / scale, scale), entropy, mean


def _normal_logp(z, scale):
    """log N(x; mean, scale^2) for z = (x - mean) / scale."""
    return -0.5 * jnp.square(z) - jnp.log(scale) - 0.5 * math.log(2 * math.pi)


class LinearGaussianPolicy(HostPolicy):
    """The host-side policy the decoder and the learner hold (what `vlajax.model.oft.Policy` is to OFT)."""

    def __init__(self, model: LinearGaussian, *, dataset_statistics: dict | None, compute_dtype=jnp.float32):
        super().__init__(model)
        self.tokenizer = load_tokenizer("tiny")
        self.dataset_statistics = dataset_statistics or {}
        self.compute_dtype = compute_dtype

    def action_stats(self, key: str):
        return self.dataset_statistics[key]

    def proprio_stats(self, key: str):
        stats = self.dataset_statistics.get(key, {}).get("proprio")
        return (stats["q01"], stats["q99"]) if stats else None

    def tokens_to_actions(self, samples, unnorm_key: str | None, gripper: str | None = None) -> np.ndarray:
        """(B, T) samples -> (B, chunk, action_dim) env actions: clipped to [-1, 1], mapped onto the
        statistics' q01..q99 where their mask says so."""
        a = np.clip(np.asarray(samples, np.float32), -1.0, 1.0).reshape(-1, self.cfg.chunk, self.cfg.action_dim)
        if unnorm_key:
            st = self.action_stats(unnorm_key)["action"]
            lo, hi = np.asarray(st["q01"], np.float32), np.asarray(st["q99"], np.float32)
            mask = np.asarray(st.get("mask", [True] * self.cfg.action_dim), bool)
            a = np.where(mask, 0.5 * (a + 1.0) * (hi - lo) + lo, a)
        return a


class LinearGaussianFamily(PolicyFamily):
    name = NAME
    adapters = {"tabletop": IOAdapter(image_flip=False, gripper=None, stats_key="tabletop")}

    def load(self, spec: PolicySpec) -> LinearGaussianPolicy:
        if spec.path != "preset:linear":
            raise SpecError(f"{spec.path}: the linear Gaussian family has only preset:linear", "path")
        cfg = LinearGaussianConfig(chunk=spec.chunk, action_dim=spec.action_dim, num_images=spec.num_images,
                                   proprio_dim=spec.proprio_dim, image_size=spec.image_size or 16)
        return LinearGaussianPolicy(LinearGaussian(cfg, nnx.Rngs(spec.seed)), dataset_statistics=spec.dataset_statistics,
                                    compute_dtype=jnp.dtype(spec.compute_dtype))

    def load_checkpoint(self, path: Path, *, param_dtype="float32", compute_dtype="bfloat16", num_images=1, spec=None):
        raise SpecError(f"{path}: the linear Gaussian family has no checkpoint format", "path")

    def flops_per_row(self, policy, prompt_len: int) -> float:
        return 2.0 * (policy.cfg.num_features + prompt_len) * policy.cfg.num_action_tokens

    @property
    def lora_targets(self) -> str:
        return LinearGaussian.LORA_TARGETS

    def convert(self, src: Path, dst: Path, to=None, *, dtype="float32", export_dtype=None) -> str:
        raise SpecError("the linear Gaussian family has no checkpoint format", "path")


FAMILY = register_family(LinearGaussianFamily())
