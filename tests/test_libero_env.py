"""LiberoEnv on real LIBERO/robosuite/MuJoCo with the offline asset pack (no mocks).

The reference for faithfulness is LIBERO itself, used the way its evaluations use it: an
`OffScreenRenderEnv` (default hard reset, cameras rendered at every step), `seed; reset;
set_init_state`, 10 no-op steps, then the actions one `step` at a time. Faithful means bit for bit:
images, proprio, the flattened simulator state and the constraint solver's warm start.

How success is produced (for early stop): in "put the bowl on the plate" (libero_goal) the test
writes an init state in which the black bowl is 10 cm above the plate centre moving up at 3.0 m/s.
It is in flight during the 10 settle steps and lands on the plate a few steps later, so LIBERO's
own predicate `On(akita_black_bowl_1, plate_1)` becomes true in the middle of a chunk through
physics alone; the step at which it does is taken from the vanilla LIBERO rollout, not hard-coded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("libero")
pytest.importorskip("robosuite")

from vlajax.envs import libero_setup  # noqa: E402
from vlajax.envs.base import NOOP_ACTION, EnvError  # noqa: E402
from vlajax.envs.libero import SUITES, LiberoEnv, proprio_from_obs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAMERAS = ("agentview", "robot0_eye_in_hand")
SIZE = 128
BOWL_TASK = "put_the_bowl_on_the_plate"


@pytest.fixture(scope="module")
def goal_env(assets):
    env = LiberoEnv("libero_goal", assets_dir=assets, cameras=CAMERAS, image_size=SIZE)
    yield env
    env.close()


@pytest.fixture(scope="module")
def bowl_task(goal_env) -> int:
    return [t.name for t in goal_env.tasks].index(BOWL_TASK)


@pytest.fixture(scope="module")
def vanilla(goal_env, bowl_task):
    """LIBERO's own env for the bowl task, used as LIBERO's evaluation scripts use it."""
    from libero.libero.envs import OffScreenRenderEnv

    from vlajax.envs.libero import suite_tasks

    task = suite_tasks("libero_goal")[bowl_task]
    env = OffScreenRenderEnv(
        bddl_file_name=task.bddl_file, camera_names=list(CAMERAS), camera_heights=SIZE, camera_widths=SIZE
    )
    yield env
    env.close()


def _physics_state(env):
    """(flattened sim state, qacc_warmstart) of a robosuite env: what the next step starts from
    (before MuJoCo 3.3.6 the solver's warm start differs between runs long before the state does)."""
    return env.get_sim_state().copy(), env.sim.data._data.qacc_warmstart.copy()


def _vanilla_rollout(env, state, seed, actions, stop_on_done=True):
    """[(obs, done, physics state)] after the settle steps and after each action, stepping LIBERO directly."""
    env.seed(seed)
    env.reset()
    obs = env.set_init_state(state)
    for _ in range(10):
        obs, _, _, _ = env.step(NOOP_ACTION)
    out = [(obs, False, _physics_state(env))]
    for a in actions:
        obs, _, done, _ = env.step(a)
        out.append((obs, done, _physics_state(env)))
        if done and stop_on_done:
            break
    return out


def _assert_obs_equal(images, proprio, ref_obs):
    for cam in CAMERAS:
        np.testing.assert_array_equal(images[cam], ref_obs[f"{cam}_image"], err_msg=cam)
    np.testing.assert_array_equal(proprio, proprio_from_obs(ref_obs))


def _assert_physics_equal(env: LiberoEnv, ref_physics, where: str):
    """Bit for bit: the full flattened sim state and the solver's warm start."""
    state, warmstart = _physics_state(env._env)
    assert np.array_equal(state, ref_physics[0]), (
        f"{where}: sim state differs from LIBERO's by up to {np.abs(state - ref_physics[0]).max():.3g}")
    assert np.array_equal(warmstart, ref_physics[1]), (
        f"{where}: qacc_warmstart differs from LIBERO's by up to {np.abs(warmstart - ref_physics[1]).max():.3g}")


def _random_actions(k, seed):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-0.8, 0.8, size=(k, 7))
    a[:, 6] = 1.0  # close the gripper, so its command ramp is non-zero at the end of the episode
    return a


