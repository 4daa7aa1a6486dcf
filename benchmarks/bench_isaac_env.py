"""Throughput of IsaacVectorEnv (Isaac Lab 3.0, Newton physics, Warp ray-traced RGB camera).

    VLAJAX_ISAAC_PYTHON=~/isaac-venv/bin/python \\
    python benchmarks/bench_isaac_env.py [--task reach] [--num-envs 1 4 16] [--image-size 128] [--chunks 8]

For each N: one simulator process with N envs of the task (the local robosuite-built Franka unless
--stock-assets), random 8-action chunks (small deltas, gripper toggling), and reports process start
time, reset time, and env steps/s (all N envs) with the camera rendered at the last sub-step of each
chunk (the rollout default) and at every sub-step. "sim" is the simulator process's own time per
chunk, the rest is host <-> process transfer and bookkeeping. Episodes never end here (limit >
chunks), so every env is stepped every time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from vlajax.envs.isaac import ISAAC_TASKS, IsaacVectorEnv, build_local_franka_usd

K = 8


def run(task: str, n: int, image_size: int, chunks: int, usd: str | None, device: str) -> dict:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with IsaacVectorEnv([task], n, image_size=image_size, local_robot_usd=usd, device=device,
                        max_episode_steps=100_000) as env:
        env.start([0])
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        env.reset([0] * n, list(range(n)))
        reset_s = time.perf_counter() - t0
        out = {"start_s": start_s, "reset_s": reset_s}
        for every in (False, True):
            env.chunk_step(rng.uniform(-0.3, 0.3, (n, K, 7)).astype(np.float32), render_every_substep=every)  # warm-up
            wall = sim = 0.0
            for _ in range(chunks):
                a = rng.uniform(-0.3, 0.3, (n, K, 7)).astype(np.float32)
                a[..., 6] = np.sign(rng.uniform(-1, 1, (n, 1)))
                t = time.perf_counter()
                res = env.chunk_step(a, render_every_substep=every)
                wall += time.perf_counter() - t
                sim += float(res.info["sim_time_s"][0])
                assert res.info["steps"].tolist() == [K] * n
            key = "every" if every else "last"
            out[f"{key}_steps_per_s"] = n * K * chunks / wall
            out[f"{key}_ms_per_step"] = 1000 * wall / (K * chunks)
            out[f"{key}_sim_ms_per_step"] = 1000 * sim / (K * chunks)
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="reach", choices=sorted(ISAAC_TASKS))
    p.add_argument("--num-envs", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--chunks", type=int, default=8, help="timed chunks of 8 steps per setting")
    p.add_argument("--device", default="cpu")
    p.add_argument("--stock-assets", action="store_true", help="use the task's own assets (ISAACSIM_ASSET_ROOT)")
    args = p.parse_args()
    usd = None if args.stock_assets else build_local_franka_usd()
    print(f"task {args.task}, image {args.image_size}x{args.image_size}, device {args.device}, "
          f"{args.chunks} chunks of {K} steps; camera rendered at the last sub-step / every sub-step")
    print(f"{'N':>4} {'start s':>8} {'reset s':>8} | {'steps/s':>8} {'ms/step':>8} {'sim ms':>7} | "
          f"{'steps/s':>8} {'ms/step':>8} {'sim ms':>7}")
    for n in args.num_envs:
        r = run(args.task, n, args.image_size, args.chunks, usd, args.device)
        print(f"{n:>4} {r['start_s']:>8.1f} {r['reset_s']:>8.2f} | {r['last_steps_per_s']:>8.1f} "
              f"{r['last_ms_per_step']:>8.1f} {r['last_sim_ms_per_step']:>7.1f} | {r['every_steps_per_s']:>8.1f} "
              f"{r['every_ms_per_step']:>8.1f} {r['every_sim_ms_per_step']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
