"""LoRA for a policy's model: adapt chosen Linear layers (by default the model class's `LORA_TARGETS`:
OpenVLA-OFT's LLM), train only the adapters, merge to export.

A LoRA layer computes y = x W + (alpha / r) * (x A) B with A (in, r) random, B (r, out) zero, so an
adapted policy starts with exactly the base policy's outputs (`vlajax.model.layers.Linear.enable_lora`).
Adapters are `nnx.LoRAParam` (a subclass of `nnx.Param`): `trainable_filter` selects them, and
everything else (`frozen_filter`) is left out of the gradient and the optimizer state, so the learner
can keep it in bf16 (2 B/param instead of 16; see `vlajax.rl.learner`).

Targets are chosen by a regular expression over the module path, dot-joined, e.g.
"llm.layers.3.q_proj" or "featurizer.blocks.0.qkv"; the default is every Linear of the LLM
(q/k/v/o/gate/up/down in every layer), as PEFT's `target_modules="all-linear"` on the Llama part.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import jax
from flax import nnx

from vlajax.model.layers import Linear

__all__ = [
    "LoraConfig", "apply_lora", "default_targets", "with_lora", "has_lora", "lora_modules", "merge_lora",
    "merged_policy", "trainable_filter", "frozen_filter", "count_params",
]

@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r), targets (a regex `re.fullmatch`-ed against
    the dot-joined module path; None: the model's own default, its class's `LORA_TARGETS`), seed
    (init of the A matrices)."""

    rank: int = 32
    alpha: float = 32.0
    targets: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")
        try:
            re.compile(self.targets or "")
        except re.error as e:
            raise ValueError(f"LoraConfig.targets {self.targets!r} is not a valid regex: {e}") from None


def _name(path) -> str:
    return ".".join(str(p) for p in path)


def default_targets(model: nnx.Module) -> str:
    """The layers a model's family adapts when none are named (`LORA_TARGETS` of its class)."""
    targets = getattr(type(model), "LORA_TARGETS", None)
    if targets is None:
        raise ValueError(f"{type(model).__name__} names no default LoRA targets (LORA_TARGETS): give LoraConfig.targets")
    return targets


def lora_modules(model: nnx.Module, targets: str | None = None) -> dict[str, Linear]:
    """Linear layers whose dot-joined path fully matches `targets` (None: the model's default), by
    name (in model order)."""
    pattern = re.compile(targets if targets is not None else default_targets(model))
    return {_name(p): m for p, m in nnx.iter_modules(model)
            if isinstance(m, Linear) and pattern.fullmatch(_name(p))}


def apply_lora(model: nnx.Module, cfg: LoraConfig = LoraConfig()) -> list[str]:
    """Add LoRA adapters in place to the targeted Linear layers; returns their names.

    Raises ValueError if the regex matches no Linear layer (naming a few that exist) or if a layer
    already has an adapter. After this the model's graph changes: to adapt a `Policy`, use
    `with_lora`."""
    targets = cfg.targets if cfg.targets is not None else default_targets(model)
    mods = lora_modules(model, targets)
    if not mods:
        kinds = sorted({re.sub(r"\.\d+\.", ".<i>.", _name(p)) for p, m in nnx.iter_modules(model)
                        if isinstance(m, Linear)})
        raise ValueError(f"LoRA targets {targets!r} match no Linear layer; the Linear layers are {kinds}")
    rngs = nnx.Rngs(cfg.seed)
    for name, m in mods.items():
        if m.lora_a is not None:
            raise ValueError(f"{name} already has a LoRA adapter")
        m.enable_lora(cfg.rank, cfg.alpha, rngs)
    return list(mods)


def with_lora(policy, cfg: LoraConfig | None):
    """`policy` (a family's `Policy`, e.g. `vlajax.model.oft.Policy`) with adapters per `cfg`, or `policy` itself for None.

    The one place a policy gets LoRA: a run's policy (`vlajax.session.build_policy`, which training
    and evaluation both use) comes through here, before a learner or a decoder sees it, so both work
    on the same graph. Returns a new Policy sharing the base arrays; `policy` is left as it is."""
    if cfg is None:
        return policy
    model = policy.model  # a view over the same arrays
    apply_lora(model, cfg)
    out = copy.copy(policy)
    out.set_model(model)
    return out


def has_lora(model_or_state) -> bool:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return len(jax.tree.leaves(nnx.filter_state(state, nnx.LoRAParam))) > 0


def trainable_filter(lora: bool):
    """nnx filter of the trained parameters: the adapters with LoRA, every Param without."""
    return nnx.LoRAParam if lora else nnx.Param


def frozen_filter(lora: bool):
    """Complement of `trainable_filter` (Params that are not adapters; nothing without LoRA)."""
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)) if lora else nnx.Nothing


def merge_lora(model: nnx.Module) -> int:
    """Fold every adapter into its kernel in place (W += alpha/r * A B, in fp32, cast back to W's
    dtype) and remove it. Returns the number of merged layers."""
    n = 0
    for _, m in nnx.iter_modules(model):
        if isinstance(m, Linear) and m.lora_a is not None:
            m.merge_lora()
            n += 1
    return n


def merged_policy(policy):
    """A copy of `policy` (a family's `Policy`, e.g. `vlajax.model.oft.Policy`) with LoRA merged: plain Params only, ready for
    `Policy.save` / `export_hf`. The input policy is left as it is."""
    state = jax.tree.map(lambda x: x, policy.state)  # new Variables: merging must not touch the input
    model = nnx.merge(policy.graphdef, state)
    merge_lora(model)
    for _, m in nnx.iter_modules(model):
        if hasattr(m, "remat"):
            m.remat = False
    out = copy.copy(policy)
    out.set_model(model)
    return out


def count_params(state, filt=nnx.Param) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.filter_state(state, filt))))