# ---- tables and setup (no simulation) ----------------------------------------------------------
def test_task_tables_and_init_states_match_libero_benchmark(assets):
    pytest.importorskip("torch")  # LIBERO's benchmark module imports torch; vlajax's reader does not
    from libero.libero import benchmark

    from vlajax.envs.libero import suite_tasks

    bench = benchmark.get_benchmark_dict()
    for suite in SUITES:
        ours, theirs = suite_tasks(suite), bench[suite]()
        assert [t.name for t in ours] == theirs.get_task_names()
        assert [t.instruction for t in ours] == [t.language for t in theirs.tasks]
        assert [t.bddl_file for t in ours] == [
            theirs.get_task_bddl_file_path(i) for i in range(theirs.n_tasks)
        ]
        for i in (0, theirs.n_tasks - 1):
            np.testing.assert_array_equal(
                libero_setup.load_init_states(ours[i].init_states_file), theirs.get_task_init_states(i)
            )


def test_setup_errors(tmp_path, monkeypatch, assets):
    monkeypatch.delenv(libero_setup.ASSETS_ENV, raising=False)
    with pytest.raises(libero_setup.LiberoAssetsError, match=libero_setup.ASSETS_ENV):
        libero_setup.resolve_assets_dir(None)
    with pytest.raises(libero_setup.LiberoAssetsError, match="does not exist"):
        libero_setup.resolve_assets_dir(tmp_path / "nowhere")
    with pytest.raises(libero_setup.LiberoAssetsError, match="not a LIBERO assets folder"):
        libero_setup.resolve_assets_dir(tmp_path)
    # the env var is honoured, and an assets folder is found from its parent too
    monkeypatch.setenv(libero_setup.ASSETS_ENV, str(Path(assets).parent))
    assert libero_setup.resolve_assets_dir(None) == Path(assets)
    with pytest.raises(EnvError, match="libero_spatial, libero_object, libero_goal, libero_10, libero_90"):
        LiberoEnv("libero_100", assets_dir=assets)


# ---- every suite --------------------------------------------------------------------------------
@pytest.mark.parametrize("suite", SUITES)
def test_every_suite_builds_resets_and_steps(suite, assets):
    env = LiberoEnv(suite, assets_dir=assets, cameras=("agentview",), image_size=64)
    try:
        n = len(env.tasks)
        assert n == (90 if suite == "libero_90" else 10)
        assert all(t.num_init_states == 50 and t.max_episode_steps == 512 for t in env.tasks)
        last = n - 1
        for task_id, state_id in ((0, 0), (last, 1)):
            out = env.reset(task_id, state_id, seed=0)
            assert out.images["agentview"].shape == (64, 64, 3) and out.images["agentview"].dtype == np.uint8
            assert out.images["agentview"].std() > 0  # a real rendering, not a blank frame
            assert out.proprio.shape == (8,) and out.proprio.dtype == np.float32
            assert out.instruction == env.tasks[task_id].instruction and out.instruction
        assert env.num_builds == 2
        out = env.chunk_step(_random_actions(2, seed=1))
        assert out.steps == 2 and not out.success
        assert set(out.images) == {"agentview"} and out.proprio.shape == (8,)
        env.reset(last, 0, seed=0)  # same task: fast reset, no rebuild
        assert env.num_builds == 2
    finally:
        env.close()


