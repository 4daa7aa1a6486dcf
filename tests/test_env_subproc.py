"""SubprocVectorEnv with real worker processes and the real MuJoCo tabletop task: bookkeeping,
validation, determinism, faults (raise, exit, hang) and recovery, video."""

from __future__ import annotations

import functools
import gc
import os
import time

import imageio.v2 as imageio
import numpy as np
import pytest

from vlajax.envs import EnvError, EnvWorkerError, SubprocVectorEnv
from vlajax.envs.tabletop import TabletopEnv, directed_actions, make_tabletop_env, target_xy

K = 8  # actions per chunk
LIMIT = 20  # episode limit of the shared pool: chunks of 8, 8, then a chunk cut to 4

RAISE_STATE, EXIT_STATE, HANG_STATE = 7, 8, 9


class FaultyTabletopEnv(TabletopEnv):
    """The tabletop task with faults injected at chosen state ids (the worker really fails)."""

    def reset(self, task_id, state_id, seed):
        if state_id == RAISE_STATE:
            raise ValueError("boom on purpose")
        if state_id == EXIT_STATE:
            os._exit(3)
        self._state_id = state_id
        return super().reset(task_id, state_id, seed)

    def chunk_step(self, actions, render_every_substep=False):
        if self._state_id == HANG_STATE:
            time.sleep(600)
        return super().chunk_step(actions, render_every_substep)


def make_faulty(index: int) -> FaultyTabletopEnv:
    return FaultyTabletopEnv()


def make_hanging_init(index: int) -> TabletopEnv:
    time.sleep(600)
    raise AssertionError("unreachable")


def make_raising_init(index: int) -> TabletopEnv:
    if index == 1:
        raise RuntimeError("cannot create the simulator")
    return TabletopEnv()


def directed(obs, task_ids, state_ids, seed=0, k=K):
    """(N, k, 7) chunks that move each gripper straight to its target block."""
    return np.stack([
        directed_actions(obs.proprio[i, :2], target_xy(t, s, seed), k)
        for i, (t, s) in enumerate(zip(task_ids, state_ids))
    ])


def idle(n, k=K):
    a = np.zeros((n, k, 7), dtype=np.float32)
    a[..., 6] = -1
    return a


@pytest.fixture(scope="module")
def pool():
    env = SubprocVectorEnv(
        functools.partial(make_tabletop_env), 3, max_episode_steps=LIMIT, timeout_s=60, name="tabletop"
    )
    yield env
    env.close()


@pytest.mark.timeout(60)
def test_reset_to_different_tasks_gives_batched_observations(pool):
    assert [t.name for t in pool.tasks] == ["reach_red", "reach_green", "reach_blue"]
    obs = pool.reset([0, 1, 2], [5, 5, 5], seed=0)
    img = obs.images["agentview"]
    assert img.shape == (3, 64, 64, 3) and img.dtype == np.uint8
    assert obs.proprio.shape == (3, 8) and obs.proprio.dtype == np.float32
    assert obs.instructions == [t.instruction for t in pool.tasks]
    # One initial state, three instructions: the same scene, only the language differs.
    assert (img[0] == img[1]).all() and (img[1] == img[2]).all()

    res = pool.chunk_step(np.random.default_rng(0).uniform(-1, 1, (3, K, 7)))
    assert res.obs.images["agentview"].shape == (3, 64, 64, 3)
    assert res.reward.dtype == np.float32 and res.reward.shape == (3,)
    assert res.terminated.dtype == bool and res.truncated.dtype == bool
    assert res.info["success"].dtype == bool and res.info["elapsed_steps"].dtype == np.int32
    assert res.info["sim_time_s"].shape == (3,) and (res.info["sim_time_s"] > 0).all()
    assert (res.info["elapsed_steps"][~res.terminated] == K).all()

    one = pool.step(np.zeros((3, 7)))  # VectorEnv.step = a chunk of one
    assert (one.info["steps"][~res.done] == 1).all()


@pytest.mark.timeout(60)
def test_success_stops_env_and_it_is_not_stepped_again(pool):
    tasks, states = [0, 2, 1], [3, 3, 4]
    obs = pool.reset(tasks, states)
    rewards = []
    for _ in range(3):
        acts = idle(3)
        acts[0] = directed(obs, tasks, states)[0]
        res = pool.chunk_step(acts)
        rewards.append(res.reward.copy())
        obs = res.obs
        if res.terminated[0]:
            break
    assert res.terminated[0] and res.info["success"][0] and not res.truncated[0]
    assert sum(r[0] for r in rewards) == 1.0 and rewards[-1][0] == 1.0
    # The observation is from the sub-step that succeeded, which can be mid-chunk.
    elapsed = res.info["elapsed_steps"][0]
    assert 0 < res.info["steps"][0] <= K
    assert np.linalg.norm(obs.proprio[0, :2] - target_xy(tasks[0], states[0])) < 0.05
    assert not res.done[1:].any()

    before_img, before_prop = obs.images["agentview"][0].copy(), obs.proprio[0].copy()
    again = pool.chunk_step(np.random.default_rng(1).uniform(-1, 1, (3, K, 7)))
    assert again.terminated[0] and again.reward[0] == 0.0
    assert again.info["sim_time_s"][0] == 0.0 and again.info["steps"][0] == 0
    assert again.info["elapsed_steps"][0] == elapsed
    assert (again.obs.images["agentview"][0] == before_img).all()
    assert (again.obs.proprio[0] == before_prop).all()
    assert (again.info["steps"][1:] > 0).all() and (again.info["sim_time_s"][1:] > 0).all()


