"""SimpleVLA-OFT as a `vlajax.model.family.PolicyFamily`: presets or HF / vlajax checkpoints (update
rows of 256-bin action tokens: `OFTConfig.sample_dtype`), its FLOP count, LoRA on the LLM, HF conversion."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from vlajax.model.family import IOAdapter, PolicyFamily, PolicySpec, SpecError

__all__ = ["OFTFamily"]

OPTIONS = {"init_scheme": "normal", "action_queries": False}  # `actor_rollout_ref.model.<key>` this family reads


class OFTFamily(PolicyFamily):
    name = "oft"
    adapters = {
        # OpenVLA-OFT's LIBERO checkpoints: frames rotated as in their data, gripper [0, 1] -> +-1,
        # actions un-normalised with the suite's statistics (`libero_10` -> `libero_10_no_noops`)
        "libero": IOAdapter(image_flip=True, gripper="libero", stats_key="suite"),
        # trained from scratch here: upright frames, gripper as decoded, the simulator's own statistics
        "tabletop": IOAdapter(image_flip=False, gripper=None, stats_key="tabletop"),
        "isaac": IOAdapter(image_flip=False, gripper=None, stats_key=None),
    }

    def load(self, spec: PolicySpec):
        opts = {**OPTIONS, **spec.options}
        policy = self._build(spec, opts) if spec.path.startswith("preset:") else self._load(spec, opts)
        if (policy.cfg.chunk, policy.cfg.action_dim) != (spec.chunk, spec.action_dim):
            raise SpecError(f"the policy {spec.path} decodes {policy.cfg.chunk} actions of {policy.cfg.action_dim} "
                            f"dims per call, not {spec.chunk} of {spec.action_dim}", "chunk")
        return policy

    @staticmethod
    def _build(spec: PolicySpec, opts: dict):
        from vlajax.model.oft.config import preset
        from vlajax.model.oft.init import apply_init
        from vlajax.model.oft.pretrained import Policy, build_model
        from vlajax.model.tokenizer import load_tokenizer

        kw = {"num_images": spec.num_images, "proprio_dim": spec.proprio_dim, "action_queries": opts["action_queries"]}
        if spec.image_size:
            kw["image_size"] = spec.image_size
        mcfg = preset(spec.path.split(":", 1)[1], **kw)
        model = build_model(mcfg, seed=spec.seed, dtype=jnp.dtype(spec.param_dtype))
        apply_init(model, opts["init_scheme"], seed=spec.seed)
        return Policy(model, tokenizer=load_tokenizer("tiny"), compute_dtype=jnp.dtype(spec.compute_dtype),
                      dataset_statistics=spec.dataset_statistics)

    options = ("init_scheme", "action_queries")

    def recognizes(self, path: Path) -> bool:
        from vlajax.model.oft.pretrained import MARKER

        return (Path(path) / "config.json").is_file() or (Path(path) / MARKER).is_file()

    def load_checkpoint(self, path: Path, *, param_dtype: str = "float32", compute_dtype: str = "bfloat16",
                        num_images: int = 1, spec: PolicySpec | None = None):
        """An HF OpenVLA-OFT directory or a vlajax policy checkpoint."""
        from vlajax.model.oft.pretrained import load_pretrained

        return load_pretrained(path, dtype=param_dtype, compute_dtype=compute_dtype, num_images=num_images)

    def _load(self, spec: PolicySpec, opts: dict):
        path = Path(spec.path)
        if not path.exists():
            raise SpecError(f"checkpoint {path} does not exist", "path")
        policy = self.load_checkpoint(path, param_dtype=spec.param_dtype, compute_dtype=spec.compute_dtype,
                                      num_images=spec.num_images)
        if policy.tokenizer is None:
            raise SpecError(f"{path} has no tokenizer.json / tokenizer.model", "path")
        has = policy.cfg.proprio_dim is not None
        if has != (spec.proprio_dim is not None):
            raise SpecError(f"the checkpoint {path} {'has' if has else 'has no'} proprio projector", "proprio_dim")
        if policy.cfg.action_queries != opts["action_queries"]:
            raise SpecError(f"the checkpoint {path} {'has' if policy.cfg.action_queries else 'has no'} action "
                            f"queries", "action_queries")
        return policy

    def flops_per_row(self, policy, prompt_len: int) -> float:
        from vlajax.model.oft.flops import forward_flops

        return forward_flops(policy.cfg, 1, prompt_len)

    @property
    def lora_targets(self) -> str:
        from vlajax.model.oft.policy import OpenVLAOFT

        return OpenVLAOFT.LORA_TARGETS

    def convert(self, src: Path, dst: Path, to: str | None = None, *, dtype: str = "float32",
                export_dtype: str | None = None) -> str:
        """HF OpenVLA-OFT directory <-> vlajax policy checkpoint (`to`: "vlajax" or "hf")."""
        from vlajax.model.oft.pretrained import MARKER, load_pretrained

        to = to or ("hf" if (src / MARKER).exists() else "vlajax")
        policy = load_pretrained(src, dtype=dtype)
        if to == "vlajax":
            policy.save(dst)
        else:
            policy.export_hf(dst, dtype=export_dtype)
        n = sum(x.size for x in jax.tree.leaves(policy.params()))
        return (f"converted {src} -> {dst} ({to}); {n:,} parameters used by the model"
                + (f", {len(policy.unused)} unused tensors kept" if policy.unused else ""))
