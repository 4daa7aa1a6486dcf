"""The one vectorized environment interface that the rollout loop and users program against.

Nothing here knows about LIBERO, MuJoCo, Isaac or models: a simulator plugs in by implementing
`VectorEnv`. Arrays are numpy; images are uint8 HWC so they cross processes and Ray nodes compactly.

Shapes: N = number of envs in the vector, K = actions per chunk, A = action dim (7 for the
end-effector-delta + gripper convention of LIBERO / OpenVLA-OFT), D = proprio dim.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Sequence

import numpy as np

# The no-op action used to let physics settle after a reset (LIBERO: gripper open = -1).
NOOP_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float32)

# State ids from SAMPLED_STATE_BASE on name initial states the simulator draws itself (LIBERO: its
# object placement sampler) from seed `state_id - SAMPLED_STATE_BASE`, instead of a task's stored
# states 0..num_init_states-1. Training can so start from states that evaluation never uses, through
# the int64 state ids every layer (rollout engine, Ray actors, worker processes) already carries.
# Decimal, so that an id reads as "1" + the zero-padded seed; seeds fit numpy's legacy seeding.
SAMPLED_STATE_BASE = 10**10
NUM_SAMPLED_SEEDS = 2**32


def sampled_state_id(seed: int) -> int:
    """The state id of the initial state the simulator samples from `seed` (0 <= seed < 2**32)."""
    if not 0 <= int(seed) < NUM_SAMPLED_SEEDS:
        raise ValueError(f"a sampled state's seed must be in [0, 2**32), got {seed}")
    return SAMPLED_STATE_BASE + int(seed)


def sampled_state_seed(state_id: int) -> int | None:
    """The seed of a sampled state id, or None for any other id (e.g. a stored state's)."""
    s = int(state_id) - SAMPLED_STATE_BASE
    return s if 0 <= s < NUM_SAMPLED_SEEDS else None


class EnvError(RuntimeError):
    """A simulator failed (crashed, hung, or was given bad input). The message names env and task."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task a VectorEnv can be reset to."""

    name: str
    instruction: str  # the language instruction shown to the policy
    num_init_states: int  # stored initial states: ids 0 .. num_init_states-1
    max_episode_steps: int  # env steps (not chunks) before truncation
    sampled_states: bool = False  # also starts from states it samples (ids from SAMPLED_STATE_BASE)

    def has_state(self, state_id) -> bool:
        """`state_id` names a start of this task: a stored state, or a sampled one if supported."""
        if not isinstance(state_id, (int, np.integer)):
            return False
        return 0 <= state_id < self.num_init_states or (
            self.sampled_states and sampled_state_seed(state_id) is not None)

    def state_range(self) -> str:
        """The valid state ids, for error messages."""
        sampled = f", or a sampled state id >= {SAMPLED_STATE_BASE}" if self.sampled_states else ""
        return f"(0..{self.num_init_states - 1}){sampled}"


@dataclasses.dataclass
class Observation:
    """A batch of observations, one row per env.

    images: camera name -> (N, H, W, 3) uint8, as the simulator renders it (no flip applied);
        cameras that were not rendered at this step are absent.
    proprio: (N, D) float32 robot state (e.g. end-effector position, axis-angle, gripper qpos).
    instructions: N language instructions.
    """

    images: dict[str, np.ndarray]
    proprio: np.ndarray
    instructions: list[str]

    def select(self, idx: np.ndarray | Sequence[int]) -> "Observation":
        idx = np.asarray(idx, dtype=np.int64)
        return Observation(
            images={k: v[idx] for k, v in self.images.items()},
            proprio=self.proprio[idx],
            instructions=[self.instructions[i] for i in idx],
        )

    @staticmethod
    def concatenate(parts: Sequence["Observation"]) -> "Observation":
        keys = parts[0].images.keys()
        return Observation(
            images={k: np.concatenate([p.images[k] for p in parts]) for k in keys},
            proprio=np.concatenate([p.proprio for p in parts]),
            instructions=[s for p in parts for s in p.instructions],
        )


@dataclasses.dataclass
class StepResult:
    """What `step` / `chunk_step` return for the envs that were stepped.

    reward: (N,) float32, 1.0 at the step where the task first succeeds, else 0.
    terminated: (N,) bool, the task predicate holds (success); the env then stops simulating.
    truncated: (N,) bool, the episode limit was reached without success.
    info: per-env arrays, at least "success" (N,) bool and "elapsed_steps" (N,) int32
        (env steps executed in this episode, counting the step that succeeded, not settle steps).
    """

    obs: Observation
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    info: dict[str, Any]

    @property
    def done(self) -> np.ndarray:
        return np.logical_or(self.terminated, self.truncated)


class VectorEnv(abc.ABC):
    """N environments stepped together. Finished envs (terminated or truncated) are not simulated
    again until the next reset: stepping them returns their last observation and done=True at no cost."""

    num_envs: int

    @property
    @abc.abstractmethod
    def tasks(self) -> Sequence[TaskSpec]:
        """The tasks this env can run; a task id indexes this list."""

    @abc.abstractmethod
    def reset(
        self, task_ids: Sequence[int], state_ids: Sequence[int], seed: int | None = None
    ) -> Observation:
        """Reset env i to task `task_ids[i]` at initial state `state_ids[i]`; len == num_envs."""

    @abc.abstractmethod
    def chunk_step(self, action_chunks: np.ndarray, render_every_substep: bool = False) -> StepResult:
        """Execute (N, K, A) action chunks open-loop. Observations come from the last executed
        sub-step (an env that finishes mid-chunk stops there); intermediate sub-steps are not
        rendered unless `render_every_substep`."""

    def step(self, actions: np.ndarray) -> StepResult:
        """One (N, A) action per env."""
        actions = np.asarray(actions)
        if actions.ndim != 2:
            raise EnvError(f"step expects actions of shape (num_envs, action_dim), got {actions.shape}")
        return self.chunk_step(actions[:, None, :])

    @abc.abstractmethod
    def close(self) -> None:
        """Release processes and simulator resources."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_actions(actions: np.ndarray, num_envs: int, action_dim: int, names: Sequence[str]) -> np.ndarray:
    """Validate a (N, K, A) chunk batch; `names[i]` describes env i (e.g. 'env 3 (libero_10 task 2)')."""
    actions = np.asarray(actions)
    if actions.ndim != 3 or actions.shape[0] != num_envs or actions.shape[2] != action_dim:
        raise EnvError(
            f"action chunks must have shape (num_envs={num_envs}, chunk, action_dim={action_dim}), "
            f"got {actions.shape}"
        )
    finite = np.isfinite(actions).all(axis=(1, 2))
    if not finite.all():
        bad = [names[i] for i in np.flatnonzero(~finite)]
        raise EnvError(f"non-finite (NaN/inf) actions for {', '.join(bad)}")
    return actions.astype(np.float64, copy=False)


@dataclasses.dataclass
class EnvOutput:
    """One env's result of a reset or a chunk: what a `SingleEnv` returns from its worker process.

    images: camera name -> (H, W, 3) uint8; proprio: (D,) float32.
    success: the task predicate held at some sub-step; steps: env steps executed by this call.
    stopped: the simulator ended the episode without success and cannot go on (e.g. a wrapped
        Gymnasium env terminated); the vector env then reports it as truncated.
    substep_images: camera name -> (steps, H, W, 3) uint8, one frame per executed sub-step, when
        `chunk_step(..., render_every_substep=True)` was asked and the env supports it.
    """

    images: dict[str, np.ndarray]
    proprio: np.ndarray
    instruction: str
    success: bool = False
    steps: int = 0
    stopped: bool = False
    substep_images: dict[str, np.ndarray] | None = None


class SingleEnv(abc.ABC):
    """One simulator instance, owned by one worker process of a `SubprocVectorEnv`.

    Episode bookkeeping (limits, early stop of finished envs, rewards) lives in the vector env;
    a SingleEnv only simulates."""

    action_dim: int = 7  # the A of the (K, A) actions it accepts

    @property
    @abc.abstractmethod
    def tasks(self) -> Sequence[TaskSpec]: ...

    @abc.abstractmethod
    def reset(self, task_id: int, state_id: int, seed: int) -> EnvOutput:
        """Put the env in task `task_id`'s initial state `state_id` (rebuilding the scene only
        if the task changed) and let it settle."""

    @abc.abstractmethod
    def chunk_step(self, actions: np.ndarray, render_every_substep: bool = False) -> EnvOutput:
        """Execute (K, A) actions, stopping after the sub-step at which the task succeeds.
        Cameras are rendered for the last executed sub-step (all sub-steps if asked)."""

    def demonstrate(self, task_id: int, state_id: int, seed: int = 0, max_steps: int | None = None) -> dict:
        """One episode of this simulator's scripted expert from (task, state): the frames, proprio
        and executed actions, and whether it succeeded (see `libero.run_expert_episode`)."""
        raise EnvError(f"{type(self).__name__} has no scripted expert: demonstrations need a simulator that has one "
                       f"(LIBERO)")

    def close(self) -> None:
        pass
