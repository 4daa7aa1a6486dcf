"""π0 as a `vlajax.model.family.PolicyFamily` (`actor_rollout_ref.model.family=pi0`): presets built
from scratch (`preset:pi0`, `preset:tiny`) or openpi checkpoints (params + norm stats, PaliGemma's
tokenizer from a path), the Flow-SDE actor (`actor.Pi0Actor`), LoRA on both Gemma experts, openpi's
checkpoint layout for conversion, adapters for the tabletop task and for LIBERO as openpi's client
meets it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlajax.model.family import HostPolicy, IOAdapter, PolicyFamily, PolicySpec, SpecError
from vlajax.model.layers import init_fan_in
from vlajax.model.pi0.actor import Pi0Actor, Pi0ActorConfig
from vlajax.model.pi0.config import PRESETS
from vlajax.model.pi0.tokenizer import Pi0Tokenizer

__all__ = ["Pi0Family", "Pi0Policy", "openpi_statistics"]


OPENPI_LIBERO_ASSET = "physical-intelligence/libero"  # openpi's pi0_libero norm stats
# a preset's random init (`actor_rollout_ref.model.init_scheme`): "normal" = N(0, 0.02) everywhere;
# "scratch" = fan-in kernels (`vlajax.model.layers.init_fan_in`), what RL from scratch needs
INIT_SCHEMES = ("normal", "scratch")


class Pi0Policy(HostPolicy):
    """The host side of a π0 policy (what `vlajax.model.oft.Policy` is to OFT): the actor's graph and
    parameters, the prompt tokenizer, openpi's normalisation statistics, chains -> env actions.

    dataset_statistics: {key: {"state": {"mean", "std"}, "actions": {"mean", "std"}}}, openpi's
    `norm_stats.json` per asset id (the key an `IOAdapter` names). π0 normalises with z-scores
    (openpi's `use_quantile_norm=False`): state (x - mean) / (std + 1e-6), actions back as
    a (std + 1e-6) + mean, over the dims the robot has (openpi pads both to the model's width)."""

    cfg: Pi0ActorConfig
    proprio_norm = "zscore"

    def __init__(self, actor: Pi0Actor, *, tokenizer, dataset_statistics: dict | None, compute_dtype=jnp.float32):
        super().__init__(actor)
        self.tokenizer = tokenizer
        self.dataset_statistics = dataset_statistics or {}
        self.compute_dtype = compute_dtype

    def _stats(self, key: str, part: str, dims: int) -> tuple[np.ndarray, np.ndarray]:
        if key not in self.dataset_statistics:
            raise KeyError(f"the policy has no statistics {key!r} (it has {', '.join(self.dataset_statistics) or 'none'})")
        st = self.dataset_statistics[key].get(part)
        if st is None or "mean" not in st or "std" not in st:
            raise KeyError(f"the policy's statistics {key!r} have no {part} mean / std")
        mean, std = np.asarray(st["mean"], np.float32), np.asarray(st["std"], np.float32)
        if mean.shape[-1] < dims:
            raise ValueError(f"the policy's {part} statistics {key!r} have {mean.shape[-1]} dims; the robot has {dims}")
        return mean[:dims], std[:dims]

    def proprio_stats(self, key: str):
        """(mean, std) of the robot state under `key`."""
        return self._stats(key, "state", self.cfg.proprio_dim) if self.cfg.proprio_dim else None

    def tokens_to_actions(self, samples, unnorm_key: str | None, gripper: str | None = None) -> np.ndarray:
        """(B, K + 1, H x A) chains -> (B, chunk, action_dim) env actions: the chain's end, its first
        `chunk` actions and `action_dim` dims, un-normalised with `unnorm_key`'s statistics (None: as
        the model made them). Not clipped: the simulator bounds its own actions (openpi's outputs are
        unclipped too)."""
        if gripper is not None:
            raise ValueError(f"π0 emits the robot's own gripper command; no {gripper!r} post-processing")
        c, m = self.cfg, self.cfg.model
        x0 = np.asarray(samples, np.float32)[:, -1].reshape(-1, m.action_horizon, m.action_dim)
        a = x0[:, :c.chunk, :c.action_dim]
        if unnorm_key:
            mean, std = self._stats(unnorm_key, "actions", c.action_dim)
            a = a * (std + 1e-6) + mean
        return a


def openpi_statistics(stats: dict | None) -> dict:
    """A simulator's scratch statistics (`dataset_statistics.json` layout: "action" / "proprio" with
    q01, q99, mask) as openpi's mean / std, so that z-scores map q01..q99 onto [-1, 1] as OFT's
    bounds do (masked-out action dims pass through)."""
    out = {}
    for key, st in (stats or {}).items():
        doc = {}
        for src, dst in (("proprio", "state"), ("action", "actions")):
            if src in st:
                lo, hi = np.asarray(st[src]["q01"], np.float32), np.asarray(st[src]["q99"], np.float32)
                keep = np.asarray(st[src].get("mask", [True] * lo.size), bool)
                doc[dst] = {"mean": np.where(keep, (hi + lo) / 2, 0.0).astype(np.float32),
                            "std": np.where(keep, (hi - lo) / 2, 1.0).astype(np.float32)}
        out[key] = doc
    return out


def default_tokenizer_path() -> Path:
    """Where openpi caches PaliGemma's tokenizer (`openpi.shared.download`: $OPENPI_DATA_HOME, else
    ~/.cache/openpi)."""
    home = os.environ.get("OPENPI_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "openpi")
    return Path(home) / "big_vision" / "paligemma_tokenizer.model"


class Pi0Family(PolicyFamily):
    name = "pi0"
    adapters = {
        # built-in tabletop: upright frames, the gripper as decoded, the simulator's own statistics
        "tabletop": IOAdapter(image_flip=False, gripper=None, stats_key="tabletop"),
        # openpi's LIBERO client (examples/libero/main.py): frames rotated 180°, the gripper command
        # as the model makes it, pi0_libero's norm stats
        "libero": IOAdapter(image_flip=True, gripper=None, stats_key=OPENPI_LIBERO_ASSET),
    }
    eval_configs = {"libero": "pi0_libero_grpo", "tabletop": "pi0_tabletop"}
    options = ("init_scheme", "num_steps", "noise_level", "action_horizon", "tokenizer_path", "greedy_chain",
               "greedy_from_noise")

    def recognizes(self, path: Path) -> bool:
        """openpi's layout: params/ (and assets/), no model config file beside them."""
        path = Path(path)
        return (path / "params").is_dir() and not any(path.glob("*.json"))

    def load(self, spec: PolicySpec) -> Pi0Policy:
        opts = spec.options
        if spec.path.startswith("preset:"):
            name = spec.path.split(":", 1)[1]
            if name not in PRESETS:
                raise SpecError(f"no π0 preset {name!r}; the presets are {', '.join(PRESETS)}", "path")
            from vlajax.model.tokenizer import load_tokenizer

            tokenizer = load_tokenizer("tiny")  # a preset trains from scratch: vlajax's own prompt tokenizer
            base = PRESETS[name]
            vision = dataclasses.replace(base.vision, image_size=spec.image_size or base.vision.image_size)
            width = max(base.action_dim, spec.action_dim, spec.proprio_dim or 0)
            model = dataclasses.replace(base, vision=vision, num_images=spec.num_images, action_dim=width,
                                        action_horizon=opts.get("action_horizon") or spec.chunk,
                                        vocab_size=max(base.vocab_size, 32_064))
            params, stats = None, openpi_statistics(spec.dataset_statistics)
        else:
            path = Path(spec.path)
            if not (path / "params").is_dir():
                raise SpecError(f"{path} is not an openpi checkpoint (it has no params/ directory)", "path")
            from vlajax.model.pi0.checkpoint import asset_ids, read_norm_stats, read_params
            from vlajax.model.pi0.openpi_convert import config_from_params

            params = read_params(path)
            model = config_from_params(params, action_horizon=opts.get("action_horizon") or 50,
                                       num_images=spec.num_images)
            if spec.image_size not in (None, model.vision.image_size):
                raise SpecError(f"the checkpoint {path} sees {model.vision.image_size} px images", "image_size")
            tokenizer = Pi0Tokenizer(_tokenizer_path(opts), max_len=model.max_token_len)
            stats = {a: read_norm_stats(path, a) for a in asset_ids(path)}
        try:
            model.validate()
            cfg = Pi0ActorConfig(model=model, chunk=spec.chunk, action_dim=spec.action_dim,
                                 proprio_dim=spec.proprio_dim, num_steps=int(opts.get("num_steps", 10)),
                                 noise_level=float(opts.get("noise_level", 0.5)),
                                 greedy_chain=str(opts.get("greedy_chain", "ode")),
                                 greedy_from_noise=bool(opts.get("greedy_from_noise", True)))
        except ValueError as e:
            msg = str(e)
            field = ("image_size" if "image size" in msg else "num_steps" if "num_steps" in msg
                     else "noise_level" if "noise_level" in msg else "greedy_chain" if "greedy_chain" in msg else "proprio_dim" if "robot state" in msg else "chunk")
            raise SpecError(msg, field) from None
        dtype = jnp.dtype(spec.param_dtype)
        if params is None:
            actor = Pi0Actor(cfg, nnx.Rngs(spec.seed))
            scheme = opts.get("init_scheme", "normal")
            if scheme not in INIT_SCHEMES:
                raise SpecError(f"{scheme!r} is not one of {', '.join(INIT_SCHEMES)}", "init_scheme")
            if scheme == "scratch":  # openpi's own inits: lecun-normal kernels, tables at unit RMS once scaled
                init_fan_in(actor.pi0, spec.seed, tables={"pos_embed": model.vision.width ** -0.5,
                                                          "embedding": model.llm.width ** -0.5})
        else:  # openpi's weights over an abstract model: nothing random is drawn for a 3B model
            from vlajax.model.pi0.openpi_convert import from_openpi

            actor = nnx.eval_shape(lambda: Pi0Actor(cfg, nnx.Rngs(0)))
            state = nnx.state(actor)
            nnx.replace_by_pure_dict(state, {"pi0": jax.tree.map(jnp.asarray, from_openpi(params, model))})
            nnx.update(actor, state)
        state = nnx.state(actor)
        if any(x.dtype != dtype for x in jax.tree.leaves(state)):
            nnx.update(actor, jax.tree.map(lambda x: x.astype(dtype), state))
        return Pi0Policy(actor, tokenizer=tokenizer, dataset_statistics=stats, compute_dtype=jnp.dtype(spec.compute_dtype))

    def load_checkpoint(self, path: Path, *, param_dtype: str = "float32", compute_dtype: str = "bfloat16",
                        num_images: int = 1, spec: PolicySpec | None = None):
        """An openpi checkpoint, run as `spec` asks (the actions a run executes are the run's)."""
        if spec is None:
            raise SpecError(f"{path}: a π0 checkpoint is run as a run config asks (chunk, action dims)", "path")
        return self.load(dataclasses.replace(spec, path=str(path), param_dtype=param_dtype, compute_dtype=compute_dtype,
                                             num_images=num_images))

    def flops_per_row(self, policy: Pi0Policy, prompt_len: int) -> float:
        """The matmul FLOPs of one call: the towers and the prefix once, the suffix once per denoising step."""
        m, c = policy.cfg.model, policy.cfg
        v, llm, ex = m.vision, m.llm, m.expert

        def gemma(g, tokens: int, keys: int) -> float:
            proj = 2 * g.width * (g.num_heads + 2 * g.num_kv_heads) * g.head_dim + 2 * g.num_heads * g.head_dim * g.width
            mlp = 3 * 2 * g.width * g.mlp_dim
            attn = 2 * 2 * g.num_heads * g.head_dim * keys
            return g.depth * tokens * (proj + mlp + attn)

        n_img = m.num_images * v.num_patches
        vit = m.num_images * v.num_patches * v.depth * (2 * 4 * v.width * v.width + 2 * 2 * v.width * v.mlp_dim)
        prefix = n_img + prompt_len
        suffix = 1 + m.action_horizon
        return float(vit + gemma(llm, prefix, prefix) + c.num_steps * gemma(ex, suffix, prefix + suffix))

    @property
    def lora_targets(self) -> str:
        return Pi0Actor.LORA_TARGETS

    def convert(self, src: Path, dst: Path, to: str | None = None, *, dtype: str = "float32",
                export_dtype: str | None = None) -> str:
        """openpi checkpoint -> openpi checkpoint through vlajax's parameters (a check that they carry
        over exactly; vlajax keeps π0 runs' weights in openpi's layout)."""
        from vlajax.model.pi0.checkpoint import asset_ids, read_norm_stats, read_params, write_checkpoint
        from vlajax.model.pi0.openpi_convert import config_from_params, from_openpi, to_openpi

        if to is not None:
            raise ValueError(f"π0 checkpoints stay in openpi's layout: --to {to} does not apply to --family pi0")
        params = read_params(src)
        cfg = config_from_params(params)
        stats = {a: read_norm_stats(src, a) for a in asset_ids(src)}
        write_checkpoint(dst, to_openpi(from_openpi(params, cfg), cfg), stats)
        n = sum(np.size(x) for x in jax.tree.leaves(params))
        return f"converted {src} -> {dst} (openpi layout); {n:,} parameters"


def _tokenizer_path(opts) -> Path:
    path = Path(opts["tokenizer_path"]) if opts.get("tokenizer_path") else default_tokenizer_path()
    if not path.is_file():
        raise SpecError(f"π0's tokenizer {path} does not exist (PaliGemma's SentencePiece model: openpi caches it as "
                        "big_vision/paligemma_tokenizer.model)", "tokenizer_path")
    return path
