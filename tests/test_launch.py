"""The multi-node launcher (`vlajax.distributed.launch`) on a real 2-node Ray cluster on one machine
(`ray.cluster_utils.Cluster`, its own temp dir): STRICT_SPREAD puts one child on each node, the two
children join one JAX job (2 CPU processes x 2 devices, gloo) and psum across it; a child that exits
3 fails the launch with an error naming it and its node, and its peer (which ignores SIGTERM) is
killed within the stop timeout; the placement group is removed every time. Plus the `vlajax train`
hook: single-node never launches, nnodes > 1 launches with the same arguments."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import ray

from tests._ray_cluster import local_cluster
from tests.conftest import alive
from vlajax.distributed import launch as L

ROOT = Path(__file__).parent.parent
CHILD_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}

# Joins via the launcher's JAX_* variables; each process contributes (process id + 1) per device.
PSUM = textwrap.dedent("""
    import os, sys
    from vlajax.distributed.multihost import initialize
    info = initialize(initialization_timeout=90)
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("i",))
    local = np.full((jax.local_device_count(),), info.process_id + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("i")), local)
    total = jax.jit(lambda a: jax.shard_map(lambda b: jax.lax.psum(b, "i"), mesh=mesh, in_specs=P("i"),
                                            out_specs=P())(a))(x)
    print(f"joined {info.process_id} of {info.num_processes} launched={os.environ['VLAJAX_LAUNCHED']} "
          f"devices {jax.local_device_count()}/{jax.device_count()} psum {float(np.asarray(total.addressable_data(0))[0])}",
          flush=True)
""")

# Process 0 ignores SIGTERM (the stop must escalate to SIGKILL) and sleeps; process 1 fails.
FAIL = textwrap.dedent("""
    import os, signal, sys, time
    pid = int(os.environ["JAX_PROCESS_ID"])
    print(f"child {pid} pid {os.getpid()}", flush=True)
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600)
    time.sleep(2)
    print("boom: simulated trainer failure", file=sys.stderr, flush=True)
    sys.exit(3)
""")


@pytest.fixture(scope="module")
def cluster():
    with local_cluster("vjl_", {"num_cpus": 1}, {"num_cpus": 1}) as (c, _, _):
        yield c


def _no_live_placement_groups() -> bool:
    return all(v["state"] == "REMOVED" for v in ray.util.placement_group_table().values())


def _pids(text: str) -> dict[int, int]:
    """{process id: pid} from the children's "[i@IP] child I pid P" lines (other lines skipped)."""
    words = (line.split("] ", 1)[-1].split() for line in text.splitlines())
    return {int(w[1]): int(w[3]) for w in words if len(w) == 4 and w[0] == "child" and w[2] == "pid"}


def test_two_children_join_one_jax_job_and_psum(cluster):
    out = io.StringIO()
    res = L.launch([], 2, command=[L.PYTHON, "-c", PSUM], env=CHILD_ENV, cwd=str(ROOT), stream="all", out=out)
    assert res.exit_codes == [0, 0], out.getvalue()
    # each process: 2 local of 4 global devices; psum over devices = 2 * 1 + 2 * 2
    for i in range(2):
        assert f"joined {i} of 2 launched=1 devices 2/4 psum 6.0" in res.stdout_tail[i], out.getvalue()
        assert f"[{i}@{res.node_ips[i]}] joined {i} of 2" in out.getvalue()
    assert res.coordinator.startswith(res.node_ips[0] + ":")
    assert _no_live_placement_groups()


def test_launched_child_prints_where_it_stands(cluster):
    """The join of `vlajax train`'s launched child (cli._join) prints one line per process."""
    cmd = [L.PYTHON, "-c", "from vlajax.cli import _join; _join(2)"]
    res = L.launch([], 2, command=cmd, env=CHILD_ENV, cwd=str(ROOT), stream="none")
    assert res.exit_codes == [0, 0]
    for i in range(2):
        line = next(x for x in res.stderr_tail[i] if x.startswith("vlajax: process"))  # stderr: shown for all
        assert line.startswith(f"vlajax: process {i} of 2 on ") and line.endswith("devices local 2 / global 4"), line


def test_failed_child_stops_the_others_and_is_named(cluster):
    out = io.StringIO()
    t0 = time.monotonic()
    with pytest.raises(L.LaunchError) as err:
        L.launch([], 2, command=[L.PYTHON, "-c", FAIL], cwd=str(ROOT), stream="all", out=out, stop_timeout_s=3)
    msg = str(err.value)
    assert err.value.exit_code == 3
    assert "trainer process 1 of 2 on node " in msg and "exited with code 3" in msg, msg
    assert "boom: simulated trainer failure" in msg
    pids = _pids(out.getvalue())
    assert set(pids) == {0, 1}, out.getvalue()
    assert not alive(pids[0]) and not alive(pids[1])  # the SIGTERM-ignoring peer was SIGKILLed
    assert time.monotonic() - t0 < 60
    assert _no_live_placement_groups()


