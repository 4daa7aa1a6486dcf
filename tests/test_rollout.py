"""The rollout engine on an embedded local Ray with real tabletop simulators (colocated placement):
trajectory layout, log-probs recomputable from the stored inputs, serial == pipelined, greedy
evaluation, start_reset, simulator faults (hung step, crashed env process), bad requests, clean
shutdown. The policy is the real (tiny, randomly initialised) OpenVLA-OFT model; a scripted
directed policy behind the same Decoder interface gives deterministic, early-finishing episodes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import ray

from benchmarks.random_weights import small_random_policy
from tests._rollout_kit import (
    CAM, CRASH_STATE, HANG_STATE, IMAGE, LIMIT, SLOW_STATE, K, DirectedDecoder, check_against_replay,
    fault_once_vector_env, logits_of, tabletop_pool,
)
from tests.conftest import alive, free_port, wait_gone
from vlajax.distributed.placement import Colocated
from vlajax.distributed.ray_sim import PlacementError, RayConnectError, SimPool, init_ray
from vlajax.envs.tabletop import TabletopEnv, make_tabletop_vector_env
from vlajax.model.oft.actions import token_logprobs
from vlajax.rl.policy_step import default_buckets, DecodeInputs, PolicyDecoder
from vlajax.rl.rollout import EngineConfig, RolloutEngine, RolloutError


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def session():
    s = init_ray(num_cpus=2)
    yield s
    s.shutdown()


@pytest.fixture(scope="module")
def pool(session):
    """2 workers x 2 stages x 1 env, colocated on the local node."""
    with tabletop_pool("ray") as p:
        yield p


@pytest.fixture(scope="module")
def policy():
    return small_random_policy()


@pytest.fixture(scope="module")
def engine(pool, policy):
    dec = PolicyDecoder(policy, prompt_len=24, flip=False, buckets=(4,))
    return RolloutEngine(pool, dec, EngineConfig(temperature=1.6))


TASKS = np.array([0, 1, 2, 0])
STATES = np.array([3, 4, 5, 3])
GROUPS = np.array([7, 8, 9, 7])


# ---- policy decode -------------------------------------------------------------------------------
def test_decode_samples_do_not_depend_on_batch_mates(policy):
    dec = PolicyDecoder(policy, prompt_len=24, flip=False, buckets=(4,))
    rng = np.random.default_rng(0)
    ids, mask = dec.encode_prompts(["move the gripper to the red block"] * 4)
    x = DecodeInputs(images=rng.integers(0, 256, (4, 1, IMAGE, IMAGE, 3), dtype=np.uint8), input_ids=ids,
                     attention_mask=mask, proprio=np.zeros((4, 8), np.float32),
                     rows=np.array([10, 11, 12, 13], np.int32), calls=np.array([0, 1, 2, 3], np.int32))
    key = jax.random.key(5)
    full = dec.fetch(dec.dispatch(x, temperature=1.6, key=key))
    sub = DecodeInputs(**{f: getattr(x, f)[2:3] for f in ("images", "input_ids", "attention_mask", "proprio",
                                                           "rows", "calls")})
    one = dec.fetch(dec.dispatch(sub, temperature=1.6, key=key))  # padded to the bucket of 4
    np.testing.assert_array_equal(one.tokens[0], full.tokens[2])
    np.testing.assert_allclose(one.logp[0], full.logp[2], atol=1e-5)
    assert full.tokens.shape == (4, 56) and full.actions.shape == (4, K, 7)
    assert len({tuple(t) for t in full.tokens}) == 4  # different rows draw differently

    logits = logits_of(policy, x.images, ids, mask, dec.preprocess)
    want, _ = token_logprobs(jnp.asarray(logits), jnp.asarray(full.tokens), 1.6)
    np.testing.assert_allclose(full.logp, want, atol=1e-5)


def test_decoder_decodes_with_the_params_it_is_handed(policy):
    """The weight hand-off is explicit: `set_params` (no copy), checked against the policy's structure."""
    from flax import nnx

    from vlajax.rl.lora import LoraConfig, with_lora

    dec = PolicyDecoder(policy, prompt_len=24, flip=False, buckets=(4,))
    ids, mask = dec.encode_prompts(["move the gripper to the blue block"] * 4)
    x = DecodeInputs(images=np.full((4, 1, IMAGE, IMAGE, 3), 128, np.uint8), input_ids=ids, attention_mask=mask,
                     proprio=np.zeros((4, 8), np.float32), rows=np.arange(4, dtype=np.int32),
                     calls=np.zeros(4, np.int32))
    key = jax.random.key(0)
    own = nnx.to_pure_dict(policy.state)
    before = dec.fetch(dec.dispatch(x, temperature=1.6, key=key))
    dec.set_params(jax.tree.map(lambda w: 2 * w, own))
    assert not np.allclose(dec.fetch(dec.dispatch(x, temperature=1.6, key=key)).logp, before.logp)
    dec.set_params(own)
    np.testing.assert_array_equal(dec.fetch(dec.dispatch(x, temperature=1.6, key=key)).logp, before.logp)
    with pytest.raises(ValueError, match="structure"):
        dec.set_params(nnx.to_pure_dict(with_lora(policy, LoraConfig(rank=2)).state))


