"""Start-up of the simulators with and without Ray: `SimSession` on the demo config, opened and closed
in a fresh process each time (what a newcomer's `vlajax train` waits for before its first step).

    python benchmarks/bench_startup.py [--repeats 3] [overrides ...]

Prints, per layout, the seconds to import, to build the policy and to open the simulators (Ray started
and its actors placed, or `LocalSimPool`'s threads), and to close them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from vlajax.config import load_config
from vlajax.session import SimSession, build_policy
t1 = time.perf_counter()
cfg = load_config("demo", sys.argv[1:])
policy = build_policy(cfg)
t2 = time.perf_counter()
sim = SimSession(cfg, policy)
t3 = time.perf_counter()
sim.close()
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "policy_s": t2 - t1, "open_s": t3 - t2, "close_s": t4 - t3,
                  "pool": type(sim.pool).__name__}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    print("| layout | pool | import s | policy s | open s | close s |\n|---|---|---:|---:|---:|---:|")
    for layout in (["ray.enable=true"], ["ray.enable=false"]):
        for _ in range(a.repeats):
            out = subprocess.run([sys.executable, "-c", CHILD, *layout, *a.overrides], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"| {layout[0]} | {r['pool']} | {r['import_s']:.1f} | {r['policy_s']:.1f} | {r['open_s']:.1f} | "
                  f"{r['close_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
