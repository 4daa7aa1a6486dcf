"""The rollout's policy call: uint8 frames + prompt ids -> sampled actions, their log-probs, and env
actions. One jitted function does preprocess -> the family's `sample_actions`
(`vlajax.model.family.ActionModel`), so the host only moves compact uint8 images to the device and
gets (B, T) samples / float32 log-probs back (OFT: 56 int32 bin tokens).

Why the sampling keys are per row: the key of trajectory row r at policy call c is
`fold_in(fold_in(key, r), c)`. A trajectory's samples therefore do not depend on which other rows
happened to share its decode batch (that depends on pipeline timing and on which envs already
finished), so the serial and the pipelined loop, and a rollout re-run after a simulator fault,
draw the same tokens for the same observations.

Un-normalising samples into env actions (dataset statistics, LIBERO gripper convention) is cheap
numpy on the host (the family's `Policy.tokens_to_actions`).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlajax.model.preprocess import PROPRIO_NORMS
from vlajax.rl.compile_ahead import CompileAhead, abstract

__all__ = ["DecodeInputs", "DecodeOutputs", "Decoder", "PolicyDecoder", "bucket_size", "decode_step",
           "default_buckets"]


@dataclasses.dataclass
class DecodeInputs:
    """One decode batch of B policy calls (numpy, host memory).

    images:      (B, n_img, H, W, 3) uint8 raw camera frames (no flip / resize applied)
    input_ids:   (B, P) int32 prompt ids, right-padded; attention_mask: (B, P) int32
    proprio:     (B, D) float32 raw robot state
    rows:        (B,) int32 trajectory row of each call; calls: (B,) int32 its policy-call index
    """

    images: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray
    proprio: np.ndarray
    rows: np.ndarray
    calls: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.shape[0])


@dataclasses.dataclass
class DecodeOutputs:
    """tokens (B, T) the samples (the family's `sample_dtype`; OFT: int32 bin columns 0..255); logp
    (B, T) float32 their log-probs at the rollout temperature (temperature 1 for greedy); actions
    (B, K, A) float32 env actions."""

    tokens: np.ndarray
    logp: np.ndarray
    actions: np.ndarray


class Decoder(Protocol):
    """What the rollout loop needs from a policy. `dispatch` must not block on the result (JAX
    async dispatch); `fetch` blocks until it is ready.

    A decoder that subclasses this gets the defaults below: int32 samples, T per call, no padding,
    no preprocessing record."""

    chunk_len: int  # K actions per call
    action_dim: int  # A
    num_tokens: int  # T sampled elements per call (K * A)
    sample_dtype: np.dtype = np.dtype(np.int32)  # what is sampled (OFT: int32 bin tokens)
    sample_shape: tuple[int, ...] | None = None  # its shape per call, None = (T,); logp is (T,) per call
    num_images: int  # cameras per call

    def encode_prompts(self, instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(B, P) int32 prompt ids and attention mask of B instructions."""
        raise NotImplementedError

    def dispatch(self, inputs: DecodeInputs, *, temperature: float, key: jax.Array) -> Any:
        raise NotImplementedError

    def fetch(self, handle: Any) -> DecodeOutputs:
        raise NotImplementedError

    def fit_capacity(self, capacity: int) -> None:
        """Called by the engine with the most rows a decode can have, before its first decode."""

    def bucket(self, n: int) -> int:
        """The padded size a decode of `n` rows runs at (for the rollout's statistics)."""
        return n

    @property
    def preprocess(self) -> dict:
        """Keyword arguments of `preprocess_images` that turn stored frames into what the policy saw."""
        return {}


MIN_BUCKET = 4


def bucket_size(n: int, multiple: int = 1, cap: int | None = None) -> int:
    """The padded size of a batch of `n`: `multiple` x the smallest power of two that holds it, at most
    `cap`. Padding batches to few sizes keeps jitted calls (decode, learner update) from compiling
    anew for every batch size, while padding less than twice over."""
    units = max(1, -(-n // multiple))
    size = multiple * (1 << (units - 1).bit_length())
    return size if cap is None else min(size, cap)


def default_buckets(capacity: int) -> tuple[int, ...]:
    """The decode batch sizes `bucket_size(n, MIN_BUCKET, capacity)` gives for 1..capacity rows:
    powers of two from `MIN_BUCKET` below `capacity`, then `capacity`: at most log2(capacity)
    compiled shapes, and a batch is padded to less than twice its size (or to 4 rows).

    Why not 1 and 2: XLA's CPU matmuls take another code path for 1 or 2 rows, whose log-probs
    differ from a larger batch's by ~1e-6. Which rows share a decode depends on simulator timing, so
    a straggler decoded alone in one run and with others in another made a resumed run differ from
    an uninterrupted one. From 4 to 32 rows a row's result does not depend on its batch (tested; on
    2 cores, 48 rows and more take yet another path)."""
    if capacity < 1:
        raise ValueError(f"decode capacity must be >= 1, got {capacity}")
    return tuple(sorted({bucket_size(n, MIN_BUCKET, capacity) for n in range(1, capacity + 1)}))


def decode_step(params, key, images, input_ids, attention_mask, proprio, rows, calls, proprio_q01, proprio_q99, *,
                graphdef, temperature: float, flip: bool, center_crop: bool, compute_dtype, proprio_norm: str = "bounds"):
    """The policy call (`PolicyDecoder` jits it with the keyword arguments bound). params: the
    model's parameters (pure dict of `graphdef`'s structure); images (B, n_img, H, W, 3) uint8;
    input_ids / attention_mask (B, P); proprio (B, D) float32 or None; rows / calls (B,) int32;
    proprio_q01/q99 (D,) or None: the pair of statistics `PROPRIO_NORMS[proprio_norm]` takes.
    Returns the samples (B, T) and their log-probs (B, T) float32 at `temperature` (the mode, with
    log-probs at temperature 1, when `temperature == 0`)."""
    model = nnx.merge(graphdef, params)
    pixel_values = model.preprocess_images(images, flip=flip, center_crop=center_crop)
    if proprio is not None and proprio_q01 is not None:
        proprio = PROPRIO_NORMS[proprio_norm](proprio, proprio_q01, proprio_q99)
    keys = jax.vmap(lambda r, c: jax.random.fold_in(jax.random.fold_in(key, r), c))(rows, calls)
    return model.sample_actions(pixel_values, input_ids, attention_mask, proprio, keys, temperature=temperature,
                                dtype=compute_dtype)


class PolicyDecoder(Decoder):
    """`Decoder` backed by a family's `Policy` (e.g. `vlajax.model.oft.Policy`).

    policy: gives the graph (an `ActionModel`), tokenizer and action statistics (read once, at
        construction), and turns samples into env actions (`tokens_to_actions`).
    params: the parameters decoded with (a pure dict of the policy's structure); default the
        policy's own. A training loop hands over the learner's after each update with `set_params`
        (the same arrays, no copy): the decoder never reads parameters from anywhere else.
    prompt_len: prompts are padded to this many ids (fixed decode shapes); longer ones raise.
    flip / center_crop: OFT preprocessing of raw frames (LIBERO frames are upside-down: flip=True;
        the built-in tabletop renders upright: flip=False).
    unnorm_key / gripper: how tokens become env actions (`Policy.tokens_to_actions`); unnorm_key
        None = identity statistics (policies trained from scratch).
    buckets: decode batch sizes; a batch of B rows is padded (by repeating its first row) to the
        smallest bucket >= B, so at most len(buckets) shapes are compiled per temperature. Default:
        `default_buckets(capacity)` if capacity is given, else set by `RolloutEngine` from its
        pool's capacity (None = no padding, one compile per batch size).
    """

    def __init__(self, policy, *, params: dict | None = None, prompt_len: int = 64, flip: bool = True,
                 center_crop: bool = True, unnorm_key: str | None = None, gripper: str | None = "libero",
                 buckets: Sequence[int] | None = None, capacity: int | None = None):
        if policy.tokenizer is None:
            raise ValueError("PolicyDecoder: the policy has no tokenizer (policy.tokenizer is None)")
        self.policy = policy
        self._graphdef = policy.graphdef
        self._params = nnx.to_pure_dict(policy.state)
        self._structure = jax.tree.structure(self._params)
        if params is not None:
            self.set_params(params)
        cfg = policy.cfg
        self.chunk_len = cfg.chunk
        self.action_dim = cfg.action_dim
        self.num_tokens = cfg.num_action_tokens
        self.sample_dtype = np.dtype(cfg.sample_dtype)
        self.sample_shape = tuple(getattr(cfg, "sample_shape", (self.num_tokens,)))
        self.num_images = cfg.num_images
        self.prompt_len = int(prompt_len)
        self.flip, self.center_crop = bool(flip), bool(center_crop)
        self.unnorm_key, self.gripper = unnorm_key, gripper
        self.resize_to = cfg.image_size
        if buckets is None:
            buckets = default_buckets(capacity) if capacity else None
        self.buckets = tuple(sorted(int(b) for b in buckets)) if buckets else None
        # Fail now, not at the first policy call, if the statistics key is wrong.
        policy.tokens_to_actions(np.zeros((1, *self.sample_shape), self.sample_dtype), unnorm_key, gripper)
        self._q01 = self._q99 = None  # the two arrays of the policy's `proprio_norm` (OFT: q01, q99)
        self.proprio_norm = policy.proprio_norm
        bounds = policy.proprio_stats(unnorm_key) if cfg.proprio_dim and unnorm_key else None
        if bounds is not None:
            self._q01, self._q99 = (np.asarray(b, np.float32) for b in bounds)
        self._prompts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._fns: dict[float, Any] = {}
        self._ahead = CompileAhead("vlajax-decode-precompile")  # (temperature, bucket) -> compiled ahead

    def set_params(self, params: dict) -> None:
        """Decode with `params` from the next dispatch on (e.g. `Learner.decode_params()` after an
        update). Taken as they are, not copied; they must have the policy's structure (the same
        LoRA adapters: `vlajax.rl.lora.with_lora` before building either)."""
        structure = jax.tree.structure(params)
        if structure != self._structure:
            raise ValueError("PolicyDecoder.set_params: the parameters do not have the policy's structure "
                             "(another model, or LoRA on one side only)")
        self._params = params

    @property
    def params(self) -> dict:
        """The parameters the next dispatch decodes with."""
        return self._params

    def model_proprio(self, proprio: np.ndarray) -> np.ndarray:
        """(..., D) raw robot state -> what the model sees (normalised the policy's way when its
        statistics have the robot state's): the learner must feed the same as the decode did."""
        if self._q01 is None:
            return np.asarray(proprio, np.float32)
        return np.asarray(PROPRIO_NORMS[self.proprio_norm](proprio, self._q01, self._q99), np.float32)

    def _fn(self, temperature: float):
        """The jitted decode for the policy's graph. Bound in a closure rather than passed as a
        static argument: hashing a GraphDef costs ~1 ms per call for the small model, more for 7B."""
        if temperature not in self._fns:
            self._fns[temperature] = jax.jit(partial(
                decode_step, graphdef=self._graphdef, temperature=temperature,
                flip=self.flip, center_crop=self.center_crop, compute_dtype=jnp.dtype(self.policy.compute_dtype),
                proprio_norm=self.proprio_norm))
        return self._fns[temperature]

    @property
    def preprocess(self) -> dict:
        """How a stored uint8 frame batch becomes the policy's pixel_values:
        `preprocess_images(images, **decoder.preprocess)`."""
        return {"flip": self.flip, "center_crop": self.center_crop, "resize_to": self.resize_to}

    def encode_prompts(self, instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(B, prompt_len) int32 ids and mask; cached per instruction."""
        missing = [s for s in dict.fromkeys(instructions) if s not in self._prompts]
        if missing:
            ids, mask = self.policy.tokenizer.encode(missing, pad_to=self.prompt_len)
            for s, i, m in zip(missing, ids, mask):
                self._prompts[s] = (i, m)
        return (np.stack([self._prompts[s][0] for s in instructions]),
                np.stack([self._prompts[s][1] for s in instructions]))

    def fit_capacity(self, capacity: int) -> None:
        """Fixed decode shapes as envs finish: `default_buckets(capacity)`, unless buckets were given."""
        if self.buckets is None:
            self.buckets = default_buckets(capacity)

    def bucket(self, n: int) -> int:
        if self.buckets is None:
            return n
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"decode batch of {n} rows exceeds the largest bucket {self.buckets[-1]}")

    def _args(self, b: int, image_shape: tuple[int, int], key: jax.Array) -> tuple:
        """Zeros shaped like a decode of `b` rows (what `precompile` lowers with)."""
        ids, mask = self.encode_prompts(["warm up"])
        proprio = np.zeros((b, self.policy.cfg.proprio_dim), np.float32) if self.policy.cfg.proprio_dim else None
        return (self._params, key, np.zeros((b, self.num_images, *image_shape, 3), np.uint8), np.repeat(ids, b, 0),
                np.repeat(mask, b, 0), proprio, np.zeros(b, np.int32), np.zeros(b, np.int32), self._q01, self._q99)

    def precompile(self, image_shape: tuple[int, int], temperatures: Sequence[float]) -> None:
        """Compile the decode of every bucket at each temperature on a background thread (the largest
        bucket of the first temperature first: what a rollout calls first), while the simulators
        start and reset; `dispatch` then runs them without compiling (waiting for one still under
        way). The compiles also fill JAX's persistent compilation cache, if on. Needs fixed buckets."""
        if self.buckets is None:
            raise ValueError("precompile needs fixed buckets (give capacity or buckets)")
        key = jax.random.key(0)
        for t in dict.fromkeys(float(t) for t in temperatures):
            for b in sorted(self.buckets, reverse=True):
                if (t, b) not in self._ahead:
                    args = abstract(self._args(b, image_shape, key))
                    self._ahead.submit((t, b), lambda fn=self._fn(t), args=args: fn.lower(*args))

    def close(self) -> None:
        """Drop queued ahead-of-time compiles (one under way finishes on its own)."""
        self._ahead.close()

    def dispatch(self, inputs: DecodeInputs, *, temperature: float, key: jax.Array):
        """Issue the jitted call (returns at once: JAX async dispatch); `fetch` the handle later."""
        n = len(inputs)
        if n == 0:
            raise ValueError("PolicyDecoder.dispatch: empty batch")
        if inputs.images.dtype != np.uint8:
            raise TypeError(f"DecodeInputs.images must be uint8, got {inputs.images.dtype}")
        b = self.bucket(n)
        pad = (lambda x: x) if b == n else (lambda x: np.concatenate([x, np.repeat(x[:1], b - n, axis=0)]))
        proprio = pad(inputs.proprio) if self.policy.cfg.proprio_dim else None
        fn = self._ahead.get((float(temperature), b)) or self._fn(float(temperature))  # waits for one compiling
        tokens, logp = fn(
            self._params, key, pad(inputs.images), pad(inputs.input_ids), pad(inputs.attention_mask),
            proprio, pad(inputs.rows.astype(np.int32)), pad(inputs.calls.astype(np.int32)), self._q01, self._q99)
        return tokens, logp, n

    def fetch(self, handle) -> DecodeOutputs:
        tokens, logp, n = handle
        tokens = np.asarray(tokens)[:n]
        logp = np.asarray(logp)[:n]
        actions = self.policy.tokens_to_actions(tokens, self.unnorm_key, self.gripper).astype(np.float32)
        return DecodeOutputs(tokens=tokens, logp=logp, actions=actions)

    def warmup(self, image_shape: tuple[int, int], proprio_dim: int, temperatures: Sequence[float] = (1.6, 0.0),
               key: jax.Array | None = None) -> None:
        """Compile every bucket for each temperature now (e.g. before timing a rollout)."""
        if self.buckets is None:
            raise ValueError("warmup needs fixed buckets")
        key = jax.random.key(0) if key is None else key
        h, w = image_shape
        ids, mask = self.encode_prompts(["warm up"])
        for t in temperatures:
            for b in self.buckets:
                x = DecodeInputs(images=np.zeros((b, self.num_images, h, w, 3), np.uint8),
                                 input_ids=np.repeat(ids, b, 0), attention_mask=np.repeat(mask, b, 0),
                                 proprio=np.zeros((b, proprio_dim), np.float32),
                                 rows=np.arange(b, dtype=np.int32), calls=np.zeros(b, np.int32))
                self.fetch(self.dispatch(x, temperature=t, key=key))
