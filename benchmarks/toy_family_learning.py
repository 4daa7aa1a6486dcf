"""Train the linear Gaussian family of `tests/toy_family.py` (a policy family registered from outside
vlajax) through `vlajax train` on the demo config, and print its greedy validation curve.

    python benchmarks/toy_family_learning.py trainer.seed=1 env.train.seed=43
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import toy_family  # noqa: E402  (registers the family)
from vlajax.cli import main as vlajax  # noqa: E402

ARGS = [f"actor_rollout_ref.model.family={toy_family.NAME}", "actor_rollout_ref.model.path=preset:linear",
        "actor_rollout_ref.actor.optim.lr=1e-2", "actor_rollout_ref.actor.optim.lr_warmup_steps=0",
        "trainer.total_training_steps=20", "trainer.test_freq=5", "trainer.save_freq=-1", "trainer.logger=[jsonl]"]


if __name__ == "__main__":  # the simulator workers are spawned processes
    with tempfile.TemporaryDirectory() as run:
        t = time.perf_counter()
        rc = vlajax(["train", "demo", *ARGS, f"trainer.default_local_dir={run}", *sys.argv[1:]])
        wall = time.perf_counter() - t
        rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    curve = " / ".join(f"{r['val/success_rate']:.2f}" for r in rows if "val/success_rate" in r)
    ratio = [r["actor/ratio_mean"] for r in rows if "actor/ratio_mean" in r]
    print(f"greedy success at steps 0, 5, ...: {curve}; ratio mean {min(ratio):.3f}..{max(ratio):.3f}; "
          f"wall {wall:.0f} s (exit {rc})")