# ---- faithfulness to LIBERO ---------------------------------------------------------------------
def test_matches_libero_fresh_and_reused_in_both_render_modes(goal_env, vanilla, bowl_task):
    """Reset, last-sub-step rendering, every-sub-step rendering and a reused (fast-reset) env all
    give byte-identical images (as robosuite renders them, unflipped) and proprio to LIBERO's own
    env stepped one action at a time with every step rendered."""
    state = goal_env.init_states(bowl_task)[3]
    actions = _random_actions(6, seed=0)
    ref = _vanilla_rollout(vanilla, state, seed=7, actions=actions)
    assert len(ref) == 7 and not any(done for _, done, _ in ref)

    out = goal_env.reset(bowl_task, 3, seed=7)
    _assert_obs_equal(out.images, out.proprio, ref[0][0])
    _assert_physics_equal(goal_env, ref[0][2], "reset")
    out = goal_env.chunk_step(actions[:4])
    assert out.steps == 4 and out.substep_images is None
    _assert_obs_equal(out.images, out.proprio, ref[4][0])
    _assert_physics_equal(goal_env, ref[4][2], "step 4")
    out = goal_env.chunk_step(actions[4:])
    _assert_obs_equal(out.images, out.proprio, ref[6][0])
    _assert_physics_equal(goal_env, ref[6][2], "step 6")

    builds = goal_env.num_builds
    out = goal_env.reset(bowl_task, 3, seed=7)  # reused env, gripper ramp left closed by the episode
    assert goal_env.num_builds == builds
    _assert_obs_equal(out.images, out.proprio, ref[0][0])
    _assert_physics_equal(goal_env, ref[0][2], "reused, reset")
    out = goal_env.chunk_step(actions, render_every_substep=True)
    _assert_obs_equal(out.images, out.proprio, ref[6][0])
    _assert_physics_equal(goal_env, ref[6][2], "reused, step 6")
    for cam in CAMERAS:
        assert out.substep_images[cam].shape == (6, SIZE, SIZE, 3)
        for k in range(6):
            np.testing.assert_array_equal(out.substep_images[cam][k], ref[k + 1][0][f"{cam}_image"])

    # robosuite's hard reset (model and sim reloaded, camera sensors replaced) gives the same
    hard = LiberoEnv("libero_goal", assets_dir=goal_env.assets_dir, cameras=CAMERAS, image_size=SIZE,
                     hard_reset=True)
    try:
        for _ in range(2):
            out = hard.reset(bowl_task, 3, seed=7)
            _assert_obs_equal(out.images, out.proprio, ref[0][0])
            _assert_physics_equal(hard, ref[0][2], "hard reset")
            out = hard.chunk_step(actions)
            _assert_obs_equal(out.images, out.proprio, ref[6][0])
            _assert_physics_equal(hard, ref[6][2], "hard reset, step 6")
        assert hard.num_builds == 1
    finally:
        hard.close()


# Where split physics and the fast reset once parted from LIBERO on MuJoCo 3.3.2 (its mj_forward
# overwrites the solver's warm start): libero_10 task 7 state 2 by 2e-6 after the settle steps (split
# physics), libero_object task 3 state 5 by 5e-15 after them, 2e-6 after 24 steps (both causes).
EXACT_CASES = (("libero_10", 7, 2), ("libero_object", 3, 5))


@pytest.mark.parametrize("suite,task_id,state_id", EXACT_CASES)
def test_physics_bit_identical_to_libero_fresh_and_reused(suite, task_id, state_id, assets):
    """Default LiberoEnv (split physics, fast reset) vs LIBERO's own env: the full flattened sim
    state, the solver's warm start and both cameras' images after the settle steps and after each of
    three 8-step chunks, in a fresh env and in one reused after another episode of the task."""
    from libero.libero.envs import OffScreenRenderEnv

    from vlajax.envs.libero import suite_tasks

    size, seed = 32, 0
    actions = _random_actions(24, seed=3)
    vanilla = OffScreenRenderEnv(bddl_file_name=suite_tasks(suite)[task_id].bddl_file, camera_names=list(CAMERAS),
                                 camera_heights=size, camera_widths=size)
    env = LiberoEnv(suite, assets_dir=assets, cameras=CAMERAS, image_size=size)
    try:
        ref = _vanilla_rollout(vanilla, env.init_states(task_id)[state_id], seed, actions)
        for run in ("fresh", "reused"):
            out = env.reset(task_id, state_id, seed=seed)
            _assert_obs_equal(out.images, out.proprio, ref[0][0])
            _assert_physics_equal(env, ref[0][2], f"{run}: after the settle steps")
            for k in range(8, 25, 8):
                out = env.chunk_step(actions[k - 8:k])
                _assert_obs_equal(out.images, out.proprio, ref[k][0])
                _assert_physics_equal(env, ref[k][2], f"{run}: after step {k}")
            env.reset(task_id, state_id + 1, seed=seed + 1)  # another episode moves the objects
            env.chunk_step(_random_actions(8, seed=4))
        assert env.num_builds == 1
    finally:
        env.close()
        vanilla.close()


