"""`vlajax train` as several JAX processes on one machine (2 CPU processes x 2 devices, gloo):

(a) a 2-process run takes a checkpoint, is resumed on 2 processes, then again on 1 process: the
    metrics file has every step once (no gap, no repeat), only process 0 wrote logs, each resumed run
    printed the resume line;
(b) killing one process mid-run ends the other with an error naming the dead process within the
    heartbeat timeout, and no process of the job is left behind.

Each process is `python -m vlajax.cli train demo ...` with the JAX_* launch variables, in its own
session (so a test can end one "node" with everything it started); a temp cwd holds the relative
run directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
HEARTBEAT_S = 10
TINY = [
    "actor_rollout_ref.model.image_size=56", "actor_rollout_ref.rollout.n=4", "data.train_batch_size=2",
    "env.train.num_envs=2", "env.train.max_episode_steps=16", "env.train.init_params.camera_heights=32",
    "env.train.init_params.camera_widths=32", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4", "actor_rollout_ref.actor.ppo_epochs=1",
    "data.val_num_trials_per_task=1", "trainer.test_freq=-1", "trainer.val_before_train=false",
    "trainer.save_freq=1", "data.filter_accuracy=false", "trainer.logger=[console,jsonl]",
    "trainer.default_local_dir=run", "ray.num_cpus=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Job:
    """`nproc` processes of one `vlajax train` job in `cwd`; logs in cwd/<tag>.<i>.log."""

    def __init__(self, cwd: Path, tag: str, nproc: int, overrides: list[str], env: dict | None = None):
        self.cwd, self.tag, self.started = cwd, tag, time.monotonic()
        port = free_port()
        self.procs: list[subprocess.Popen] = []
        try:
            for i in range(nproc):
                e = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                     "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                     "JAX_COMPILATION_CACHE_DIR": str(cwd / "jax_cache"),
                     "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **(env or {})}
                if nproc > 1:
                    e.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(nproc),
                             JAX_PROCESS_ID=str(i))
                with open(self.log_path(i), "w") as f:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, "-m", "vlajax.cli", "train", "demo", f"trainer.nnodes={nproc}", *TINY,
                         *overrides], cwd=cwd, env={**e, "PYTHONPATH": str(ROOT)}, stdout=f,
                        stderr=subprocess.STDOUT, start_new_session=True))
        except BaseException:
            self.kill()
            raise

    def log_path(self, i: int) -> Path:
        return self.cwd / f"{self.tag}.{i}.log"

    def log(self, i: int) -> str:
        return self.log_path(i).read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {self.tag} process {i}:\n{self.log(i)[-3000:]}" for i in range(len(self.procs)))

    def wait(self, timeout: float) -> list[int]:
        deadline = self.started + timeout
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        alive = [i for i, p in enumerate(self.procs) if p.poll() is None]
        if alive:
            logs = self.logs()
            self.kill()
            pytest.fail(f"{self.tag}: processes {alive} still running after {timeout} s\n{logs}")
        return [p.returncode for p in self.procs]

    def kill_session(self, i: int) -> None:
        """End process i and everything it started (its session): a node going down."""
        try:
            os.killpg(self.procs[i].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.procs[i].wait()

    def kill(self) -> None:
        for i in range(len(self.procs)):
            self.kill_session(i)

    def leftovers(self) -> list[int]:
        """Pids still in any of the job's sessions."""
        sids = {p.pid for p in self.procs}
        out = []
        for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
            try:
                if os.getsid(pid) in sids and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
                    out.append(pid)
            except (OSError, IndexError):
                pass
        return out


def _steps(run: Path) -> list[int]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [x["step"] for x in lines if "train/success_rate" in x]


