"""The rollout engine on the in-process pool (`LocalSimPool`, no Ray): real tabletop simulators, the
small policy preset and the scripted directed policy; a crashed simulator process surfaces as a
`SimFailure` naming worker, env, task and state, and the engine re-runs the worker's episodes."""

from __future__ import annotations

import functools
import logging
import pickle
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.random_weights import small_random_policy
from tests._rollout_kit import (
    CAM, CRASH_STATE, IMAGE, LIMIT, DirectedDecoder, check_against_replay, fault_once_vector_env, logits_of,
    tabletop_pool,
)
from vlajax.envs.sim_worker import SimFailure
from vlajax.envs.tabletop import TabletopEnv
from vlajax.model.oft.actions import token_logprobs
from vlajax.rl.policy_step import PolicyDecoder
from vlajax.rl.rollout import EngineConfig, RolloutEngine

TASKS, STATES, GROUPS = np.array([0, 1, 2, 0]), np.array([3, 4, 5, 3]), np.array([7, 8, 9, 7])


@pytest.fixture(scope="module")
def pool():
    """2 workers x 2 stages x 1 env in this process."""
    with tabletop_pool("local") as p:
        yield p


def test_the_rollout_engine_and_the_local_pool_import_no_ray():
    code = ("import sys, vlajax.rl.rollout, vlajax.envs.local_pool; "
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_policy_rollout_without_ray(pool):
    policy = small_random_policy()
    eng = RolloutEngine(pool, PolicyDecoder(policy, prompt_len=24, flip=False), EngineConfig(temperature=1.6))
    b = eng.rollout(TASKS, STATES, GROUPS)
    tr = b.trajectories
    assert tr.actions_tokens.shape == (4, LIMIT // 8, 56) and b.images.shape[:3] == (4, LIMIT // 8, 1)
    np.testing.assert_array_equal(tr.group_id, GROUPS)
    np.testing.assert_array_equal(tr.task_id, TASKS)
    np.testing.assert_array_equal(b.state_id, STATES)
    assert b.stats.decoded_rows == b.stats.env_calls == tr.chunk_valid.sum()
    assert set(b.stats.decode_buckets) <= {4} and len(b.stats.sim_busy_s) == 2  # buckets fitted to the pool
    for i in range(4):
        np.testing.assert_array_equal(b.images[i, 0, 0], TabletopEnv(IMAGE).reset(TASKS[i], STATES[i], 0).images[CAM])
    vi, vc = np.nonzero(tr.chunk_valid)
    logits = logits_of(policy, b.images[vi, vc], b.prompt_ids[vi], b.prompt_mask[vi], b.preprocess)
    logp, _ = token_logprobs(jnp.asarray(logits), jnp.asarray(tr.actions_tokens[vi, vc]), b.temperature)
    np.testing.assert_allclose(np.asarray(logp), tr.old_logp[vi, vc], atol=1e-4)


@pytest.mark.parametrize("pipelined", [True, False])
def test_directed_rollout_matches_an_in_process_replay(pool, pipelined):
    b = RolloutEngine(pool, DirectedDecoder(TASKS, STATES), EngineConfig(pipelined=pipelined)).rollout(
        TASKS, STATES, GROUPS)
    check_against_replay(b, TASKS, STATES, GROUPS)
    assert b.stats.restarts == 0


def test_a_crashed_simulator_process_is_a_sim_failure_and_is_rerun(tmp_path, caplog):
    env_fn = functools.partial(fault_once_vector_env, marker_dir=str(tmp_path))
    tasks, states, groups = np.array([0, 1, 2, 1]), np.array([4, 5, CRASH_STATE, 6]), np.arange(4) + 50
    with tabletop_pool("local", env_fn) as p:
        # the failure names where it happened, and crosses a process boundary intact
        p.result(p.issue_reset(1, 0, np.array([2]), tasks[2:3], states[2:3], groups[2:3], 0))
        call = p.issue_step(1, 0, np.array([2]), np.zeros((1, 8, 7), np.float32))
        with pytest.raises(SimFailure, match="sim worker 1 stage 0") as info:
            p.result(call)
        e = pickle.loads(pickle.dumps(info.value))
        assert (e.worker, e.stage, e.env_indices, e.task_ids, e.state_ids) == (1, 0, (0,), (2,), (CRASH_STATE,))
        assert str(e) == str(info.value)
        p.restart(1)
        (tmp_path / str(CRASH_STATE)).unlink()  # crash once more, inside a rollout
        eng = RolloutEngine(p, DirectedDecoder(tasks, states), EngineConfig(step_timeout_s=60.0))
        with caplog.at_level(logging.WARNING):
            b = eng.rollout(tasks, states, groups)
        assert b.stats.restarts == 1 and p.restarts == 2
        assert "sim worker 1: a simulator process failed (sim worker 1 stage 0" in caplog.text
        check_against_replay(b, tasks, states, groups)