def test_decode_logprobs_do_not_depend_on_the_batch_size(policy):
    """Which rows share a decode depends on simulator timing. With the default buckets (4 rows and
    up) and up to 32 rows, a row's log-probs are bit-identical whatever batch it lands in, so a
    resumed run computes what an uninterrupted one did (XLA's CPU matmuls take other paths for 1-2
    rows, which made resumed demo runs differ at ~1e-8, and, on 2 cores, for 48 rows and more)."""
    n = 32
    dec = PolicyDecoder(policy, prompt_len=24, flip=False, capacity=n)
    assert dec.buckets == default_buckets(n) and min(dec.buckets) >= 4
    rng = np.random.default_rng(1)
    ids, mask = dec.encode_prompts(["move the gripper to the green block"] * n)
    x = DecodeInputs(images=rng.integers(0, 256, (n, 1, IMAGE, IMAGE, 3), dtype=np.uint8), input_ids=ids,
                     attention_mask=mask, proprio=np.zeros((n, 8), np.float32),
                     rows=np.arange(n, dtype=np.int32), calls=np.zeros(n, np.int32))
    key = jax.random.key(3)
    full = dec.fetch(dec.dispatch(x, temperature=1.6, key=key))
    for m in (1, 2, 3, 5, 9, 17):
        idx = rng.permutation(n)[:m]
        sub = DecodeInputs(**{f: getattr(x, f)[idx] for f in ("images", "input_ids", "attention_mask", "proprio",
                                                               "rows", "calls")})
        part = dec.fetch(dec.dispatch(sub, temperature=1.6, key=key))
        np.testing.assert_array_equal(part.tokens, full.tokens[idx], err_msg=f"{m} rows")
        np.testing.assert_array_equal(part.logp, full.logp[idx], err_msg=f"{m} rows in a bucket of {dec.bucket(m)}")


# ---- rollouts with the policy --------------------------------------------------------------------
def test_policy_rollout_layout_and_logprobs(engine, policy):
    b = engine.rollout(TASKS, STATES, GROUPS)
    tr = b.trajectories
    n, c = 4, LIMIT // K
    assert tr.actions_tokens.shape == (n, c, 56) and tr.old_logp.shape == (n, c, 56)
    assert b.images.shape == (n, c, 1, IMAGE, IMAGE, 3) and b.images.dtype == np.uint8
    assert b.actions.shape == (n, c, K, 7) and b.proprio.shape == (n, c, 8)
    np.testing.assert_array_equal(tr.group_id, GROUPS)
    np.testing.assert_array_equal(tr.task_id, TASKS)
    np.testing.assert_array_equal(b.state_id, STATES)
    # calls are contiguous from 0 and cover exactly the executed env steps
    nv = tr.chunk_valid.sum(1)
    np.testing.assert_array_equal(tr.chunk_valid, np.arange(c)[None] < nv[:, None])
    assert ((nv - 1) * K < tr.finish_step).all() and (tr.finish_step <= nv * K).all()
    assert b.stats.decoded_rows == tr.chunk_valid.sum()  # no decode for finished envs
    assert b.stats.env_calls == tr.chunk_valid.sum()  # one env per unit: one step call per policy call
    # the first observation is a fresh reset of the row's own (task, state)
    for i in range(n):
        np.testing.assert_array_equal(b.images[i, 0, 0], TabletopEnv(IMAGE).reset(TASKS[i], STATES[i], 0).images[CAM])
    # prompts are the instructions' prompt ids
    ids, mask = policy.tokenizer.encode(b.instructions, pad_to=24)
    np.testing.assert_array_equal(b.prompt_ids, ids)
    np.testing.assert_array_equal(b.prompt_mask, mask)
    # old log-probs are recomputable from what the batch stores
    vi, vc = np.nonzero(tr.chunk_valid)
    logits = logits_of(policy, b.images[vi, vc], b.prompt_ids[vi], b.prompt_mask[vi], b.preprocess)
    logp, _ = token_logprobs(jnp.asarray(logits), jnp.asarray(tr.actions_tokens[vi, vc]), b.temperature)
    np.testing.assert_allclose(np.asarray(logp), tr.old_logp[vi, vc], atol=1e-4)
    np.testing.assert_allclose(b.actions[vi, vc], policy.tokens_to_actions(tr.actions_tokens[vi, vc], None, "libero"))
    assert (tr.old_logp[~tr.chunk_valid] == 0).all() and (b.images[~tr.chunk_valid] == 0).all()
    assert b.stats.restarts == 0 and len(b.stats.sim_busy_s) == 2


