"""Multi-host training on one machine: N CPU processes x 2 devices form one jax job.

(a) one GRPO update of the small policy on 2 processes x 2 devices equals the update on 1 process x 4
    devices on the same batch (same global mesh shape, same rows), and `global_batch` assembles
    exactly the arrays the learner's own batch path does;
(b) a process that never joins: the others exit with the clear join error within the timeout;
(c) `assign_groups` rules, and `aggregate_metrics` / `global_batch`'s row check over 2 real processes;
(d) processes that end normally while `watch_peers` beats exit 0 (no abort in Python's teardown).

The workers are this module run as a script (``python -m tests.test_multihost MODE ...``); every
subprocess is started by a module fixture (so they overlap on 2 cores) and killed in a finally.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Job

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # _learner_worker: the small policy and batches of test_learner
M = 8  # global mini-batch: 4 GRPO groups x 2 samples
GROUP = 2
JOIN_TIMEOUT_S = 10
# The update below has lr * eps-dominated Adam (eps=1): its step is ~ lr * gradient, so comparing
# the parameter change compares the gradients themselves (with the default eps=1e-8 the first Adam
# step is ~ lr * sign(gradient) and would hide small gradient differences).
LEARNER_KW = dict(compute_dtype="float32", micro_batch_size=1, lr=0.1, eps=1.0)
# Tolerances, 2x2 vs 1x4 (float32; gradients are reduced in another order across processes; measured
# worst case 0.8x / 0.5x of these): parameters after the update rtol 1e-5 (atol 1e-7, for entries near
# 0); the parameter change itself within 1e-5 x its largest entry + 2 float32 ulps of the parameter
# (the rounding of p0 + change).
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-7
DELTA_ATOL_SCALED, DELTA_ULPS = 1e-5, 2


# -- launching ----------------------------------------------------------------------------------
def _worker_job(mode: str, nproc: int, devices: int, out: Path, *extra: str, skip: tuple[int, ...] = ()) -> Job:
    """Worker processes of one multi-host job, `devices` CPU devices each, logs in out/<mode>.<i>.log
    (ids in `skip` are never started: they "never join")."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONUNBUFFERED": "1"}

    def command(i: int, port: int) -> tuple[list[str], dict]:
        return [sys.executable, "-m", "tests.test_multihost", mode, str(out), str(nproc), str(i), str(port),
                *extra], env

    return Job((i for i in range(nproc) if i not in skip), command, out=out, tag=mode, cwd=ROOT)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Start every subprocess at once; the join-failure jobs mostly sleep while the updates compile."""
    dirs = {k: tmp_path_factory.mktemp(k) for k in ("two", "one", "no1", "no0", "watch")}
    started = []
    try:
        started.append(_worker_job("update", 2, 2, dirs["two"]))
        started.append(_worker_job("update", 1, 4, dirs["one"]))
        started.append(_worker_job("join", 2, 2, dirs["no1"], str(JOIN_TIMEOUT_S), skip=(1,)))  # peer missing
        started.append(_worker_job("join", 2, 2, dirs["no0"], str(JOIN_TIMEOUT_S), skip=(0,)))  # coordinator missing
        started.append(_worker_job("watch", 2, 1, dirs["watch"]))
        yield dict(zip(("two", "one", "no1", "no0", "watch"), started))
    finally:
        for job in started:
            job.kill()


@pytest.fixture(scope="module")
def updates(jobs):
    """The finished 2x2 and 1x4 runs: {"two": (npz, [per-process json]), "one": ...}."""
    out = {}
    for name in ("two", "one"):
        job = jobs[name]
        codes = job.wait(240)
        assert set(codes.values()) == {0}, f"{name}: exit codes {codes}\n{job.logs()}"
        res = [json.loads((job.out / f"result{i}.json").read_text()) for i in job.ids]
        out[name] = (dict(np.load(job.out / "params.npz")), res)
    return out


# -- (a) 2 processes x 2 devices == 1 process x 4 devices -----------------------------------------
@pytest.mark.slow  # the update jobs: ~1-2 min of compiling on 2 cores
def test_two_process_update_matches_single_process(updates):
    (two, res2), (one, res1) = updates["two"], updates["one"]
    from _learner_worker import flat_params, init_params

    p0 = flat_params(init_params())
    assert two.keys() == one.keys() == {f"p/{k}" for k in p0} | {f"batch/{k}" for k in _batch_keys()}
    moved = 0
    for k, v0 in p0.items():
        a, b = two[f"p/{k}"], one[f"p/{k}"]
        np.testing.assert_allclose(a, b, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=k)
        da, db = a - v0, b - v0
        tol = DELTA_ATOL_SCALED * np.max(np.abs(db), initial=0.0) + DELTA_ULPS * np.spacing(np.abs(b))
        bad = np.abs(da - db) > tol
        assert not bad.any(), f"update of {k}: {bad.sum()} entries differ, max {np.max(np.abs(da - db))}"
        moved += int(np.any(db != 0))
    assert moved > 0.9 * len(p0), f"only {moved} of {len(p0)} parameters changed"
    # metrics of the update (replicated scalars): the same loss and gradient norm
    m2, m1 = res2[0]["metrics"], res1[0]["metrics"]
    for k in ("loss", "pg_loss", "grad_norm", "valid_tokens", "adv_mean", "clipfrac", "entropy"):
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert m2["grad_norm"] > 0 and m2["skipped"] == 0 and m2["num_micro_batches"] == m1["num_micro_batches"] == 2
    assert res2[0]["metrics"] == res2[1]["metrics"]  # every process sees the same job-wide metrics


@pytest.mark.slow  # the update jobs: ~1-2 min of compiling on 2 cores
def test_global_batch_layout(updates):
    (two, res2), (one, res1) = updates["two"], updates["one"]
    from _learner_worker import make_batch

    full = make_batch(1, m=M)
    for name, arrays in (("2x2", two), ("1x4", one)):  # the assembled global batch, all-gathered
        for k in _batch_keys():
            np.testing.assert_array_equal(arrays[f"batch/{k}"], full[k], err_msg=f"{name} {k}")
    # process p holds rows block p, which is exactly its assign_groups block of groups
    assert [r["rows"] for r in res2] == [[0, 4], [4, 8]] and res1[0]["rows"] == [0, 8]
    assert [r["groups"] for r in res2] == [[0, 2], [2, 4]] and res1[0]["groups"] == [0, 4]
    for r in res2 + res1:
        assert r["spec"] == "P(('data', 'fsdp'), None)"  # sharding's "batch" rule
        assert r["same_as_learner"], "global_batch differs from the learner's prepare_batch"
    # FSDP: a sharded kernel lives on devices of both processes (its all-gathers cross processes)
    assert [r["fsdp_params_span_processes"] for r in res2] == [2, 2] and res1[0]["fsdp_params_span_processes"] == 1
    assert res1[0]["distributed"] is False  # the single-process path never starts a coordinator


# -- (c) metrics and the row check across 2 real processes ------------------------------------------
@pytest.mark.slow  # the update jobs: ~1-2 min of compiling on 2 cores
def test_aggregate_metrics_two_processes(updates):
    _, res2 = updates["two"]
    agg = [r["aggregated"] for r in res2]
    assert agg[0] == agg[1]  # identical on every process
    a = agg[0]
    assert a["train/success_rate"] == pytest.approx((0.25 + 0.75) / 2)  # mean
    assert a["train/episodes"] == 8 + 9  # count: summed
    assert a["rollout/decode_calls_b8"] == 3 + 5  # "_calls": summed
    assert a["perf/env_steps_per_s"] == pytest.approx((100.0 + 300.0) / 2)
    assert a["train/success_rate/task_a"] == pytest.approx(0.5)  # reported by process 0 only
    assert a["train/success_rate/task_b"] == pytest.approx(1.0)  # by process 1 only
    assert set(a) == {"train/success_rate", "train/episodes", "rollout/decode_calls_b8", "perf/env_steps_per_s",
                      "train/success_rate/task_a", "train/success_rate/task_b"}
    # single process: unchanged
    assert updates["one"][1][0]["aggregated"]["train/episodes"] == 8


@pytest.mark.slow  # the update jobs: ~1-2 min of compiling on 2 cores
def test_advantages_are_job_wide(updates):
    """REINFORCE++ whitens over the job's whole batch, not each process's rows: the two processes'
    advantages, put together, are the single-process ones of the whole batch (GRPO too)."""
    from vlajax.config import load_config
    from vlajax.train import trajectory_advantages

    _, res2 = updates["two"]
    for est in ("reinforce_plus_plus", "grpo"):
        want = trajectory_advantages(load_config("demo", [f"algorithm.adv_estimator={est}"]), _trajectories(),
                                     action_dim=7, chunk_len=2)
        got = np.concatenate([r["advantages"][est] for r in res2])
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=est)
    alone = trajectory_advantages(load_config("demo", ["algorithm.adv_estimator=reinforce_plus_plus"]),
                                  _trajectories(slice(0, M // 2)), action_dim=7, chunk_len=2)
    assert not np.allclose(alone, res2[0]["advantages"]["reinforce_plus_plus"])  # per-process whitening differs


@pytest.mark.slow  # the update jobs: ~1-2 min of compiling on 2 cores
def test_global_batch_rejects_unequal_local_rows(updates):
    _, res2 = updates["two"]
    for r in res2:  # raised on both processes, naming the key and the counts
        assert "batch['advantages'] has [4, 2] local rows" in r["unequal_rows_error"]


# -- (b) a process that never joins ------------------------------------------------------------------
@pytest.mark.parametrize("missing", ["no1", "no0"])
def test_missing_process_fails_fast(jobs, missing):
    from vlajax.distributed.multihost import JOIN_TIMEOUT_EXIT_CODE

    job = jobs[missing]
    codes = job.wait(JOIN_TIMEOUT_S + 45)  # + interpreter start-up and jax import on a busy machine
    (pid, code), = codes.items()
    log = job.logs()
    assert code == JOIN_TIMEOUT_EXIT_CODE, log
    assert f"process {pid} of 2 could not join the job at coordinator localhost:{job.port}" in log, log
    assert f"within initialization_timeout={JOIN_TIMEOUT_S} s" in log
    assert "JOINED" not in log
    # from the call to the exit (the watchdog's message is the log's last write): the timeout, no more
    began = float(log.split("JOIN_STARTED_AT ")[1].split()[0])
    waited = job.log_path(pid).stat().st_mtime - began
    assert JOIN_TIMEOUT_S - 0.5 < waited < JOIN_TIMEOUT_S + 5, waited


# -- (d) the peer watchdog at exit ----------------------------------------------------------------------
def test_processes_watching_their_peers_exit_cleanly(jobs):
    """CI once saw a finished run's process 1 abort (SIGABRT, a C++ stack trace from a Python thread)
    as Python finalized: the watchdog's daemon thread was inside the key-value store's client. Here it
    beats without pause (interval 0, so it is always in a store call) while both processes end."""
    job = jobs["watch"]
    codes = job.wait(120)
    log = job.logs()
    assert codes == {0: 0, 1: 0}, log
    assert log.count("WATCHED") == 2 and "Stack trace" not in log and "stopped" not in log, log


# -- (c) assign_groups ------------------------------------------------------------------------------
def test_assign_groups_rule():
    from vlajax.distributed.multihost import assign_groups

    assert [assign_groups(64, 4, p) for p in range(4)] == [range(0, 16), range(16, 32), range(32, 48), range(48, 64)]
    blocks = [list(assign_groups(12, 3, p)) for p in range(3)]
    assert sorted(sum(blocks, [])) == list(range(12))  # every group once, none straddling
    assert assign_groups(8, 1, 0) == range(8)
    assert assign_groups(8, 2, 1) == assign_groups(8, 2, 1)  # deterministic
    with pytest.raises(ValueError, match=r"data\.train_batch_size=10 groups cannot be split evenly over 4"):
        assign_groups(10, 4, 0)
    with pytest.raises(ValueError, match="my.key=3"):
        assign_groups(3, 2, 0, key="my.key")
    with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, 2\)"):
        assign_groups(8, 2, 2)


def test_count_metric_rule():
    from vlajax.distributed.multihost import is_count_metric

    for name in ("train/episodes", "train/successes", "train/env_steps", "rollout/restarts", "num_groups",
                 "rollout/decode_calls_b8", "x/skipped_total", "sampling/kept_count", "sampling/groups_seen",
                 "sampling/groups_kept", "sampling/carried_in", "sampling/carried_out", "sampling/dropped_excess"):
        assert is_count_metric(name), name
    for name in ("train/success_rate", "train/episode_length", "perf/env_steps_per_s", "rollout/wall_s",
                 "actor/grad_norm", "rollout/sim_busy_fraction", "train/success_rate/pick up the bowl",
                 "sampling/rounds", "sampling/kept_fraction"):
        assert not is_count_metric(name), name


def test_single_process_initialize_is_a_no_op():
    """In this (1-process) pytest interpreter: no coordinator, no backend touched, instant."""
    import jax

    from vlajax.distributed.multihost import initialize

    t0 = time.perf_counter()
    info = initialize(num_processes=1)
    assert time.perf_counter() - t0 < 0.01
    assert (info.process_id, info.num_processes, info.coordinator, info.multi) == (0, 1, None, False)
    assert not jax.distributed.is_initialized()
    with pytest.raises(ValueError, match=r"process_id 2 is not in \[0, 2\)"):
        initialize("localhost:1", 2, 2)
    with pytest.raises(ValueError, match="coordinator address"):
        initialize(None, 2, 0)


# -- worker side --------------------------------------------------------------------------------------
def _trajectories(rows: slice = slice(None)):
    """8 trajectories (4 GRPO groups of 2) with mixed successes and lengths, or the given rows."""
    from vlajax.rl.samples import Trajectories

    n, c, k, a = M, 4, 2, 7
    length = np.array([1, 4, 2, 4, 3, 4, 4, 2])
    tr = Trajectories(actions_tokens=np.zeros((n, c, k * a), np.int32), old_logp=np.zeros((n, c, k * a), np.float32),
                      chunk_valid=np.arange(c)[None, :] < length[:, None],
                      success=np.array([1, 0, 1, 1, 0, 0, 1, 0], bool), finish_step=2 * length.astype(np.int32),
                      group_id=np.arange(n) // GROUP + 100, task_id=np.zeros(n, np.int64))
    return type(tr)(**{f: getattr(tr, f)[rows] for f in tr.__dataclass_fields__})


def _batch_keys() -> tuple[str, ...]:
    return ("input_ids", "attention_mask", "tokens", "old_logp", "advantages", "mask", "pixel_values")


def _worker_update(out: str, nproc: str, pid: str, port: str) -> None:
    """One GRPO update on a 4-device job (nproc processes x 4/nproc devices), mesh data=1 x fsdp=4."""
    nproc, pid = int(nproc), int(pid)
    from vlajax.distributed.multihost import (aggregate_metrics, assign_groups, global_batch, initialize,
                                              local_rows)

    info = initialize(f"localhost:{port}", nproc, pid, initialization_timeout=120)
    import jax
    from jax.experimental import multihost_utils

    sys.path.insert(0, str(HERE))
    from _learner_worker import flat_params, init_params, make_batch, make_policy

    from vlajax.config import load_config
    from vlajax.distributed.sharding import make_mesh
    from vlajax.rl.learner import Learner, LearnerConfig
    from vlajax.train import trajectory_advantages

    assert jax.device_count() == 4 and jax.local_device_count() == 4 // nproc and jax.process_count() == nproc
    mesh = make_mesh()
    full = make_batch(1, m=M)
    rows = local_rows(mesh, M)
    groups = assign_groups(M // GROUP, nproc, pid)
    assert (rows.start, rows.stop) == (groups.start * GROUP, groups.stop * GROUP), (rows, groups)
    local = {k: full[k][rows] for k in _batch_keys()}
    batch = global_batch(local, mesh)

    learner = Learner(make_policy(init_params()), LearnerConfig(**LEARNER_KW), mesh=mesh)
    prepared = learner.prepare_batch(local)  # the learner's own assembly of the same rows
    same = all(batch[k].sharding.is_equivalent_to(prepared[k].sharding, batch[k].ndim)
               and all(np.array_equal(np.asarray(a.data), np.asarray(b.data))
                       for a, b in zip(batch[k].addressable_shards, prepared[k].addressable_shards))
               for k in batch)
    q = learner.state.params["llm"]["layers"][0]["q_proj"]["kernel"]
    # Learner.update cannot take global_batch's arrays across processes yet (sharding.shard_batch calls
    # np.asarray on them); one process takes them, several take the local rows (same arrays: `same`).
    metrics = learner.update(batch if nproc == 1 else local)
    metrics = {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}

    local_metrics = {"train/success_rate": 0.25 + 0.5 * pid, "train/episodes": 8 + pid,
                     "rollout/decode_calls_b8": 3 + 2 * pid, "perf/env_steps_per_s": 100.0 + 200 * pid,
                     f"train/success_rate/task_{'ab'[pid]}": 0.5 + 0.5 * pid}
    aggregated = aggregate_metrics(local_metrics)
    unequal = ""
    if nproc > 1:
        try:
            global_batch({"advantages": local["advantages"][: 4 if pid == 0 else 2]}, mesh)
        except ValueError as e:
            unequal = str(e)

    adv = {est: trajectory_advantages(load_config("demo", [f"algorithm.adv_estimator={est}"]), _trajectories(rows),
                                      action_dim=7, chunk_len=2).tolist() for est in ("reinforce_plus_plus", "grpo")}

    gathered = multihost_utils.process_allgather({"p": learner.params(), "batch": batch}, tiled=True)
    res = dict(rows=[rows.start, rows.stop], groups=[groups.start, groups.stop],
               spec=str(batch["tokens"].sharding.spec),
               same_as_learner=bool(same), metrics=metrics, aggregated=aggregated, unequal_rows_error=unequal,
               advantages=adv,
               distributed=jax.distributed.is_initialized(), info=[info.process_id, info.num_processes],
               fsdp_params_span_processes=len({d.process_index for d in q.sharding.device_set}))
    Path(out, f"result{pid}.json").write_text(json.dumps(res))
    if pid == 0:
        flat = {f"p/{k}": v for k, v in flat_params(gathered["p"]).items()}
        flat.update({f"batch/{k}": np.asarray(v) for k, v in gathered["batch"].items()})
        np.savez(Path(out, "params.npz"), **flat)
    multihost_utils.sync_global_devices("written")  # nobody exits while a peer still gathers


def _worker_join(out: str, nproc: str, pid: str, port: str, timeout: str) -> None:
    """Join a job one of whose processes is never started; the watchdog must end this process."""
    from vlajax.distributed.multihost import initialize

    print(f"JOIN_STARTED_AT {time.time():.3f}", flush=True)
    initialize(f"localhost:{port}", int(nproc), int(pid), initialization_timeout=int(timeout))
    print("JOINED", flush=True)


def _worker_watch(out: str, nproc: str, pid: str, port: str) -> None:
    """Join, watch the peers with no pause between beats for a while, then end normally."""
    from jax.experimental import multihost_utils

    from vlajax.distributed.multihost import initialize, watch_peers

    initialize(f"localhost:{port}", int(nproc), int(pid), initialization_timeout=60)
    watch_peers(9, 60.0, interval_s=0.0)
    time.sleep(2.0)
    multihost_utils.sync_global_devices("done")
    print("WATCHED", flush=True)


if __name__ == "__main__":
    {"update": _worker_update, "join": _worker_join, "watch": _worker_watch}[sys.argv[1]](*sys.argv[2:])
