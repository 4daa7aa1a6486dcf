"""Does the installed MuJoCo run LIBERO as the validated one does? The measurements behind
tests/test_libero_simulator.py, and the generator of its rendering fixture.

Usage (from the repository root):
    MUJOCO_GL=egl python benchmarks/libero_simulator_check.py [--assets PATH] [--all-tasks]
        [--write-fixture]

Prints, for benchmarks/RESULTS.md:
- libero_spatial task 5 ("... black bowl on the ramekin ..."), all 50 init states, after reset's 10
  settle steps: the bowl's height above the ramekin, its horizontal offset from the ramekin's centre
  and its tilt (mean, min, max).
- libero_10 tasks 0, 1 and 7 (living-room scenes), all 50 init states: how far the settle steps lift
  each object above its stored height (the largest, per task).
- per suite: the mean agentview brightness (0-255) of the images after reset, for the fixture's
  (task, state) pairs, or with --all-tasks for init state 0 of every task.
--write-fixture rewrites tests/data/libero_render_stats.json (per-image 8x8 grid of mean brightness)
from this simulator; it refuses a MuJoCo outside `libero_setup.VALIDATED_MUJOCO`.

Images are those of `LiberoEnv.reset` at 256x256, as robosuite renders them (upside-down). The
offline asset pack has downscaled textures and stand-ins, so absolute brightness differs from the
full assets'; comparisons between simulators are what it is for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "libero_render_stats.json"
IMAGE_SIZE = 256
GRID = 8  # cells per image side (32x32 px each)
# (task, state) pairs per suite: scenes whose objects settle alike on 3.3.2 and 3.9.0 (their images
# differ by < 1 level per cell outside libero_object), so a change here is a rendering change.
# libero_object's scenes stand on the floor; the other suites' show little of it.
RENDER_PAIRS = {
    "libero_spatial": ((0, 0), (7, 3)),
    "libero_object": ((0, 0), (6, 2)),
    "libero_goal": ((0, 0), (8, 1)),
    "libero_10": ((2, 4), (5, 0)),
}
BOWL_TASK = 5  # libero_spatial: pick_up_the_black_bowl_on_the_ramekin_and_place_it_on_the_plate
BOWL, RAMEKIN = "akita_black_bowl_1", "glazed_rim_porcelain_ramekin_1"
LIVING_ROOM_TASKS = (0, 1, 7)  # libero_10 tasks whose box-built objects start inside the table


def default_assets() -> str:
    return os.environ.get("VLAJAX_LIBERO_ASSETS") or str(REPO.parent / "shared" / "libero-assets.tar.xz")


def grid_brightness(image: np.ndarray, grid: int = GRID) -> np.ndarray:
    """(grid, grid) mean brightness (mean of R, G, B) of each cell of an (H, W, 3) uint8 image."""
    h, w, _ = image.shape
    cells = image.astype(np.float64).mean(-1).reshape(grid, h // grid, grid, w // grid)
    return cells.mean((1, 3))


def render_grids(env, pairs) -> dict[str, np.ndarray]:
    """'task/state' -> grid_brightness of the agentview image after `env.reset(task, state)`."""
    return {f"{t}/{s}": grid_brightness(env.reset(t, s, seed=0).images["agentview"]) for t, s in pairs}


def bowl_on_ramekin(env) -> tuple[float, float, float]:
    """(height above the ramekin [m], horizontal offset from its centre [m], tilt [deg]) of the bowl."""
    poses = env.object_poses()
    bowl, ramekin = poses[BOWL], poses[RAMEKIN]
    _, qx, qy, _ = bowl[3:]
    tilt = np.degrees(np.arccos(np.clip(1.0 - 2.0 * (qx * qx + qy * qy), -1.0, 1.0)))  # body z vs world z
    return float(bowl[2] - ramekin[2]), float(np.linalg.norm(bowl[:2] - ramekin[:2])), float(tilt)


def bowl_seating(env, states) -> np.ndarray:
    """(len(states), 3) `bowl_on_ramekin` after resetting libero_spatial task 5 to each state."""
    rows = []
    for s in states:
        env.reset(BOWL_TASK, int(s), seed=0)
        rows.append(bowl_on_ramekin(env))
    return np.array(rows)


def settle_rise(env, task: int, state: int) -> dict[str, float]:
    """Object -> how far the settle steps lift it above its stored height [m] (`env` must be built
    with num_settle_steps=0; the steps are run here as reset runs them)."""
    from vlajax.envs.base import NOOP_ACTION
    from vlajax.envs.libero import NUM_SETTLE_STEPS

    env.reset(task, state, seed=0)
    stored = env.object_poses()
    env.chunk_step(np.tile(NOOP_ACTION, (NUM_SETTLE_STEPS, 1)))
    return {name: float(pose[2] - stored[name][2]) for name, pose in env.object_poses().items()}


def make_env(suite: str, assets: str, **kwargs):
    from vlajax.envs.libero import LiberoEnv

    return LiberoEnv(suite, assets_dir=assets, cameras=("agentview",), **kwargs)


def report_bowl(assets: str) -> dict:
    env = make_env("libero_spatial", assets, image_size=32)
    try:
        rows = bowl_seating(env, range(env.tasks[BOWL_TASK].num_init_states))
    finally:
        env.close()
    out = {}
    for i, name in enumerate(("height_m", "offset_m", "tilt_deg")):
        col = rows[:, i]
        out[name] = {"mean": col.mean(), "min": col.min(), "max": col.max()}
        print(f"  spatial task {BOWL_TASK} bowl {name:9s} mean {col.mean():.4f} min {col.min():.4f} "
              f"max {col.max():.4f} (50 init states)")
    return out


def report_rise(assets: str) -> dict:
    env = make_env("libero_10", assets, image_size=32, num_settle_steps=0)
    out = {}
    try:
        for task in LIVING_ROOM_TASKS:
            rises = [settle_rise(env, task, s) for s in range(env.tasks[task].num_init_states)]
            top = {name: max(r[name] for r in rises) for name in rises[0]}
            name = max(top, key=top.get)
            thrown = sum(max(r.values()) > 0.10 for r in rises)
            out[task] = top
            print(f"  libero_10 task {task}: largest rise {top[name]:.3f} m ({name}); "
                  f"an object rose > 0.10 m in {thrown}/{len(rises)} init states")
    finally:
        env.close()
    return out


def report_brightness(assets: str, all_tasks: bool) -> dict:
    grids = {}
    for suite, pairs in RENDER_PAIRS.items():
        env = make_env(suite, assets, image_size=IMAGE_SIZE)
        try:
            use = [(t, 0) for t in range(len(env.tasks))] if all_tasks else pairs
            found = render_grids(env, use)
        finally:
            env.close()
        grids[suite] = found
        means = [g.mean() for g in found.values()]
        print(f"  {suite:15s} agentview mean brightness {np.mean(means):7.2f} over {len(means)} images "
              f"({', '.join(f'{k}: {m:.2f}' for k, m in zip(found, means))})")
    return grids


def _one_row_a_line(doc: dict) -> str:
    """JSON with every list of numbers (a grid row) on one line."""
    text = json.dumps(doc, indent=1)
    return re.sub(r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text) + "\n"


def write_fixture(assets: str) -> None:
    import mujoco

    from vlajax.envs import libero_setup

    if libero_setup.check_mujoco_version(mujoco.__version__) is not None:
        sys.exit(f"refusing to write the fixture from mujoco {mujoco.__version__}: install the validated one")
    grids = {}
    for suite, pairs in RENDER_PAIRS.items():
        env = make_env(suite, assets, image_size=IMAGE_SIZE)
        try:
            grids[suite] = {k: np.round(g, 2).tolist() for k, g in render_grids(env, pairs).items()}
        finally:
            env.close()
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(_one_row_a_line({
        "mujoco": mujoco.__version__,
        "image_size": IMAGE_SIZE,
        "grid": GRID,
        "what": "agentview after LiberoEnv.reset(task, state, seed=0), as rendered (upside-down): "
                "mean of R, G, B per cell, rows top to bottom; written by benchmarks/libero_simulator_check.py",
        "grids": grids,
    }))
    print(f"wrote {FIXTURE}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", default=default_assets())
    parser.add_argument("--all-tasks", action="store_true", help="brightness of state 0 of every task")
    parser.add_argument("--write-fixture", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    from vlajax.envs import libero_setup

    libero_setup.setup_libero(args.assets)
    import mujoco
    import robosuite

    print(f"# mujoco {mujoco.__version__}, robosuite {robosuite.__version__}, MUJOCO_GL={os.environ['MUJOCO_GL']}, "
          f"validated {libero_setup.VALIDATED_MUJOCO[0]}..{libero_setup.VALIDATED_MUJOCO[1]}")
    start = time.time()
    if args.write_fixture:
        write_fixture(args.assets)
        return
    report_bowl(args.assets)
    report_rise(args.assets)
    report_brightness(args.assets, args.all_tasks)
    print(f"# {time.time() - start:.0f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