def test_serial_loop_draws_the_same_trajectories(pool, engine):
    key = jax.random.key(123)
    a = engine.rollout(TASKS, STATES, GROUPS, key=key)
    b = RolloutEngine(pool, engine.decoder, EngineConfig(pipelined=False)).rollout(TASKS, STATES, GROUPS, key=key)
    ta, tb = a.trajectories, b.trajectories
    np.testing.assert_array_equal(ta.actions_tokens, tb.actions_tokens)
    np.testing.assert_array_equal(ta.chunk_valid, tb.chunk_valid)
    np.testing.assert_array_equal(ta.finish_step, tb.finish_step)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_allclose(ta.old_logp, tb.old_logp, atol=1e-5)
    # serial: every decode waits for every unit, so there is one decode per round of env results
    assert b.stats.decode_calls == tb.chunk_valid.any(0).sum()


def test_greedy_evaluation_uses_the_same_loop(engine, policy):
    e1 = engine.evaluate(TASKS, STATES, GROUPS)
    e2 = engine.evaluate(TASKS, STATES, GROUPS)
    assert e1.temperature == 0.0
    np.testing.assert_array_equal(e1.trajectories.actions_tokens, e2.trajectories.actions_tokens)
    logits = logits_of(policy, e1.images[:, 0], e1.prompt_ids, e1.prompt_mask, e1.preprocess)
    np.testing.assert_array_equal(np.argmax(logits, -1), e1.trajectories.actions_tokens[:, 0])
    logp, _ = token_logprobs(jnp.asarray(logits), jnp.asarray(e1.trajectories.actions_tokens[:, 0]), 1.0)
    np.testing.assert_allclose(np.asarray(logp), e1.trajectories.old_logp[:, 0], atol=1e-4)


def test_start_reset_is_consumed_by_the_next_rollout(engine):
    engine.start_reset(TASKS, STATES[::-1], GROUPS, seed=3)
    with pytest.raises(RolloutError, match="twice"):
        engine.start_reset(TASKS, STATES, GROUPS)
    with pytest.raises(RolloutError, match="pass no ids"):
        engine.rollout(TASKS, STATES)
    assert engine.reset_ready(timeout_s=120)  # waits for the resets without consuming them
    b = engine.rollout()
    np.testing.assert_array_equal(b.state_id, STATES[::-1])
    for i in range(4):
        want = TabletopEnv(IMAGE).reset(TASKS[i], STATES[::-1][i], 3).images[CAM]
        np.testing.assert_array_equal(b.images[i, 0, 0], want)
    with pytest.raises(RolloutError, match="needs task_ids"):
        engine.rollout()


def test_bad_requests_are_named(engine):
    with pytest.raises(RolloutError, match="exactly workers x stages x envs = 2 x 2 x 1 = 4"):
        engine.rollout([0, 1], [0, 1])
    with pytest.raises(RolloutError, match="row 2: task id 7 out of range"):
        engine.rollout([0, 0, 7, 0], [0, 0, 0, 0])
    with pytest.raises(RolloutError, match=r"row 1 \(task reach_green\): state id 5000 out of range"):
        engine.rollout([0, 1, 0, 0], [0, 5000, 0, 0])