def test_interrupting_the_launcher_stops_every_child(cluster, tmp_path):
    """A launcher in its own process (as `vlajax train` runs) gets SIGTERM: no child survives."""
    driver = textwrap.dedent(f"""
        import signal, sys
        from vlajax.distributed import launch as L
        from vlajax.distributed.ray_sim import init_ray
        signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))  # as vlajax.cli does
        init_ray({cluster.address!r})
        L.launch([], 2, command=[L.PYTHON, "-c", "import os, time; print('child', os.environ['JAX_PROCESS_ID'], "
                 "'pid', os.getpid(), flush=True); time.sleep(600)"], stream="all", stop_timeout_s=3)
    """)
    log = tmp_path / "launcher.txt"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 90
        while len(_pids(log.read_text())) < 2 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.5)
        pids = _pids(log.read_text())
        assert set(pids) == {0, 1}, log.read_text()
        p.send_signal(signal.SIGTERM)
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGTERM, log.read_text()
    assert not any(alive(x) for x in pids.values())
    deadline = time.monotonic() + 20  # the launcher's removal reaches the GCS asynchronously
    while not _no_live_placement_groups() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _no_live_placement_groups()


def test_strict_spread_on_too_few_nodes_fails_clearly(cluster):
    with pytest.raises(L.LaunchError, match=r"trainer.nnodes=3: .*STRICT_SPREAD was not placed within 2 s.*"
                                            r"VLAJAX_LAUNCH_STRATEGY=PACK"):
        L.launch([], 3, command=[L.PYTHON, "-c", "pass"], placement_timeout_s=2)
    assert _no_live_placement_groups()


def test_strategy_and_child_detection(monkeypatch):
    for k in ("VLAJAX_LAUNCH_STRATEGY", "VLAJAX_LAUNCHED", "JAX_NUM_PROCESSES", "NUM_PROCESSES", "WORLD_SIZE",
              "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert L.placement_strategy() == "STRICT_SPREAD" and not L.in_multiprocess_job()
    monkeypatch.setenv("VLAJAX_LAUNCH_STRATEGY", "pack")
    assert L.placement_strategy() == "PACK"
    monkeypatch.setenv("VLAJAX_LAUNCH_STRATEGY", "bogus")
    with pytest.raises(ValueError, match="VLAJAX_LAUNCH_STRATEGY"):
        L.placement_strategy()
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert not L.in_multiprocess_job()  # salloc shell, no srun step: launch
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert L.in_multiprocess_job()  # srun --ntasks-per-node=1: join, do not launch
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("VLAJAX_LAUNCHED", "1")
    assert L.in_multiprocess_job()
    assert L.train_command(["demo", "a=1"]) == [L.PYTHON, "-m", "vlajax.cli", "train", "demo", "a=1"]
    assert (L._exit_text(3), L._exit_text(-9)) == ("exited with code 3", "was killed by SIGKILL")
    monkeypatch.setenv("XLA_FLAGS", "--x")
    assert L.forwarded_env({"XLA_FLAGS": "--x", "JAX_PLATFORMS": "cpu", "HOME": "/h", "CUDA_VISIBLE_DEVICES": "0"}) \
        == {"XLA_FLAGS": "--x", "JAX_PLATFORMS": "cpu"}  # the node keeps its own devices and home


def test_cli_launches_only_for_several_nodes(monkeypatch):
    """`vlajax train` with trainer.nnodes > 1 goes through the launcher with its own arguments;
    nnodes = 1 trains in-process without touching the launcher or Ray."""
    import vlajax.cli as cli
    import vlajax.distributed.launch as launch_mod
    import vlajax.train as train_mod

    for k in ("VLAJAX_LAUNCHED", "JAX_NUM_PROCESSES", "NUM_PROCESSES", "WORLD_SIZE", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    calls = []
    # the real config loading (it once refused nnodes > 1 before the launcher was reached); the launch
    # and the training are recorded instead of run (tests/test_multiprocess_train.py runs them for real)
    monkeypatch.setattr(launch_mod, "launch_train", lambda argv, n, address: calls.append(("launch", argv, n, address))
                        or L.LaunchResult([0, 0], ["a", "b"], "a:1", [[], []], [[], []]))
    monkeypatch.setattr(train_mod, "train", lambda cfg, job=None: calls.append(("train", cfg.trainer.nnodes)) or
                        types.SimpleNamespace(final_eval={}, run_dir=Path("r"), steps=0, primary=True))
    assert cli.main(["train", "demo", "trainer.nnodes=2", "ray.address=auto"]) == 0
    assert calls == [("launch", ["demo", "trainer.nnodes=2", "ray.address=auto"], 2, "auto")]
    calls.clear()
    monkeypatch.setattr(launch_mod, "launch_train", lambda *a: (_ for _ in ()).throw(
        L.LaunchError("trainer process 1 of 2 on node b exited with code 3", exit_code=3)))
    assert cli.main(["train", "trainer.nnodes=2", "ray.address=auto"]) == 3
    monkeypatch.setattr(launch_mod, "launch_train", lambda *a: pytest.fail("single node must not launch"))
    assert cli.main(["train", "trainer.total_training_steps=1"]) == 0 and calls == [("train", 1)]
