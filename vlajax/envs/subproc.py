"""`SubprocVectorEnv`: N `SingleEnv`s, one worker process each, with the episode bookkeeping.

Why processes: MuJoCo/robosuite physics and CPU rendering hold the GIL, so N envs need N cores.
Workers are started with `spawn` (default) or `forkserver`, never plain `fork`: the parent may hold
EGL, MuJoCo or JAX state that must not be duplicated. Every command is sent to all workers first
and then gathered, so the workers simulate in parallel; every wait is bounded by `timeout_s`, and a
worker that raises, dies or hangs becomes an `EnvWorkerError` that names env, task and state.
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

import numpy as np

from vlajax.envs.base import (
    EnvError,
    EnvOutput,
    Observation,
    SingleEnv,
    StepResult,
    TaskSpec,
    VectorEnv,
    check_actions,
)
from vlajax.envs.video import EpisodeVideoWriter


def set_default_gl_backend() -> str | None:
    """Choose MuJoCo's OpenGL backend unless the user did: EGL if libEGL exists, else OSMesa.

    Must run before `import mujoco` (it reads MUJOCO_GL at import). Returns the backend in use."""
    if not os.environ.get("MUJOCO_GL"):
        if ctypes.util.find_library("EGL"):
            os.environ["MUJOCO_GL"] = "egl"
        elif ctypes.util.find_library("OSMesa"):
            os.environ["MUJOCO_GL"] = "osmesa"
    return os.environ.get("MUJOCO_GL")


class EnvWorkerError(EnvError):
    """One or more workers failed (raised, died or hung) during a command.

    env_indices: the failed envs; they stay unusable until `restart(i)`.
    result: for `chunk_step`, the StepResult of all envs (failed rows keep their previous
        observation and have info["worker_failed"] set), so the other envs' chunk is not lost; else None.
    """

    def __init__(self, message: str, env_indices: Sequence[int], result: StepResult | None = None):
        super().__init__(message)
        self.env_indices = tuple(env_indices)
        self.result = result


# ---- worker side --------------------------------------------------------------------------------
def _worker_main(conn: Connection, factory_bytes: bytes, index: int, env_vars: dict[str, str]) -> None:
    """Build the env, report its tasks, then serve (command, args) requests until 'close' or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    os.environ.update(env_vars)
    set_default_gl_backend()
    env: SingleEnv | None = None
    try:
        t0 = time.perf_counter()
        env = pickle.loads(factory_bytes)(index)
        info = {"tasks": list(env.tasks), "action_dim": int(getattr(env, "action_dim", 7))}
        conn.send(("ok", info, time.perf_counter() - t0))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        _send_quietly(conn, ("error", traceback.format_exc(), 0.0))
        return
    try:
        while True:
            try:
                cmd, args = conn.recv()
            except (EOFError, OSError):  # parent went away
                break
            if cmd == "close":
                break
            t0 = time.perf_counter()
            try:
                if cmd == "reset":
                    out = env.reset(*args)
                elif cmd == "step":
                    out = env.chunk_step(*args)
                elif cmd == "demo":
                    out = env.demonstrate(*args)
                else:
                    raise ValueError(f"unknown worker command {cmd!r}")
                msg = ("ok", out, time.perf_counter() - t0)
            except Exception:  # noqa: BLE001
                msg = ("error", traceback.format_exc(), time.perf_counter() - t0)
            if not _send_quietly(conn, msg):
                break
    finally:
        try:
            env.close()
        except Exception:  # noqa: BLE001 - nothing useful to do at shutdown
            pass


def _send_quietly(conn: Connection, msg) -> bool:
    try:
        conn.send(msg)
        return True
    except (BrokenPipeError, EOFError, OSError):
        return False
    except Exception:  # e.g. an unpicklable result: report it instead
        try:
            conn.send(("error", traceback.format_exc(), 0.0))
            return True
        except Exception:  # noqa: BLE001
            return False


# ---- parent side --------------------------------------------------------------------------------
@dataclasses.dataclass
class _Worker:
    process: Any  # multiprocessing Process
    conn: Connection
    broken: str | None = None  # why it cannot be used until restart