@pytest.mark.timeout(60)
def test_truncation_cuts_the_last_chunk_at_the_limit(pool):
    pool.reset([0, 1, 2], [20, 21, 22])
    steps, elapsed, truncated = [], [], []
    for _ in range(4):
        res = pool.chunk_step(idle(3))
        steps.append(res.info["steps"].tolist())
        elapsed.append(res.info["elapsed_steps"].tolist())
        truncated.append(res.truncated.tolist())
    assert steps == [[8] * 3, [8] * 3, [4] * 3, [0] * 3]
    assert elapsed == [[8] * 3, [16] * 3, [20] * 3, [20] * 3]
    assert truncated == [[False] * 3, [False] * 3, [True] * 3, [True] * 3]
    assert not res.terminated.any() and (res.reward == 0).all()
    assert (res.info["sim_time_s"] == 0).all()


@pytest.mark.timeout(60)
def test_bad_input_is_rejected_with_a_named_env_and_task(pool):
    with pytest.raises(EnvError, match=r"env 1: task id 3 out of range \(0\.\.2\)"):
        pool.reset([0, 3, 1], [0, 0, 0])
    with pytest.raises(EnvError, match=r"env 2 \(task reach_green\): state id 1000 out of range"):
        pool.reset([0, 0, 1], [0, 0, 1000])
    with pytest.raises(EnvError, match=r"env 0 \(task reach_red\): state id -1 out of range"):
        pool.reset([0, 0, 1], [-1, 0, 0])
    with pytest.raises(EnvError, match="2 task ids and 3 state ids for 3 envs"):
        pool.reset([0, 0], [0, 0, 0])

    pool.reset([0, 1, 2], [0, 1, 2])
    with pytest.raises(EnvError, match=r"shape \(num_envs=3, chunk, action_dim=7\), got \(3, 8, 6\)"):
        pool.chunk_step(np.zeros((3, K, 6)))
    with pytest.raises(EnvError, match=r"got \(2, 8, 7\)"):
        pool.chunk_step(np.zeros((2, K, 7)))
    bad = np.zeros((3, K, 7))
    bad[1, 3, 0] = np.nan
    bad[2, 0, 6] = np.inf
    with pytest.raises(EnvError, match=r"non-finite.*env 1 \(task reach_green, state 1\).*env 2 \(task reach_blue"):
        pool.chunk_step(bad)
    # Rejected input did not advance anything.
    assert (pool.chunk_step(idle(3)).info["elapsed_steps"] == K).all()


@pytest.mark.timeout(60)
def test_same_inputs_give_byte_identical_observations_across_pools():
    def rollout():
        with SubprocVectorEnv(make_tabletop_env, 2, timeout_s=60) as env:
            obs = [env.reset([0, 2], [11, 12], seed=5)]
            rng = np.random.default_rng(123)
            for j in range(4):
                res = env.chunk_step(rng.uniform(-1, 1, (2, K, 7)), render_every_substep=(j == 1))
                obs.append(res.obs)
                if j == 1:
                    sub = res.info["substep_images"]
            return obs, sub

    a, sub_a = rollout()
    b, sub_b = rollout()
    for oa, ob in zip(a, b):
        assert oa.images["agentview"].tobytes() == ob.images["agentview"].tobytes()
        assert oa.proprio.tobytes() == ob.proprio.tobytes()
    for sa, sb in zip(sub_a, sub_b):
        assert sa["agentview"].shape == (K, 64, 64, 3)
        assert sa["agentview"].tobytes() == sb["agentview"].tobytes()
    assert not (a[0].images["agentview"] == a[-1].images["agentview"]).all()  # something moved


@pytest.mark.timeout(60)
def test_worker_exception_names_env_task_state_and_restart_recovers():
    env = SubprocVectorEnv(make_faulty, 2, timeout_s=60, name="faulty")
    try:
        with pytest.raises(EnvWorkerError) as err:
            env.reset([0, 1], [1, RAISE_STATE])
        msg = str(err.value)
        assert err.value.env_indices == (1,)
        assert "env 1 (task reach_green, state 7)" in msg
        assert "Traceback" in msg and "ValueError: boom on purpose" in msg
        with pytest.raises(EnvError, match="env 1"):
            env.chunk_step(idle(2))
        with pytest.raises(EnvError, match=r"unusable until restart\(1\).*boom on purpose"):
            env.reset([0, 1], [1, 2])
        env.restart(1)
        obs = env.reset([0, 1], [1, 2])
        assert obs.images["agentview"].shape == (2, 64, 64, 3)
        assert (env.chunk_step(idle(2)).info["steps"] == K).all()
    finally:
        env.close()