# ---- faults --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fault_pool(session, tmp_path_factory):
    marker_dir = tmp_path_factory.mktemp("fault_markers")
    with tabletop_pool("ray", functools.partial(fault_once_vector_env, marker_dir=str(marker_dir))) as p:
        p.marker_dir = marker_dir
        yield p


def test_hung_step_and_crashed_env_process_rerun_their_episodes(fault_pool, caplog):
    pool = fault_pool
    tasks, states, groups = np.array([0, 1, 2, 1]), np.array([HANG_STATE, 4, CRASH_STATE, 6]), np.arange(4) + 50
    old_pids = [i["pid"] for i in pool.infos]
    eng = RolloutEngine(pool, DirectedDecoder(tasks, states), EngineConfig(step_timeout_s=4.0))
    b = eng.rollout(tasks, states, groups)
    assert b.stats.restarts == 2 and eng.total_restarts == 2
    assert "sim worker 0: step of stage 0 exceeded 4 s" in caplog.text
    assert "sim worker 1: a simulator process failed (sim worker 1 stage 0" in caplog.text
    assert sorted(p.name for p in pool.marker_dir.iterdir()) == [str(HANG_STATE), str(CRASH_STATE)]
    check_against_replay(b, tasks, states, groups)
    assert b.stats.decoded_rows > b.trajectories.chunk_valid.sum()  # the aborted episodes' calls
    assert all(i["pid"] not in old_pids for i in pool.infos)


def test_no_barrier_a_slow_simulator_does_not_hold_back_the_others(fault_pool):
    """Row 0 (worker 0, stage 0) simulates 0.4 s per chunk; worker 1's stages finish their whole
    episodes while it is still on its first chunks (a per-step barrier would lock them together)."""
    tasks, states = np.array([0, 1, 2, 1]), np.array([SLOW_STATE, 4, 5, 6])
    events = []
    b = RolloutEngine(fault_pool, DirectedDecoder(tasks, states)).rollout(tasks, states, on_step=events.append)
    steps = [(e.worker, e.stage, int(e.calls[0])) for e in events if e.kind == "step"]
    last_fast = max(i for i, (w, _, _) in enumerate(steps) if w == 1)
    slow_calls_by_then = [c for (w, s, c) in steps[: last_fast + 1] if (w, s) == (0, 0)]
    assert b.trajectories.chunk_valid[2:].all()  # worker 1 ran all its calls...
    assert max(slow_calls_by_then, default=0) <= 2  # ...while the slow env was at most 2 chunks in
    check_against_replay(b, tasks, states, np.asarray(b.trajectories.group_id))


# ---- start-up errors and shutdown ----------------------------------------------------------------
def test_unreachable_address_fails_fast():
    port = free_port()
    with pytest.raises(RayConnectError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        init_ray(f"127.0.0.1:{port}", connect_timeout_s=2.0)
    with pytest.raises(RayConnectError, match="host:port"):
        init_ray("no-port-here")


def test_missing_gpu_is_named(session):
    env_fn = functools.partial(make_tabletop_vector_env, image_size=IMAGE)
    with pytest.raises(PlacementError, match=r"missing resource 'GPU' on trainer \(colocated"):
        SimPool(env_fn, num_envs=1, placement=Colocated.standalone(n_env_gpus_per_node=1))


def test_close_and_shutdown_leave_no_processes(session, pool):
    """Last test of the module: it closes the shared pool and stops the embedded Ray."""
    pids = [i["pid"] for i in pool.infos] + [p for i in pool.infos for p in i["env_pids"]]
    assert pids and all(alive(p) for p in pids)
    pool.close()
    assert wait_gone(pids) == []
    node = ray._private.worker._global_node  # noqa: SLF001 - the processes of the Ray we started
    ray_pids = [p.process.pid for procs in node.all_processes.values() for p in procs]
    assert session.started and ray_pids
    temp_dir = session.temp_dir
    assert Path(temp_dir).is_dir()
    session.shutdown()
    assert not ray.is_initialized()
    assert wait_gone(ray_pids) == []
    assert not Path(temp_dir).exists()  # the session directory init_ray made is gone too
