"""LIBERO env-step throughput on a whole node: N env processes stepping at once, rendering the last
sub-step of each chunk or every sub-step, with MuJoCo's EGL (the GPU where the driver has one) or
OSMesa (CPU). Answers: how many env steps/s and frames/s the node's cores give, and whether
rendering hits a ceiling that more processes do not lift.

    python benchmarks/bench_libero_node.py [--workers 1,14] [--backends egl,osmesa] [--chunks 6]
        [--suite libero_10] [--size 256] [--cameras agentview] [--json OUT]

Each configuration builds `--workers` LIBERO processes (`make_libero_vector_env`), resets them to the
suite's tasks, runs one warm-up chunk, then times `--chunks` chunks of 8 zero actions in both render
modes. A backend that cannot start (no libOSMesa, no EGL device) is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CHUNK = 8


def _gpu_memory_used() -> float | None:
    """nvidia-smi's memory.used of GPU 0 in MiB (None without an NVIDIA GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20)
        return float(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def run(backend: str, workers: int, args) -> dict:
    from vlajax.envs import gl
    from vlajax.envs.libero import make_libero_vector_env

    try:
        env_vars, renderer = gl.setup(backend, what=f"bench_libero_node ({backend})")
    except gl.GLSetupError as e:
        return {"backend": backend, "workers": workers, "error": str(e)}
    gl.apply(env_vars)  # the env processes inherit it
    env = make_libero_vector_env(args.suite, workers, assets_dir=args.assets, image_size=args.size,
                                 cameras=tuple(args.cameras.split(",")), max_episode_steps=10_000,
                                 mujoco_gl=backend)
    out = {"backend": backend, "workers": workers, "renderer": renderer, "gpu_memory_before_mib": _gpu_memory_used()}
    try:
        tasks = [i % len(env.tasks) for i in range(workers)]
        t0 = time.perf_counter()
        env.reset(tasks, [0] * workers, seed=0)
        out["reset_s"] = time.perf_counter() - t0
        out["gpu_memory_used_mib"] = _gpu_memory_used()  # with every env's GL context open
        zeros = np.zeros((workers, CHUNK, 7), np.float32)
        zeros[..., -1] = -1.0
        for every in (False, True):
            env.chunk_step(zeros, render_every_substep=every)  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.chunks):
                env.chunk_step(zeros, render_every_substep=every)
            wall = time.perf_counter() - t0
            steps = workers * CHUNK * args.chunks
            frames = (steps if every else workers * args.chunks) * len(args.cameras.split(","))
            key = "every_substep" if every else "last_substep"
            out[key] = {"env_steps_per_s": steps / wall, "frames_per_s": frames / wall,
                        "s_per_chunk": wall / args.chunks}
    finally:
        env.close()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,14")
    p.add_argument("--backends", default="egl,osmesa")
    p.add_argument("--chunks", type=int, default=6)
    p.add_argument("--suite", default="libero_10")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--cameras", default="agentview")
    p.add_argument("--assets", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # backend:workers, in a child process
    args = p.parse_args(argv)
    if args.one:  # MuJoCo's backend is fixed at import: one configuration per process
        backend, workers = args.one.split(":")
        print(json.dumps(run(backend, int(workers), args)))
        return
    rows = []
    for backend in args.backends.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            cmd = [sys.executable, __file__, "--one", f"{backend}:{workers}"] + [
                a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--one")]
            res = subprocess.run(cmd, capture_output=True, text=True)
            lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"backend": backend, "workers": workers,
                                                        "error": (res.stderr.strip().splitlines() or ["?"])[-1]}
            rows.append(row)
            if "error" in row:
                print(f"{backend:7s} x{workers:<3d} error: {row['error']}", flush=True)
                continue
            last, every = row["last_substep"], row["every_substep"]
            print(f"{backend:7s} x{workers:<3d} {row['renderer'][:40]:40s} last sub-step: {last['env_steps_per_s']:7.1f} "
                  f"env steps/s ({last['frames_per_s']:6.1f} frames/s) | every sub-step: "
                  f"{every['env_steps_per_s']:7.1f} env steps/s ({every['frames_per_s']:7.1f} frames/s) | reset "
                  f"{row['reset_s']:.1f} s | GPU memory {row['gpu_memory_before_mib']} -> {row['gpu_memory_used_mib']} MiB",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpus": len(os.sched_getaffinity(0)), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
