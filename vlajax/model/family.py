"""Policy families: what the rest of vlajax may ask of a policy without naming its kind.

A family is one package under `vlajax/model/` (`vlajax.model.oft`: SimpleVLA-OFT) that registers a
`PolicyFamily` here; a run picks it by `actor_rollout_ref.model.family`. The family says how its
policies are built or loaded (`PolicySpec`), what one update row holds (`batch_spec`), what a forward
costs (`flops_per_row`), which layers LoRA adapts by default, and how its checkpoints convert. Why a
registry of names: configs and checkpoints name a family as text, and `vlajax.config` must read them
without importing jax or any model.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["BatchField", "PolicyFamily", "PolicySpec", "SpecError", "family_names", "get_family",
           "register_family"]

# family name -> the module that registers it on import (so `get_family` imports only the one asked for)
_MODULES = {"oft": "vlajax.model.oft"}
_FAMILIES: dict[str, "PolicyFamily"] = {}


class SpecError(ValueError):
    """A policy that cannot be built as asked. `field` names the `PolicySpec` field (or the key of
    `PolicySpec.options`) at fault, so the caller can name its own config key."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """What a run asks of its policy, in terms every family understands.

    path: "preset:<name>" (a random init of a named size) or a checkpoint directory.
    num_images: camera images per observation; proprio_dim: robot-state inputs (None: none).
    chunk / action_dim: actions per policy call and their size (the simulator's).
    dataset_statistics: action (and proprio) statistics for a preset (a checkpoint brings its own).
    options: the family's own keys (`actor_rollout_ref.model.<key>`), e.g. OFT's `init_scheme`.
    """

    path: str
    num_images: int = 1
    proprio_dim: int | None = None
    chunk: int = 8
    action_dim: int = 7
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    image_size: int | None = None
    seed: int = 0
    dataset_statistics: dict | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BatchField:
    """One array of an update batch: `shape` per row (without the batch axis) and dtype."""

    shape: tuple[int, ...]
    dtype: np.dtype


class PolicyFamily(abc.ABC):
    """The interface a family implements (see the module docstring)."""

    name: str

    @abc.abstractmethod
    def load(self, spec: PolicySpec) -> Any:
        """The policy `spec` asks for: built from a preset or loaded from a checkpoint. Raises
        `SpecError` naming the field that does not fit."""

    @abc.abstractmethod
    def batch_spec(self, policy: Any, *, image_shape: tuple[int, int], prompt_width: int) -> dict[str, BatchField]:
        """The arrays one row of an update batch holds (an update compiles for exactly these)."""

    @abc.abstractmethod
    def flops_per_row(self, policy: Any, prompt_len: int) -> float:
        """Model FLOPs of one policy call on one observation (matmuls and attention)."""

    @property
    @abc.abstractmethod
    def lora_targets(self) -> str:
        """Regex over module paths: the layers LoRA adapts when the config names none."""

    @abc.abstractmethod
    def convert(self, src: Path, dst: Path, to: str | None = None, *, dtype: str = "float32",
                export_dtype: str | None = None) -> str:
        """Convert a checkpoint between the family's public format and vlajax's (`to`: "vlajax",
        the public format's name, or None to go the other way from what `src` is); a summary line."""


def register_family(family: PolicyFamily) -> PolicyFamily:
    """Make `family` selectable by its name (a family outside vlajax registers itself this way)."""
    _MODULES.setdefault(family.name, type(family).__module__)
    _FAMILIES[family.name] = family
    return family


def family_names() -> tuple[str, ...]:
    return tuple(_MODULES)


def get_family(name: str) -> PolicyFamily:
    """The family called `name` (its package imported on first use)."""
    if name not in _MODULES:
        raise KeyError(f"no policy family {name!r}; the families are {', '.join(family_names())}")
    if name not in _FAMILIES:
        importlib.import_module(_MODULES[name])
    return _FAMILIES[name]
