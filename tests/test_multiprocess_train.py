"""`vlajax train` as several JAX processes on one machine (CPU devices, gloo collectives):

(a) launched as a user launches it, `vlajax train demo trainer.nnodes=2 ray.address=auto` on a real
    2-node Ray cluster on this machine (one trainer per raylet, one CPU device each, as a one-GPU
    node has; the data axis alone crosses processes): a 2-process run takes a checkpoint,
    is resumed on 2 processes, then again on 1 process (`trainer.nnodes=1`); the metrics file has
    every step once (no gap, no repeat), only process 0 wrote logs, each resumed run printed the
    resume line, no process and no Ray resource is left behind;
(b) launched with the JAX_* variables (as srun or any other launcher does), 2 devices per process
    (FSDP inside each), each process
    `python -m vlajax.cli train demo ...` in its own session (a "node"): killing one mid-run ends the
    other with an error naming the dead process within the heartbeat timeout, and no process of the
    job is left behind.

A temp cwd holds the relative run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, Job, free_port, kill_sessions, pids_where

ROOT = Path(__file__).parent.parent
HEARTBEAT_S = 10
RUN = TINY_RUN + [  # a 2-step-a-minute demo: 2 groups of 4 per step, on 2 envs
    "env.train.num_envs=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.actor.ppo_epochs=1", "trainer.logger=[console,jsonl]", "trainer.default_local_dir=run",
]


def _train_job(cwd: Path, tag: str, nproc: int, overrides: list[str], env: dict | None = None) -> Job:
    """`nproc` processes of one `vlajax train` job in `cwd` (2 CPU devices each, the JAX_* variables as
    a launcher sets them); logs in cwd/<tag>.<i>.log."""

    def command(i: int, port: int) -> tuple[list[str], dict]:
        e = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
             "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
             "JAX_COMPILATION_CACHE_DIR": str(cwd / "jax_cache"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **(env or {})}
        if nproc > 1:
            e.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(nproc), JAX_PROCESS_ID=str(i))
        return ([sys.executable, "-m", "vlajax.cli", "train", "demo", f"trainer.nnodes={nproc}", *RUN, "ray.num_cpus=2",
                 *overrides], {**e, "PYTHONPATH": str(ROOT)})

    return Job(range(nproc), command, out=cwd, tag=tag)


def _steps(run: Path) -> list[int]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [x["step"] for x in lines if "train/success_rate" in x]


RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # the same for every process of the test


class RayCluster:
    """A real 2-node Ray cluster on this machine, started as a user starts one: `ray start --head` and
    `ray start --address=...` (two raylets, 2 CPUs each), `--block` so that ending those two
    processes stops everything they started. Its own temp dir ($RAY_TMPDIR: `ray.address=auto` finds
    it there), its own ports. Nothing of it lives in the pytest process, whose own Ray state other
    tests use (Ray caches its auth mode per process)."""

    def __init__(self, cpus: int = 2):
        self.tmp = tempfile.mkdtemp(prefix="vjm_", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": self.tmp}
        ray_cli = str(Path(sys.executable).parent / "ray")
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        node = lambda: ["--block", f"--num-cpus={cpus}", f"--dashboard-agent-listen-port={free_port()}",  # noqa: E731
                        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        self.procs = []
        try:
            self.procs.append(self._start([ray_cli, "start", "--head", f"--port={port}", "--include-dashboard=false",
                                           f"--ray-client-server-port={free_port()}", *node()], "head"))
            self._wait_nodes(1)
            self.procs.append(self._start([ray_cli, "start", f"--address={self.address}", *node()], "node2"))
            self._wait_nodes(2)
        except BaseException:
            self.stop()
            raise

    def _start(self, cmd: list[str], tag: str) -> subprocess.Popen:
        with open(Path(self.tmp) / f"{tag}.log", "w") as f:
            return subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def query(self, code: str) -> dict:
        """Run `code` (which sets `out`) in a fresh driver connected to the cluster; `out` as a dict."""
        script = (f"import json, ray\nray.init(address={self.address!r}, log_to_driver=False)\n{code}\n"
                  "print('OUT ' + json.dumps(out))")
        r = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True, timeout=120)
        line = [x for x in r.stdout.splitlines() if x.startswith("OUT ")]
        assert line, f"query failed: {r.stdout[-2000:]}{r.stderr[-3000:]}"
        return json.loads(line[-1][4:])

    def _wait_nodes(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert all(p.poll() is None for p in self.procs), self.logs()
            try:
                if self.query("out = {'n': sum(x['Alive'] for x in ray.nodes())}")["n"] >= n:
                    return
            except AssertionError:
                pass
            assert time.monotonic() < deadline, f"{n} Ray node(s) not up in {timeout} s\n{self.logs()}"
            time.sleep(2)

    def released(self) -> tuple[bool, dict]:
        """Every placement group removed and every CPU free again (a few seconds' grace)."""
        code = ("import time\nfor _ in range(30):\n"
                "    out = {'pgs': [v['state'] for v in ray.util.placement_group_table().values()],\n"
                "           'free': ray.available_resources().get('CPU'), 'total': ray.cluster_resources().get('CPU')}\n"
                "    if all(s == 'REMOVED' for s in out['pgs']) and out['free'] == out['total']:\n"
                "        break\n"
                "    time.sleep(1)")
        out = self.query(code)
        return all(s == "REMOVED" for s in out["pgs"]) and out["free"] == out["total"], out

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-2000:]}" for p in Path(self.tmp).glob("*.log"))

    def stop(self) -> None:
        """End the two `ray start --block` processes (they stop their nodes); SIGKILL what is left of
        their sessions after 30 s."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 30
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        kill_sessions(p.pid for p in self.procs)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def ray_cluster():
    c = RayCluster()
    try:
        yield c
    finally:
        c.stop()


class UserCommand:
    """`vlajax train demo ...` run the way a user types it, in `cwd` (relative run dir), on the Ray
    cluster (`ray.address=auto`); output in cwd/<tag>.log."""

    def __init__(self, cwd: Path, tag: str, overrides: list[str], cluster: RayCluster):
        self.cwd, self.log_path = cwd, cwd / f"{tag}.log"
        # one CPU device per process, as a user gets by default (and as a one-GPU node has); the
        # JAX_* variables reach the launched processes through the launcher
        env = {**cluster.env, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
               "JAX_COMPILATION_CACHE_DIR": str(cwd / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        env.pop("XLA_FLAGS", None)
        with open(self.log_path, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "vlajax.cli", "train", "demo", "ray.address=auto",
                                          *RUN, *overrides], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running after {timeout} s\n{self.log()[-5000:]}")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def _in_dir(cwd: Path) -> list[int]:
    """Pids of live processes whose working directory is `cwd`: the trainers."""
    return pids_where(lambda pid: Path(f"/proc/{pid}/cwd").resolve() == cwd.resolve())


@pytest.mark.slow  # three short runs, one after the other (~2 min each on 2 busy cores)
def test_launched_run_resumes_across_process_counts(tmp_path, ray_cluster):
    """The user's commands on a 2-node cluster: `vlajax train demo trainer.nnodes=2 ray.address=auto`
    (one trainer per node, launched through Ray) for 1 step; the same for 2 steps (resumes on 2
    processes); `trainer.nnodes=1` for 3 steps (resumes on 1). Metrics have every step once, only
    process 0 writes logs, each resumed run prints where it resumed, nothing is left running."""
    runs = []
    try:
        for tag, nnodes, steps in (("a", 2, 1), ("b", 2, 2), ("c", 1, 3)):
            cmd = UserCommand(tmp_path, tag, [f"trainer.nnodes={nnodes}", f"trainer.total_training_steps={steps}"],
                              ray_cluster)
            runs.append(cmd)
            code = cmd.wait(420)
            assert code == 0, f"{tag}: exit code {code}\n{cmd.log()[-5000:]}"
            assert not _in_dir(tmp_path), f"{tag}: processes left behind"
            ok, state = ray_cluster.released()
            assert ok, f"{tag}: Ray resources not released: {state}"
        a, b, c = (r.log() for r in runs)
        run = tmp_path / "run"
        assert _steps(run) == [1, 2, 3]  # no gap, no repeat: only process 0 logs, resumed at the right step
        assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
        for log in (a, b):  # one trainer per node (STRICT_SPREAD over the two raylets), both joined
            assert "vlajax train: 2 trainer processes finished" in log, log[-3000:]
            for i in range(2):
                assert f"] vlajax: process {i} of 2 on " in log and "devices local 1 / global 2" in log, log[-3000:]
        assert "resumed from checkpoint" not in a
        assert "[0@" in b and f"resumed from checkpoint {run.resolve()}/checkpoints/1 at training step 1" in b
        assert f"resumed from checkpoint {run.resolve()}/checkpoints/2 at training step 2" in c
        for log, last in ((a, 1), (b, 2)):  # console metrics, the resume line and the summary: process 0 only
            assert f"step {last}/{last}" in log
            ones = [x for x in log.splitlines() if x.startswith("[1@")]
            assert not any("step " in x or "resumed from" in x or "run directory:" in x for x in ones), ones
            assert log.count("run directory: ") == 1
        assert (run / "eval" / "final.md").exists() and (run / "learning_curve.png").exists()
    finally:
        for r in runs:
            r.kill()


@pytest.mark.slow  # one 2-process run until its first step (~2 min), then the heartbeat timeout
def test_killed_process_ends_the_other(tmp_path):
    job = _train_job(tmp_path, "k", 2, ["trainer.total_training_steps=50"],
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
        from vlajax.distributed.job import PEER_LOST_EXIT_CODE

        assert p0.returncode == PEER_LOST_EXIT_CODE, f"exit code {p0.returncode}\n{log0[-3000:]}"
        lost = f"process 0 of 2: process(es) 1 stopped (no heartbeat for {HEARTBEAT_S} s)"
        assert log0.count(lost) == 1, log0[-3000:]  # named once, and no anonymous collective error first
        assert not any(s in log0 for s in ("Connection closed by peer", "AllGather failed")), log0[-3000:]
        assert waited < HEARTBEAT_S + 60
        time.sleep(2)
        assert not job.leftovers(), "processes of the job left behind"
    finally:
        job.kill()


def test_nnodes_needs_a_multi_process_launch(monkeypatch, capsys):
    """One process and trainer.nnodes=2: the config loads (the head node launches from it), `vlajax
    train` without a Ray cluster says how to start one, and training in that process is an error
    naming the key and saying how to launch; a described job of another size is a config error."""
    from vlajax import cli
    from vlajax.config import ConfigError, load_config
    from vlajax.train import train

    for k in ("JAX_NUM_PROCESSES", "NUM_PROCESSES", "WORLD_SIZE", "SLURM_JOB_ID", "VLAJAX_LAUNCHED",
              "VLAJAX_LAUNCH_STRATEGY"):
        monkeypatch.delenv(k, raising=False)
    cfg = load_config(None, ["trainer.nnodes=2"])
    assert cli.main(["train", "trainer.nnodes=2"]) == 1  # embedded Ray is one node: nothing is started
    assert "trainer.nnodes=2 needs a Ray cluster of 2 train nodes: start one" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"cannot train in a single process.*ray\.address=auto.*srun") as e:
        train(cfg)
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


def test_processes_draw_their_own_sampling_noise():
    """Each decode row's key is fold_in(fold_in(round key, row), call), rows counted per process: the
    round key must differ per process, or row i of every process would sample the same noise. One
    process keeps its (seed, step, round) key, which exact resume relies on."""
    import jax
    import numpy as np

    from vlajax.distributed.job import rollout_key

    base = jax.random.key(0)
    data = lambda k: np.asarray(jax.random.key_data(k))  # noqa: E731
    want = jax.random.fold_in(jax.random.fold_in(base, 3), 1)
    np.testing.assert_array_equal(data(rollout_key(base, 3, 1)), data(want))
    row_noise = [jax.random.uniform(jax.random.fold_in(jax.random.fold_in(rollout_key(base, 3, 1, p), 5), 0), (4,))
                 for p in (0, 1)]
    assert not np.allclose(row_noise[0], row_noise[1])
    assert not np.array_equal(data(rollout_key(base, 3, 1, 0)), data(rollout_key(base, 3, 2, 0)))


@pytest.mark.parametrize("layout", [[], ["env.disagg_sim.enable=true", "env.disagg_sim.nnodes=4"]],
                         ids=["colocated", "disaggregated"])
def test_each_process_places_its_share_of_the_simulators(layout, monkeypatch):
    """Process configs of a 2-process job: together they place exactly the configured simulators
    (one train node's worth each, or half the simulator nodes each), and a job-wide rollout round
    is the processes' rounds put together."""
    from vlajax.config import load_config

    for k in ("JAX_NUM_PROCESSES", "NUM_PROCESSES", "WORLD_SIZE", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    cfg = load_config("demo", ["trainer.nnodes=2", "env.rollout.pipeline_stage_num=1", "env.train.num_envs=4", *layout])
    mine = cfg.per_process(2)
    assert mine.trainer.nnodes == 1 and cfg.trainer.nnodes == 2
    assert mine.placement().num_workers * 2 == cfg.placement().num_workers
    assert mine.envs_per_round * 2 == cfg.envs_per_round
    if layout:
        assert mine.env.disagg_sim.nnodes == 2
    assert cfg.per_process(1) is cfg  # one process: the config as it is
