"""IsaacVectorEnv: pure parts and host <-> process plumbing in CI; Isaac Lab itself behind `isaac`.

CI (no Isaac Lab): the action mapping, camera orientation, message framing, grouping by task, the
errors for a missing Isaac interpreter, and the whole multi-process path (`IsaacVectorEnv` starting
`_isaac_worker.py` processes, one per task, that serve `tests/_isaac_numpy_runner.PointRunner`, a
plain-numpy batched simulator, through the same episode loop as Isaac Lab).

`@pytest.mark.isaac`: the real Isaac Lab 3.0 worker (Newton physics, Warp camera, a Franka built from
robosuite's Panda), run when VLAJAX_ISAAC_PYTHON names an interpreter with isaaclab==3.0.0 and
mujoco-usd-converter==0.6.1.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlajax.envs import EnvError, EnvWorkerError
from vlajax.envs import _isaac_worker as wire
from vlajax.envs.isaac import (
    ISAAC_PYTHON_ENV,
    ISAAC_TASKS,
    IsaacTask,
    IsaacVectorEnv,
    group_envs_by_task,
    reset_seed,
    resolve_isaac_python,
)

RUNNER = f"{Path(__file__).with_name('_isaac_numpy_runner.py')}:PointRunner"
GOAL_A, GOAL_B = (0.3, 0.0, 0.0), (-0.3, 0.2, 0.0)


def point_task(name: str, goal, *extra: str, steps: int = 40) -> IsaacTask:
    return IsaacTask(name, "point", f"move the point to {goal}", steps,
                     overrides=("goal=" + ",".join(map(str, goal)), *extra), num_init_states=100)


def point_env(tasks, num_envs, **kw) -> IsaacVectorEnv:
    kw.setdefault("timeout_s", 20.0)
    kw.setdefault("start_timeout_s", 30.0)
    return IsaacVectorEnv(tasks, num_envs, python=sys.executable, runner=RUNNER, image_size=(4, 6), **kw)


def start_pos(seed: int, state_id: int) -> np.ndarray:
    """The point's initial position as the runner draws it for (seed, state id)."""
    return np.random.default_rng(reset_seed(seed, state_id, 100)).uniform(-0.5, 0.5, 3)


def toward(goal, proprio: np.ndarray, k: int) -> np.ndarray:
    """(N, k, 7) open-loop actions moving each point towards `goal` (N, 3) without overshooting
    within the chunk (each step covers at most 1/k of the distance), gripper closed."""
    a = np.zeros((len(proprio), k, 7), np.float32)
    a[:, :, :3] = np.clip((np.asarray(goal) - proprio[:, :3]) / (0.05 * k), -1, 1)[:, None, :]
    a[:, :, 6] = 1.0
    return a


