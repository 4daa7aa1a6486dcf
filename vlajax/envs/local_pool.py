"""`LocalSimPool`: sim workers in this process, for runs and tests that need no Ray.

Same interface as the Ray pool (`SimPoolAPI`): each worker's calls run on its own threads (one per
stage, as a Ray actor's concurrency allows), so the host decodes while envs step, and the env
processes of `SubprocVectorEnv`s still simulate in parallel.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import threading
from typing import Any, Callable, Sequence

import numpy as np

from vlajax.envs.sim_worker import SimResult, SimWorker

__all__ = ["LocalSimPool"]


@dataclasses.dataclass(eq=False)  # hashed by identity: an opaque handle
class _Call:
    worker: int
    stage: int
    kind: str
    future: cf.Future


def _retire(executor: cf.ThreadPoolExecutor, worker: SimWorker) -> None:
    """Close a replaced worker once its running calls return (closing its envs under a running call
    would race it; a hung simulator process ends at its env's own timeout)."""
    executor.shutdown(wait=True, cancel_futures=True)
    worker.close()


class LocalSimPool:
    """`num_workers` `SimWorker`s of `num_stages` x `num_envs` envs in this process.

    `restart(w)` builds the replacement at once (it blocks while its envs start; the Ray pool's does
    not) and closes the old worker in the background."""

    def __init__(self, env_fn: Callable[..., Any], *, num_envs: int, num_stages: int = 2, num_workers: int = 1,
                 cameras: Sequence[str] = ("agentview",), render_every_substep: bool = False,
                 concurrent_stages: bool = False, mujoco_gl: str | None = None):
        if min(num_envs, num_stages, num_workers) < 1:
            raise ValueError(f"LocalSimPool: num_envs, num_stages and num_workers must be >= 1, got "
                             f"{num_envs}, {num_stages}, {num_workers}")
        self.num_envs, self.num_stages, self.num_workers = int(num_envs), int(num_stages), int(num_workers)
        self.cameras = tuple(cameras)
        self._make_args = (env_fn, self.num_envs, self.num_stages)
        self._make_kw = {"cameras": self.cameras, "render_every_substep": render_every_substep,
                         "concurrent_stages": concurrent_stages, "mujoco_gl": mujoco_gl}
        self.workers: list[SimWorker] = []
        self._executors: list[cf.ThreadPoolExecutor] = []
        self._infos: list[dict] = []
        self.restarts = 0
        self._closed = False
        try:
            for w in range(self.num_workers):
                self._start(w)
        except BaseException:
            self.close()
            raise

    @property
    def capacity(self) -> int:
        """Trajectories per rollout: workers x stages x envs."""
        return self.num_workers * self.num_stages * self.num_envs

    @property
    def infos(self) -> list[dict]:
        return list(self._infos)

    def _start(self, w: int) -> None:
        worker = SimWorker(*self._make_args, w, **self._make_kw)
        executor = cf.ThreadPoolExecutor(max_workers=self.num_stages, thread_name_prefix=f"sim{w}")
        if w < len(self.workers):
            self.workers[w], self._executors[w], self._infos[w] = worker, executor, worker.info()
        else:
            self.workers.append(worker)
            self._executors.append(executor)
            self._infos.append(worker.info())

    def issue_reset(self, worker: int, stage: int, rows: np.ndarray, task_ids: np.ndarray, state_ids: np.ndarray,
                    group_ids: np.ndarray, seed: int) -> _Call:
        w = self.workers[worker]
        fut = self._executors[worker].submit(w.reset, stage, rows, task_ids, state_ids, group_ids, seed)
        return _Call(worker, stage, "reset", fut)

    def issue_step(self, worker: int, stage: int, rows: np.ndarray, actions: np.ndarray) -> _Call:
        fut = self._executors[worker].submit(self.workers[worker].step, stage, rows, actions)
        return _Call(worker, stage, "step", fut)

    def issue_demo(self, worker: int, stage: int, task_ids: np.ndarray, state_ids: np.ndarray, seed: int,
                   max_steps: int | None = None) -> _Call:
        fut = self._executors[worker].submit(self.workers[worker].demonstrate, stage, task_ids, state_ids, seed,
                                             max_steps)
        return _Call(worker, stage, "demo", fut)

    def wait(self, handles: Sequence[_Call], *, timeout_s: float | None, wait_all: bool = False) -> list[_Call]:
        if handles:
            cf.wait([h.future for h in handles], timeout=timeout_s,
                    return_when=cf.ALL_COMPLETED if wait_all else cf.FIRST_COMPLETED)
        return [h for h in handles if h.future.done()]

    def result(self, handle: _Call) -> SimResult:
        """The call's result; raises what the worker raised (`SimFailure` for a failed simulator process)."""
        return handle.future.result()

    def restart(self, worker: int) -> None:
        old, executor = self.workers[worker], self._executors[worker]
        threading.Thread(target=_retire, args=(executor, old), name=f"retire-sim{worker}", daemon=True).start()
        self._start(worker)
        self.restarts += 1

    def clear_busy(self) -> None:
        self.take_busy()

    def take_busy(self) -> list[float]:
        return [w.take_busy() for w in self.workers]

    def close(self) -> None:
        """Wait for running calls, then close every worker's envs. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for executor in self._executors:
            executor.shutdown(wait=True, cancel_futures=True)
        for w in self.workers:
            w.close()
        self.workers, self._executors = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
