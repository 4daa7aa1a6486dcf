"""A sim worker and the pool interface the rollout loop drives, with no Ray in sight.

`SimWorker` holds `num_stages` vector envs ("stages") of `num_envs` envs each and tags every env slot
with its trajectory ids (row, task, state, group), so results are matched by id, never by position.
A pool places workers somewhere (Ray actors: `vlajax.distributed.ray_sim.SimPool`; this process:
`vlajax.envs.local_pool.LocalSimPool`) and exposes them through `SimPoolAPI`: issue a reset or a
step for a (worker, stage) and get an opaque handle back at once, wait for handles, fetch a result.
A failure that replacing the worker can fix surfaces as `SimFailure`, whatever the transport.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any, Callable, Hashable, Protocol, Sequence

import numpy as np

from vlajax.envs import gl
from vlajax.envs.base import EnvError, TaskSpec
from vlajax.envs.subproc import EnvWorkerError

__all__ = ["BusyClock", "SimFailure", "SimPoolAPI", "SimResult", "SimWorker"]


class SimFailure(EnvError):
    """A sim worker failed in a way that replacing it fixes: one of its simulator processes crashed or
    hung (`EnvWorkerError`), or the worker itself died. The rollout restarts the worker and re-runs
    its episodes.

    worker / stage: where (stage None: the whole worker). env_indices: the failed env slots of the
    stage (empty when unknown); task_ids / state_ids: their trajectories' ids, in the same order.
    Pickles with its fields (it crosses Ray's exception serialisation)."""

    def __init__(self, message: str, *, worker: int | None = None, stage: int | None = None,
                 env_indices: Sequence[int] = (), task_ids: Sequence[int] = (), state_ids: Sequence[int] = ()):
        super().__init__(message)
        self.worker, self.stage = worker, stage
        self.env_indices = tuple(int(i) for i in env_indices)
        self.task_ids = tuple(int(t) for t in task_ids)
        self.state_ids = tuple(int(s) for s in state_ids)

    def __reduce__(self):
        return type(self), (self.args[0],), self.__dict__

    def brief(self) -> str:
        """First and last line of the message (a simulator's traceback in between)."""
        lines = str(self).strip().splitlines() or [""]
        return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


@dataclasses.dataclass
class SimResult:
    """What a (worker, stage) returns for the n trajectory rows a reset or step ran.

    rows, task_id, state_id, group_id: (n,) int64, the ids its env slots carry (echoed back)
    active: (n,) bool, the rows still running (all True after a reset)
    images: camera -> (m, H, W, 3) uint8 and proprio (m, D) float32, for the m active rows: the
        next policy input
    instructions: (n,) language instructions (reset only)
    terminated / truncated (n,) bool, elapsed_steps / steps (n,) int32, reward (n,) float32: step only
    """

    rows: np.ndarray
    task_id: np.ndarray
    state_id: np.ndarray
    group_id: np.ndarray
    active: np.ndarray
    images: dict[str, np.ndarray]
    proprio: np.ndarray
    instructions: list[str] = dataclasses.field(default_factory=list)
    terminated: np.ndarray | None = None
    truncated: np.ndarray | None = None
    elapsed_steps: np.ndarray | None = None
    steps: np.ndarray | None = None
    reward: np.ndarray | None = None


class SimPoolAPI(Protocol):
    """What the rollout loop needs from a pool of sim workers. Handles are opaque and hashable;
    `issue_*` return at once, `result` raises `SimFailure` for a failure that `restart` fixes and
    any other error for one it does not (e.g. bad input)."""

    num_workers: int
    num_stages: int
    num_envs: int
    cameras: tuple[str, ...]

    @property
    def capacity(self) -> int: ...  # workers x stages x envs

    @property
    def infos(self) -> list[dict]: ...  # per worker, see `SimWorker.info`

    def issue_reset(self, worker: int, stage: int, rows: np.ndarray, task_ids: np.ndarray, state_ids: np.ndarray,
                    group_ids: np.ndarray, seed: int) -> Hashable: ...

    def issue_step(self, worker: int, stage: int, rows: np.ndarray, actions: np.ndarray) -> Hashable: ...

    def issue_demo(self, worker: int, stage: int, task_ids: np.ndarray, state_ids: np.ndarray, seed: int,
                   max_steps: int | None = None) -> Hashable: ...  # result: list of episode dicts

    def wait(self, handles: Sequence[Hashable], *, timeout_s: float | None, wait_all: bool = False) -> list[Hashable]:
        """Block until one handle (all, with `wait_all`) is done or `timeout_s` passed (None: no limit);
        return every handle done by then."""

    def result(self, handle: Hashable) -> SimResult: ...

    def restart(self, worker: int) -> None: ...

    def clear_busy(self) -> None:
        """Start the workers' busy clocks afresh (need not wait)."""

    def take_busy(self) -> list[float]:
        """Per worker: seconds its envs ran since the last call or `clear_busy` (NaN: no answer)."""


class BusyClock:
    """Union of the time intervals during which at least one env call runs (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running = 0
        self._since = 0.0
        self._total = 0.0

    def __enter__(self):
        with self._lock:
            if self._running == 0:
                self._since = time.perf_counter()
            self._running += 1

    def __exit__(self, *exc):
        with self._lock:
            self._running -= 1
            if self._running == 0:
                self._total += time.perf_counter() - self._since

    def take(self) -> float:
        with self._lock:
            now = time.perf_counter()
            total = self._total + (now - self._since if self._running else 0.0)
            self._total = 0.0
            if self._running:
                self._since = now
            return total


class SimWorker:
    """`num_stages` vector envs ("stages") of `num_envs` envs each.

    env_fn: picklable `env_fn(num_envs, *, name) -> VectorEnv`, e.g.
        `functools.partial(make_tabletop_vector_env, image_size=64)`.
    cameras: the cameras returned to the host (others are not sent).
    concurrent_stages: False (default) runs one stage's env call at a time: the simulator's
        resources (cores, or the EGL GPU) are sized for one stage and the other stages' steps wait
        while the host decodes for them (the reference's ping-pong). True lets stages simulate at
        the same time, for nodes with cores for all stages' env processes.
    mujoco_gl / gpu_ids: MuJoCo's GL backend, set up before any env process starts (they inherit
        it), rendering on the first of `gpu_ids` (`vlajax.envs.gl`).
    """

    def __init__(self, env_fn: Callable[..., Any], num_envs: int, num_stages: int, worker_index: int,
                 cameras: Sequence[str] = ("agentview",), render_every_substep: bool = False,
                 concurrent_stages: bool = False, mujoco_gl: str | None = None, gpu_ids: Sequence[str] = ()):
        self.worker_index = int(worker_index)
        self.gpu_ids = [str(g) for g in gpu_ids]
        self.renderer = None
        if mujoco_gl:
            where = f"sim worker {worker_index} (pid {os.getpid()}, GPUs {self.gpu_ids or 'none'})"
            gl_env, self.renderer = gl.setup(mujoco_gl, self.gpu_ids, what=where)
            gl.apply(gl_env)
        self.num_envs = int(num_envs)
        self.cameras = tuple(cameras)
        self.render_every_substep = bool(render_every_substep)
        self._lock = None if concurrent_stages else threading.Lock()
        self._busy = BusyClock()
        self._envs: list[Any] = []
        try:
            for s in range(num_stages):
                self._envs.append(env_fn(self.num_envs, name=f"sim{worker_index}.stage{s}"))
        except BaseException:
            self.close()
            raise
        for s, env in enumerate(self._envs):
            if env.num_envs != self.num_envs:
                raise EnvError(f"sim worker {worker_index} stage {s}: env_fn made {env.num_envs} envs, "
                               f"asked for {self.num_envs}")
        self._ids: list[dict[str, np.ndarray] | None] = [None] * num_stages
        self._done = [np.ones(self.num_envs, bool) for _ in range(num_stages)]

    def info(self) -> dict:
        """pid, env_pids, tasks (`TaskSpec`s), action_dim, max_episode_steps, gpu_ids, renderer,
        node_id (None here; a Ray worker fills it)."""
        env = self._envs[0]
        tasks: list[TaskSpec] = list(env.tasks)
        return {
            "node_id": None,
            "pid": os.getpid(),
            "env_pids": [p for e in self._envs for p in getattr(e, "pids", []) if p is not None],
            "tasks": tasks,
            "action_dim": int(getattr(env, "action_dim", 7)),
            "max_episode_steps": getattr(env, "max_episode_steps", None),
            "gpu_ids": list(self.gpu_ids),
            "renderer": self.renderer,
        }

    def _env(self, stage: int):
        if not 0 <= stage < len(self._envs):
            raise EnvError(f"sim worker {self.worker_index}: stage {stage} out of range (0..{len(self._envs) - 1})")
        return self._envs[stage]

    def _run(self, stage: int, ids: dict[str, np.ndarray], fn):
        """Run an env call under the stage lock and busy clock; a crashed or hung simulator process
        becomes a `SimFailure` naming the failed slots' trajectories."""
        try:
            if self._lock is None:
                with self._busy:
                    return fn()
            with self._lock, self._busy:
                return fn()
        except EnvWorkerError as e:
            slots = [i for i in e.env_indices if 0 <= i < self.num_envs]
            raise SimFailure(f"sim worker {self.worker_index} stage {stage}: {e}", worker=self.worker_index,
                             stage=stage, env_indices=slots, task_ids=ids["task_id"][slots],
                             state_ids=ids["state_id"][slots]) from None

    def _obs(self, obs, idx) -> tuple[dict[str, np.ndarray], np.ndarray]:
        missing = [c for c in self.cameras if c not in obs.images]
        if missing:
            raise EnvError(f"sim worker {self.worker_index}: cameras {missing} not rendered; the env returns "
                           f"{sorted(obs.images)}")
        return ({c: np.ascontiguousarray(obs.images[c][idx], dtype=np.uint8) for c in self.cameras},
                np.asarray(obs.proprio[idx], np.float32))

    def reset(self, stage: int, rows, task_ids, state_ids, group_ids, seed: int) -> SimResult:
        """Reset stage `stage` (all its envs) to these trajectories, each (E,)."""
        env = self._env(stage)
        ids = {"rows": np.asarray(rows, np.int64), "task_id": np.asarray(task_ids, np.int64),
               "state_id": np.asarray(state_ids, np.int64), "group_id": np.asarray(group_ids, np.int64)}
        for k, v in ids.items():
            if v.shape != (self.num_envs,):
                raise EnvError(f"sim worker {self.worker_index} stage {stage}: reset got {k} of shape {v.shape}, "
                               f"expected ({self.num_envs},)")
        self._ids[stage] = None
        obs = self._run(stage, ids, lambda: env.reset(ids["task_id"].tolist(), ids["state_id"].tolist(),
                                                      seed=int(seed)))
        self._ids[stage] = ids
        self._done[stage] = np.zeros(self.num_envs, bool)
        images, proprio = self._obs(obs, np.arange(self.num_envs))
        return SimResult(**ids, active=np.ones(self.num_envs, bool), images=images, proprio=proprio,
                         instructions=list(obs.instructions))

    def _slots(self, stage: int, rows: np.ndarray) -> np.ndarray:
        """The env slots of trajectory `rows`, which must be exactly the stage's running envs."""
        ids = self._ids[stage]
        if ids is None:
            raise EnvError(f"sim worker {self.worker_index} stage {stage}: step before reset")
        slot_of = {int(r): i for i, r in enumerate(ids["rows"])}
        unknown = [int(r) for r in rows if int(r) not in slot_of]
        if unknown:
            raise EnvError(f"sim worker {self.worker_index} stage {stage}: trajectory rows {unknown} are not held "
                           f"here (this stage holds rows {ids['rows'].tolist()})")
        slots = np.array([slot_of[int(r)] for r in rows], np.int64)
        running = np.flatnonzero(~self._done[stage])
        if sorted(slots.tolist()) != running.tolist():
            raise EnvError(f"sim worker {self.worker_index} stage {stage}: asked to step rows {rows.tolist()}, but "
                           f"the running envs hold rows {ids['rows'][running].tolist()}")
        return slots

    def step(self, stage: int, rows, actions) -> SimResult:
        """Step the envs of trajectory `rows` (n,) by `actions` (n, K, A) float32; every other env of
        the stage must already be finished."""
        env = self._env(stage)
        rows = np.asarray(rows, np.int64)
        actions = np.asarray(actions, np.float32)
        slots = self._slots(stage, rows)
        if actions.ndim != 3 or actions.shape[0] != len(rows):
            raise EnvError(f"sim worker {self.worker_index} stage {stage}: actions must be (n={len(rows)}, K, A), "
                           f"got {actions.shape}")
        full = np.zeros((self.num_envs,) + actions.shape[1:], np.float32)
        full[slots] = actions
        ids = self._ids[stage]
        res = self._run(stage, ids, lambda: env.chunk_step(full, render_every_substep=self.render_every_substep))
        done = np.asarray(res.done, bool)
        self._done[stage] = done.copy()
        active = ~done[slots]
        images, proprio = self._obs(res.obs, slots[active])
        return SimResult(
            **{k: v[slots] for k, v in ids.items()}, active=active, images=images, proprio=proprio,
            terminated=np.asarray(res.terminated, bool)[slots], truncated=np.asarray(res.truncated, bool)[slots],
            elapsed_steps=np.asarray(res.info["elapsed_steps"], np.int32)[slots],
            steps=np.asarray(res.info["steps"], np.int32)[slots], reward=np.asarray(res.reward, np.float32)[slots])

    def demonstrate(self, stage: int, task_ids, state_ids, seed: int, max_steps: int | None = None) -> list[dict]:
        """One scripted-expert episode per (task, state) pair (at most num_envs), on stage `stage`'s
        envs in parallel (`SubprocVectorEnv.demonstrate`); the stage needs a reset before its next step."""
        env = self._env(stage)
        ids = {"task_id": np.asarray(task_ids, np.int64), "state_id": np.asarray(state_ids, np.int64)}
        if ids["task_id"].shape != ids["state_id"].shape or not 0 < len(ids["task_id"]) <= self.num_envs:
            raise EnvError(f"sim worker {self.worker_index} stage {stage}: demonstrate takes 1..{self.num_envs} "
                           f"(task, state) pairs, got {ids['task_id'].shape} and {ids['state_id'].shape}")
        self._ids[stage] = None
        self._done[stage] = np.ones(self.num_envs, bool)
        return self._run(stage, ids, lambda: env.demonstrate(ids["task_id"].tolist(), ids["state_id"].tolist(),
                                                             seed=int(seed), max_steps=max_steps))

    def take_busy(self) -> float:
        """Seconds during which an env call ran since the last call (union over stages)."""
        return self._busy.take()

    def close(self) -> None:
        for env in getattr(self, "_envs", []):  # none if the constructor failed
            try:
                env.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self._envs = []
