"""LIBERO env throughput on one CPU core: rendering every sub-step vs the last sub-step of a chunk,
and fast reset vs hard reset vs rebuilding the scene.

Usage:
    python benchmarks/bench_libero_env.py [--assets PATH] [--suite libero_10] [--task 0]
        [--rounds 3] [--chunks 2] [--resets 5] [--core 0 | --no-pin]

Per core: the process is pinned to one CPU and Mesa's llvmpipe (the software renderer behind EGL
or OSMesa on a machine without GPU) is limited to one thread (LP_NUM_THREADS=1, unless set); rates
come from process CPU time (all threads). Configurations take turns round by round and each chunk
counts with its best round, because on a shared 2-core VM other load (a busy sibling core, steal
time) inflates even CPU time. Wall-clock rates are printed too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("LP_NUM_THREADS", "1")  # must precede the first GL context

import numpy as np  # noqa: E402

CHUNK = 8


def _clock():
    return time.perf_counter(), time.process_time()


def _since(start):
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def bench_chunks(envs, task, n_rounds, n_chunks):
    """Per-step (CPU, wall) seconds of every env in `envs` in both render modes.

    Every (env, mode) replays the same actions from the same initial state, and they take turns
    round by round, so load from elsewhere on the machine (other processes, a sibling hyperthread,
    VM steal) is spread over all of them; each chunk's cost is its minimum over rounds (interference
    only ever adds time)."""
    times = {(name, every): [] for name in envs for every in (True, False)}
    for _ in range(n_rounds):
        for name, env in envs.items():
            for every in (True, False):
                rng = np.random.default_rng(0)
                env.reset(task, 0, seed=0)
                row = []
                for _ in range(n_chunks):
                    start = _clock()
                    out = env.chunk_step(_actions(rng), render_every_substep=every)
                    wall, cpu = _since(start)
                    row.append((cpu / out.steps, wall / out.steps))
                times[(name, every)].append(row)
    return {key: np.array(t).min(axis=0).mean(axis=0) for key, t in times.items()}


def bench_resets(env, tasks, n):
    """Median (wall, CPU) seconds per reset, cycling through `tasks` (two tasks: every reset rebuilds)."""
    env.reset(tasks[0], 0, seed=0)  # warm-up and first build
    times = []
    for i in range(n):
        start = _clock()
        env.reset(tasks[(i + 1) % len(tasks)], i % 10, seed=i)
        times.append(_since(start))
    return np.median(np.array(times), axis=0)


def _actions(rng):
    a = rng.uniform(-0.3, 0.3, size=(CHUNK, 7))
    a[:, 6] = np.sign(rng.uniform(-1, 1, size=CHUNK))
    return a


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", default=None, help="LIBERO assets folder or .tar.xz pack (else $VLAJAX_LIBERO_ASSETS)")
    p.add_argument("--suite", default="libero_10")
    p.add_argument("--task", type=int, default=0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="rounds in which every config and mode take turns")
    p.add_argument("--chunks", type=int, default=2, help="chunks of 8 steps per config, mode and round")
    p.add_argument("--resets", type=int, default=5, help="resets timed per row")
    p.add_argument("--core", type=int, default=0)
    p.add_argument("--no-pin", action="store_true", help="do not pin the process to one core")
    args = p.parse_args(argv)

    if not args.no_pin:
        os.sched_setaffinity(0, {args.core})

    import mujoco

    from vlajax.envs.libero import LiberoEnv
    from vlajax.envs.libero_setup import setup_libero

    assets = setup_libero(args.assets)
    import robosuite

    print(f"# LIBERO env benchmark: suite {args.suite} task {args.task}, chunk {CHUNK}, {args.size}x{args.size}")
    print(
        f"# MUJOCO_GL={os.environ.get('MUJOCO_GL')} PYOPENGL_PLATFORM={os.environ.get('PYOPENGL_PLATFORM')} "
        f"LP_NUM_THREADS={os.environ.get('LP_NUM_THREADS')} affinity={sorted(os.sched_getaffinity(0))} "
        f"cpus={os.cpu_count()} loadavg={os.getloadavg()[0]:.2f}"
    )
    print(f"# mujoco {mujoco.__version__}, robosuite {robosuite.__version__}, python {sys.version.split()[0]}")
    print(f"# assets {assets}")
    print()
    configs = {  # name -> (cameras, split_physics)
        "agentview": (("agentview",), True),
        "agentview+robot0_eye_in_hand": (("agentview", "robot0_eye_in_hand"), True),
        "agentview, split_physics=False": (("agentview",), False),  # robosuite's own inner loop
    }
    envs = {}
    for name, (cams, split) in configs.items():
        envs[name] = LiberoEnv(args.suite, assets_dir=assets, cameras=cams, image_size=args.size, split_physics=split)
        envs[name].reset(args.task, 0, seed=0)
        envs[name].chunk_step(_actions(np.random.default_rng(1)), render_every_substep=True)  # warm-up
    per_step = bench_chunks(envs, args.task, args.rounds, args.chunks)
    for env in envs.values():
        env.close()

    print(f"| chunk of {CHUNK} ({args.rounds} rounds x {args.chunks} chunks, best of rounds) "
          "| env steps/s per core (CPU time) | wall steps/s | ms/step (CPU) |")
    print("|---|---:|---:|---:|")
    for name in configs:
        for every in (True, False):
            cpu, wall = per_step[(name, every)]
            print(f"| {name}: render {'every sub-step' if every else 'last sub-step only'} "
                  f"| {1 / cpu:.2f} | {1 / wall:.2f} | {1000 * cpu:.1f} |")
    print()
    for name in configs:
        every, last = per_step[(name, True)][0], per_step[(name, False)][0]
        render = (every - last) * CHUNK / (CHUNK - 1)  # every = p + r, last = p + r / CHUNK
        print(
            f"{name}: last-sub-step rendering is {every / last:.2f}x faster per env step than every "
            f"sub-step (derived: {1000 * (every - render):.0f} ms physics+bookkeeping per step, "
            f"{1000 * render:.0f} ms per render of all cameras)"
        )
    print()

    print("| reset (incl. 10 settle steps + 1 agentview render; median) | s/reset (CPU) | s/reset (wall) |")
    print("|---|---:|---:|")
    rows = (
        ("fast reset (same task, env reused, hard_reset=False)", False, [args.task]),
        ("hard reset (same task, robosuite hard_reset=True)", True, [args.task]),
        ("rebuild (task switch: new OffScreenRenderEnv)", False, [args.task, args.task + 1]),
    )
    for label, hard, tasks in rows:
        env = LiberoEnv(args.suite, assets_dir=assets, cameras=("agentview",), image_size=args.size, hard_reset=hard)
        wall, cpu = bench_resets(env, tasks, args.resets)
        print(f"| {label} | {cpu:.3f} | {wall:.3f} |")
        env.close()


if __name__ == "__main__":
    main()
