"""Per-step table of a `vlajax train` run's metrics (metrics.jsonl): what the end-to-end GPU-node run
reports (benchmarks/e2e_gpu_node.sh).

    python benchmarks/e2e_report.py RUN_DIR [--decode-times bench_rollout.json]

Per RL step: rollout wall time, simulator busy fraction, decoder busy fraction (decode calls per batch
size x the per-call times bench_rollout measured, when given), update time, reset overlap (the first
env result's wait in a step whose resets overlapped the previous update, against step 1's, whose
resets did not), peak accelerator memory and the trainer's peak host RSS.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--decode-times", default=None, help="bench_rollout.py --json output (per-call decode times)")
    args = p.parse_args(argv)
    rows = [json.loads(x) for x in (Path(args.run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rollout/wall_s" in r]
    per_call = {}
    if args.decode_times:
        layouts = json.loads(Path(args.decode_times).read_text())["layouts"]
        per_call = {int(k): v for k, v in layouts[-1]["decode_s_per_call"].items()}
    first_reset = rows[0]["rollout/first_result_s"] if rows else float("nan")
    print("| step | rollout s | env steps | sim busy | decoder busy | update s | reset wait s | reset overlap | "
          "GPU peak GB | host RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        wall = r["rollout/wall_s"]
        dec = sum(per_call.get(int(k.rsplit("_b", 1)[1]), float("nan")) * v for k, v in r.items()
                  if k.startswith("rollout/decode_calls_b"))
        overlap = 1 - r["rollout/first_result_s"] / first_reset if r is not rows[0] else 0.0
        print(f"| {r['step']} | {wall:.1f} | {r['train/env_steps']} | {r['rollout/sim_busy_fraction']:.2f} | "
              f"{dec / wall if per_call else float('nan'):.2f} | {r.get('timing/update_s', float('nan')):.1f} | "
              f"{r['rollout/first_result_s']:.2f} | {overlap:.2f} | {r.get('perf/device_peak_gb', float('nan')):.1f} | "
              f"{r['perf/host_peak_rss_gb']:.1f} |")


if __name__ == "__main__":
    main()