@pytest.mark.timeout(60)
def test_worker_that_exits_is_reported_with_exit_code():
    env = SubprocVectorEnv(make_faulty, 2, timeout_s=60, name="faulty")
    try:
        with pytest.raises(EnvWorkerError, match=r"env 0 \(task reach_blue, state 8\).*died \(exit code 3\)"):
            env.reset([2, 0], [EXIT_STATE, 1])
        env.restart(0)
        env.reset([2, 0], [1, 1], env_indices=None)
    finally:
        env.close()


@pytest.mark.timeout(60)
def test_hung_worker_times_out_is_killed_and_others_keep_their_chunk():
    env = SubprocVectorEnv(make_faulty, 2, timeout_s=60, name="faulty")
    try:
        env.reset([0, 1], [1, HANG_STATE])
        env.timeout_s = 2.0
        hung_pid = env.pids[1]
        t0 = time.monotonic()
        with pytest.raises(EnvWorkerError, match=r"env 1 \(task reach_green, state 9\): no answer within 2 s") as err:
            env.chunk_step(idle(2))
        assert time.monotonic() - t0 < 10
        with pytest.raises(ProcessLookupError):
            os.kill(hung_pid, 0)  # killed and reaped
        partial = err.value.result
        assert partial.info["worker_failed"].tolist() == [False, True]
        assert partial.info["steps"][0] == K and partial.info["elapsed_steps"][0] == K

        env.timeout_s = 60.0
        env.restart(1)
        obs = env.reset([1], [2], env_indices=[1])  # re-run just the failed env's episode
        assert obs.images["agentview"].shape == (1, 64, 64, 3)
        res = env.chunk_step(idle(2))
        assert res.info["elapsed_steps"].tolist() == [2 * K, K]
    finally:
        env.close()


@pytest.mark.timeout(60)
def test_initialization_is_under_the_timeout_and_errors_name_the_env():
    t0 = time.monotonic()
    with pytest.raises(EnvWorkerError, match=r"(?s)initialization failed.*env 0: no answer within 3 s"):
        SubprocVectorEnv(make_hanging_init, 1, timeout_s=3)
    assert time.monotonic() - t0 < 15
    with pytest.raises(EnvWorkerError, match=r"(?s)env 1: worker raised:.*cannot create the simulator") as err:
        SubprocVectorEnv(make_raising_init, 2, timeout_s=60)
    assert err.value.env_indices == (1,)
    with pytest.raises(EnvError, match="picklable"):
        SubprocVectorEnv(lambda i: TabletopEnv(), 1)


@pytest.mark.timeout(60)
def test_close_is_idempotent_and_garbage_collection_stops_workers():
    env = SubprocVectorEnv(make_tabletop_env, 2, timeout_s=60)
    pids = env.pids
    env.close()
    env.close()
    assert env.pids == [None, None]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(EnvError, match="closed"):
        env.reset([0, 0], [0, 0])

    env = SubprocVectorEnv(make_tabletop_env, 1, timeout_s=60)
    (pid,) = env.pids
    del env
    gc.collect()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.timeout(60)
def test_video_per_episode_is_written_when_enabled(tmp_path):
    env = SubprocVectorEnv(make_tabletop_env, 2, timeout_s=60, max_episode_steps=16, video_dir=str(tmp_path),
                           name="sim0.stage1")
    try:
        tasks, states = [0, 1], [3, 4]
        obs = env.reset(tasks, states)
        chunks = 0
        while True:
            acts = idle(2)
            acts[0] = directed(obs, tasks, states)[0]
            res = env.chunk_step(acts)
            obs, chunks = res.obs, chunks + 1
            if res.done.all():
                break
        assert res.terminated[0] and res.truncated[1]
        env.reset(tasks, states)  # second episode, abandoned: written at close
    finally:
        env.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "sim0.stage1_env000_reach_red_state0003_ep00001_success.mp4",
        "sim0.stage1_env000_reach_red_state0003_ep00002_unfinished.mp4",
        "sim0.stage1_env001_reach_green_state0004_ep00001_fail.mp4",
        "sim0.stage1_env001_reach_green_state0004_ep00002_unfinished.mp4",
    ]
    frames = imageio.mimread(tmp_path / "sim0.stage1_env001_reach_green_state0004_ep00001_fail.mp4")
    assert len(frames) == 1 + 2 and frames[0].shape == (64, 64, 3)  # reset + two chunks of 8
