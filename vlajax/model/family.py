"""Policy families: what the rest of vlajax may ask of a policy without naming its kind.

A family is one package under `vlajax/model/` (`vlajax.model.oft`: SimpleVLA-OFT) that registers a
`PolicyFamily` here; a run picks it by `actor_rollout_ref.model.family`. The family says how its
policies are built or loaded (`PolicySpec`), what one update row holds (`batch_spec`), what a forward
costs (`flops_per_row`), which layers LoRA adapts by default, and how its checkpoints convert. Its
model (an nnx module) samples actions and scores them (`ActionModel`): the decoder and the learner
call only that. Why a registry of names: configs and checkpoints name a family as text, and
`vlajax.config` must read them without importing jax or any model.

What a policy samples per call is T = chunk x action_dim elements in the layout
`[step0: dim0..dimA-1, step1: ...]`, each with its own log-prob (OFT: 256-bin tokens; a Gaussian
family: one float per action dim). The rollout stores them as `tokens`, the loss weighs their
log-probs, and the validity mask (`vlajax.rl.samples`) cuts them at the env step they belong to,
whatever their dtype (`cfg.sample_dtype`).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import logging
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

__all__ = ["ActionModel", "BatchField", "HostPolicy", "IOAdapter", "PolicyFamily", "PolicySpec", "SpecError", "family_names", "get_family",
           "register_family"]

# family name -> the module that registers it on import (so `get_family` imports only the one asked for)
_MODULES = {"oft": "vlajax.model.oft", "pi0": "vlajax.model.pi0"}
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


@dataclasses.dataclass(frozen=True)
class IOAdapter:
    """How a family's policies meet one simulator's cameras and robot (openpi pairs a model with a
    robot the same way in `policies/libero_policy.py`): what the policy was trained to see and to
    emit there, which the simulator itself does not decide.

    image_flip: rotate frames 180° before the policy sees them (OpenVLA's LIBERO data is upside-down).
    gripper: how the decoded gripper action becomes the robot's command (`vlajax.model.oft.actions`:
        "libero" = [0, 1] open..close -> LIBERO's +-1), None = as decoded.
    stats_key: which `dataset_statistics.json` entry un-normalises actions: "suite" = the suite's own,
        which a policy with statistics must have (LIBERO checkpoints: `libero_10` ->
        `libero_10_no_noops`); another string = that entry where the policy has it (a policy trained
        from scratch gets the simulator's statistics under it); None = identity.
    """

    image_flip: bool = False
    gripper: str | None = None
    stats_key: str | None = None

    def unnorm_key(self, suite: str, dataset_statistics: dict | None) -> str | None:
        """The statistics key a policy's actions are un-normalised with here (None: identity)."""
        if not dataset_statistics or self.stats_key is None:
            return None
        if self.stats_key == "suite":
            return suite  # a missing entry is the policy's error, raised by its decoder
        if self.stats_key not in dataset_statistics:
            logging.getLogger(__name__).warning(
                "the policy has no statistics %r (it has %s): its actions and robot state are not normalised",
                self.stats_key, ", ".join(map(str, dataset_statistics)))
            return None
        return self.stats_key


class ActionModel(Protocol):
    """What the decoder (`vlajax.rl.policy_step`) and the learner (`vlajax.rl.learner`) call on a
    family's model, merged from its parameters inside their jitted functions.

    Inputs, for B policy calls: pixel_values (B, ...) float32 as its `preprocess_images` makes them; input_ids / attention_mask (B, P) int32 prompt ids; proprio
    (B, D) float32 normalised robot state, or None. Its `cfg` has chunk, action_dim,
    num_action_tokens (T = chunk x action_dim), num_images, image_size, proprio_dim and sample_dtype, and
    may have sample_shape: what one call samples (default (T,); a flow policy keeps its denoising
    chain, so the learner can score every step), of which `log_prob` scores T elements.
    """

    def preprocess_images(self, images, *, flip: bool, center_crop: bool, crop_offsets=None):
        """uint8 camera frames (B, n_img, H, W, 3) -> the `pixel_values` this model reads (flip: rotate
        180° first; center_crop / crop_offsets: OFT's evaluation crop or its training crops)."""

    def sample_actions(self, pixel_values, input_ids, attention_mask, proprio, keys, *, temperature: float,
                       dtype) -> tuple[Any, Any]:
        """(samples (B, T) of `cfg.sample_dtype`, their log-probs (B, T) float32) at `temperature`,
        row b drawn with `keys[b]`; the distribution's mode when `temperature == 0` (log-probs then at
        temperature 1)."""

    def log_prob(self, pixel_values, input_ids, attention_mask, proprio, samples, *, temperature: float,
                 dtype) -> tuple[Any, Any, Any]:
        """(logp, entropy, mode), each (B, T): the log-probs of `samples` at `temperature` (exactly what
        `sample_actions` gave for them), each element's entropy, and the distribution's mode."""


class HostPolicy:
    """What a family's host-side policy shares: its model kept split as (graphdef, state), the source of
    truth the decoder and the learner read (merging per access is cheap, collecting state is not).
    `proprio_norm` names how the robot state is normalised with the two arrays `proprio_stats(key)`
    gives (`vlajax.model.preprocess.PROPRIO_NORMS`)."""

    proprio_norm = "bounds"

    # flax imported in the methods: `vlajax.config` imports this module without jax
    def __init__(self, model: Any):
        self.set_model(model)

    @property
    def model(self) -> Any:
        """A module view of the current state (shares its arrays); hand a changed one back with `set_model`."""
        from flax import nnx

        return nnx.merge(self.graphdef, self.state)

    def set_model(self, model: Any) -> None:
        from flax import nnx

        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg

    def params(self) -> dict:
        from flax import nnx

        return nnx.to_pure_dict(nnx.filter_state(self.state, nnx.Param))


class PolicyFamily(abc.ABC):
    """The interface a family implements (see the module docstring)."""

    name: str
    adapters: Mapping[str, IOAdapter] = {}  # simulator name (`env.train.simulator_type`) -> its adapter
    # the `actor_rollout_ref.model` keys this family reads (`PolicySpec.options`); another one set away
    # from its default is a config error. None: the family does not say (it is given them all)
    options: tuple[str, ...] | None = None
    # simulator name -> the config (`configs/<name>.yaml`) `vlajax eval` runs this family's checkpoints
    # with there; a simulator not named: its own `eval_config`
    eval_configs: Mapping[str, str] = {}

    def recognizes(self, path: Path) -> bool:
        """Whether `path` is a checkpoint in this family's own format (so `vlajax eval` picks the
        family without being told)."""
        return False

    def adapter(self, simulator: str) -> IOAdapter:
        """How this family's policies meet `simulator`; a `SpecError` if they have never met."""
        if simulator not in self.adapters:
            raise SpecError(f"the {self.name} policy family has no input/output adapter for the {simulator} simulator "
                            f"(it has {', '.join(self.adapters) or 'none'})", "simulator")
        return self.adapters[simulator]

    @abc.abstractmethod
    def load(self, spec: PolicySpec) -> Any:
        """The policy `spec` asks for: built from a preset or loaded from a checkpoint. Raises
        `SpecError` naming the field that does not fit."""

    @abc.abstractmethod
    def load_checkpoint(self, path: Path, *, param_dtype: str = "float32", compute_dtype: str = "bfloat16",
                        num_images: int = 1, spec: PolicySpec | None = None) -> Any:
        """The policy a checkpoint directory holds, as it is (an evaluation takes what it finds;
        `load` checks it against a run's spec). `spec`: the evaluation run's, for what a checkpoint
        does not say (π0's executed chunk and action dims)."""

    def batch_spec(self, policy: Any, *, image_shape: tuple[int, int], prompt_width: int) -> dict[str, BatchField]:
        """The arrays one row of an update batch holds (an update compiles for exactly these): the
        frames as the simulator gave them, the prompt, the T samples (`cfg.sample_dtype`) with their
        behaviour log-probs, advantages and mask, and the robot state if the policy reads it."""
        c = policy.cfg
        t = (c.num_action_tokens,)
        spec = {"images": BatchField((c.num_images, *image_shape, 3), np.dtype(np.uint8)),
                "input_ids": BatchField((prompt_width,), np.dtype(np.int32)),
                "attention_mask": BatchField((prompt_width,), np.dtype(np.int32)),
                "tokens": BatchField(tuple(getattr(c, "sample_shape", t)), np.dtype(c.sample_dtype)),
                "old_logp": BatchField(t, np.dtype(np.float32)),
                "advantages": BatchField(t, np.dtype(np.float32)),
                "mask": BatchField(t, np.dtype(np.float32))}
        if c.proprio_dim:
            spec["proprio"] = BatchField((c.proprio_dim,), np.dtype(np.float32))
        return spec

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
