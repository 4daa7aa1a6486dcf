"""The scripted LIBERO expert on real LIBERO (offline asset pack): each primitive succeeds on a few
of the fixed init states within the suite's step budget, through the env's own `demonstrate`
(the path `vlajax demos` runs in its simulator workers), and a goal it has no primitive for is a
named error, not a silent failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("libero")
pytest.importorskip("robosuite")

from tests.conftest import libero_pack  # noqa: E402
from vlajax.envs import libero_setup  # noqa: E402
from vlajax.envs.libero import LiberoEnv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAMERAS = ("agentview", "robot0_eye_in_hand")
SIZE = 32
BUDGET = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300}  # OpenVLA-OFT's max steps


def _env(suite, assets):
    return LiberoEnv(suite, assets_dir=assets, cameras=CAMERAS, image_size=SIZE, max_episode_steps=BUDGET[suite])


def _check_record(rec, suite):
    T = rec["steps"]
    assert rec["success"] and rec["error"] is None, rec["error"]
    assert 0 < T <= BUDGET[suite]
    for cam in CAMERAS:
        assert rec["images"][cam].shape == (T, SIZE, SIZE, 3) and rec["images"][cam].dtype == np.uint8
    assert rec["proprio"].shape == (T, 8) and rec["actions"].shape == (T, 7)
    assert rec["states"].shape[0] == T and rec["joint_states"].shape == (T, 7)
    assert np.all(np.abs(rec["actions"][:, 3:6]) <= 1) and np.all(np.abs(rec["actions"][:, :3]) <= 1 + 1e-6)
    assert set(np.unique(rec["actions"][:, 6])) <= {-1.0, 0.0, 1.0}
    # the first frame is the settled reset (what the policy sees first), not a frame after an action
    assert not np.array_equal(rec["images"]["robot0_eye_in_hand"][0], rec["images"]["robot0_eye_in_hand"][-1])


@pytest.mark.parametrize("suite,pairs", [
    # On(bowl, plate): a rim grasp (task 1: the bowl next to the ramekin); task 6 state 0: the bowl at
    # the edge of the arm's reach, taken by its near rim (the far one is out of reach)
    ("libero_spatial", ((1, 7), (6, 0))),
    # In(cream cheese, basket): top-down, dropped into the basket; it lies beside a tall can, so the
    # hand turns away from it
    ("libero_object", ((1, 7),)),
])
def test_pick_and_place_succeeds_within_budget(suite, pairs, assets):
    env = _env(suite, assets)
    try:
        for task, state in pairs:
            _check_record(env.demonstrate(task, state), suite)
    finally:
        env.close()


@pytest.mark.parametrize("task,state", [
    (7, 0),  # TurnOn(stove): pinch the knob's handle on its axis and yaw
    (5, 0),  # On(plate, stove front region): slide the plate by its rim
    (9, 0),  # On(wine bottle, rack): a tall bottle carried high, set on the tilted rack region
])
def test_goal_primitive_succeeds_within_budget(task, state, assets):
    env = _env("libero_goal", assets)
    try:
        _check_record(env.demonstrate(task, state), "libero_goal")
    finally:
        env.close()


def test_sampled_state_and_no_primitive(assets):
    """A sampled (non-evaluation) state works the same; a goal without a primitive (open a drawer,
    or fill a closed one) is reported with suite, task and predicate, and the episode is not
    counted as a demonstration."""
    from vlajax.envs.base import sampled_state_id

    env = _env("libero_goal", assets)
    try:
        _check_record(env.demonstrate(8, sampled_state_id(123)), "libero_goal")  # put the bowl on the plate
        rec = env.demonstrate(0, 0)  # open the middle drawer
        assert not rec["success"] and rec["steps"] == 0
        assert "libero_goal task 0" in rec["error"] and "open" in rec["error"]
        rec = env.demonstrate(3, 0)  # put the bowl into the top drawer, which is closed
        assert not rec["success"] and rec["steps"] == 0 and "is closed" in rec["error"]
    finally:
        env.close()


# `vlajax demos` as a user runs it: the installed command, a relative --out, Ray simulator workers.
DEMOS = [
    "demos", "libero_grpo", "env.train.task_suite_name=libero_object", "env.train.num_envs=1",
    "env.rollout.pipeline_stage_num=1", "env.train.init_params.camera_heights=32",
    "env.train.init_params.camera_widths=32", "env.train.init_params.camera_names=[agentview,robot0_eye_in_hand]",
    "trainer.n_env_gpus_per_node=0", "trainer.n_rollout_gpus_per_node=0",
    "--tasks", "2", "--per-task", "2", "--no-progress", "--out", "demos",
]


def _demos_cmd(assets_pack: str, model_dir: Path) -> tuple[list[str], dict]:
    exe = Path(sys.executable).parent / "vlajax"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env[libero_setup.ASSETS_ENV] = assets_pack
    return [str(exe), *DEMOS, f"actor_rollout_ref.model.path={model_dir}"], env


def test_vlajax_demos_interrupted_keeps_and_resumes(tmp_path, assets):
    """Ctrl-C after the first kept episode: exit 130, that episode stays readable; the same command
    then finishes the task without repeating an attempt, and the files load as a dataset."""
    from vlajax.data.libero_hdf5 import read_dataset

    cmd, env = _demos_cmd(libero_pack(), REPO / "vlajax" / "assets" / "tiny_tokenizer")
    progress = tmp_path / "demos" / "libero_object" / "demos_progress.json"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if progress.exists() and json.loads(progress.read_text())["tasks"] and \
                    next(iter(json.loads(progress.read_text())["tasks"].values()))["successes"] >= 1:
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"finished before it could be interrupted:\n{proc.communicate()[1][-3000:]}"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; the finished episodes are kept" in err
    first = read_dataset(tmp_path / "demos", suite="libero_object")
    assert len(first) == 1 and first[0].length > 0

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    eps = read_dataset(tmp_path / "demos", suite="libero_object")
    assert len(eps) == 2 and len({e.state_id for e in eps}) == 2
    assert np.array_equal(eps[0].actions, first[0].actions)  # the first episode is untouched
    assert all(e.instruction == "pick up the salad dressing and place it in the basket" for e in eps)
    assert "| pick_up_the_salad_dressing_and_place_it_in_the_basket |" in again.stdout


def test_vlajax_demos_needs_a_simulator_with_an_expert(tmp_path):
    out = subprocess.run([str(Path(sys.executable).parent / "vlajax"), "demos", "demo", "--per-task", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "env.train.simulator_type=tabletop has no scripted expert" in out.stderr
    assert not (tmp_path / "demos").exists()
