"""`vlajax demos`: demonstrations made by the simulator's scripted expert, in LIBERO's HDF5 layout.

Why: SFT needs demonstrations, and a machine with no hub (an air-gapped cluster) has none. The
expert (`vlajax.envs.libero_expert`) runs inside the same simulator workers that rollouts use (Ray
actors, each with its env processes), on sampled initial states (never the 50 evaluation states),
and only its successful episodes are kept. Each kept episode is appended to its task's file at
once, so an interrupted run keeps what it finished; rerunning the same command continues where it
stopped (attempts already made are not repeated: `demos_progress.json` beside the files).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from vlajax.config import ConfigError, RunConfig
from vlajax.envs.base import sampled_state_id

log = logging.getLogger(__name__)

PROGRESS_FILE = "demos_progress.json"
DEMO_SEED = 7919  # sampled-state seeds of demonstrations: a stream of their own (training's come from the run seed)


@dataclasses.dataclass
class TaskProgress:
    """Per task: attempts finished, the next attempt's index (attempts in flight when a run stopped
    are not repeated), successes kept, and why the task stopped early (if it did)."""

    attempts: int = 0
    next_attempt: int = 0
    successes: int = 0
    stopped: str | None = None


def demo_state_id(task_id: int, attempt: int) -> int:
    """The sampled initial state of a task's `attempt`-th demonstration (fixed, so a resumed run
    makes the same attempts)."""
    seed = np.random.SeedSequence([DEMO_SEED, int(task_id), int(attempt)]).generate_state(1, np.uint32)[0]
    return sampled_state_id(int(seed))


class _Progress:
    """`demos_progress.json`: what was attempted, written atomically after every batch."""

    def __init__(self, folder: Path, suite: str):
        self.path = folder / PROGRESS_FILE
        self.tasks: dict[str, TaskProgress] = {}
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("suite") != suite:
                raise ConfigError(f"{self.path} belongs to suite {data.get('suite')!r}, not {suite!r}: "
                                  f"choose another --out")
            self.tasks = {k: TaskProgress(**v) for k, v in data["tasks"].items()}
        self.suite = suite

    def task(self, name: str) -> TaskProgress:
        return self.tasks.setdefault(name, TaskProgress())

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"suite": self.suite, "tasks": {k: dataclasses.asdict(v) for k, v in
                                                                  self.tasks.items()}}, indent=1))
        os.replace(tmp, self.path)


def episode_from_record(rec: dict):
    """A `SingleEnv.demonstrate` record as a dataset `Episode` (what `DemoWriter.append` takes)."""
    from vlajax.data.libero_hdf5 import Episode

    return Episode(images=rec["images"], proprio=rec["proprio"], actions=rec["actions"],
                   instruction=rec["instruction"], task=rec["task"], state_id=rec["state_id"],
                   states=rec["states"], joint_states=rec["joint_states"], eef_quat=rec["eef_quat"])


def make_demos(cfg: RunConfig, out: Path, *, per_task: int, tasks: Sequence[int] | None = None,
               max_attempts: int | None = None, progress_bar: bool = True) -> dict[str, TaskProgress]:
    """Until every task in `tasks` (default: all of the suite) has `per_task` successful episodes
    in `out/<suite>/`, or `max_attempts` (default 4 x per_task) were made for it. Returns the
    per-task progress (also printed as a table)."""
    from tqdm import tqdm

    from vlajax.data.libero_hdf5 import DemoWriter
    from vlajax.distributed.pools import open_sim_pool
    from vlajax.session import make_env_fn

    t, sim = cfg.env.train, cfg.simulator
    suite = t.task_suite_name
    if not sim.has_expert:
        raise ConfigError(f"env.train.simulator_type={sim.name} has no scripted expert to make demonstrations "
                          f"(LIBERO has one)", key="env.train.simulator_type")
    if per_task < 1:
        raise ConfigError(f"--per-task must be >= 1, got {per_task}")
    max_attempts = 4 * per_task if max_attempts is None else int(max_attempts)
    folder = Path(out) / suite
    folder.mkdir(parents=True, exist_ok=True)
    progress = _Progress(folder, suite)

    pool, closers = open_sim_pool(cfg.placement(), make_env_fn(cfg), num_envs=t.num_envs,
                                  num_stages=cfg.env.rollout.pipeline_stage_num,
                                  cameras=tuple(t.init_params.camera_names),
                                  mujoco_gl=t.mujoco_gl if sim.mujoco_gl else None, ray_address=cfg.ray.address,
                                  ray_num_cpus=cfg.ray.num_cpus, ray_temp_dir=cfg.ray.temp_dir)
    writers = None
    try:
        specs = pool.infos[0]["tasks"]
        task_ids = list(range(len(specs))) if tasks is None else [int(i) for i in tasks]
        bad = [i for i in task_ids if not 0 <= i < len(specs)]
        if bad:
            raise ConfigError(f"--tasks {bad}: {suite} has tasks 0..{len(specs) - 1}")
        writers = {i: DemoWriter(Path(out), suite, specs[i].name, specs[i].instruction,
                                 env_args=_env_args(cfg)) for i in task_ids}
        for i in task_ids:  # the files are the truth for what was kept
            progress.task(specs[i].name).successes = writers[i].num_demos
        done_states = {i: writers[i].state_ids() for i in task_ids}

        def wanted(i: int) -> bool:
            p = progress.task(specs[i].name)
            return p.stopped is None and p.successes < per_task and p.next_attempt < max_attempts

        def next_attempts(n: int) -> list[tuple[int, int]]:
            """Up to n (task, state) pairs, round-robin over tasks that still need episodes."""
            pairs: list[tuple[int, int]] = []
            while len(pairs) < n:
                added = False
                for i in task_ids:
                    p = progress.task(specs[i].name)
                    if len(pairs) < n and wanted(i):
                        state = demo_state_id(i, p.next_attempt)
                        p.next_attempt += 1
                        if state not in done_states[i]:
                            pairs.append((i, state))
                        added = True
                if not added:
                    break
            return pairs

        total = per_task * len(task_ids)
        bar = tqdm(total=total, initial=sum(min(per_task, progress.task(specs[i].name).successes) for i in task_ids),
                   desc=f"demos {suite}", unit="demo", disable=not progress_bar, dynamic_ncols=True)
        slots = [(w, s) for w in range(pool.num_workers) for s in range(pool.num_stages)]
        running: dict = {}
        t0 = time.monotonic()

        def issue(slot) -> None:
            pairs = next_attempts(t.num_envs)
            if pairs:
                h = pool.issue_demo(slot[0], slot[1], np.array([p[0] for p in pairs]),
                                    np.array([p[1] for p in pairs]), t.seed, t.max_episode_steps)
                running[h] = slot

        try:
            for slot in slots:
                issue(slot)
            while running:
                for h in pool.wait(list(running), timeout_s=None):
                    slot = running.pop(h)
                    for rec in pool.result(h):
                        i = rec["task_id"]
                        p = progress.task(specs[i].name)
                        p.attempts += 1
                        if rec["error"]:
                            p.stopped = rec["error"]
                        elif rec["success"] and p.successes < per_task:
                            writers[i].append(episode_from_record(rec))
                            done_states[i].add(rec["state_id"])
                            p.successes += 1
                            bar.update(1)
                    progress.save()
                    attempts = sum(progress.task(specs[i].name).attempts for i in task_ids)
                    bar.set_postfix(attempts=attempts)
                    issue(slot)
        finally:
            progress.save()
            bar.close()
        elapsed = time.monotonic() - t0
    finally:
        for w in (writers or {}).values():
            w.close()
        for close in closers:
            close()
    result = {specs[i].name: progress.task(specs[i].name) for i in task_ids}
    print(summary_table(result, per_task))
    print(f"demonstrations in {folder} ({elapsed:.0f} s)")
    return result


def summary_table(progress: dict[str, TaskProgress], per_task: int) -> str:
    """Attempts and successes per task, as a markdown table."""
    lines = ["| task | attempts | kept | success rate | note |", "|---|---:|---:|---:|---|"]
    for name, p in progress.items():
        rate = p.successes / p.attempts if p.attempts else float("nan")
        note = p.stopped or ("" if p.successes >= per_task else "attempts exhausted")
        lines.append(f"| {name} | {p.attempts} | {p.successes} | {rate:.2f} | {note} |")
    a, s = sum(p.attempts for p in progress.values()), sum(p.successes for p in progress.values())
    lines.append(f"| all | {a} | {s} | {s / a if a else float('nan'):.2f} | |")
    return "\n".join(lines)


def _env_args(cfg: RunConfig) -> dict:
    ip = cfg.env.train.init_params
    return {"type": 1, "env_name": cfg.env.train.task_suite_name,
            "env_kwargs": {"camera_names": list(ip.camera_names), "camera_heights": ip.camera_heights,
                           "camera_widths": ip.camera_widths, "control_freq": 20}}
