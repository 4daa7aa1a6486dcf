"""The scripted LIBERO expert's success per task on the fixed evaluation init states.

    python benchmarks/expert_success.py --suite libero_spatial --states 50 --workers 16 [--json out.json]

Runs `LiberoEnv.demonstrate` (the path `vlajax demos` uses) in `--workers` env processes, one
episode per (task, state), at the suite's OpenVLA-OFT step budget; cameras are rendered at
`--image-size` (default 32 px: the expert reads privileged state, not images). Prints a markdown table per task and the mean.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from vlajax.envs.libero import make_libero_vector_env

BUDGET = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, choices=sorted(BUDGET))
    p.add_argument("--states", type=int, default=50, help="fixed init states 0..N-1 per task")
    p.add_argument("--tasks", default=None, help="comma list of task ids (default: all)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=32, help="camera size (32: the expert needs no images; "
                                                               "256 with both cameras times making demos)")
    p.add_argument("--cameras", default="agentview")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    env = make_libero_vector_env(a.suite, a.workers, image_size=a.image_size, cameras=tuple(a.cameras.split(",")),
                                 max_episode_steps=BUDGET[a.suite], timeout_s=600)
    try:
        tasks = list(range(len(env.tasks))) if a.tasks is None else [int(t) for t in a.tasks.split(",")]
        pairs = [(t, s) for t in tasks for s in range(a.states)]
        results: dict[int, list[bool]] = {t: [] for t in tasks}
        steps: dict[int, list[int]] = {t: [] for t in tasks}
        errors: dict[int, str] = {}
        t0 = time.monotonic()
        for i in range(0, len(pairs), a.workers):
            batch = pairs[i:i + a.workers]
            for (t, s), rec in zip(batch, env.demonstrate([b[0] for b in batch], [b[1] for b in batch],
                                                            max_steps=BUDGET[a.suite])):
                results[t].append(rec["success"])
                steps[t].append(rec["steps"])
                if rec["error"]:
                    errors[t] = rec["error"]
        elapsed = time.monotonic() - t0
    finally:
        env.close()
    print(f"| {a.suite} task | success | mean steps (successes) | note |\n|---|---:|---:|---|")
    for t in tasks:
        ok = np.array(results[t])
        st = np.array(steps[t])[ok]
        name = env.tasks[t].name
        print(f"| {t}: {name} | {ok.mean():.2f} ({ok.sum()}/{len(ok)}) | "
              f"{st.mean() if len(st) else float('nan'):.0f} | {errors.get(t, '')} |")
    mean = float(np.mean([np.mean(results[t]) for t in tasks]))
    total_steps = sum(sum(v) for v in steps.values())
    print(f"| mean | {mean:.3f} | | {len(pairs)} episodes ({total_steps} steps), {elapsed:.0f} s on {a.workers} "
          f"workers, cameras {a.cameras} at {a.image_size} px |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"suite": a.suite, "mean": mean, "elapsed_s": elapsed, "workers": a.workers,
                       "tasks": {env.tasks[t].name: {"success": results[t], "steps": steps[t],
                                                     "error": errors.get(t)} for t in tasks}}, f)


if __name__ == "__main__":
    main()