@pytest.mark.slow  # three short runs, one after the other (~2 min each on 2 busy cores)
def test_resume_across_process_counts(tmp_path):
    runs = []
    try:
        for tag, nproc, steps in (("a", 2, 1), ("b", 2, 2), ("c", 1, 3)):
            job = Job(tmp_path, tag, nproc, [f"trainer.total_training_steps={steps}"])
            runs.append(job)
            codes = job.wait(360)
            assert codes == [0] * nproc, f"{tag}: exit codes {codes}\n{job.logs()}"
            assert not job.leftovers(), f"{tag}: processes left behind"
        a, b, c = runs
        run = tmp_path / "run"
        assert _steps(run) == [1, 2, 3]  # no gap, no repeat: only process 0 logs, resumed at the right step
        assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
        assert "vlajax train: resumed from checkpoint" not in a.log(0)
        assert f"resumed from checkpoint {run.resolve()}/checkpoints/1 at training step 1" in b.log(0)
        assert f"resumed from checkpoint {run.resolve()}/checkpoints/2 at training step 2" in c.log(0)
        for job, last in ((a, 1), (b, 2)):  # console metrics and the resume line: process 0 only
            assert f"step {last}/{last}" in job.log(0) and f"step {last}/{last}" not in job.log(1)
            assert "resumed from checkpoint" not in job.log(1)
        assert (run / "eval" / "final.md").exists() and (run / "learning_curve.png").exists()
    finally:
        for job in runs:
            job.kill()


@pytest.mark.slow  # one 2-process run until its first step (~2 min), then the heartbeat timeout
def test_killed_process_ends_the_other(tmp_path):
    job = Job(tmp_path, "k", 2, ["trainer.total_training_steps=50"],
              env={"VLAJAX_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S)})
    try:
        deadline = time.monotonic() + 300
        while "step 1/50" not in job.log(0):
            assert time.monotonic() < deadline, f"no first step within 300 s\n{job.logs()}"
            assert all(p.poll() is None for p in job.procs), job.logs()
            time.sleep(1)
        job.kill_session(1)
        killed = time.monotonic()
        p0 = job.procs[0]
        try:
            p0.wait(HEARTBEAT_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process 0 still running {HEARTBEAT_S + 60} s after process 1 died\n{job.logs()}")
        waited = time.monotonic() - killed
        log0 = job.log(0)
        from vlajax.train import PEER_LOST_EXIT_CODE

        assert p0.returncode == PEER_LOST_EXIT_CODE, f"exit code {p0.returncode}\n{log0[-3000:]}"
        assert f"process 0 of 2: process(es) 1 stopped (no heartbeat for {HEARTBEAT_S} s)" in log0, log0[-3000:]
        assert waited < HEARTBEAT_S + 60
        time.sleep(2)
        assert not job.leftovers(), "processes of the job left behind"
    finally:
        job.kill()


def test_nnodes_needs_a_multi_process_launch(monkeypatch):
    """Single process: trainer.nnodes=2 is an error saying how to launch; a described job of another
    size is an error naming both counts."""
    from vlajax.config import ConfigError, load_config

    for k in ("JAX_NUM_PROCESSES", "NUM_PROCESSES", "WORLD_SIZE", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match=r"ray\.address=auto.*srun") as e:
        load_config(None, ["trainer.nnodes=2"])
    assert e.value.key == "trainer.nnodes"
    monkeypatch.setenv("JAX_NUM_PROCESSES", "3")
    with pytest.raises(ConfigError, match="trainer.nnodes=2 but the job has 3 processes"):
        load_config(None, ["trainer.nnodes=2"])


def test_group_buffer_pop_limit():
    """The lockstep rule's `pop(limit)`: every process takes the same number of groups."""
    import numpy as np

    from vlajax.rl.dynamic_sampling import GroupBuffer

    buf = GroupBuffer(3, lower=0.0, upper=1.0, max_rounds=1)
    g = np.repeat(np.arange(3), 2)
    buf.add({"x": np.arange(6)}, np.ones(6, bool), g)
    with pytest.warns(RuntimeWarning, match="only 2/3 groups"):
        batch = buf.pop(limit=2)
    assert batch.num_groups == 2 and batch.trajectories["x"].tolist() == [0, 1, 2, 3] and not batch.full
    buf.add({"x": np.arange(6)}, np.ones(6, bool), g + 10)
    assert buf.pop().num_groups == 3  # without a limit: as before
