"""Sim actors on a real multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`): a head
node carrying `train_rollout` (where this test process, the trainer, runs) and two nodes carrying
`sim`. Disaggregated placement, trajectory <-> group mapping with 2 workers x 2 stages, a sim actor
killed mid-rollout, missing-resource errors, placement timeouts, clean close."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import ray

from tests._ray_cluster import local_cluster
from tests._rollout_kit import IMAGE, DirectedDecoder, check_against_replay, tabletop_pool
from tests.conftest import wait_gone
from vlajax.distributed.placement import Colocated, Disaggregated, InProcess
from vlajax.distributed.ray_sim import PlacementError, SimPool, check_cluster_resources
from vlajax.envs.tabletop import make_tabletop_vector_env
from vlajax.rl.rollout import EngineConfig, RolloutEngine

LIMIT = 64  # long enough that the slow directed policy succeeds in some episodes, not all
DISAGG = Disaggregated.standalone(sim_nodes=2, trainer_nnodes=1)
ENV_FN = functools.partial(make_tabletop_vector_env, image_size=IMAGE, max_episode_steps=LIMIT)

# 2 workers x 2 stages x 2 envs; rows 2k and 2k+1 share a stage. Distinct (task, state) per row
# except one GRPO group of two rows on different workers.
TASKS = np.array([0, 1, 2, 0, 1, 2, 0, 2])
STATES = np.array([11, 12, 13, 14, 15, 16, 17, 11])
GROUPS = np.array([100, 101, 102, 103, 104, 105, 106, 107])


@pytest.fixture(scope="module")
def cluster():
    with local_cluster("vjr_", {"num_cpus": 1, "resources": {"train_rollout": 1}},
                       *[{"num_cpus": 1, "resources": {"sim": 1}}] * 2) as (c, sim_nodes, session):
        yield {"cluster": c, "session": session, "sim_node_ids": {n.node_id for n in sim_nodes},
               "head_node_id": c.head_node.node_id}


@pytest.fixture(scope="module")
def pool(cluster):
    with tabletop_pool("ray", ENV_FN, num_envs=2, placement=DISAGG) as p:
        yield p


def test_trainer_runs_on_the_train_rollout_node(cluster):
    assert ray.get_runtime_context().get_node_id() == cluster["head_node_id"]
    assert not cluster["session"].started and cluster["session"].connected


def test_sim_actors_land_only_on_sim_nodes(cluster, pool):
    nodes = pool.node_ids()
    assert len(nodes) == 2 and set(nodes) == cluster["sim_node_ids"]  # one per sim node
    assert cluster["head_node_id"] not in nodes
    assert pool.capacity == 8


def test_trajectories_map_to_their_groups_2_workers_x_2_stages(pool):
    eng = RolloutEngine(pool, DirectedDecoder(TASKS, STATES), EngineConfig())
    events = []
    b = eng.rollout(TASKS, STATES, GROUPS, on_step=events.append)
    check_against_replay(b, TASKS, STATES, GROUPS, limit=LIMIT)
    tr = b.trajectories
    assert tr.success.any() and not tr.success.all()  # some envs left the batch early
    assert b.stats.decoded_rows == tr.chunk_valid.sum()
    # each unit (worker, stage) saw only its own rows
    for e in events:
        assert set(e.rows.tolist()) <= set(range(4 * e.worker + 2 * e.stage, 4 * e.worker + 2 * e.stage + 2))
    assert {(e.worker, e.stage) for e in events} == {(w, s) for w in range(2) for s in range(2)}


def test_killing_a_sim_actor_mid_rollout_loses_nothing(cluster, pool):
    eng = RolloutEngine(pool, DirectedDecoder(TASKS, STATES), EngineConfig())
    killed = []

    def kill_worker_1(e):
        if not killed and e.kind == "step" and e.worker == 1:  # after its first chunk: all envs still running
            killed.append(pool.infos[1]["pid"])
            ray.kill(pool.actors[1])

    b = eng.rollout(TASKS, STATES, GROUPS, on_step=kill_worker_1)
    assert killed and b.stats.restarts == 1 and pool.restarts >= 1
    check_against_replay(b, TASKS, STATES, GROUPS, limit=LIMIT)  # nothing lost, duplicated or mixed up
    info = pool.infos[1]
    assert info["pid"] != killed[0] and info["node_id"] in cluster["sim_node_ids"]
    # the restarted pool keeps working
    again = eng.rollout(TASKS, STATES, GROUPS)
    np.testing.assert_array_equal(again.images, b.images)
    assert again.stats.restarts == 0


def test_missing_resources_are_named(cluster):
    cases = [
        (Disaggregated.standalone(sim_nodes=3),
         r"missing resource 'sim': env.disagg_sim.nnodes=3.* asks for 3 sim node\(s\) carrying .* the cluster has 2"),
        (Disaggregated.standalone(sim_nodes=2, n_env_gpus_per_node=1),
         r"missing resource 'GPU' on sim nodes: .*trainer.n_env_gpus_per_node=1"),
        (Disaggregated.standalone(sim_nodes=2, n_rollout_gpus_per_node=2),
         r"missing resource 'GPU' on train_rollout nodes: trainer.nnodes=1, trainer.n_rollout_gpus_per_node=2"),
        (Disaggregated.standalone(sim_nodes=2, trainer_nnodes=2),
         r"missing resource 'train_rollout': .*asks for 2 train_rollout node\(s\)"),
        (Disaggregated.standalone(sim_nodes=2, env_workers_per_node=2),
         r"missing resource 'CPU' on sim nodes"),
    ]
    for opts, pattern in cases:
        with pytest.raises(PlacementError, match=pattern):
            SimPool(ENV_FN, num_envs=1, placement=opts)
    # the pure check agrees with a hand-made node list
    nodes = [{"NodeID": "a" * 20, "Alive": True, "Resources": {"CPU": 4.0, "sim": 1.0}}]
    assert check_cluster_resources(nodes, Disaggregated.standalone()) != []  # no train_rollout node
    nodes.append({"NodeID": "b" * 20, "Alive": True, "Resources": {"CPU": 1.0, "train_rollout": 1.0}})
    assert check_cluster_resources(nodes, Disaggregated.standalone()) == []


def test_placement_reads_the_reference_config_keys():
    """`RunConfig.placement()` is the one reading of the layout keys; its node groups are what Ray is asked for."""
    from vlajax import config as C

    cfg = C.RunConfig(env=C.EnvConfig(disagg_sim=C.DisaggSimConfig(enable=True, nnodes=3)),
                      trainer=C.TrainerConfig(nnodes=2, n_env_gpus_per_node=4, n_rollout_gpus_per_node=8))
    opts = cfg.placement()
    assert isinstance(opts, Disaggregated) and (opts.sim_nnodes, opts.trainer_nnodes) == (3, 2)
    assert (opts.n_env_gpus_per_node, opts.n_rollout_gpus_per_node) == (4, 8)
    assert opts.num_workers == 12 and opts.gpus_per_worker == 1.0  # one sim actor per env GPU
    sim, trainer = opts.node_groups()
    assert (sim.bundle, sim.count, sim.marker, sim.sims, sim.trainer) == ({"CPU": 4.0, "GPU": 4.0, "sim": 1e-4}, 3,
                                                                          "sim", True, False)
    assert (trainer.bundle, trainer.count, trainer.sims, trainer.trainer) == ({"GPU": 8.0, "train_rollout": 1e-4}, 2,
                                                                              False, True)
    share = opts.per_process(2)  # each of 2 trainer processes places its own share
    assert (share.trainer_nnodes, share.sim_nnodes) == (1, 1) and isinstance(share, Disaggregated)
    colocated = C.RunConfig(trainer=C.TrainerConfig(nnodes=1, n_env_gpus_per_node=0, n_rollout_gpus_per_node=1)).placement()
    assert isinstance(colocated, Colocated) and colocated.num_workers == 1
    # one bundle per trainer node: its sim worker's CPU and the trainer's GPU
    assert [(g.bundle, g.count, g.sims, g.trainer) for g in colocated.node_groups()] == [
        ({"CPU": 1.0, "GPU": 1.0}, 1, True, True)]
    local = C.RunConfig(ray=C.RayConfig(enable=False)).placement()
    assert isinstance(local, InProcess) and not local.uses_ray and local.node_groups() == []


def test_resources_in_use_time_out_instead_of_hanging(pool):
    """The module's pool holds each sim node's only CPU: a second pool cannot be placed."""
    t0 = time.monotonic()
    opts = Disaggregated.standalone(sim_nodes=2, placement_timeout_s=3.0)
    with pytest.raises(PlacementError, match="was not placed within 3 s"):
        SimPool(ENV_FN, num_envs=1, placement=opts)
    assert time.monotonic() - t0 < 30


def test_close_kills_only_this_pools_processes(cluster, pool):
    """Last test of the module: closes the shared pool."""
    pids = [i["pid"] for i in pool.infos] + [p for i in pool.infos for p in i["env_pids"]]
    assert len(pids) == 2 + 2 * 2 * 2
    pool.close()
    assert wait_gone(pids) == []
    assert ray.is_initialized() and len([n for n in ray.nodes() if n["Alive"]]) == 3  # the cluster lives on
    assert ray.util.placement_group_table() == {} or all(
        v["state"] == "REMOVED" for v in ray.util.placement_group_table().values())


def test_stale_embedded_ray_folders_of_dead_runs_are_removed(tmp_path):
    """A SIGKILLed run cannot remove its /tmp/vlajax_ray_* folder; the next run removes it, and only
    folders whose owner process is gone (a live run's folder, or one without an owner record, stays)."""
    from vlajax.distributed.ray_sim import OWNER_FILE, TEMP_PREFIX, _process_start, remove_stale_temp_dirs

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = _process_start(child.pid)
    child.kill()
    child.wait()
    assert start is not None and _process_start(child.pid) is None
    dead, live, unknown = (tmp_path / (TEMP_PREFIX + n) for n in ("dead", "live", "unknown"))
    for d in (dead, live, unknown):
        (d / "session_latest").mkdir(parents=True)
    (dead / OWNER_FILE).write_text(f"{child.pid} {start}\n")
    (live / OWNER_FILE).write_text(f"{os.getpid()} {_process_start(os.getpid())}\n")
    assert remove_stale_temp_dirs(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and live.exists() and unknown.exists()


def test_a_killed_run_takes_its_embedded_ray_along(tmp_path):
    """A run killed with SIGKILL cannot stop its embedded Ray; the reaper `init_ray` started beside it
    ends Ray's processes (the agents would linger for minutes) and removes the session folder, in seconds."""
    import signal
    from pathlib import Path

    from vlajax.distributed.ray_reaper import session_processes

    code = ("import time\nfrom vlajax.distributed.ray_sim import init_ray\ns = init_ray(num_cpus=1)\n"
            "print(s.temp_dir, flush=True)\ntime.sleep(600)\n")
    log = tmp_path / "driver.err"
    with open(log, "w") as err:
        driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, text=True,
                                  start_new_session=True)
    try:
        temp_dir = driver.stdout.readline().strip()
        assert temp_dir.startswith("/tmp/vlajax_ray_"), log.read_text()[-2000:]
        assert session_processes(temp_dir), "no Ray process names the session folder"
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 60
        while (session_processes(temp_dir) or Path(temp_dir).exists()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not session_processes(temp_dir) and not Path(temp_dir).exists()
        assert "ended its" in log.read_text() and temp_dir in log.read_text()
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # whatever is left of the driver's own session
        except OSError:
            pass
