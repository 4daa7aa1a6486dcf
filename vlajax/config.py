"""The typed configuration of a GRPO run, with verl's key names, loaded from YAML + dotted overrides.

Why verl's names: a user of verl's VLA recipe (`rob_ppo_trainer.yaml`, `run_simpleVLA_libero_grpo.sh`)
or of SimpleVLA-RL can carry a run over key by key, e.g.

    vlajax train configs/libero_grpo.yaml actor_rollout_ref.rollout.n=8 env.train.num_envs=16 \\
        env.rollout.pipeline_stage_num=2 trainer.total_training_steps=100

The schema is a tree of frozen dataclasses (OmegaConf "structured config"): `load_config` merges a
YAML file and `key=value` overrides onto it (OmegaConf rejects unknown keys and values of the wrong
type), resolves `${...}` interpolations, checks the combinations (`validate`) and returns the
dataclass tree, so consumers read plain typed attributes (`cfg.actor_rollout_ref.rollout.n`) and never
need OmegaConf. Every error is a `ConfigError` that names the key.

Defaults are the SimpleVLA-RL LIBERO recipe (openvla_oft.md §6) with verl's spellings
(verl_vla_recipe.md §4). Where the two disagree on units, this file says which one it follows.
Keys that are vlajax's own (verl has no equivalent) are marked "vlajax:" in the field comments:
`data.max_sampling_rounds`, `data.keep_excess_groups`, `data.val_num_trials_per_task`,
`actor_rollout_ref.model.{param_dtype,compute_dtype,image_size}`, `env.train.num_trials_per_task`
(SimpleVLA-RL has it under `data.`), `env.train.init_states`, `trainer.resume` (verl: `resume_mode` +
`resume_from_path`), `trainer.mesh.*`, `ray.*`.

The YAML files ship inside the package (`vlajax/configs/*.yaml`; the repository's `configs/` is a
link to that folder), so `load_config("libero_grpo")` works from an installed wheel too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib.resources
import os
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from vlajax.distributed.placement import Colocated, Disaggregated, InProcess, Placement  # no Ray import
from vlajax.envs import simulators
from vlajax.envs.gl import BACKENDS as GL_BACKENDS  # no GL import
from vlajax.rl.advantages import ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS  # numpy only
from vlajax.rl.data import INIT_STATES  # numpy only

__all__ = [
    "ConfigError", "RunConfig", "load_config", "from_dict", "validate", "save_config", "to_dict", "flatten",
    "config_diff", "packaged_configs", "DEFAULT_CONFIG", "LOGGERS", "MODEL_PRESETS",
]

DEFAULT_CONFIG = "demo"  # what `vlajax train` runs without arguments
CONFIG_FILE = "config.yaml"  # name written by `save_config` in the run directory
LOGGERS = ("console", "tensorboard", "jsonl", "wandb")
# Names of `vlajax.model.oft.config.PRESETS`, repeated here so that loading a config does not import jax
# (a test keeps the two equal).
MODEL_PRESETS = ("openvla-oft-7b", "small")
PRESET_PREFIX = "preset:"
DTYPES = ("float32", "bfloat16", "float16")
KL_TYPES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")  # vlajax.rl.loss.kl_penalty
INIT_SCHEMES = ("normal", "scratch")  # vlajax.model.oft.init.INIT_SCHEMES (no jax import here)
PATCH_SIZE = 14  # both vision towers of OpenVLA-OFT
# Keys accepted so that a verl / SimpleVLA-RL config loads key by key, but that vlajax does not use.
# Setting one to a non-default value warns (with the reason); a test holds every other key to being read.
VERL_COMPAT_KEYS = {
    "data.val_batch_size": "validation runs in rollout rounds of the simulator pool's capacity "
                           "(env.rollout.pipeline_stage_num x simulator workers x env.train.num_envs)",
}
# Keys only `vlajax sft` reads (`vlajax train` ignores them; its every-key test leaves them out).
SFT_KEYS = ("data.train_files", "data.val_episodes_per_task", "data.image_aug")
PURPOSES = ("train", "sft")  # what a config is loaded for: which combinations `validate` checks
# Keys holding filesystem paths: made absolute once, where the config is read (`resolve_paths`).
PATH_KEYS = ("data.train_files", "trainer.default_local_dir", "trainer.resume", "actor_rollout_ref.model.path",
             "env.train.video_cfg.video_base_dir", "ray.temp_dir")
_NOT_PATHS = ("auto", "disable")  # trainer.resume's keywords


class _Section:
    """Base of the schema's sections. `track_reads` uses it to record which leaf keys the code reads
    (a test holds every key to doing something); outside `track_reads` a read costs one check."""

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if _READS is not None and not _PAUSED and not name.startswith("_"):
            key = _leaf_keys().get((type(self), name))
            if key is not None:
                _READS.add(key)
        return value


_READS: set[str] | None = None
_PAUSED = 0


@functools.lru_cache(maxsize=None)
def _leaf_keys() -> dict[tuple[type, str], str]:
    """(section class, field name) -> dotted key, for every leaf of the schema (each section class
    sits at one place in the tree)."""
    out = {}

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")
            else:
                out[(cls, f.name)] = prefix + f.name

    walk(RunConfig, "")
    return out


@contextlib.contextmanager
def track_reads():
    """Record the leaf keys of run configs that code reads within the block (reads by `to_dict`,
    `save_config` and `validate` excepted: copying or checking a value is not using it). Yields the
    set of dotted keys."""
    global _READS
    _READS = set()
    try:
        yield _READS
    finally:
        _READS = None


@contextlib.contextmanager
def _not_counted():
    global _PAUSED
    _PAUSED += 1
    try:
        yield
    finally:
        _PAUSED -= 1


class ConfigError(ValueError):
    """A bad configuration. `key` is the dotted key at fault (None for whole-file problems)."""

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(f"config key '{key}': {message}" if key else message)


# --------------------------------------------------------------------------------------------------
# Schema. Field comments are the documentation of each key; "verl:" notes where the meaning differs.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig(_Section):
    # Initial states (= GRPO groups) per training step; each is rolled out
    # actor_rollout_ref.rollout.n times (SimpleVLA-RL: 64 states x 8 = 512 trajectories).
    train_batch_size: int = 64
    # verl's key, accepted and unused (VERL_COMPAT_KEYS): validation runs in rounds of the pool's capacity.
    val_batch_size: int = 64
    # Dynamic sampling (SimpleVLA-RL's keys): keep a group iff lower <= success rate <= upper.
    filter_accuracy: bool = True
    accuracy_lower_bound: float = 0.1
    accuracy_upper_bound: float = 0.9
    # vlajax: rollout rounds allowed per step to fill the batch with kept groups
    # (SimpleVLA-RL loops without a bound); when hit, the step trains on what it has.
    max_sampling_rounds: int = 8
    # vlajax: kept groups beyond a full batch go to the next step (SimpleVLA-RL drops them).
    keep_excess_groups: bool = False
    shuffle: bool = True
    # vlajax: init states per task used for validation; None = env.train.num_trials_per_task
    # (SimpleVLA-RL validates on the training pairs).
    val_num_trials_per_task: Optional[int] = None
    # `vlajax sft` only (SFT_KEYS); there data.train_batch_size counts frames per optimizer step.
    # Demonstrations (verl's key): a folder (`<out>/<suite>` or the --out root of `vlajax demos`),
    # one LIBERO-layout HDF5 file, or a list of files.
    train_files: Any = None
    # vlajax: episodes per task held out of training (the last ones of each task), for the held-out
    # token accuracy; a task with fewer episodes keeps them all for training.
    val_episodes_per_task: int = 1
    # vlajax: OpenVLA-OFT's training augmentation (a random 90%-area crop per sample, resized back;
    # evaluation and rollouts take the centre crop).
    image_aug: bool = True


@dataclass(frozen=True)
class ModelConfig(_Section):
    # vlajax: the policy family (vlajax.model.family): "oft" = SimpleVLA-OFT (OpenVLA-OFT).
    family: str = "oft"
    # HF OpenVLA-OFT directory, vlajax checkpoint, or "preset:small" / "preset:openvla-oft-7b"
    # (random init).
    path: str = "preset:small"
    # LoRA (verl's keys): rank 0 = full-parameter training (the recipe). target_modules:
    # "all-linear" (every Linear of the LLM), a regex over module paths such as
    # "llm.layers.3.q_proj", or a list of module names (suffix match, as PEFT).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    target_modules: Any = "all-linear"
    # vlajax: master-weight dtype and compute dtype (verl: actor.fsdp_config.model_dtype=bfloat16).
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    # Rematerialise transformer blocks in the backward pass (vlajax.rl.learner's remat).
    enable_gradient_checkpointing: bool = True
    # vlajax: input resolution of the vision towers for "preset:" paths (multiple of 14);
    # None = 224. A checkpoint brings its own.
    image_size: Optional[int] = None
    # vlajax: random init of "preset:" models: "normal" (N(0, 0.02)) or "scratch" (fan-in kernels,
    # ordinal action head: what RL from scratch needs; vlajax.model.oft.init).
    init_scheme: str = "normal"
    # vlajax: learned embeddings at the 56 action rows instead of OFT's zeros, for "preset:" models
    # trained from scratch (vlajax.model.oft.init says why); HF checkpoints have none, and a vlajax
    # checkpoint brings its own (this key must then match it).
    action_queries: bool = False
    # vlajax, family pi0 (names as openpi's and RLinf's): Euler steps of the flow per action chunk, the
    # Flow-SDE noise level (vlajax.model.pi0.actor; the sampling temperature scales it), the actions
    # the model makes per call (None: openpi's 50; the run executes the first num_action_chunks),
    # PaliGemma's SentencePiece file (None: openpi's cache, $OPENPI_DATA_HOME or
    # ~/.cache/openpi, big_vision/paligemma_tokenizer.model; a preset uses vlajax's own tokenizer),
    # greedy decoding's chain ("ode": the flow's ODE, openpi's sampler; "mean": each Flow-SDE step's
    # mean, the greedy chain of a policy RL trained from scratch) and where it starts: true = a
    # N(0, I) draw, as openpi; false = 0 (deterministic).
    num_steps: int = 10
    noise_level: float = 0.5
    action_horizon: Optional[int] = None
    tokenizer_path: Optional[str] = None
    greedy_chain: str = "ode"
    greedy_from_noise: bool = True

    # keys of this section a family reads as its own options (`PolicySpec.options`)
    FAMILY_OPTIONS = ("init_scheme", "action_queries", "num_steps", "noise_level", "action_horizon", "tokenizer_path",
                      "greedy_chain", "greedy_from_noise")

    def policy_spec(self, *, num_images: int, proprio_dim: int | None, chunk: int, action_dim: int, seed: int,
                    dataset_statistics: dict | None):
        """What this section asks of the family (`vlajax.model.family.PolicySpec`)."""
        from vlajax.model.family import PolicySpec

        return PolicySpec(path=self.path, num_images=num_images, proprio_dim=proprio_dim, chunk=chunk,
                          action_dim=action_dim, param_dtype=self.param_dtype, compute_dtype=self.compute_dtype,
                          image_size=self.image_size, seed=seed, dataset_statistics=dataset_statistics,
                          options={k: getattr(self, k) for k in self.FAMILY_OPTIONS})

    def lora_target_regex(self) -> str | None:
        """Regex for `vlajax.rl.lora.LoraConfig.targets`; None = its default (every LLM Linear)."""
        t = self.target_modules
        if isinstance(t, str):
            return None if t == "all-linear" else t
        return r"(?:.*\.)?(?:" + "|".join(re.escape(x) for x in t) + ")"

    def lora_config(self, seed: int):
        """The adapters of lora_rank / lora_alpha / target_modules as a `vlajax.rl.lora.LoraConfig`
        (A matrices drawn from `seed`), or None for rank 0 (full-parameter training)."""
        if self.lora_rank <= 0:
            return None
        from vlajax.rl.lora import LoraConfig

        targets = self.lora_target_regex()
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, seed=seed,
                          **({"targets": targets} if targets else {}))


@dataclass(frozen=True)
class OptimConfig(_Section):
    lr: float = 5e-6  # constant after warm-up
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01  # AdamW, on every parameter
    lr_warmup_steps: int = 0  # linear warm-up, in training steps

    def learning_rate(self, step: int) -> float:
        """lr of training step `step` (0-based): linear warm-up over `lr_warmup_steps` training steps,
        then constant (verl's constant schedule). The learner takes it as a runtime value (`set_lr`),
        so the schedule never recompiles the update."""
        if not self.lr_warmup_steps:
            return self.lr
        return self.lr * min(1.0, (step + 1) / self.lr_warmup_steps)

    def learner_fields(self, grad_clip: float | None) -> dict[str, Any]:
        """This section as `vlajax.rl.learner.LearnerConfig` fields (verl's names -> the learner's),
        with the actor's global-norm clip `grad_clip`."""
        b1, b2 = self.betas
        return {"lr": self.lr, "b1": b1, "b2": b2, "weight_decay": self.weight_decay, "grad_clip": grad_clip}

    def optimizer(self, grad_clip: float | None):
        """The optax update rule of this section: clip by global norm -> Adam moments -> + weight decay
        (AdamW as torch's), without the learning rate, which the learner applies from its train state
        (`learning_rate`). The same object the learner builds from `learner_fields`."""
        from vlajax.rl.learner import LearnerConfig

        return LearnerConfig(**self.learner_fields(grad_clip)).optimizer()


@dataclass(frozen=True)
class ActorConfig(_Section):
    optim: OptimConfig = field(default_factory=OptimConfig)
    # PPO mini-batch in trajectories (SimpleVLA-RL's unit: 512 / 128 = 4 optimizer steps per
    # training step). verl: counted in prompts and multiplied by rollout.n.
    ppo_mini_batch_size: int = 128
    # Samples (= policy calls) per device per micro-batch (vlajax.rl.learner micro_batch_size).
    ppo_micro_batch_size_per_gpu: int = 2
    # verl's global spelling: samples per micro-batch over all devices; when set it replaces
    # ppo_micro_batch_size_per_gpu (divided by the device count at start-up).
    ppo_micro_batch_size: Optional[int] = None
    ppo_epochs: int = 1
    # PPO-clip ratio range [1 - low, 1 + high] ("clip-higher") and dual-clip bound for A < 0.
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 3.0
    entropy_coeff: float = 0.0
    # KL to the initial policy (vlajax.rl.learner): with LoRA the base model (adapters off, no extra
    # memory); with full parameters a frozen copy in the compute dtype (+2 B/param: 15 GB for the 7B).
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    grad_clip: Optional[float] = 1.0  # global-norm clip; None = off
    num_images_in_input: int = 1  # camera images fed to the policy (env.train.init_params.camera_names[:n])
    # Feed the robot state as one token after the patches (OFT's proprio projector; SimpleVLA's
    # LIBERO runs keep it off). "preset:" models get an 8-d projector (LIBERO / tabletop state); a
    # checkpoint must have a proprio projector exactly when this is true.
    use_proprio: bool = False

    def micro_batch_size_per_device(self, num_devices: int) -> int:
        """Samples per device per micro-batch, from whichever of the two keys is in use."""
        if self.ppo_micro_batch_size is None:
            return self.ppo_micro_batch_size_per_gpu
        if self.ppo_micro_batch_size % num_devices:
            raise ConfigError(f"{self.ppo_micro_batch_size} is not divisible by the {num_devices} devices",
                              "actor_rollout_ref.actor.ppo_micro_batch_size")
        return self.ppo_micro_batch_size // num_devices


@dataclass(frozen=True)
class ValKwargsConfig(_Section):
    # Validation decoding: greedy (argmax over the 256 bins) unless do_sample.
    do_sample: bool = False
    temperature: float = 0.0  # used only with do_sample
    n: int = 1  # rollouts per validation state


@dataclass(frozen=True)
class RolloutConfig(_Section):
    n: int = 8  # rollouts per initial state (GRPO group size; SimpleVLA-RL: data.n_samples)
    temperature: float = 1.6
    val_kwargs: ValKwargsConfig = field(default_factory=ValKwargsConfig)
    # "sync": roll out, then update. "async" (one step off-policy): the next step's rollout runs during
    # this step's update, decoding with the weights from before it (vlajax.train says what changes).
    mode: str = "sync"
    # vlajax: devices of each trainer process that only decode (0 or 1: its last local device); the
    # learner's mesh gets the rest, and the decoder is handed a copy of the weights after each update
    # (verl's separate rollout GPUs; with mode=async the two work at once).
    decode_devices: int = 0


@dataclass(frozen=True)
class ActorRolloutRefConfig(_Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    def learner_config(self, num_devices: int, image_flip: bool, objective: str = "ppo"):
        """The update's `vlajax.rl.learner.LearnerConfig` from the actor, model and rollout keys.
        num_devices: the learner mesh's size (splits `ppo_micro_batch_size`); image_flip: the
        simulator's frame orientation (the update must preprocess frames as the rollout did);
        objective: "ppo" (`vlajax train`) or "nll" (`vlajax sft`)."""
        from vlajax.rl.learner import LearnerConfig

        a, m = self.actor, self.model
        return LearnerConfig(
            **a.optim.learner_fields(a.grad_clip), micro_batch_size=a.micro_batch_size_per_device(num_devices),
            temperature=self.rollout.temperature, clip_low=a.clip_ratio_low, clip_high=a.clip_ratio_high,
            dual_clip_c=a.clip_ratio_c, entropy_coef=a.entropy_coeff,
            kl_coef=a.kl_loss_coef if a.use_kl_loss else 0.0, kl_type=a.kl_loss_type,
            remat=m.enable_gradient_checkpointing, compute_dtype=m.compute_dtype, image_flip=image_flip,
            image_center_crop=True, objective=objective)


@dataclass(frozen=True)
class AlgorithmConfig(_Section):
    adv_estimator: str = "grpo"  # grpo | reinforce_plus_plus (vlajax.rl.advantages)
    norm_adv_by_std_in_grpo: bool = True


@dataclass(frozen=True)
class InitParamsConfig(_Section):
    camera_heights: int = 256
    camera_widths: int = 256
    camera_names: list[str] = field(default_factory=lambda: ["agentview"])


@dataclass(frozen=True)
class VideoConfig(_Section):
    save_video: bool = False  # verl: True; vlajax records the final evaluation's episodes
    video_base_dir: Optional[str] = None  # None = <trainer.default_local_dir>/videos


@dataclass(frozen=True)
class EnvTrainConfig(_Section):
    simulator_type: str = "libero"  # libero | tabletop | isaac
    task_suite_name: str = "libero_10"  # LIBERO suite, or "tabletop"
    num_envs: int = 8  # envs per pipeline stage per simulator worker
    max_episode_steps: int = 512  # env steps (= 64 chunks of 8)
    num_trials_per_task: int = 50  # vlajax (SimpleVLA-RL: data.): init states per task
    # vlajax: where training episodes start. "fixed": the task's stored init states (LIBERO's 50, which
    # evaluation uses too); "sampled": states LIBERO's placement sampler draws, one fresh seeded state
    # per (task, trial) slot and epoch (num_trials_per_task slots per task), settled like the stored
    # ones. Evaluation and validation always use the fixed states.
    init_states: str = "fixed"
    seed: int = 42
    reward_coef: float = 1.0  # success reward scale (cancels out under GRPO)
    # vlajax: MuJoCo's GL in the simulator workers (vlajax.envs.gl): "egl" renders on the GPU the
    # worker was given (else the node's first GPU; Mesa's llvmpipe where there is none), "osmesa" on
    # the CPU (leaves the GPU's memory to the learner).
    mujoco_gl: str = "egl"
    init_params: InitParamsConfig = field(default_factory=InitParamsConfig)
    video_cfg: VideoConfig = field(default_factory=VideoConfig)


@dataclass(frozen=True)
class EnvRolloutConfig(_Section):
    # Simulator groups per worker stepped in ping-pong with the policy (verl's pipeline).
    pipeline_stage_num: int = 2
    # vlajax: an env call (one chunk of a stage's envs; a reset, including a restarted worker's
    # start-up) that takes longer is a hung simulator: its worker is restarted and its episodes re-run.
    # A LIBERO chunk with two cameras on a loaded node can take seconds; a reset rebuilds scenes.
    step_timeout_s: float = 120.0
    reset_timeout_s: float = 600.0


@dataclass(frozen=True)
class EnvActorModelConfig(_Section):
    num_action_chunks: int = 8  # actions per policy call (must match the checkpoint)
    action_dim: int = 7


@dataclass(frozen=True)
class EnvActorConfig(_Section):
    model: EnvActorModelConfig = field(default_factory=EnvActorModelConfig)


@dataclass(frozen=True)
class DisaggSimConfig(_Section):
    enable: bool = False  # simulators on their own nodes (Ray resource "sim")
    nnodes: int = 1  # simulator nodes when enabled


@dataclass(frozen=True)
class EnvConfig(_Section):
    train: EnvTrainConfig = field(default_factory=EnvTrainConfig)
    rollout: EnvRolloutConfig = field(default_factory=EnvRolloutConfig)
    actor: EnvActorConfig = field(default_factory=EnvActorConfig)
    disagg_sim: DisaggSimConfig = field(default_factory=DisaggSimConfig)


@dataclass(frozen=True)
class MeshConfig(_Section):
    # vlajax: learner device mesh axes ("data", "fsdp"); -1 = infer (both -1: all devices on fsdp).
    data: int = -1
    fsdp: int = -1

    def build(self, job, decode_devices: int = 0):
        """The learner's mesh for this process of `job` (`vlajax.distributed.job.Job.mesh`), on the
        devices `decode_devices` leaves it; a layout that cannot give each process its own full copy of
        the weights is an error naming the key."""
        try:
            return job.mesh(self.data, self.fsdp, decode_devices)
        except ValueError as e:
            key = "actor_rollout_ref.rollout.decode_devices" if "decode_devices" in str(e) else "trainer.mesh.data"
            raise ConfigError(str(e), key=key) from None


@dataclass(frozen=True)
class TrainerConfig(_Section):
    nnodes: int = 1  # train/rollout nodes
    # Simulator workers per node (one Ray actor each; a GPU each for GPU simulators, a CPU
    # process group on CPU) and policy-rollout devices per node.
    n_env_gpus_per_node: int = 4
    n_rollout_gpus_per_node: int = 4
    total_training_steps: int = 700  # SimpleVLA-RL: 100 epochs x 7 batches
    save_freq: int = 25  # steps between checkpoints; -1 = only at the end
    test_freq: int = 4  # steps between validations; -1 = never during training
    val_before_train: bool = True
    project_name: str = "vlajax"
    experiment_name: str = "libero_grpo"
    # Run directory: config, metrics, checkpoints, videos, evaluation tables.
    default_local_dir: str = "checkpoints/${trainer.project_name}/${trainer.experiment_name}"
    # auto: continue from the latest checkpoint in default_local_dir if any; disable: start
    # fresh; otherwise a checkpoint directory to start from (verl: resume_mode/resume_from_path).
    resume: str = "auto"
    max_actor_ckpt_to_keep: Optional[int] = 3  # None = keep all
    logger: list[str] = field(default_factory=lambda: ["console", "tensorboard", "jsonl"])
    seed: int = 0  # model init, rollout sampling and data order
    mesh: MeshConfig = field(default_factory=MeshConfig)


@dataclass(frozen=True)
class RayConfig(_Section):
    # true: simulators in Ray actors; false: on threads of the trainer's process, no Ray (one node);
    # null: Ray only where the run needs it (ray.address set, trainer.nnodes > 1, env.disagg_sim.enable)
    enable: Optional[bool] = True
    address: Optional[str] = None  # None = start an embedded local Ray; "auto" or host:port = join
    num_cpus: Optional[int] = None  # embedded Ray only; None = all
    temp_dir: Optional[str] = None  # embedded Ray only; None = a fresh directory under /tmp


@dataclass(frozen=True)
class RunConfig(_Section):
    data: DataConfig = field(default_factory=DataConfig)
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    # Derived sizes (what the trainer and the rollout engine plan with).
    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.default_local_dir)

    @property
    def num_sim_workers(self) -> int:
        """Simulator workers in the cluster (`Placement.num_workers`): one per env GPU, or one
        CPU-only worker per node, on the simulator nodes if disaggregated, else the trainer nodes."""
        return self.placement().num_workers

    @property
    def simulator(self) -> simulators.SimulatorSpec:
        """What vlajax knows of `env.train.simulator_type` (`vlajax.envs.simulators`)."""
        try:
            return simulators.simulator(self.env.train.simulator_type)
        except ValueError as e:
            raise ConfigError(str(e), "env.train.simulator_type") from None

    def placement(self) -> Placement:
        """Where the simulators and the trainer go: the one reading of `ray.enable`, `env.disagg_sim.*`,
        `trainer.nnodes` and `trainer.n_*_gpus_per_node` (`vlajax.distributed.placement`)."""
        t, dis = self.trainer, self.env.disagg_sim
        sizes = dict(trainer_nnodes=t.nnodes, n_env_gpus_per_node=t.n_env_gpus_per_node,
                     n_rollout_gpus_per_node=t.n_rollout_gpus_per_node)
        if not self.uses_ray:
            return InProcess(**sizes)
        if dis.enable:
            return Disaggregated(sim_nodes=dis.nnodes, **sizes)
        return Colocated(**sizes)

    @property
    def uses_ray(self) -> bool:
        """`ray.enable`, or when it is null whether the run needs Ray: to join a cluster, to launch one
        trainer process per node, or to place simulators on their own nodes."""
        r = self.ray
        if r.enable is not None:
            return r.enable
        return r.address is not None or self.trainer.nnodes > 1 or self.env.disagg_sim.enable

    def per_process(self, num_processes: int) -> "RunConfig":
        """The config of one trainer process of a `num_processes`-process job: each places its own
        share of the simulators (`Placement.per_process`: one train node's worth, or its share of the
        simulator nodes; the config checks that they divide)."""
        if num_processes == 1:
            return self
        share = self.placement().per_process(num_processes)
        return dataclasses.replace(
            self, trainer=dataclasses.replace(self.trainer, nnodes=share.trainer_nnodes),
            env=dataclasses.replace(self.env, disagg_sim=dataclasses.replace(
                self.env.disagg_sim, nnodes=max(1, self.env.disagg_sim.nnodes // num_processes))))

    def rollout_config(self):
        """The rollout engine's `vlajax.rl.rollout.EngineConfig`: the training temperature
        (`actor_rollout_ref.rollout`), the env call timeouts (`env.rollout`), sampling keys from
        `trainer.seed`."""
        from vlajax.rl.rollout import EngineConfig

        er = self.env.rollout
        return EngineConfig(temperature=self.actor_rollout_ref.rollout.temperature, seed=self.trainer.seed,
                            step_timeout_s=er.step_timeout_s, reset_timeout_s=er.reset_timeout_s)

    @property
    def num_rollout_workers(self) -> int:
        return self.trainer.n_rollout_gpus_per_node * self.trainer.nnodes

    @property
    def trajectories_per_step(self) -> int:
        return self.data.train_batch_size * self.actor_rollout_ref.rollout.n

    @property
    def envs_per_round(self) -> int:
        """Trajectories one rollout round runs: stages x simulator workers x envs per stage."""
        return self.env.rollout.pipeline_stage_num * self.num_sim_workers * self.env.train.num_envs

    @property
    def rounds_per_step(self) -> int:
        """Rollout rounds for one batch before dynamic sampling asks for more."""
        return self.trajectories_per_step // self.envs_per_round

    @property
    def chunks_per_episode(self) -> int:
        return self.env.train.max_episode_steps // self.env.actor.model.num_action_chunks

    @property
    def optimizer_steps_per_step(self) -> int:
        return self.actor_rollout_ref.actor.ppo_epochs * (
            self.trajectories_per_step // self.actor_rollout_ref.actor.ppo_mini_batch_size)


# Keys of verl / SimpleVLA-RL that vlajax spells differently or does not have: a hint for the
# "unknown key" error. Prefix keys cover their whole subtree.
RENAMED = {
    "actor_rollout_ref.model.lora_targets": "actor_rollout_ref.model.target_modules",
    "env.simulator_type": "env.train.simulator_type",
    "trainer.resume_mode": "trainer.resume (auto | disable | <checkpoint path>)",
    "trainer.resume_from_path": "trainer.resume=<checkpoint path>",
    "trainer.total_epochs": "trainer.total_training_steps",
    "trainer.n_gpus_per_node": "trainer.n_env_gpus_per_node and trainer.n_rollout_gpus_per_node",
    "data.n_samples": "actor_rollout_ref.rollout.n (SimpleVLA-RL's data.n_samples)",
    "data.task_suite_name": "env.train.task_suite_name",
    "data.num_trials_per_task": "env.train.num_trials_per_task",
    "actor_rollout_ref.actor.clip_ratio": "actor_rollout_ref.actor.clip_ratio_low and clip_ratio_high",
    "actor_rollout_ref.actor.optim.warmup_style":
        "actor_rollout_ref.actor.optim.lr_warmup_steps (linear, then constant)",
    "actor_rollout_ref.actor.fsdp_config": "trainer.mesh.data / trainer.mesh.fsdp (JAX sharding, no FSDP wrapper "
                                           "settings); dtypes are actor_rollout_ref.model.param_dtype/compute_dtype",
    "actor_rollout_ref.ref": "nothing: vlajax builds a reference policy only with actor.use_kl_loss=true",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size": "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu":
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _unfreeze(node) -> None:
    """Frozen dataclasses make read-only OmegaConf nodes; the schema must accept merges."""
    OmegaConf.set_readonly(node, False)
    if isinstance(node, DictConfig):
        for k in node.keys():
            child = node._get_node(k)  # the node itself (attribute access would resolve values)
            if isinstance(child, (DictConfig, ListConfig)):
                _unfreeze(child)


_SCHEMA: DictConfig | None = None


def _schema() -> DictConfig:
    """The schema as an OmegaConf node (built once; `OmegaConf.merge` never mutates its inputs)."""
    global _SCHEMA
    if _SCHEMA is None:
        schema = OmegaConf.structured(RunConfig)
        _unfreeze(schema)
        _SCHEMA = schema
    return _SCHEMA


@functools.lru_cache(maxsize=None)
def _schema_keys(cls=RunConfig, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema (nodes and leaves) -> its annotation."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        out[key] = tp
        if dataclasses.is_dataclass(tp):
            out.update(_schema_keys(tp, key + "."))
    return out


def _type_name(tp) -> str:
    if tp is Any:
        return "a string or a list of strings"
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return f"{_type_name(next(a for a in args if a is not type(None)))} or null"
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping of sub-keys"
    return getattr(tp, "__name__", str(tp))


def _unknown_key_message(key: str) -> str:
    for old, new in RENAMED.items():
        if key == old or key.startswith(old + "."):
            return f"unknown key; vlajax's equivalent: {new}"
    keys = list(_schema_keys())
    parent, _, leaf = key.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(key, siblings, n=3, cutoff=0.6) or difflib.get_close_matches(
        key, keys, n=3, cutoff=0.6)
    # Also the same leaf name under another parent (e.g. `env.num_envs` -> `env.train.num_envs`).
    close += [k for k in keys if k.rpartition(".")[2] == leaf and k not in close][:3]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    if not close and (parent == "" or parent in keys):
        valid = sorted(k.rpartition(".")[2] for k in siblings)
        hint += f"; valid keys{' under ' + repr(parent) if parent else ''}: {', '.join(valid)}"
    return "unknown key" + hint


def _wrap(e: Exception, where: str, fallback_key: str | None = None) -> ConfigError:
    key = getattr(e, "full_key", None) or fallback_key
    if key:
        key = re.sub(r"\[\d+\]$", "", str(key))
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, oc_errors.ConfigKeyError) or (
            isinstance(e, oc_errors.ConfigAttributeError) and "not in" in first):
        return ConfigError(f"{_unknown_key_message(key)} ({where})", key)
    if isinstance(e, oc_errors.ValidationError):
        tp = _schema_keys().get(key) if key else None
        expected = f"; expected {_type_name(tp)}" if tp is not None else ""
        return ConfigError(f"wrong type: {first}{expected} ({where})", key)
    return ConfigError(f"{first} ({where})", key)


def packaged_configs() -> dict[str, Path]:
    """The YAML configs shipped in the package, by name (without .yaml)."""
    root = importlib.resources.files("vlajax") / "configs"
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def _resolve_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    shipped = packaged_configs()
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if p.parent == Path(".") and name in shipped:
        return shipped[name]
    raise ConfigError(f"config file {str(path)!r} not found; packaged configs: {', '.join(sorted(shipped))}")


def _merge(base: DictConfig, other, where: str, fallback_key: str | None = None) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except oc_errors.OmegaConfBaseException as e:
        raise _wrap(e, where, fallback_key) from None


def _parse_override(item: str) -> tuple[str, DictConfig]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    if item.startswith("~"):
        raise ConfigError(f"override {item!r}: deleting keys is not supported (every key has a default)")
    item = item.lstrip("+")  # hydra's "+key=" / "++key=": every vlajax key already exists
    key = item.partition("=")[0].strip()
    if not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"override {item!r}: {key!r} is not a dotted key")
    try:
        return key, OmegaConf.from_dotlist([item])
    except Exception as e:  # OmegaConf or YAML parse errors
        msg = " ".join(str(e).split())
        raise ConfigError(f"cannot parse the value of override {item!r}: {msg}", key) from None


def _to_run_config(merged: DictConfig, where: str, purpose: str = "train") -> RunConfig:
    try:
        cfg = OmegaConf.to_object(merged)
    except oc_errors.OmegaConfBaseException as e:
        raise _wrap(e, where) from None
    return validate(resolve_paths(cfg), purpose)


def _get(cfg: RunConfig, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _replace(node, key: str, value):
    """A copy of the frozen tree `node` with the dotted `key` set to `value`."""
    head, _, rest = key.partition(".")
    child = value if not rest else _replace(getattr(node, head), rest, value)
    return dataclasses.replace(node, **{head: child})


def resolve_paths(cfg: RunConfig, cwd: str | os.PathLike | None = None) -> RunConfig:
    """`PATH_KEYS` made absolute (`~` expanded) against `cwd` (default: the working directory).

    Done once, where the config is read: orbax refuses relative checkpoint paths, and the run's saved
    `config.yaml` must name the same files whatever directory it is read from later."""
    base = Path(cwd or os.getcwd())
    with _not_counted():
        for key in PATH_KEYS:
            value = _get(cfg, key)
            if isinstance(value, list):  # data.train_files: a list of files
                resolved = [x if not isinstance(x, str) else os.path.normpath(base / Path(x).expanduser())
                            for x in value]
            elif not isinstance(value, str) or value in _NOT_PATHS or value.startswith(PRESET_PREFIX):
                continue
            else:
                resolved = os.path.normpath(base / Path(value).expanduser())
            if resolved != value:
                cfg = _replace(cfg, key, resolved)
    return cfg


def _apply(base: DictConfig, overrides: Sequence[str]) -> DictConfig:
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}")
    parsed = [_parse_override(item) for item in overrides]
    if not parsed:
        return base
    try:  # one merge for all (fast); on error, one at a time to find the override at fault
        return OmegaConf.merge(base, *(dot for _, dot in parsed))
    except oc_errors.OmegaConfBaseException:
        pass
    for item, (key, dot) in zip(overrides, parsed):
        base = _merge(base, dot, f"override {item!r}", key)
    raise AssertionError("unreachable: merging overrides one by one succeeded after the joint merge failed")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), purpose: str = "train") -> RunConfig:
    """Schema defaults <- YAML file <- `key=value` overrides, then `validate`.

    Args:
      path: a YAML file, the name of a packaged config ("demo", "libero_grpo",
        "libero_grpo_disagg"), or None for the embedded default (`DEFAULT_CONFIG`).
      overrides: dotted `key=value` strings, values parsed as YAML (`trainer.logger=[console,wandb]`,
        `ray.address=null`); a leading `+`/`++` (hydra) is accepted.
      purpose: "train" (GRPO) or "sft" (`vlajax sft`): which combinations `validate` checks.

    Raises:
      ConfigError naming the key: unknown key (with a "did you mean"), wrong type, missing file,
      inconsistent combination.
    """
    with _not_counted():  # loading copies and checks every value: that is not using one
        return _load(path, overrides, purpose)


def _load(path, overrides, purpose: str = "train") -> RunConfig:
    src = _resolve_path(DEFAULT_CONFIG if path is None else path)
    try:
        loaded = OmegaConf.load(src)
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"cannot read config file {str(src)!r}: {e}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {str(src)!r} must hold a mapping at the top level")
    merged = _merge(_schema(), loaded, f"in {src}")
    merged = _apply(merged, overrides)
    return _to_run_config(merged, f"loading {src}", purpose)


def from_dict(d: Mapping[str, Any], overrides: Sequence[str] = (), purpose: str = "train") -> RunConfig:
    """Same as `load_config` from a nested dict (e.g. the config stored in a checkpoint)."""
    with _not_counted():
        merged = _merge(_schema(), OmegaConf.create(dict(d)), "in the given dict")
        return _to_run_config(_apply(merged, overrides), "from a dict", purpose)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Nested plain dict (JSON/YAML-able)."""
    with _not_counted():
        return dataclasses.asdict(cfg)


def flatten(cfg: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Dotted key -> leaf value."""
    d = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(d, "")
    return out


def config_diff(a: RunConfig, b: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ -> (a's value, b's value). E.g. to report on resume."""
    fa, fb = flatten(a), flatten(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def save_config(cfg: RunConfig, run_dir: str | Path, command: str = "train") -> Path:
    """Write the resolved config to `<run_dir>/config.yaml` (loadable with `load_config`)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    text = f"# vlajax run config (resolved); rerun with: vlajax {command} " + str(path) + "\n"
    text += OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(message, key)


def _positive(value, key: str) -> None:
    _check(value >= 1, key, f"must be >= 1, got {value}")


def _freq(value: int, key: str) -> None:
    _check(value == -1 or value >= 1, key, f"must be >= 1 (steps) or -1 (off), got {value}")


def validate(cfg: RunConfig, purpose: str = "train") -> RunConfig:
    """Check ranges and combinations for `purpose` ("train" or "sft"); raises ConfigError naming the
    key. Returns cfg."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    with _not_counted():
        _validate(cfg, purpose)
    return cfg


def _validate(cfg: RunConfig, purpose: str = "train") -> None:
    if purpose == "sft":  # the model path first: a typo there is reported before anything is read
        checks = (_validate_model, _validate_data, _validate_sft, _validate_actor, _validate_rollout, _validate_env,
                  _validate_cluster, _validate_trainer, _validate_ray)
    else:
        checks = (_validate_data, _validate_model, _validate_actor, _validate_rollout, _validate_env,
                  _validate_cluster, _validate_batches, _validate_trainer, _validate_ray)
    for check in checks:
        check(cfg)
    _warn_unused_verl_keys(cfg)


def _validate_sft(cfg: RunConfig) -> None:
    """`vlajax sft`: the demonstrations, and what SFT does not do (several processes, a KL term)."""
    d, key = cfg.data, "data.train_files"
    files = d.train_files
    _check(files is not None, key, "is required for vlajax sft: a folder of demonstrations (`vlajax demos` --out "
                                   "root or <out>/<suite>), one *_demo.hdf5 file, or a list of files")
    if isinstance(files, str):
        files = [files]
    _check(isinstance(files, list) and len(files) > 0 and all(isinstance(f, str) and f for f in files), key,
           f"must be a path or a non-empty list of paths, got {d.train_files!r}")
    missing = [f for f in files if not Path(f).exists()]
    _check(not missing, key, f"{', '.join(missing)} does not exist")
    _check(cfg.env.train.simulator_type == "libero", "env.train.simulator_type",
           f"vlajax sft reads LIBERO-layout demonstrations; got {cfg.env.train.simulator_type}")
    _check(d.val_episodes_per_task >= 0, "data.val_episodes_per_task", f"must be >= 0, got {d.val_episodes_per_task}")
    _positive(d.train_batch_size, "data.train_batch_size")
    _check(cfg.trainer.nnodes == 1, "trainer.nnodes", f"vlajax sft runs in one process, got {cfg.trainer.nnodes}")
    _check(not cfg.actor_rollout_ref.actor.use_kl_loss, "actor_rollout_ref.actor.use_kl_loss",
           "has no meaning for vlajax sft (the nll objective has no KL term): set it false")


def _validate_data(cfg: RunConfig) -> None:
    """Data keys and dynamic sampling's bounds."""
    d = cfg.data
    _positive(d.train_batch_size, "data.train_batch_size")
    _positive(d.max_sampling_rounds, "data.max_sampling_rounds")
    for k in ("accuracy_lower_bound", "accuracy_upper_bound"):
        v = getattr(d, k)
        _check(0.0 <= v <= 1.0, f"data.{k}", f"must be in [0, 1], got {v}")
    _check(d.accuracy_lower_bound <= d.accuracy_upper_bound, "data.accuracy_lower_bound",
           f"{d.accuracy_lower_bound} is above data.accuracy_upper_bound={d.accuracy_upper_bound}: "
           "dynamic sampling would keep no group")
    if d.val_num_trials_per_task is not None:
        _positive(d.val_num_trials_per_task, "data.val_num_trials_per_task")


def _validate_model(cfg: RunConfig) -> None:
    """The model keys; the path first, since the others are judged by what it names."""
    m = cfg.actor_rollout_ref.model
    from vlajax.model.family import family_names  # numpy only

    _check(m.family in family_names(), "actor_rollout_ref.model.family",
           f"{m.family!r} is not a policy family; the families are {', '.join(family_names())}")
    key = "actor_rollout_ref.model.path"
    _check(bool(m.path.strip()), key, "is empty")
    if not m.path.startswith(PRESET_PREFIX):
        _check(Path(m.path).exists(), key, f"checkpoint {m.path} does not exist")
    if m.family == "oft":  # another family judges its presets and options when it builds the policy
        _validate_oft_model(m)
    _check(m.lora_rank >= 0, "actor_rollout_ref.model.lora_rank", f"must be >= 0 (0 = no LoRA), got {m.lora_rank}")
    _check(m.lora_alpha > 0, "actor_rollout_ref.model.lora_alpha", f"must be > 0, got {m.lora_alpha}")
    key = "actor_rollout_ref.model.target_modules"
    tm = m.target_modules
    if isinstance(tm, str):
        _check(bool(tm), key, "is empty")
        try:
            re.compile(tm)
        except re.error as e:
            raise ConfigError(f"{tm!r} is neither 'all-linear' nor a valid regex: {e}", key) from None
    else:
        _check(isinstance(tm, list) and len(tm) > 0 and all(isinstance(x, str) and x for x in tm), key,
               f"must be 'all-linear', a regex, or a non-empty list of module names, got {tm!r}")
    for k in ("param_dtype", "compute_dtype"):
        v = getattr(m, k)
        _check(v in DTYPES, f"actor_rollout_ref.model.{k}", f"{v!r} is not one of {', '.join(DTYPES)}")


def _validate_oft_model(m) -> None:
    """The OFT family's presets and options (`vlajax.model.oft`), judged here without importing jax."""
    key = "actor_rollout_ref.model.path"
    is_preset = m.path.startswith(PRESET_PREFIX)
    if is_preset:
        name = m.path[len(PRESET_PREFIX):]
        _check(name in MODEL_PRESETS, key,
               f"unknown preset {name!r}; choose one of {', '.join(PRESET_PREFIX + p for p in MODEL_PRESETS)}")
    if m.image_size is not None:
        key = "actor_rollout_ref.model.image_size"
        _check(is_preset, key, f"applies to '{PRESET_PREFIX}...' models only (a checkpoint brings its own), "
                               f"but actor_rollout_ref.model.path={m.path!r}")
        _check(m.image_size >= PATCH_SIZE and m.image_size % PATCH_SIZE == 0, key,
               f"must be a positive multiple of the {PATCH_SIZE}-pixel patch size, got {m.image_size}")
    if m.init_scheme != "normal":
        key = "actor_rollout_ref.model.init_scheme"
        _check(m.init_scheme in INIT_SCHEMES, key, f"{m.init_scheme!r} is not one of {', '.join(INIT_SCHEMES)}")
        _check(is_preset, key, f"applies to '{PRESET_PREFIX}...' models only (a checkpoint brings its own "
                               f"weights: set it to normal), but actor_rollout_ref.model.path={m.path!r}")
    if m.action_queries:
        _check(m.path.startswith(PRESET_PREFIX) or not (Path(m.path) / "config.json").exists(),
               "actor_rollout_ref.model.action_queries",
               f"a Hugging Face OpenVLA-OFT checkpoint has no action queries, but actor_rollout_ref.model.path={m.path!r}")


def _validate_actor(cfg: RunConfig) -> None:
    """Optimizer and loss keys."""
    a, p = cfg.actor_rollout_ref.actor, "actor_rollout_ref.actor."
    _check(a.optim.lr > 0, p + "optim.lr", f"must be > 0, got {a.optim.lr}")
    _check(a.optim.weight_decay >= 0, p + "optim.weight_decay", f"must be >= 0, got {a.optim.weight_decay}")
    _check(len(a.optim.betas) == 2 and all(0.0 <= b < 1.0 for b in a.optim.betas), p + "optim.betas",
           f"must be two numbers in [0, 1), got {a.optim.betas}")
    _check(a.optim.lr_warmup_steps >= 0, p + "optim.lr_warmup_steps", f"must be >= 0, got {a.optim.lr_warmup_steps}")
    _check(0.0 < a.clip_ratio_low < 1.0, p + "clip_ratio_low",
           f"must be in (0, 1) (the ratio is clipped below at 1 - clip_ratio_low), got {a.clip_ratio_low}")
    _check(a.clip_ratio_high > 0.0, p + "clip_ratio_high", f"must be > 0, got {a.clip_ratio_high}")
    _check(a.clip_ratio_c > 1.0, p + "clip_ratio_c", f"the dual-clip bound must be > 1, got {a.clip_ratio_c}")
    _check(a.entropy_coeff >= 0, p + "entropy_coeff", f"must be >= 0, got {a.entropy_coeff}")
    _check(a.kl_loss_coef >= 0, p + "kl_loss_coef", f"must be >= 0, got {a.kl_loss_coef}")
    _check(a.kl_loss_type in KL_TYPES, p + "kl_loss_type", f"{a.kl_loss_type!r} is not one of {', '.join(KL_TYPES)}")
    _check(a.grad_clip is None or a.grad_clip > 0, p + "grad_clip", f"must be > 0 or null, got {a.grad_clip}")
    _positive(a.ppo_epochs, p + "ppo_epochs")
    _positive(a.ppo_micro_batch_size_per_gpu, p + "ppo_micro_batch_size_per_gpu")
    if a.ppo_micro_batch_size is not None:
        _positive(a.ppo_micro_batch_size, p + "ppo_micro_batch_size")
    _check(a.num_images_in_input in (1, 2, 3), p + "num_images_in_input", f"must be 1..3, got {a.num_images_in_input}")


def _validate_rollout(cfg: RunConfig) -> None:
    """Rollout decoding and the advantage estimator."""
    r = cfg.actor_rollout_ref.rollout
    _positive(r.n, "actor_rollout_ref.rollout.n")
    _check(r.temperature > 0, "actor_rollout_ref.rollout.temperature",
           f"must be > 0 for training rollouts (sampling), got {r.temperature}")
    _positive(r.val_kwargs.n, "actor_rollout_ref.rollout.val_kwargs.n")
    _check(r.mode in ("sync", "async"), "actor_rollout_ref.rollout.mode", f"must be sync or async, got {r.mode!r}")
    _check(r.decode_devices in (0, 1), "actor_rollout_ref.rollout.decode_devices",
           f"must be 0 (decode on the learner's devices) or 1 (one device apart), got {r.decode_devices}")
    if r.val_kwargs.do_sample:
        _check(r.val_kwargs.temperature > 0, "actor_rollout_ref.rollout.val_kwargs.temperature",
               f"must be > 0 with val_kwargs.do_sample=true, got {r.val_kwargs.temperature}")
    _check(cfg.algorithm.adv_estimator in ADVANTAGE_ESTIMATORS, "algorithm.adv_estimator",
           f"{cfg.algorithm.adv_estimator!r} is not one of {', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
    if cfg.algorithm.adv_estimator in GROUP_ESTIMATORS:
        _check(r.n >= 2, "actor_rollout_ref.rollout.n",
               f"algorithm.adv_estimator={cfg.algorithm.adv_estimator} (GRPO-style) compares rollouts of the same "
               f"state: needs n >= 2, got {r.n}")


def _validate_env(cfg: RunConfig) -> None:
    """The simulator, its tasks, cameras and action chunks."""
    d, a, env = cfg.data, cfg.actor_rollout_ref.actor, cfg.env
    e = env.train
    sim = cfg.simulator
    try:
        sim.check_suite(e.task_suite_name)
    except ValueError as err:
        raise ConfigError(str(err), "env.train.task_suite_name") from None
    n_states = sim.init_states_per_task
    if n_states is not None:
        _check(e.num_trials_per_task <= n_states or e.init_states == "sampled", "env.train.num_trials_per_task",
               f"{sim.label} has {n_states} init states per task, got {e.num_trials_per_task}")
        if d.val_num_trials_per_task is not None:
            _check(d.val_num_trials_per_task <= n_states, "data.val_num_trials_per_task",
                   f"{sim.label} has {n_states} init states per task, got {d.val_num_trials_per_task}")
    for k in ("num_envs", "max_episode_steps", "num_trials_per_task"):
        _positive(getattr(e, k), f"env.train.{k}")
    _check(e.init_states in INIT_STATES, "env.train.init_states",
           f"{e.init_states!r} is not one of {', '.join(INIT_STATES)}")
    _check(e.init_states == "fixed" or sim.sampled_init_states, "env.train.init_states",
           f"'sampled' draws states with the simulator's placement sampler; env.train.simulator_type="
           f"{e.simulator_type} has none (use 'fixed')")
    _check(e.mujoco_gl in GL_BACKENDS, "env.train.mujoco_gl",
           f"{e.mujoco_gl!r} is not one of {', '.join(GL_BACKENDS)}")
    for k in ("camera_heights", "camera_widths"):
        _positive(getattr(e.init_params, k), f"env.train.init_params.{k}")
    cams = e.init_params.camera_names
    _check(len(cams) >= a.num_images_in_input and len(set(cams)) == len(cams), "env.train.init_params.camera_names",
           f"needs {a.num_images_in_input} distinct camera(s) (actor_rollout_ref.actor.num_images_in_input), "
           f"got {cams}")
    chunk = env.actor.model.num_action_chunks
    _positive(chunk, "env.actor.model.num_action_chunks")
    _check(env.actor.model.action_dim == 7, "env.actor.model.action_dim",
           f"the {e.simulator_type} actions are 7-d (xyz, axis-angle, gripper), got {env.actor.model.action_dim}")
    _check(e.max_episode_steps % chunk == 0, "env.train.max_episode_steps",
           f"{e.max_episode_steps} is not a multiple of env.actor.model.num_action_chunks={chunk}")
    _positive(env.rollout.pipeline_stage_num, "env.rollout.pipeline_stage_num")
    for k in ("step_timeout_s", "reset_timeout_s"):
        _check(getattr(env.rollout, k) > 0, f"env.rollout.{k}", f"must be > 0 seconds, got {getattr(env.rollout, k)}")
    _check(env.disagg_sim.nnodes >= 1, "env.disagg_sim.nnodes",
           f"must be >= 1 simulator node, got {env.disagg_sim.nnodes}")


def _validate_cluster(cfg: RunConfig) -> None:
    """Nodes, devices and the learner mesh."""
    t = cfg.trainer
    _positive(t.nnodes, "trainer.nnodes")
    if t.nnodes > 1:
        from vlajax.distributed.multihost import described_processes

        procs = described_processes()  # 1 on the head node that launches them (vlajax.cli): checked by train()
        _check(procs in (1, t.nnodes), "trainer.nnodes",
               f"trainer.nnodes={t.nnodes} but the job has {procs} processes: run one process per train node")
        p = cfg.placement()  # each trainer process owns an equal share of the nodes holding simulators
        _check(p.sim_nnodes % t.nnodes == 0, p.sim_nodes_key,
               f"{p.sim_nnodes} simulator nodes cannot be shared evenly by trainer.nnodes={t.nnodes} trainer "
               "processes (each owns its own): use a multiple of trainer.nnodes")
    _check(t.n_env_gpus_per_node >= 0, "trainer.n_env_gpus_per_node",
           f"must be >= 0 (0 = CPU-only simulators), got {t.n_env_gpus_per_node}")
    _check(t.n_rollout_gpus_per_node >= 0, "trainer.n_rollout_gpus_per_node",
           f"must be >= 0 (0 = train on CPU), got {t.n_rollout_gpus_per_node}")
    for k in ("data", "fsdp"):
        v = getattr(t.mesh, k)
        _check(v == -1 or v >= 1, f"trainer.mesh.{k}", f"must be >= 1 or -1 (infer), got {v}")


def _validate_batches(cfg: RunConfig) -> None:
    """How a step's trajectories split into rollout rounds, mini-batches and micro-batches."""
    d, r, env, t = cfg.data, cfg.actor_rollout_ref.rollout, cfg.env, cfg.trainer
    e, a, p = env.train, cfg.actor_rollout_ref.actor, "actor_rollout_ref.actor."
    n_traj = cfg.trajectories_per_step
    round_size = cfg.envs_per_round
    _check(n_traj % round_size == 0, "data.train_batch_size",
           f"data.train_batch_size x actor_rollout_ref.rollout.n = {d.train_batch_size} x {r.n} = {n_traj} "
           f"trajectories cannot be split across env.rollout.pipeline_stage_num={env.rollout.pipeline_stage_num} "
           f"stages x {cfg.num_sim_workers} simulator workers (trainer.n_env_gpus_per_node="
           f"{t.n_env_gpus_per_node} x {cfg.placement().sim_nodes_key}="
           f"{cfg.placement().sim_nnodes}) x env.train.num_envs={e.num_envs} = {round_size} "
           "envs per rollout round: it must be a multiple of that")
    if t.nnodes > 1:  # each process trains its own whole groups, the same number on every process
        _check(d.train_batch_size % t.nnodes == 0, "data.train_batch_size",
               f"{d.train_batch_size} GRPO groups cannot be split evenly over trainer.nnodes={t.nnodes} processes "
               "(a group never straddles processes): use a multiple of trainer.nnodes")
    mini = a.ppo_mini_batch_size
    _positive(mini, p + "ppo_mini_batch_size")
    if t.nnodes > 1:
        _check(mini % t.nnodes == 0, p + "ppo_mini_batch_size",
               f"{mini} trajectories cannot be split evenly over trainer.nnodes={t.nnodes} processes (each "
               "contributes the same number of rows to every mini-batch): use a multiple of trainer.nnodes")
    _check(n_traj % mini == 0, p + "ppo_mini_batch_size",
           f"{mini} trajectories does not divide the {n_traj} trajectories of a step "
           f"(data.train_batch_size x actor_rollout_ref.rollout.n)")
    if t.mesh.data > 0 and t.mesh.fsdp > 0:
        a.micro_batch_size_per_device(t.mesh.data * t.mesh.fsdp)  # raises if not divisible


def _validate_trainer(cfg: RunConfig) -> None:
    """Run length, checkpoints, logging, resume."""
    t = cfg.trainer
    _positive(t.total_training_steps, "trainer.total_training_steps")
    _freq(t.save_freq, "trainer.save_freq")
    _freq(t.test_freq, "trainer.test_freq")
    if t.max_actor_ckpt_to_keep is not None:
        _positive(t.max_actor_ckpt_to_keep, "trainer.max_actor_ckpt_to_keep")
    _check(bool(t.default_local_dir.strip()), "trainer.default_local_dir", "is empty")
    _check(bool(t.experiment_name) and "/" not in t.experiment_name, "trainer.experiment_name",
           f"must be a non-empty name without '/', got {t.experiment_name!r}")
    bad = [x for x in t.logger if x not in LOGGERS]
    _check(not bad, "trainer.logger", f"unknown logger(s) {bad}; choose from {', '.join(LOGGERS)}")
    _check(len(set(t.logger)) == len(t.logger), "trainer.logger", f"lists a logger twice: {t.logger}")
    if t.resume not in ("auto", "disable"):
        _check(Path(t.resume).exists(), "trainer.resume",
               f"is neither 'auto', 'disable' nor an existing checkpoint path: {t.resume!r}")


def _validate_ray(cfg: RunConfig) -> None:
    """The Ray connection, or none (`ray.enable=false`: simulators in the trainer's process)."""
    r = cfg.ray
    if r.enable is False:
        _check(not cfg.env.disagg_sim.enable, "ray.enable",
               "is false, but env.disagg_sim.enable=true places the simulators on other nodes, through Ray")
        _check(r.address is None, "ray.enable", f"is false, but ray.address={r.address} names a Ray cluster to join")
        from vlajax.distributed.multihost import described_processes

        _check(cfg.trainer.nnodes == 1 or described_processes() > 1, "ray.enable",
               f"is false, but trainer.nnodes={cfg.trainer.nnodes} without a launched job: `vlajax train` launches "
               "one process per node through Ray; without Ray, start them yourself (srun, or "
               "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID in each)")
    if cfg.ray.num_cpus is not None:
        _positive(cfg.ray.num_cpus, "ray.num_cpus")
    if cfg.ray.address is not None:
        _check(bool(cfg.ray.address.strip()), "ray.address", "is empty (use null for an embedded local Ray)")


def _warn_unused_verl_keys(cfg: RunConfig) -> None:
    defaults = flatten(RunConfig())
    for key, why in VERL_COMPAT_KEYS.items():
        value = _get(cfg, key)
        if value != defaults[key]:
            warnings.warn(f"config key '{key}'={value!r} does nothing in vlajax (accepted so that verl configs "
                          f"load): {why}", UserWarning, stacklevel=4)