# ---- pure functions -------------------------------------------------------------------------------
def test_policy_to_task_actions_maps_gripper_and_noops():
    pol = np.array([[0.5, -2.0, 0.1, 0.2, 0.0, -0.3, 1.0],  # close
                    [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, -1.0],  # open
                    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    stepping = np.array([True, True, False])
    last = np.array([1.0, 1.0, -1.0], np.float32)  # env 2 last closed its gripper (Isaac: < 0)
    out = wire.policy_to_task_actions(pol, 6, 1, stepping, last)
    np.testing.assert_allclose(out[0], [0.5, -1.0, 0.1, 0.2, 0.0, -0.3, -1.0])  # clipped; close -> -1
    np.testing.assert_allclose(out[1, 6], 1.0)  # open -> +1
    np.testing.assert_allclose(out[2], [0, 0, 0, 0, 0, 0, -1.0])  # no-op keeps the gripper closed
    no_grip = wire.policy_to_task_actions(pol, 6, 0, stepping, last)
    assert no_grip.shape == (3, 6)
    np.testing.assert_allclose(no_grip[:2], out[:2, :6])
    with pytest.raises(ValueError, match="6-d relative pose"):
        wire.policy_to_task_actions(pol, 7, 1, stepping, last)
    with pytest.raises(ValueError, match=r"\(N, 7\)"):
        wire.policy_to_task_actions(pol[:, :6], 6, 1, stepping, last)


@pytest.mark.parametrize("eye,target", [((1.7, 0.0, 1.1), (0.3, 0.0, 0.2)), ((0.2, -1.0, 0.5), (0.4, 0.3, 0.0)),
                                        ((-1.0, -1.0, -0.2), (0.0, 0.0, 0.1))])
def test_look_at_points_the_camera_x_axis_at_the_target(eye, target):
    x, y, z, w = wire.look_at_quat_xyzw(eye, target)
    # rotation matrix of (x, y, z, w): its first column is the camera's forward (+X) axis
    fwd = np.array([1 - 2 * (y * y + z * z), 2 * (x * y + z * w), 2 * (x * z - y * w)])
    left = np.array([2 * (x * y - z * w), 1 - 2 * (x * x + z * z), 2 * (y * z + x * w)])
    d = np.subtract(target, eye)
    np.testing.assert_allclose(fwd, d / np.linalg.norm(d), atol=1e-9)
    assert abs(left[2]) < 1e-9  # no roll: the camera's y axis stays horizontal


def test_message_framing_roundtrip_keeps_arrays_out_of_pickle():
    a, b = mp.Pipe()
    msg = ("ok", {"images": np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3), "f": np.float32(1.5),
                  "flags": np.array([True, False]), "empty": np.zeros((0, 3), np.float64),
                  "frames": [np.ones((1, 2), np.int16), np.zeros((0, 2), np.int16)], "s": "x"}, 0.25)
    wire.send_msg(a, msg)
    status, out, dt = wire.recv_msg(b)
    assert (status, dt, out["s"]) == ("ok", 0.25, "x")
    assert type(out["f"]) is float and out["f"] == 1.5
    for k in ("images", "flags", "empty"):
        assert out[k].dtype == msg[1][k].dtype and out[k].shape == msg[1][k].shape
        np.testing.assert_array_equal(out[k], msg[1][k])
    assert [f.shape for f in out["frames"]] == [(1, 2), (0, 2)]


def test_group_envs_by_task_keeps_caller_order_and_checks_capacity():
    assert group_envs_by_task([2, 0, 2, 2, 0], capacity=3) == {2: [0, 2, 3], 0: [1, 4]}
    with pytest.raises(EnvError, match="task 2: 3 envs"):
        group_envs_by_task([2, 0, 2, 2], capacity=2)


def test_reset_seed_depends_on_seed_and_state_only():
    assert reset_seed(0, 7, 100) == 7
    assert len({reset_seed(s, i, 100) for s in range(3) for i in range(100)}) == 300


def test_task_table_is_consistent():
    for t in ISAAC_TASKS.values():
        assert t.max_episode_steps % 8 == 0, t.name  # whole chunks of the policy's 8 actions
        assert t.instruction and t.success_terms


# ---- the Isaac interpreter ----------------------------------------------------------------------
def test_missing_isaac_python_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv(ISAAC_PYTHON_ENV, raising=False)
    with pytest.raises(EnvError, match=r"pip install isaaclab==3\.0\.0.*VLAJAX_ISAAC_PYTHON"):
        IsaacVectorEnv(["reach"], 2)
    monkeypatch.setenv(ISAAC_PYTHON_ENV, str(tmp_path / "no-python"))
    with pytest.raises(EnvError, match="no-python.*not an executable.*pip install isaaclab"):
        resolve_isaac_python()


def test_vector_env_fn_for_the_trainer_checks_suite_and_interpreter(monkeypatch):
    from vlajax.envs.isaac import ISAAC_ROBOT_USD_ENV, vector_env_fn

    def args(suite):
        return {"suite": suite, "image_size": (96, 128), "cameras": ("agentview",), "max_episode_steps": 64}

    monkeypatch.delenv(ISAAC_ROBOT_USD_ENV, raising=False)
    monkeypatch.delenv(ISAAC_PYTHON_ENV, raising=False)
    with pytest.raises(EnvError, match="pip install isaaclab"):
        vector_env_fn(**args("isaac_stack"))
    monkeypatch.setenv(ISAAC_PYTHON_ENV, sys.executable)
    with pytest.raises(EnvError, match="unknown Isaac suite 'libero_10'"):
        vector_env_fn(**args("libero_10"))
    fn = vector_env_fn(**args("isaac_stack"))
    assert fn.keywords["image_size"] == (96, 128) and fn.keywords["max_episode_steps"] == 64
    assert fn.keywords["python"] == sys.executable and fn.keywords["camera"] == "agentview"


def test_interpreter_without_isaaclab_fails_at_start_with_install_hint():
    # the real worker and its Isaac runner, in an interpreter that lacks Isaac Lab
    env = IsaacVectorEnv(["reach"], 1, python=sys.executable, start_timeout_s=60.0)
    try:
        with pytest.raises(EnvError, match=r"(?s)task 0 \(reach.*No module named 'isaaclab'.*pip install isaaclab"):
            env.reset([0], [0])
    finally:
        env.close()


def test_importing_vlajax_imports_no_isaac_package():
    code = ("import sys, vlajax, vlajax.envs, vlajax.envs.isaac; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('isaaclab', 'torch', 'warp', 'newton')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- plumbing through real processes (plain-numpy simulator) ------------------------------------
def test_multi_task_batch_restores_order_and_stops_finished_envs():
    tasks = [point_task("a", GOAL_A), point_task("b", GOAL_B, steps=24)]
    task_ids, state_ids = [1, 0, 1, 0, 0], [5, 5, 6, 9, 5]
    with point_env(tasks, 5, envs_per_task=3) as env:
        obs = env.reset(task_ids, state_ids, seed=3)
        assert len(env.pids) == 2  # one process per task
        assert obs.instructions == [tasks[t].instruction for t in task_ids]
        for i, s in enumerate(state_ids):
            np.testing.assert_allclose(obs.proprio[i, :3], start_pos(3, s), rtol=1e-6)
        # same (task, state) in two slots of one process: same initial state and image
        np.testing.assert_array_equal(obs.proprio[1], obs.proprio[4])
        np.testing.assert_array_equal(obs.images["agentview"][1], obs.images["agentview"][4])
        assert obs.images["agentview"].shape == (5, 4, 6, 3) and obs.images["agentview"].dtype == np.uint8

        goals = np.array([GOAL_B if t else GOAL_A for t in task_ids])
        done_steps = np.zeros(5, np.int32)
        total_reward = np.zeros(5)
        frozen: dict[int, np.ndarray] = {}
        proprio, before = obs.proprio, np.zeros(5, np.int32)
        for _ in range(8):
            actions = toward(goals, proprio, 8)
            actions[3] = 0.0  # env 3 stays where it is: it runs into its limit (40 steps)
            res = env.chunk_step(actions)
            proprio = res.obs.proprio
            total_reward += res.reward
            assert np.all(res.info["steps"] == res.info["elapsed_steps"] - before)
            before = res.info["elapsed_steps"]
            for i in np.flatnonzero(res.done):
                if i in frozen:  # finished earlier: not stepped, same observation
                    assert res.info["steps"][i] == 0 and res.reward[i] == 0
                    np.testing.assert_array_equal(res.obs.proprio[i], frozen[i])
                else:
                    frozen[i] = res.obs.proprio[i].copy()
                    done_steps[i] = res.info["elapsed_steps"][i]
        assert res.terminated[[0, 1, 2, 4]].all() and total_reward[[0, 1, 2, 4]].tolist() == [1, 1, 1, 1]
        for i in (0, 1, 2, 4):
            # a point moves at most 0.05 per axis and step, so it needs at least this many steps
            need = (np.linalg.norm(start_pos(3, state_ids[i]) - goals[i]) - 0.06) / (0.05 * np.sqrt(3))
            assert need <= done_steps[i] <= 40
            assert np.linalg.norm(frozen[i][:3] - goals[i]) < 0.06  # stopped at the success step
        assert res.truncated[3] and not res.terminated[3] and total_reward[3] == 0
        assert done_steps[3] == 40  # task a's max_episode_steps


def test_failure_term_truncates_and_limit_cuts_the_chunk():
    with point_env([point_task("a", GOAL_A, steps=12)], 2) as env:
        env.reset([0, 0], [1, 2])
        still = np.zeros((2, 8, 7), np.float32)
        steps = []
        for _ in range(4):
            res = env.chunk_step(still)
            steps.append(res.info["steps"].tolist())
        assert steps[:2] == [[8, 8], [4, 4]] and steps[2:] == [[0, 0], [0, 0]]  # limit 12 cuts chunk 2
        assert res.truncated.all() and not res.terminated.any() and res.reward.sum() == 0
        # render_every_substep gives one frame per executed sub-step
        env.reset([0, 0], [1, 2])
        res = env.chunk_step(still[:, :3], render_every_substep=True)
        frames = res.info["substep_images"]
        assert [f["agentview"].shape[0] for f in frames] == [3, 3]
        np.testing.assert_array_equal(frames[0]["agentview"][-1], res.obs.images["agentview"][0])
    with point_env([point_task("a", GOAL_A, steps=400)], 1) as env:
        env.reset([0], [0])
        push = np.zeros((1, 8, 7), np.float32)
        push[0, :, 0] = 1.0  # leaves the box (x > 1) within 30 steps: the failure term
        for _ in range(10):
            res = env.chunk_step(push)
            if res.done[0]:
                break
        assert res.truncated[0] and not res.terminated[0]
        assert res.obs.proprio[0, 0] > 1.0 and res.info["elapsed_steps"][0] < 400  # stopped by the failure


def test_bad_input_is_rejected_with_names():
    with point_env([point_task("a", GOAL_A)], 2) as env:
        with pytest.raises(EnvError, match="before reset"):
            env.chunk_step(np.zeros((2, 8, 7), np.float32))
        with pytest.raises(EnvError, match="task id 3 out of range"):
            env.reset([0, 3], [0, 0])
        with pytest.raises(EnvError, match=r"env 1 \(task a\): state id 100 out of range"):
            env.reset([0, 0], [0, 100])
        env.reset([0, 0], [0, 1])
        bad = np.zeros((2, 8, 7), np.float32)
        bad[1, 2, 0] = np.nan
        with pytest.raises(EnvError, match=r"non-finite.*env 1 \(task a, state 1\)"):
            env.chunk_step(bad)
        with pytest.raises(EnvError, match="action_dim=7"):
            env.chunk_step(np.zeros((2, 8, 6), np.float32))
    with pytest.raises(EnvError, match="closed"):
        env.reset([0, 0], [0, 0])


def test_process_failures_name_the_task_and_keep_other_results():
    tasks = [point_task("ok", GOAL_A), point_task("crashes", GOAL_B, "fault_step=crash"),
             point_task("raises", GOAL_B, "fault_step=raise"), point_task("no_start", GOAL_A, "fault_init=raise")]
    with point_env(tasks, 3) as env:
        with pytest.raises(EnvError, match=r"(?s)start failed.*task 3 \(no_start.*fault injected at init"):
            env.reset([0, 3, 0], [0, 0, 0])
        env.reset([0, 1, 2], [0, 1, 2])
        res = env.chunk_step(np.zeros((3, 2, 7), np.float32))  # first step works everywhere
        with pytest.raises(EnvWorkerError) as err:
            env.chunk_step(np.zeros((3, 2, 7), np.float32))
        msg = str(err.value)
        assert "task 1 (crashes, envs [1]): process died; exit code 3" in msg
        assert "task 2 (raises, envs [2]): process raised" in msg and "fault injected at step" in msg
        assert err.value.env_indices == (1, 2)
        res = err.value.result
        assert res.info["worker_failed"].tolist() == [False, True, True]
        assert res.info["steps"].tolist() == [2, 0, 0] and res.info["elapsed_steps"][0] == 4
        with pytest.raises(EnvError, match="before reset for env 1, env 2"):
            env.chunk_step(np.zeros((3, 2, 7), np.float32))
        env.reset([0, 0, 0], [0, 1, 2])  # failed processes are gone; healthy task 0 takes all
        assert len(env.pids) == 1


def test_hung_process_is_killed_after_timeout():
    with point_env([point_task("hangs", GOAL_A, "fault_step=hang")], 1, timeout_s=2.0) as env:
        env.reset([0], [0])
        env.chunk_step(np.zeros((1, 1, 7), np.float32))
        pid = env.pids[0]
        with pytest.raises(EnvWorkerError, match=r"no answer within 2 s \(process killed\)"):
            env.chunk_step(np.zeros((1, 1, 7), np.float32))
        assert env.pids == []
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_max_processes_closes_idle_tasks():
    tasks = [point_task(f"t{i}", GOAL_A) for i in range(3)]
    with point_env(tasks, 2, max_processes=2) as env:
        env.reset([0, 1], [0, 0])
        first = dict(zip([0, 1], env.pids))
        env.reset([2, 1], [0, 0])  # task 0 is idle: closed for task 2
        assert sorted(env._procs) == [1, 2] and env._procs[1].proc.pid == first[1]
    with point_env(tasks, 3, max_processes=2) as env:
        with pytest.raises(EnvError, match="needs 3 tasks' processes, max_processes=2"):
            env.reset([0, 1, 2], [0, 0, 0])


# ---- Isaac Lab itself ---------------------------------------------------------------------------
isaac = pytest.mark.skipif(not os.environ.get(ISAAC_PYTHON_ENV),
                           reason=f"{ISAAC_PYTHON_ENV} is not set (a Python 3.12 venv with isaaclab==3.0.0)")


@pytest.fixture(scope="module")
def franka_usd():
    from vlajax.envs.isaac import build_local_franka_usd

    return build_local_franka_usd()


@isaac
@pytest.mark.isaac
@pytest.mark.slow
def test_isaac_multi_task_stack_with_camera(franka_usd):
    tasks = ["stack_blue_red_green", "stack_red_green"]
    with IsaacVectorEnv(tasks, 4, envs_per_task=2, image_size=64, local_robot_usd=franka_usd,
                        max_episode_steps=12) as env:
        obs = env.reset([0, 1, 0, 1], [3, 5, 3, 7], seed=1)
        img, prop = obs.images["agentview"], obs.proprio
        assert img.shape == (4, 64, 64, 3) and img.dtype == np.uint8 and prop.shape == (4, 8)
        assert obs.instructions == [ISAAC_TASKS[tasks[t]].instruction for t in (0, 1, 0, 1)]
        assert img.std(axis=(1, 2, 3)).min() > 5  # a rendered scene, not a blank frame
        np.testing.assert_allclose(prop[0], prop[2], atol=1e-5)  # same task and state id, two slots
        assert np.abs(img[0].astype(int) - img[2]).mean() < 1.0
        assert np.abs(img[1].astype(int) - img[3]).mean() > 0.5  # another random initial state
        np.testing.assert_allclose(prop[:, 6:], 0.04, atol=2e-3)  # fingers open after reset

        down = np.zeros((4, 8, 7), np.float32)
        down[..., 2] = -0.5  # move down, close the gripper
        down[..., 6] = 1.0
        res = env.chunk_step(down)
        assert res.info["steps"].tolist() == [8] * 4
        dz = res.obs.proprio[:, 2] - prop[:, 2]
        assert (dz < -0.01).all() and (np.abs(res.obs.proprio[:, :2] - prop[:, :2]) < 0.01).all()
        assert (res.obs.proprio[:, 6:] < 0.02).all()  # fingers closed
        res = env.chunk_step(down)  # the 12-step limit cuts this chunk at 4 steps
        assert res.info["steps"].tolist() == [4] * 4 and res.truncated.all()
        last = res.obs
        res = env.chunk_step(down)
        assert res.info["steps"].tolist() == [0] * 4  # finished envs are not stepped
        np.testing.assert_array_equal(res.obs.images["agentview"], last.images["agentview"])


@isaac
@pytest.mark.isaac
@pytest.mark.slow
def test_isaac_success_term_terminates_with_frozen_observation(franka_usd):
    # Reach's own success term with its thresholds raised: every env succeeds at its first step.
    easy = IsaacTask("reach_easy", "Isaac-Reach-Franka", "reach", 40, overrides=(
        "presets=diffik", "env.commands.ee_pose.position_success_threshold=100.0",
        "env.commands.ee_pose.orientation_success_threshold=100.0"), offline_scene={"ground": None})
    with IsaacVectorEnv([easy], 2, image_size=32, local_robot_usd=franka_usd) as env:
        env.reset([0, 0], [0, 1])
        res = env.chunk_step(np.zeros((2, 8, 7), np.float32))
        assert res.terminated.all() and res.reward.tolist() == [1.0, 1.0]
        assert res.info["steps"].tolist() == [1, 1] and res.info["elapsed_steps"].tolist() == [1, 1]
        again = env.chunk_step(np.ones((2, 8, 7), np.float32))
        assert again.info["steps"].tolist() == [0, 0] and again.reward.sum() == 0
        np.testing.assert_array_equal(again.obs.proprio, res.obs.proprio)