def test_single_env_errors(goal_env, bowl_task, assets):
    fresh = LiberoEnv("libero_goal", assets_dir=assets, cameras=("agentview",), image_size=64)
    with pytest.raises(EnvError, match="before reset"):
        fresh.chunk_step(np.zeros((2, 7)))
    with pytest.raises(EnvError, match=r"libero_goal: task id 10 out of range \(0..9\)"):
        fresh.reset(10, 0, seed=0)
    with pytest.raises(EnvError, match=rf"{BOWL_TASK}\): state id 50 out of range \(0..49\)"):
        fresh.reset(bowl_task, 50, seed=0)
    with pytest.raises(EnvError, match="init_states_override"):
        LiberoEnv("libero_goal", assets_dir=assets, init_states_override={0: np.zeros(5)})
    assert fresh.num_builds == 0  # bad ids are rejected before any scene is built

    goal_env.reset(bowl_task, 0, seed=0)
    for bad in (np.zeros((2, 6)), np.zeros(7), np.zeros((0, 7)), np.zeros((2, 7, 1))):
        with pytest.raises(EnvError, match=r"shape \(K>=1, 7\)"):
            goal_env.chunk_step(bad)
    nan = np.zeros((2, 7))
    nan[1, 3] = np.nan
    with pytest.raises(EnvError, match="NaN"):
        goal_env.chunk_step(nan)


# ---- through SubprocVectorEnv -------------------------------------------------------------------
def _toss_state(vanilla, init_state):
    """init_state with the bowl 10 cm above the plate centre, moving up at 3.0 m/s."""
    inner = vanilla.env
    vanilla.seed(0)
    vanilla.reset()
    vanilla.set_init_state(init_state)
    joint = inner.get_object("akita_black_bowl_1").joints[-1]
    qpos = np.array(inner.sim.data.get_joint_qpos(joint))
    qpos[:3] = inner.sim.data.body_xpos[inner.obj_body_id["plate_1"]] + [0.0, 0.0, 0.10]
    inner.sim.data.set_joint_qpos(joint, qpos)
    inner.sim.data.set_joint_qvel(joint, [0.0, 0.0, 3.0, 0.0, 0.0, 0.0])
    inner.sim.forward()
    return vanilla.get_sim_state().copy()