def _stop_workers(workers: list, grace_s: float = 3.0) -> None:
    """Ask every worker to exit, kill the ones that do not within `grace_s`. Safe to repeat."""
    for w in workers:
        if w is not None and w.process.is_alive():
            try:
                w.conn.send(("close", None))
            except Exception:  # noqa: BLE001 - dead pipe: it is killed below
                pass
    deadline = time.monotonic() + grace_s
    for w in workers:
        if w is None:
            continue
        w.process.join(max(0.0, deadline - time.monotonic()))
        if w.process.is_alive():
            w.process.kill()
            w.process.join(5.0)
        w.conn.close()
    workers[:] = [None] * len(workers)


class SubprocVectorEnv(VectorEnv):
    """`num_envs` copies of `env_factory(index)`, each in its own process (see module docstring).

    env_factory: picklable callable (top-level function or functools.partial) run in the worker.
    max_episode_steps: episode limit in env steps; default: the task's `TaskSpec.max_episode_steps`.
    video_dir: if set, one mp4 per episode per env (see `vlajax.envs.video`), named after `name`.
    start_method: "spawn" or "forkserver".
    worker_env: environment variables set in each worker before the factory is loaded (e.g.
        MUJOCO_GL, MUJOCO_EGL_DEVICE_ID). By default LP_NUM_THREADS=1 unless the parent sets it:
        Mesa's software renderer otherwise starts one render thread per core in every worker.
    The same (task id, state id, seed) gives the same initial state in every env slot: the seed is
    passed unchanged to all workers, so GRPO groups can share an initial state across envs.
    """

    def __init__(
        self,
        env_factory: Callable[[int], SingleEnv],
        num_envs: int,
        *,
        timeout_s: float = 120.0,
        max_episode_steps: int | None = None,
        video_dir: str | None = None,
        video_camera: str | None = None,
        video_fps: int = 10,
        name: str = "env",
        start_method: str = "spawn",
        worker_env: dict[str, str] | None = None,
    ):
        if num_envs < 1:
            raise EnvError(f"{name}: num_envs must be >= 1, got {num_envs}")
        if start_method not in ("spawn", "forkserver"):
            raise EnvError(f"{name}: start_method must be 'spawn' or 'forkserver', got {start_method!r}")
        if max_episode_steps is not None and max_episode_steps < 1:
            raise EnvError(f"{name}: max_episode_steps must be >= 1, got {max_episode_steps}")
        try:
            self._factory_bytes = pickle.dumps(env_factory)
        except Exception as e:
            raise EnvError(
                f"{name}: env_factory must be picklable (a top-level function or functools.partial): {e}"
            ) from e
        self.num_envs = int(num_envs)
        self.name = name
        self.timeout_s = float(timeout_s)
        self.max_episode_steps = max_episode_steps
        self._ctx = mp.get_context(start_method)
        self._worker_env = {} if "LP_NUM_THREADS" in os.environ else {"LP_NUM_THREADS": "1"}
        self._worker_env.update({str(k): str(v) for k, v in (worker_env or {}).items()})
        self._workers: list[_Worker | None] = [None] * self.num_envs
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        self._closed = False

        n = self.num_envs
        self._task_ids = np.full(n, -1, dtype=np.int64)
        self._state_ids = np.full(n, -1, dtype=np.int64)
        self._needs_reset = np.ones(n, dtype=bool)  # never reset, or restarted since
        self._elapsed = np.zeros(n, dtype=np.int32)
        self._limit = np.zeros(n, dtype=np.int32)
        self._terminated = np.zeros(n, dtype=bool)
        self._truncated = np.zeros(n, dtype=bool)
        self._last: list[EnvOutput | None] = [None] * n
        self._episodes = np.zeros(n, dtype=np.int64)

        self._video = None
        if video_dir is not None:
            self._video = EpisodeVideoWriter(video_dir, fps=video_fps, camera=video_camera, prefix=name)

        for i in range(n):
            self._start_worker(i)
        infos, failures = self._gather({i: "initialization" for i in range(n)})
        if failures:
            self.close()
            raise EnvWorkerError(self._failure_message("initialization", failures), sorted(failures))
        self._tasks: tuple[TaskSpec, ...] = tuple(infos[0][0]["tasks"])
        self.action_dim: int = infos[0][0]["action_dim"]

    # ---- public API -----------------------------------------------------------------------------
    @property
    def tasks(self) -> Sequence[TaskSpec]:
        return self._tasks

    @property
    def pids(self) -> list[int | None]:
        """Worker process ids (None for a slot without a worker, e.g. after close)."""
        return [w.process.pid if w is not None else None for w in self._workers]

    def reset(
        self,
        task_ids: Sequence[int],
        state_ids: Sequence[int],
        seed: int | None = None,
        *,
        env_indices: Sequence[int] | None = None,
    ) -> Observation:
        """Reset envs to (task, initial state). `env_indices` (an extension of `VectorEnv`) resets
        only those envs, e.g. one that was just `restart`ed; ids then align with it and the
        returned Observation has one row per listed env."""
        self._check_open()
        idx = self._env_indices(env_indices)
        task_ids, state_ids = list(task_ids), list(state_ids)
        if len(task_ids) != len(idx) or len(state_ids) != len(idx):
            raise EnvError(
                f"{self.name}: reset got {len(task_ids)} task ids and {len(state_ids)} state ids "
                f"for {len(idx)} envs"
            )
        seed = 0 if seed is None else int(seed)
        for i, t, s in zip(idx, task_ids, state_ids):
            if not isinstance(t, (int, np.integer)) or not 0 <= t < len(self._tasks):
                raise EnvError(
                    f"{self.name}: env {i}: task id {t!r} out of range (0..{len(self._tasks) - 1})"
                )
            spec = self._tasks[t]
            if not spec.has_state(s):
                raise EnvError(
                    f"{self.name}: env {i} (task {spec.name}): state id {s!r} out of range "
                    f"{spec.state_range()}"
                )
        self._check_usable(idx)

        for i, t, s in zip(idx, task_ids, state_ids):
            if self._video is not None:
                self._video.finish(i, None)  # an episode abandoned before it finished
            self._task_ids[i], self._state_ids[i] = t, s
            self._needs_reset[i] = True
        results, failures = self._run(
            {i: ("reset", (int(t), int(s), seed)) for i, t, s in zip(idx, task_ids, state_ids)}, "reset"
        )
        for i, (out, _) in results.items():
            t = self._task_ids[i]
            self._last[i] = out
            self._needs_reset[i] = False
            self._elapsed[i] = 0
            self._limit[i] = self.max_episode_steps or self._tasks[t].max_episode_steps
            self._terminated[i] = False
            self._truncated[i] = False
            self._episodes[i] += 1
            if self._video is not None:
                self._video.start(i, self._tasks[t].name, int(self._state_ids[i]), int(self._episodes[i]))
                self._video.add(i, out.images)
        if failures:
            raise EnvWorkerError(self._failure_message("reset", failures), sorted(failures))
        return self._observation(idx)

    def chunk_step(self, action_chunks: np.ndarray, render_every_substep: bool = False) -> StepResult:
        """Step every unfinished env by its (K, A) chunk, cut at the episode limit (see VectorEnv).

        info: success (N,) bool, elapsed_steps (N,) int32, steps (N,) int32 executed by this call,
        sim_time_s (N,) float64 worker wall time, worker_failed (N,) bool, and with
        `render_every_substep` substep_images: per env a dict camera -> (steps, H, W, 3) or None.
        """
        self._check_open()
        actions = check_actions(action_chunks, self.num_envs, self.action_dim, self._names())
        if actions.shape[1] == 0:
            raise EnvError(f"{self.name}: empty action chunk (K=0)")
        unready = np.flatnonzero(self._needs_reset)
        if unready.size:
            raise EnvError(
                f"{self.name}: chunk_step before reset for "
                + ", ".join(f"env {i}" for i in unready)
                + " (never reset, failed, or restarted since)"
            )
        active = [i for i in range(self.num_envs) if not (self._terminated[i] or self._truncated[i])]
        self._check_usable(active)
        left = self._limit - self._elapsed
        results, failures = self._run(
            {i: ("step", (actions[i, : min(actions.shape[1], left[i])], render_every_substep))
             for i in active},
            "chunk_step",
        )

        n = self.num_envs
        reward = np.zeros(n, dtype=np.float32)
        steps = np.zeros(n, dtype=np.int32)
        sim_time = np.zeros(n, dtype=np.float64)
        substep_images: list[dict[str, np.ndarray] | None] = [None] * n
        for i, (out, dt) in results.items():
            self._last[i] = out
            steps[i], sim_time[i] = out.steps, dt
            self._elapsed[i] += out.steps
            if out.success:
                self._terminated[i] = True
                reward[i] = 1.0
            elif out.stopped or self._elapsed[i] >= self._limit[i]:
                self._truncated[i] = True
            substep_images[i] = out.substep_images
            if self._video is not None:
                self._video.add(i, out.substep_images if out.substep_images else out.images)
                if self._terminated[i] or self._truncated[i]:
                    self._video.finish(i, bool(self._terminated[i]))
        failed = np.zeros(n, dtype=bool)
        failed[list(failures)] = True
        self._needs_reset[failed] = True
        info: dict[str, Any] = {
            "success": self._terminated.copy(),
            "elapsed_steps": self._elapsed.copy(),
            "steps": steps,
            "sim_time_s": sim_time,
            "worker_failed": failed,
        }
        if render_every_substep:
            info["substep_images"] = substep_images
        result = StepResult(
            self._observation(range(n)), reward, self._terminated.copy(), self._truncated.copy(), info
        )
        if failures:
            raise EnvWorkerError(self._failure_message("chunk_step", failures), sorted(failures), result)
        return result

    def demonstrate(self, task_ids: Sequence[int], state_ids: Sequence[int], seed: int = 0, *,
                    max_steps: int | None = None, timeout_s: float | None = None) -> list[dict]:
        """One scripted-expert episode per env (`SingleEnv.demonstrate`), in parallel; each env
        then needs a reset before `chunk_step`. A whole episode may outlast one step's timeout:
        `timeout_s` (default: 20 x the env's) bounds it."""
        self._check_open()
        idx = list(range(len(task_ids)))
        if len(task_ids) > self.num_envs or len(state_ids) != len(task_ids):
            raise EnvError(f"{self.name}: demonstrate got {len(task_ids)} task ids and {len(state_ids)} state ids "
                           f"for {self.num_envs} envs")
        self._check_usable(idx)
        for i, t, s in zip(idx, task_ids, state_ids):
            self._task_ids[i], self._state_ids[i] = int(t), int(s)
            self._needs_reset[i] = True
        limit = max_steps if max_steps is None else int(max_steps)
        results, failures = self._run({i: ("demo", (int(t), int(s), int(seed), limit))
                                       for i, t, s in zip(idx, task_ids, state_ids)}, "demo",
                                      timeout_s=timeout_s or 20 * self.timeout_s)
        if failures:
            raise EnvWorkerError(self._failure_message("demo", failures), sorted(failures))
        return [results[i][0] for i in idx]

    def restart(self, env_index: int) -> None:
        """Replace env `env_index`'s worker by a fresh one (after a failure); reset it next."""
        self._check_open()
        (i,) = self._env_indices([env_index])
        w = self._workers[i]
        if w is not None:
            _stop_workers([w], grace_s=1.0)
        self._start_worker(i)
        self._needs_reset[i] = True
        _, failures = self._gather({i: "initialization"})
        if failures:
            raise EnvWorkerError(self._failure_message("restart", failures), [i])

    def close(self) -> None:
        """Stop all workers (idempotent); unfinished episode videos are written as 'unfinished'."""
        if self._closed:
            return
        self._closed = True
        if self._video is not None:
            for i in range(self.num_envs):
                self._video.finish(i, None)
        self._finalizer()

    # ---- internals ------------------------------------------------------------------------------
    def _start_worker(self, i: int) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self._factory_bytes, i, self._worker_env),
            name=f"{self.name}-worker-{i}",
            daemon=True,
        )
        proc.start()
        child.close()
        self._workers[i] = _Worker(proc, parent)

    def _run(self, commands: dict[int, tuple[str, tuple]], what: str, timeout_s: float | None = None):
        """Send every command, then gather the answers (so workers run in parallel)."""
        failures: dict[int, str] = {}
        for i, msg in commands.items():
            try:
                self._workers[i].conn.send(msg)
            except (BrokenPipeError, EOFError, OSError) as e:
                failures[i] = self._dead_message(i, f"could not send ({type(e).__name__})")
        results, more = self._gather({i: what for i in commands if i not in failures}, timeout_s)
        failures.update(more)
        for i, why in failures.items():
            self._workers[i].broken = why
        return results, failures

    def _gather(self, pending: dict[int, str], timeout_s: float | None = None):
        """Wait (up to timeout_s, default the env's, in total) for one answer from each pending worker.

        Returns ({i: (payload, sim_time_s)}, {i: failure text}); hung workers are killed."""
        results: dict[int, tuple[Any, float]] = {}
        failures: dict[int, str] = {}
        waiting = set(pending)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while waiting:
            handles = {}
            for i in waiting:
                handles[self._workers[i].conn] = i
                handles[self._workers[i].process.sentinel] = i
            ready = wait(list(handles), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for h in ready:
                i = handles[h]
                if i not in waiting:
                    continue
                conn = self._workers[i].conn
                if conn.poll():
                    try:
                        status, payload, dt = conn.recv()
                    except (EOFError, OSError):
                        failures[i] = self._dead_message(i, "died")
                    else:
                        if status == "ok":
                            results[i] = (payload, dt)
                        else:
                            failures[i] = f"worker raised:\n{payload}"
                    waiting.discard(i)
                elif h is self._workers[i].process.sentinel:
                    failures[i] = self._dead_message(i, "died")
                    waiting.discard(i)
        for i in waiting:
            w = self._workers[i]
            w.process.kill()
            w.process.join(5.0)
            failures[i] = f"no answer within {timeout_s:g} s (worker killed)"
        return results, failures

    def _dead_message(self, i: int, what: str) -> str:
        p = self._workers[i].process
        p.join(1.0)
        return f"worker process {what} (exit code {p.exitcode})"

    def _failure_message(self, what: str, failures: dict[int, str]) -> str:
        lines = [f"{self.name}: {what} failed for {len(failures)} env(s); call restart(i) for each:"]
        for i in sorted(failures):
            lines.append(f"{self._describe(i)}: {failures[i]}")
        if what in ("initialization", "restart") and any("died" in f for f in failures.values()):
            lines.append(
                "(the worker's stderr has its traceback; with 'spawn' the main script needs an "
                "`if __name__ == '__main__':` guard)"
            )
        return "\n".join(lines)

    def _describe(self, i: int) -> str:
        t = self._task_ids[i]
        if t < 0:
            return f"env {i}"
        return f"env {i} (task {self._tasks[t].name}, state {self._state_ids[i]})"

    def _names(self) -> list[str]:
        return [self._describe(i) for i in range(self.num_envs)]

    def _env_indices(self, env_indices) -> list[int]:
        if env_indices is None:
            return list(range(self.num_envs))
        idx = [int(i) for i in env_indices]
        bad = [i for i in idx if not 0 <= i < self.num_envs]
        if bad or len(set(idx)) != len(idx):
            raise EnvError(f"{self.name}: env indices {idx} must be distinct and in 0..{self.num_envs - 1}")
        return idx

    def _check_usable(self, idx) -> None:
        broken = [(i, self._workers[i].broken) for i in idx if self._workers[i].broken]
        if broken:
            raise EnvError(
                f"{self.name}: "
                + "; ".join(f"{self._describe(i)} is unusable until restart({i}): {why.strip().splitlines()[-1]}"
                            for i, why in broken)
            )

    def _check_open(self) -> None:
        if self._closed:
            raise EnvError(f"{self.name}: the vector env is closed")

    def _observation(self, idx) -> Observation:
        outs = [self._last[i] for i in idx]
        keys = list(outs[0].images)
        for i, o in zip(idx, outs):
            if list(o.images) != keys:
                raise EnvError(f"{self.name}: env {i} returned cameras {list(o.images)}, env {idx[0]} {keys}")
        return Observation(
            images={k: np.stack([o.images[k] for o in outs]) for k in keys},
            proprio=np.stack([np.asarray(o.proprio, dtype=np.float32) for o in outs]),
            instructions=[o.instruction for o in outs],
        )
