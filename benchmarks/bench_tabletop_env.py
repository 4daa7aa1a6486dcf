"""Throughput of the built-in tabletop task and its random-policy success rate.

    python benchmarks/bench_tabletop_env.py [--episodes 1000] [--num-envs 2] [--image-size 64]

Prints env steps/s per core (one worker process per core) for: no camera, camera rendered at the
last sub-step of each 8-action chunk (the rollout default), camera rendered at every sub-step; the
same through SubprocVectorEnv with --num-envs workers; and the success rate of a uniformly random
policy and of a directed (scripted) policy.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

# One render thread, as in the SubprocVectorEnv workers, so "1 process" means one core.
os.environ.setdefault("LP_NUM_THREADS", "1")
from vlajax.envs.tabletop import SUITES, TabletopEnv, directed_actions, make_tabletop_vector_env, target_xy  # noqa: E402

K = 8


def single_process(image_size: int, render: bool, every: bool, seconds: float) -> float:
    """Env steps/s of one TabletopEnv in this process (one core), random policy, 64-step episodes."""
    env = TabletopEnv(image_size, render=render)
    rng = np.random.default_rng(0)
    steps, ep, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        env.reset(ep % 3, ep % 1000, 0)
        ep_steps = 0
        while ep_steps < 64:
            out = env.chunk_step(rng.uniform(-1, 1, (min(K, 64 - ep_steps), 7)), render_every_substep=every)
            ep_steps += out.steps
            if out.success:
                break
        steps += ep_steps
        ep += 1
    rate = steps / (time.perf_counter() - t0)
    env.close()
    return rate


def vector(num_envs: int, image_size: int, render: bool, every: bool, seconds: float) -> float:
    """Aggregate env steps/s of a SubprocVectorEnv (resets included), random policy."""
    rng = np.random.default_rng(0)
    with make_tabletop_vector_env(num_envs, image_size, env_kwargs={"render": render}) as env:
        steps, ep, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            env.reset([(ep + i) % 3 for i in range(num_envs)], [(ep + i) % 1000 for i in range(num_envs)])
            ep += num_envs
            while True:
                res = env.chunk_step(rng.uniform(-1, 1, (num_envs, K, 7)), render_every_substep=every)
                steps += int(res.info["steps"].sum())
                if res.done.all():
                    break
        return steps / (time.perf_counter() - t0)


def success_rates(num_envs: int, episodes: int, suite: str = "tabletop") -> tuple[float, float, int]:
    """(random-policy, directed-policy) success rates within the default 64-step limit, and the number
    of episodes each rate is over (`episodes` rounded up to whole batches of `num_envs`)."""
    rng = np.random.default_rng(1)
    wins = {"random": 0, "directed": 0}
    batches = -(-episodes // num_envs)
    jitter = SUITES[suite].get("block_jitter")
    with make_tabletop_vector_env(num_envs, suite=suite, env_kwargs={"render": False}) as env:
        for policy in wins:
            for b in range(batches):
                e = b * num_envs
                tasks = [(e + i) % 3 for i in range(num_envs)]
                states = [(e + i) % 1000 for i in range(num_envs)]
                obs = env.reset(tasks, states, seed=0)
                won = np.zeros(num_envs, bool)  # an env that finished early keeps its outcome
                while True:
                    if policy == "random":
                        acts = rng.uniform(-1, 1, (num_envs, K, 7))
                    else:
                        acts = np.stack([directed_actions(obs.proprio[i, :2], target_xy(t, s, block_jitter=jitter), K)
                                         for i, (t, s) in enumerate(zip(tasks, states))])
                    res = env.chunk_step(acts)
                    obs = res.obs
                    won |= np.asarray(res.terminated, bool)
                    if res.done.all():
                        break
                wins[policy] += int(won.sum())
    n = batches * num_envs
    return wins["random"] / n, wins["directed"] / n, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--num-envs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0, help="per throughput measurement")
    ap.add_argument("--suite", default="tabletop", choices=sorted(SUITES))
    ap.add_argument("--success-only", action="store_true", help="skip the throughput measurements")
    args = ap.parse_args()
    print(f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}  image {args.image_size}x{args.image_size}  "
          f"chunk {K}  cores {os.cpu_count()}  load average {os.getloadavg()[0]:.1f}")
    modes = [("no camera", False, False), ("render last sub-step", True, False),
             ("render every sub-step", True, True)]
    print(f"{'mode':24s} {'1 process (steps/s)':>20s} {f'{args.num_envs} workers (steps/s)':>22s} "
          f"{'per core':>9s}")
    for name, render, every in [] if args.success_only else modes:
        one = single_process(args.image_size, render, every, args.seconds)
        many = vector(args.num_envs, args.image_size, render, every, args.seconds)
        print(f"{name:24s} {one:20.0f} {many:22.0f} {many / args.num_envs:9.0f}")
    rnd, directed, n = success_rates(args.num_envs, args.episodes, args.suite)
    print(f"{args.suite}: success within 64 steps over {n} episodes: random policy {rnd:.3f}, "
          f"directed policy {directed:.3f}")


if __name__ == "__main__":
    main()