@pytest.mark.slow
def test_vector_env_early_stop_errors_and_task_switch(goal_env, vanilla, bowl_task, assets):
    from vlajax.envs.libero import make_libero_vector_env

    toss = _toss_state(vanilla, goal_env.init_states(bowl_task)[0])
    ref = _vanilla_rollout(vanilla, toss, seed=0, actions=[NOOP_ACTION] * 30)
    assert ref[-1][1], "the tossed bowl should land on the plate within 30 steps"
    s_star = len(ref) - 1  # env steps after settling at which LIBERO first reports success
    assert s_star >= 2
    other = 0  # "open the middle drawer of the cabinet"

    with make_libero_vector_env(
        "libero_goal", 2, assets_dir=assets, cameras=CAMERAS, image_size=SIZE,
        init_states_override={bowl_task: toss[None]}, timeout_s=300,
    ) as venv:
        assert venv.tasks[bowl_task].num_init_states == 1 and venv.tasks[other].num_init_states == 50
        obs = venv.reset([bowl_task, other], [0, 0], seed=0)
        assert obs.images["agentview"].shape == (2, SIZE, SIZE, 3)
        assert obs.instructions == [venv.tasks[bowl_task].instruction, venv.tasks[other].instruction]
        np.testing.assert_array_equal(obs.images["agentview"][0], ref[0][0]["agentview_image"])

        k = s_star + 3  # success lands in the middle of this chunk
        chunk = np.tile(NOOP_ACTION, (2, k, 1))
        res = venv.chunk_step(chunk)
        np.testing.assert_array_equal(res.terminated, [True, False])
        np.testing.assert_array_equal(res.reward, [1.0, 0.0])
        np.testing.assert_array_equal(res.info["elapsed_steps"], [s_star, k])
        np.testing.assert_array_equal(res.info["success"], [True, False])
        _assert_obs_equal(
            {c: v[0] for c, v in res.obs.images.items()}, res.obs.proprio[0], ref[s_star][0]
        )

        res2 = venv.chunk_step(chunk)  # the finished env is not simulated again
        np.testing.assert_array_equal(res2.reward, [0.0, 0.0])
        np.testing.assert_array_equal(res2.info["elapsed_steps"], [s_star, 2 * k])
        np.testing.assert_array_equal(res2.obs.images["agentview"][0], res.obs.images["agentview"][0])

        bad = chunk.copy()
        bad[1, 0, 2] = np.nan
        with pytest.raises(EnvError, match="NaN"):
            venv.chunk_step(bad)
        with pytest.raises(EnvError, match="shape"):
            venv.chunk_step(chunk[:, :, :6])
        with pytest.raises(EnvError, match="task id 10 out of range"):
            venv.reset([10, 0], [0, 0])
        with pytest.raises(EnvError, match=rf"{BOWL_TASK}\): state id 1 out of range \(0..0\)"):
            venv.reset([bowl_task, other], [1, 0])

        # Task switch: env 0 rebuilds its scene, env 1 keeps its own (fast reset). Same task, state
        # and seed must give byte-identical observations in both processes.
        obs = venv.reset([other, other], [5, 5], seed=3)
        assert obs.instructions == [venv.tasks[other].instruction] * 2
        for cam in CAMERAS:
            np.testing.assert_array_equal(obs.images[cam][0], obs.images[cam][1])
        np.testing.assert_array_equal(obs.proprio[0], obs.proprio[1])
        res = venv.chunk_step(np.stack([_random_actions(3, seed=2)] * 2))
        np.testing.assert_array_equal(res.info["elapsed_steps"], [3, 3])
        for cam in CAMERAS:
            np.testing.assert_array_equal(res.obs.images[cam][0], res.obs.images[cam][1])


# ---- a separate, clean process ------------------------------------------------------------------
_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from vlajax.envs.libero import LiberoEnv
    env = LiberoEnv("libero_goal", cameras={cameras!r}, image_size={size})
    out0 = env.reset({task}, 4, seed=11)
    out1 = env.chunk_step(np.asarray({actions!r}))
    np.savez(sys.argv[1], **{{f"reset_{{c}}": v for c, v in out0.images.items()}},
             **{{f"step_{{c}}": v for c, v in out1.images.items()}}, proprio=out1.proprio)
    env.close()
    print(json.dumps({{"torch": "torch" in sys.modules, "gl": os.environ.get("MUJOCO_GL"),
                      "config": os.environ.get("LIBERO_CONFIG_PATH")}}))
    """
)


def test_deterministic_across_processes_non_interactive_and_torch_free(goal_env, bowl_task, assets, tmp_path):
    """A fresh process with no LIBERO config, no MUJOCO_GL and no stdin imports LIBERO without
    asking, renders with EGL, never imports torch, and reproduces this process byte for byte."""
    actions = _random_actions(3, seed=5)
    script = _CHILD.format(cameras=CAMERAS, size=SIZE, task=bowl_task, actions=actions.tolist())
    unset = ("MUJOCO_GL", "PYOPENGL_PLATFORM", "LIBERO_CONFIG_PATH")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env[libero_setup.ASSETS_ENV] = assets
    env[libero_setup.CACHE_ENV] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out.npz")],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"torch": False, "gl": "egl", "config": str(tmp_path / "cache")}
    assert (tmp_path / "cache" / "config.yaml").exists()

    child = np.load(tmp_path / "out.npz")
    out0 = goal_env.reset(bowl_task, 4, seed=11)
    out1 = goal_env.chunk_step(actions)
    for cam in CAMERAS:
        assert child[f"reset_{cam}"].tobytes() == out0.images[cam].tobytes()
        assert child[f"step_{cam}"].tobytes() == out1.images[cam].tobytes()
    assert child["proprio"].tobytes() == out1.proprio.tobytes()
