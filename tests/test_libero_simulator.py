"""LIBERO on the validated MuJoCo (`libero_setup.VALIDATED_MUJOCO`; pyproject.toml pins 3.3.2):
tests that fail on a MuJoCo that changes what a checkpoint trained on LIBERO data sees. Real LIBERO
scenes from the offline asset pack, no mocks. Measurements and the fixture's generator:
benchmarks/libero_simulator_check.py (numbers in benchmarks/RESULTS.md).

One test per known mechanism:
- Settling (MuJoCo 3.4.0, "fixed a bug in the box-box distance computation"). LIBERO's objects
  collide through unions of boxes (the black bowl 40, the ramekin 25), and some init states store
  objects above or inside their support, so reset's 10 settle steps decide where they are at the
  first observation. From 3.4.0 libero_spatial task 5's bowl slides onto the ramekin's rim (a
  published checkpoint: 98% -> 12% on that task, RLinf #1460), and in libero_10's living-room
  scenes the ketchup, milk and orange juice, stored inside the table, are thrown 0.4-0.6 m up.
- Rendering (MuJoCo 3.3.3 added texture colour spaces, `<texture colorspace="auto">` by default: the
  image file decides). LIBERO's two floor textures are PNGs with an sRGB chunk, so they are now
  decoded as sRGB and linearised: floors render darker than in the training data (LIBERO #88).
  libero_object's floor scenes lose ~36 of 255 levels of mean brightness; the other suites'
  tabletop scenes show little floor (< 0.4 levels).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("libero")
pytest.importorskip("robosuite")

from vlajax.envs import libero_setup  # noqa: E402
from vlajax.envs.libero import LiberoEnv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "libero_render_stats.json"
BOWL_TASK_NAME = "pick_up_the_black_bowl_on_the_ramekin_and_place_it_on_the_plate"
# Bowl after the settle steps, identical in all 50 init states: 3.3.0-3.3.3 at 3.51 cm above the
# ramekin and 1.45 cm off its centre; 3.4.0 and 3.9.0 at 4.35 cm and 3.72 cm (on the rim).
# The limits sit halfway.
MAX_BOWL_HEIGHT = 0.039
MAX_BOWL_OFFSET = 0.025
# Largest rise of any object over the settle steps (libero_10 tasks 0, 1, 7; all 50 states):
# 3.3.2 3.2 cm (objects stored slightly inside the table pop out); 3.4.0 and 3.9.0 0.57 m (thrown).
MAX_RISE = 0.10
RISE_STATES = (0, 13, 26, 39)
# Per 32x32-px cell, in levels of 255. 3.3.1 and 3.3.2 reproduce the fixture exactly, 3.3.0 within
# 1.2 (a small renderer difference); 3.3.3's floor darkening moves libero_object's cells by up to 61.
RENDER_TOLERANCE = 4.0


def _load_check():
    """benchmarks/libero_simulator_check.py: the measurements and the fixture's definition."""
    path = REPO / "benchmarks" / "libero_simulator_check.py"
    spec = importlib.util.spec_from_file_location("libero_simulator_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_check()




def _mujoco_version() -> str:
    import mujoco  # after setup_libero chose the GL backend

    return mujoco.__version__


# ---- the version check (no simulation) ----------------------------------------------------------
def test_mujoco_version_warning_names_version_range_consequences_and_fix(caplog):
    """A user on another MuJoCo learns which one they have, what it costs and what to install."""
    low, high = libero_setup.VALIDATED_MUJOCO
    for inside in (low, high):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert libero_setup.check_mujoco_version(inside) is None
    with caplog.at_level(logging.WARNING, logger=libero_setup.__name__):
        with pytest.warns(libero_setup.MujocoVersionWarning) as caught:
            msg = libero_setup.check_mujoco_version("3.9.0")
    for part in ("mujoco 3.9.0", f"{low}..{high}", "settle", "ramekin", "darker", f"pip install 'mujoco=={high}'"):
        assert part in msg
    assert str(caught[0].message) == msg and msg in caplog.text
    for outside in ("3.3.3", "3.4.0", "3.2.7", "3.10.0"):
        with pytest.warns(libero_setup.MujocoVersionWarning, match=f"mujoco {outside},"):
            libero_setup.check_mujoco_version(outside)
    # what pyproject.toml installs (core or libero extra) is the range's upper end
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert f"mujoco=={high}" in project["dependencies"] + project["optional-dependencies"]["libero"]


# ---- settling: MuJoCo 3.4.0's box-box fix ----------------------------------------------------------
def test_spatial_task5_black_bowl_settles_onto_the_ramekin(assets):
    """The task's premise after reset, in all 50 init states (limits: see MAX_BOWL_*)."""
    env = LiberoEnv("libero_spatial", assets_dir=assets, cameras=("agentview",), image_size=32)
    try:
        assert env.tasks[check.BOWL_TASK].name == BOWL_TASK_NAME
        states = range(env.tasks[check.BOWL_TASK].num_init_states)
        rows = check.bowl_seating(env, states)
    finally:
        env.close()
    assert len(rows) == 50
    off = [(s, round(float(h), 4), round(float(o), 4)) for s, (h, o, _) in zip(states, rows)
           if h > MAX_BOWL_HEIGHT or o > MAX_BOWL_OFFSET]
    assert not off, (
        f"mujoco {_mujoco_version()}: after reset the black bowl is not on the ramekin in {len(off)}/50 "
        f"init states (height above it <= {MAX_BOWL_HEIGHT} m and offset <= {MAX_BOWL_OFFSET} m "
        f"expected); (state, height, offset): {off[:4]}"
    )


def test_libero_10_living_room_objects_stay_on_the_table(assets):
    """Objects stored inside the table pop out of it, not into the air (4 of 50 states per task)."""
    env = LiberoEnv("libero_10", assets_dir=assets, cameras=("agentview",), image_size=32, num_settle_steps=0)
    thrown = []
    try:
        for task in check.LIVING_ROOM_TASKS:
            for state in RISE_STATES:
                rise = check.settle_rise(env, task, state)
                thrown += [(task, state, name, round(r, 3)) for name, r in rise.items() if r > MAX_RISE]
    finally:
        env.close()
    assert not thrown, (
        f"mujoco {_mujoco_version()}: reset's settle steps threw objects more than {MAX_RISE} m up "
        f"(task, state, object, rise): {thrown[:6]}"
    )


# ---- rendering: MuJoCo 3.3.3's texture colour spaces ---------------------------------------------
def test_agentview_brightness_matches_the_pinned_fixture(assets):
    """Coarse brightness of agentview after reset, 2 scenes per suite, as on the pinned release."""
    fixture = json.loads(FIXTURE.read_text())
    assert (fixture["image_size"], fixture["grid"]) == (check.IMAGE_SIZE, check.GRID)
    assert set(fixture["grids"]) == set(check.RENDER_PAIRS)
    assert {"libero_spatial", "libero_object", "libero_goal", "libero_10"} <= set(fixture["grids"])
    changed = []
    for suite, expected in fixture["grids"].items():
        env = LiberoEnv(suite, assets_dir=assets, cameras=("agentview",), image_size=fixture["image_size"])
        try:
            got = check.render_grids(env, [tuple(map(int, key.split("/"))) for key in expected])
        finally:
            env.close()
        for key, grid in got.items():
            diff = grid - np.asarray(expected[key])
            worst = diff.flat[np.abs(diff).argmax()]
            if abs(worst) > RENDER_TOLERANCE:
                moved = int((np.abs(diff) > RENDER_TOLERANCE).sum())
                changed.append(f"{suite} {key}: mean {grid.mean():.1f} (fixture {np.mean(expected[key]):.1f}), "
                               f"largest cell change {worst:+.1f}, {moved}/{diff.size} cells")
    assert not changed, (
        f"mujoco {_mujoco_version()} renders LIBERO differently from the fixture (mujoco {fixture['mujoco']}, "
        f"tolerance {RENDER_TOLERANCE} levels per cell): " + "; ".join(changed)
    )
