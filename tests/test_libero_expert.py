"""The scripted LIBERO expert on real LIBERO (offline asset pack): each primitive succeeds on a few
of the fixed init states within the suite's step budget, through the env's own `demonstrate`
(the path `vlajax demos` runs in its simulator workers), and a goal it has no primitive for is a
named error, not a silent failure."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("libero")
pytest.importorskip("robosuite")

from tests.test_libero_env import _pack_path  # noqa: E402
from vlajax.envs import libero_setup  # noqa: E402
from vlajax.envs.libero import LiberoEnv  # noqa: E402

CAMERAS = ("agentview", "robot0_eye_in_hand")
SIZE = 32
BUDGET = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300}  # OpenVLA-OFT's max steps


@pytest.fixture(scope="module")
def assets() -> str:
    pack = _pack_path()
    if pack is None:
        pytest.skip(f"no LIBERO asset pack: set {libero_setup.ASSETS_ENV} or put shared/ beside the repo")
    return str(libero_setup.setup_libero(pack))


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


@pytest.mark.parametrize("suite,task,states", [
    ("libero_spatial", 0, (0, 1)),   # On(bowl, plate): rim grasp, place on the plate
    ("libero_spatial", 1, (7,)),     # the bowl next to the ramekin
    ("libero_object", 2, (0, 1)),    # In(salad dressing, basket): top-down grasp, drop into the basket
    ("libero_object", 1, (7,)),      # cream cheese beside a tall can: the hand turns away from it
])
def test_pick_and_place_succeeds_within_budget(suite, task, states, assets):
    env = _env(suite, assets)
    try:
        for s in states:
            _check_record(env.demonstrate(task, s), suite)
    finally:
        env.close()


def test_sampled_state_and_no_primitive(assets):
    """A sampled (non-evaluation) state works the same; a goal without a primitive (open a drawer)
    is reported with suite, task and predicate, and the episode is not counted as a demonstration."""
    from vlajax.envs.base import sampled_state_id

    env = _env("libero_goal", assets)
    try:
        _check_record(env.demonstrate(8, sampled_state_id(123)), "libero_goal")  # put the bowl on the plate
        rec = env.demonstrate(0, 0)  # open the middle drawer
        assert not rec["success"] and rec["steps"] == 0
        assert "libero_goal task 0" in rec["error"] and "open" in rec["error"]
    finally:
        env.close()
