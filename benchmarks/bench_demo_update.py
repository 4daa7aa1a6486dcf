"""Time one GRPO update of the embedded default's policy (demo.yaml's small preset) on the CPU: a
128-sample mini-batch (16 trajectories x 8 policy calls) of random frames, prompts and tokens, at the
config's micro-batch size (override any demo.yaml key as `key=value`).

    python benchmarks/bench_demo_update.py actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=64
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vlajax.config import load_config  # noqa: E402
from vlajax.distributed.sharding import make_mesh  # noqa: E402
from vlajax.rl.learner import Learner  # noqa: E402
from vlajax.session import build_policy  # noqa: E402


def main() -> None:
    overrides = sys.argv[1:]
    cfg = load_config("demo", overrides)
    policy = build_policy(cfg)
    learner = Learner(policy, cfg.actor_rollout_ref.learner_config(1, False), make_mesh(1, 1))
    m, size = 128, cfg.env.train.init_params.camera_heights
    rng = np.random.default_rng(0)
    ids, mask = policy.tokenizer.encode(["move the gripper to the red block"] * m, pad_to=24)
    batch = {"images": rng.integers(0, 255, (m, size, size, 3), dtype=np.uint8), "input_ids": ids,
             "attention_mask": mask, "tokens": rng.integers(0, 256, (m, 56)).astype(np.int32),
             "old_logp": np.full((m, 56), -np.log(256), np.float32),
             "advantages": rng.normal(size=m).astype(np.float32), "mask": np.ones((m, 56), np.float32),
             "proprio": rng.normal(size=(m, 8)).astype(np.float32)}
    times = []
    for _ in range(6):  # the first is the compile
        t = time.perf_counter()
        jax.block_until_ready(learner.update(batch))
        times.append(time.perf_counter() - t)
    print(f"{' '.join(overrides) or 'demo.yaml'}: update of {m} samples, median of 5 after compile "
          f"{1000 * float(np.median(times[1:])):.0f} ms")


if __name__ == "__main__":
    main()
