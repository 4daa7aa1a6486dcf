"""π0 as a `vlajax.model.family.PolicyFamily` (`actor_rollout_ref.model.family=pi0`): presets built
from scratch (`preset:pi0`, `preset:tiny`), the Flow-SDE actor (`actor.Pi0Actor`), LoRA on both
Gemma experts, openpi's checkpoint layout for conversion."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlajax.model.family import HostPolicy, IOAdapter, PolicyFamily, PolicySpec, SpecError
from vlajax.model.pi0.actor import Pi0Actor, Pi0ActorConfig
from vlajax.model.pi0.config import PRESETS

__all__ = ["Pi0Family", "Pi0Policy"]


class Pi0Policy(HostPolicy):
    """The host side of a π0 policy (what `vlajax.model.oft.Policy` is to OFT): the actor's graph and
    parameters, the prompt tokenizer, action statistics, chains -> env actions."""

    cfg: Pi0ActorConfig

    def __init__(self, actor: Pi0Actor, *, tokenizer, dataset_statistics: dict | None, compute_dtype=jnp.float32):
        super().__init__(actor)
        self.tokenizer = tokenizer
        self.dataset_statistics = dataset_statistics or {}
        self.compute_dtype = compute_dtype

    def _stats(self, key: str) -> dict:
        if key not in self.dataset_statistics:
            raise KeyError(f"the policy has no statistics {key!r} (it has {', '.join(self.dataset_statistics) or 'none'})")
        return self.dataset_statistics[key]

    def proprio_stats(self, key: str):
        stats = self._stats(key).get("proprio")
        return (np.asarray(stats["q01"], np.float32), np.asarray(stats["q99"], np.float32)) if stats else None

    def tokens_to_actions(self, samples, unnorm_key: str | None, gripper: str | None = None) -> np.ndarray:
        """(B, K + 1, H x A) chains -> (B, chunk, action_dim) env actions: the chain's end, clipped to
        [-1, 1], mapped onto the statistics' q01..q99 where their mask says so."""
        if gripper is not None:
            raise ValueError(f"π0 emits the robot's own gripper command; no {gripper!r} post-processing")
        c, m = self.cfg, self.cfg.model
        x0 = np.asarray(samples, np.float32)[:, -1].reshape(-1, m.action_horizon, m.action_dim)
        a = np.clip(x0[:, :c.chunk, :c.action_dim], -1.0, 1.0)
        if unnorm_key:
            st = self._stats(unnorm_key)["action"]
            lo, hi = np.asarray(st["q01"], np.float32), np.asarray(st["q99"], np.float32)
            mask = np.asarray(st.get("mask", [True] * c.action_dim), bool)
            a = np.where(mask, 0.5 * (a + 1.0) * (hi - lo) + lo, a)
        return a


class Pi0Family(PolicyFamily):
    name = "pi0"
    adapters = {
        # built-in tabletop: upright frames, the gripper as decoded, the simulator's own statistics
        "tabletop": IOAdapter(image_flip=False, gripper=None, stats_key="tabletop"),
    }

    def load(self, spec: PolicySpec) -> Pi0Policy:
        if not spec.path.startswith("preset:"):
            raise SpecError(f"{spec.path}: π0 runs from openpi checkpoints are not wired into training yet "
                            f"(vlajax.model.pi0.checkpoint reads them); use preset:{' or preset:'.join(PRESETS)}",
                            "path")
        name = spec.path.split(":", 1)[1]
        if name not in PRESETS:
            raise SpecError(f"no π0 preset {name!r}; the presets are {', '.join(PRESETS)}", "path")
        from vlajax.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer("tiny")  # a preset trains from scratch: vlajax's own prompt tokenizer
        base = PRESETS[name]
        vision = dataclasses.replace(base.vision, image_size=spec.image_size or base.vision.image_size)
        width = max(base.action_dim, spec.action_dim, spec.proprio_dim or 0)
        model = dataclasses.replace(base, vision=vision, num_images=spec.num_images, action_dim=width,
                                    action_horizon=spec.chunk, vocab_size=max(base.vocab_size, 32_064))
        try:
            model.validate()
            cfg = Pi0ActorConfig(model=model, chunk=spec.chunk, action_dim=spec.action_dim,
                                 proprio_dim=spec.proprio_dim)
        except ValueError as e:
            raise SpecError(str(e), "image_size" if "image size" in str(e) else "chunk") from None
        actor = Pi0Actor(cfg, nnx.Rngs(spec.seed))
        dtype = jnp.dtype(spec.param_dtype)
        if dtype != jnp.float32:
            state = nnx.state(actor)
            nnx.update(actor, jax.tree.map(lambda x: x.astype(dtype), state))
        return Pi0Policy(actor, tokenizer=tokenizer, dataset_statistics=spec.dataset_statistics,
                         compute_dtype=jnp.dtype(spec.compute_dtype))

    def load_checkpoint(self, path: Path, *, param_dtype: str = "float32", compute_dtype: str = "bfloat16",
                        num_images: int = 1):
        raise SpecError(f"{path}: evaluating π0 checkpoints is not wired in yet (issue #26 part 3)", "path")

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
        from vlajax.model.pi0.checkpoint import read_norm_stats, read_params, write_checkpoint
        from vlajax.model.pi0.openpi_convert import config_from_params, from_openpi, to_openpi

        if to is not None:
            raise ValueError(f"π0 checkpoints stay in openpi's layout: --to {to} does not apply to --family pi0")
        params = read_params(src)
        cfg = config_from_params(params)
        assets = Path(src) / "assets"
        stats = {p.name: read_norm_stats(src, p.name) for p in sorted(assets.iterdir())} if assets.is_dir() else {}
        write_checkpoint(dst, to_openpi(from_openpi(params, cfg), cfg), stats)
        n = sum(np.size(x) for x in jax.tree.leaves(params))
        return f"converted {src} -> {dst} (openpi layout); {n:,} parameters"
