"""Training on states LIBERO's placement sampler draws (`env.train.init_states=sampled`), on real
LIBERO (CPU, one libero_spatial task, no mocks): a sampled state is fixed by (task, seed) in any env
or process, differs between seeds, is settled like a stored one, and is none of the 50 fixed states
that evaluation keeps using.

The task puts a bowl on the wooden cabinet: LIBERO places it relative to the cabinet's pose, which the
previous reset leaves in the model, so it also checks that a reused env does not carry that over.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("libero")
pytest.importorskip("robosuite")

from vlajax.envs.base import NOOP_ACTION, SAMPLED_STATE_BASE, EnvError, sampled_state_id  # noqa: E402
from vlajax.envs.libero import NUM_SETTLE_STEPS, LiberoEnv, make_libero_vector_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUITE = "libero_spatial"
TASK = "pick_up_the_black_bowl_on_the_wooden_cabinet_and_place_it_on_the_plate"
SIZE = 64
SETTLED_M = 1e-4  # an object may move this far (m) in one more no-op step after the settle steps
APART_M = 3e-3  # a sampled state has an object at least this far (xy, m) from where any stored state has it




@pytest.fixture(scope="module")
def env(assets):
    e = LiberoEnv(SUITE, assets_dir=assets, image_size=SIZE)
    yield e
    e.close()


@pytest.fixture(scope="module")
def fresh_env(assets):
    """A second instance, closed only at the end: closing one robosuite EGL context in a process
    spoils the renders of the others."""
    e = LiberoEnv(SUITE, assets_dir=assets, image_size=SIZE)
    yield e
    e.close()


@pytest.fixture(scope="module")
def task(env) -> int:
    return [t.name for t in env.tasks].index(TASK)


def _poses(env, task_id, state_id):
    out = env.reset(task_id, state_id)
    return env.object_poses(), out


def _object_joints(env) -> list[tuple[int, int]]:
    """(qpos, qvel) addresses of the free joints of the task's movable objects (fixtures have none)."""
    inner = env._env.env
    model = inner.sim.model
    ids = [model.joint_name2id(o.joints[-1]) for o in inner.objects_dict.values() if o.joints]
    return [(int(model._model.jnt_qposadr[j]), int(model._model.jnt_dofadr[j])) for j in ids]


def _nearest_stored_xy(env, task_id) -> float:
    """How far the current scene is from the nearest stored state: per stored state the largest xy
    distance of any object (stored states hold objects up to 10 cm above their support, so z is
    left to the settle steps), then the smallest over the 50."""
    qpos = env._env.env.sim.data.qpos
    stored = env.init_states(task_id)[:, 1:1 + qpos.size]  # flattened: time, qpos, qvel
    worst = np.stack([np.abs(stored[:, a:a + 2] - qpos[a:a + 2]).max(1) for a, _ in _object_joints(env)], 1).max(1)
    return float(worst.min())


def test_same_task_and_seed_give_the_same_state_in_any_env(env, fresh_env, task):
    first, _ = _poses(env, task, sampled_state_id(11))
    other, _ = _poses(env, task, sampled_state_id(12))
    again, _ = _poses(env, task, sampled_state_id(11))  # reused, after another sampled state
    fresh, _ = _poses(fresh_env, task, sampled_state_id(11))  # its first reset of the scene
    assert first.keys() == fresh.keys() and len(first) >= 5
    for name in first:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
        np.testing.assert_array_equal(first[name], fresh[name], err_msg=name)
    moved = max(np.abs(first[n][:3] - other[n][:3]).max() for n in first)
    assert moved > 5e-3, f"seeds 11 and 12 place the objects within {moved} m of each other"


def test_a_worker_process_renders_the_same_sampled_state(env, task, assets):
    _, here = _poses(env, task, sampled_state_id(7))
    with make_libero_vector_env(SUITE, 1, assets_dir=assets, image_size=SIZE) as venv:
        obs = venv.reset([task], [sampled_state_id(7)], seed=123)  # the reset seed does not matter
    assert obs.images["agentview"][0].tobytes() == here.images["agentview"].tobytes()
    assert obs.proprio[0].tobytes() == here.proprio.tobytes()


def test_sampled_states_are_settled_like_stored_ones(env, task):
    for state in (sampled_state_id(3), 3):
        before, _ = _poses(env, task, state)
        data = env._env.env.sim.data
        assert data.time == pytest.approx(NUM_SETTLE_STEPS * env._env.env.control_timestep)
        speeds = [np.abs(data.qvel[v:v + 6]).max() for _, v in _object_joints(env)]  # free joint: 6 dofs
        env.chunk_step(NOOP_ACTION[None])
        after = env.object_poses()
        step = max(np.abs(before[n][:3] - after[n][:3]).max() for n in before)
        assert step < SETTLED_M, f"state {state}: an object moved {step} m in one more no-op step"
        assert max(speeds) < 1e-2, f"state {state}: an object still moves at {max(speeds)} after settling"


def test_sampled_states_are_none_of_the_fixed_ones(env, task):
    for seed in (1, 2, 12345):
        env.reset(task, sampled_state_id(seed))
        assert _nearest_stored_xy(env, task) > APART_M, f"seed {seed} reproduces a stored state"
    for state in (0, 49):  # the measure itself: a stored state is found where it is
        env.reset(task, state)
        assert _nearest_stored_xy(env, task) < 1e-3


def test_bad_sampled_state_ids_name_env_and_task(env, task):
    for bad in (SAMPLED_STATE_BASE + 2**32, SAMPLED_STATE_BASE - 1, 50):
        with pytest.raises(EnvError, match=rf"LIBERO {SUITE} task {task} \({TASK}\): state id {bad} out of range"):
            env.reset(task, bad)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
        sampled_state_id(-1)


def test_evaluation_uses_the_fixed_states_whatever_training_uses(env, task):
    """`vlajax eval` and training's validation take their pairs from `select_pairs`: stored states
    0..49, which reset to the stored states, with `env.train.init_states=sampled` as without."""
    from vlajax.config import load_config
    from vlajax.states import eval_states_line, select_pairs, train_states_line
    from vlajax.rl.data import StateSampler

    sft = REPO / "vlajax" / "assets" / "tiny_tokenizer"  # a directory standing in for the SFT checkpoint
    cfg = load_config("libero_grpo", [f"actor_rollout_ref.model.path={sft}", f"env.train.task_suite_name={SUITE}",
                                      "env.train.init_states=sampled"])
    tasks = list(env.tasks)  # TaskSpecs, as the rollout engine passes them
    pairs = select_pairs(tasks, None, None)
    assert pairs == [(t, s) for t in range(len(tasks)) for s in range(50)]
    env.reset(task, pairs[task * 50 + 7][1])
    assert _nearest_stored_xy(env, task) < 1e-3
    # while the run's sampler draws only sampled states, which the env accepts
    t = cfg.env.train
    groups = StateSampler(len(tasks), t.num_trials_per_task, seed=t.seed, init_states=t.init_states).next_groups(3)
    assert all(g.state_id >= SAMPLED_STATE_BASE for g in groups)
    env.reset(task, groups[0].state_id)
    assert _nearest_stored_xy(env, task) > APART_M
    assert eval_states_line("libero", tasks, [s for _, s in pairs]) == \
        "init states: LIBERO's 50 fixed states per task (ids 0..49 used)"
    assert "none of the fixed ones" in train_states_line("libero", t.init_states, t.num_trials_per_task)
