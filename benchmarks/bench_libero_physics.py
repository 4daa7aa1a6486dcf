"""What `LiberoEnv`'s split physics saves, without rendering noise: per robosuite sub-step, the CPU time
of the MuJoCo calls each way of stepping makes, and per env step, the three ways interleaved in one
process (issue #25).

Usage:
    python benchmarks/bench_libero_physics.py [--assets PATH] [--suite libero_10] [--task 0]
        [--rounds 5] [--core 0 | --no-pin]

Ways of stepping (robosuite 1.4 calls forward() twice, in its loop and in the OSC controller, then step()):
- robosuite: 2x mj_forward + mj_step (split_physics=False);
- exact below 3.3.6: mj_forward + mj_forwardSkip(mjSTAGE_VEL) + mj_step2 (what split_physics does on
  MuJoCo < 3.3.6, where every mj_forward updates the solver's warm start);
- step1/step2: 2x mj_step1 + mj_step2 (split_physics on MuJoCo >= 3.3.6; below it, states differ
  from LIBERO's, so it is timed here only as the reference for what exactness costs).
The env-step rows patch the module's version switch to time the step1/step2 form on any MuJoCo.
Times are process CPU time, best of rounds (other load only ever adds time); chunk of 8 actions,
agentview 128x128 rendered once per chunk.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("LP_NUM_THREADS", "1")  # must precede the first GL context

import numpy as np  # noqa: E402

CHUNK = 8


def bench_calls(env, task, n_rounds, n_calls=200):
    """Microseconds per sub-step of each way, from the state after reset (positions reset each call)."""
    import mujoco

    env.reset(task, 0, seed=0)
    model, data = env._env.sim.model._model, env._env.sim.data._data
    qpos, qvel, warm = data.qpos.copy(), data.qvel.copy(), data.qacc_warmstart.copy()
    calls = {
        "mj_forward": lambda: mujoco.mj_forward(model, data),
        "mj_forwardSkip(VEL)": lambda: mujoco.mj_forwardSkip(model, data, mujoco.mjtStage.mjSTAGE_VEL, 0),
        "mj_step1": lambda: mujoco.mj_step1(model, data),
        "mj_step2": lambda: mujoco.mj_step2(model, data),
        "mj_step": lambda: mujoco.mj_step(model, data),
    }
    best = dict.fromkeys(calls, np.inf)
    for _ in range(n_rounds):
        for name, call in calls.items():
            data.qacc_warmstart[:] = warm
            start = time.process_time()
            for _ in range(n_calls):
                data.qpos[:], data.qvel[:] = qpos, qvel
                call()
            best[name] = min(best[name], (time.process_time() - start) / n_calls)
    us = {k: 1e6 * v for k, v in best.items()}
    ways = {
        "robosuite": 2 * us["mj_forward"] + us["mj_step"],
        "exact below 3.3.6": us["mj_forward"] + us["mj_forwardSkip(VEL)"] + us["mj_step2"],
        "step1/step2": 2 * us["mj_step1"] + us["mj_step2"],
    }
    return us, ways, int(data.ncon), int(data.nefc)


def bench_env_steps(envs, task, n_rounds, n_chunks=2):
    """CPU ms per env step of each (name -> (env, form)), interleaved round by round."""
    from vlajax.envs import libero

    exact = libero._forward_sets_warmstart
    times = {name: [] for name in envs}
    try:
        for _ in range(n_rounds):
            for name, (env, form) in envs.items():
                libero._forward_sets_warmstart = (lambda: False) if form == "step1/step2" else exact
                rng = np.random.default_rng(0)
                env.reset(task, 0, seed=0)
                row = []
                for _ in range(n_chunks):
                    a = rng.uniform(-0.3, 0.3, size=(CHUNK, 7))
                    a[:, 6] = np.sign(rng.uniform(-1, 1, size=CHUNK))
                    start = time.process_time()
                    out = env.chunk_step(a)
                    row.append((time.process_time() - start) / out.steps)
                times[name].append(row)
    finally:
        libero._forward_sets_warmstart = exact
    return {name: 1e3 * np.array(t).min(axis=0).mean() for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", default=None, help="LIBERO assets folder or .tar.xz pack (else $VLAJAX_LIBERO_ASSETS)")
    p.add_argument("--suite", default="libero_10")
    p.add_argument("--task", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--core", type=int, default=0)
    p.add_argument("--no-pin", action="store_true", help="do not pin the process to one core")
    args = p.parse_args(argv)
    if not args.no_pin:
        os.sched_setaffinity(0, {args.core})

    import mujoco

    from vlajax.envs.libero import LiberoEnv, _forward_sets_warmstart
    from vlajax.envs.libero_setup import setup_libero

    assets = setup_libero(args.assets)
    print(f"# LIBERO physics benchmark: suite {args.suite} task {args.task}; mujoco {mujoco.__version__} "
          f"(mj_forward updates the warm start: {_forward_sets_warmstart()}); "
          f"loadavg={os.getloadavg()[0]:.2f} affinity={sorted(os.sched_getaffinity(0))}")
    envs = {
        "split_physics=False (robosuite)": (LiberoEnv(args.suite, assets_dir=assets, image_size=128,
                                                      split_physics=False), None),
        "split_physics (exact below 3.3.6)": (LiberoEnv(args.suite, assets_dir=assets, image_size=128), "exact"),
        "split_physics, step1/step2 form": (LiberoEnv(args.suite, assets_dir=assets, image_size=128), "step1/step2"),
    }
    us, ways, ncon, nefc = bench_calls(envs["split_physics=False (robosuite)"][0], args.task, args.rounds)
    print(f"\nMuJoCo calls after reset ({ncon} contacts, {nefc} constraint rows), us each: "
          + ", ".join(f"{k} {v:.0f}" for k, v in us.items()))
    print("\n| way (calls per sub-step) | us per sub-step | ms per env step (25 sub-steps) |\n|---|---:|---:|")
    for name, t in ways.items():
        print(f"| {name} | {t:.0f} | {t * 25e-3:.2f} |")
    per_step = bench_env_steps(envs, args.task, args.rounds)
    print(f"\n| env step, chunk of {CHUNK}, best of {args.rounds} interleaved rounds | CPU ms/step |\n|---|---:|")
    for name, ms in per_step.items():
        print(f"| {name} | {ms:.1f} |")
    for env, _ in envs.values():
        env.close()


if __name__ == "__main__":
    main()
