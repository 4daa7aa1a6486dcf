"""A random-weight OpenVLA-OFT checkpoint in the Hugging Face layout, as a user's SFT checkpoint would be:
what the end-to-end runs load through the converter's path (`actor_rollout_ref.model.path=<dir>`).

    python benchmarks/make_random_checkpoint.py OUT_DIR [--preset openvla-oft-7b] [--suite libero_10]

Weights: N(0, 0.02) drawn on the device in bf16 (`random_weights.random_policy`). The tokenizer is the
shipped tiny one (same 32000-id vocabulary layout; no hub). `dataset_statistics.json` holds identity
action statistics under `<suite>_no_noops`, the key a LIBERO checkpoint carries.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from random_weights import random_policy  # noqa: E402

from vlajax.model.oft import preset  # noqa: E402
from vlajax.model.oft.actions import ActionStats  # noqa: E402
from vlajax.model.tokenizer import TINY_TOKENIZER_DIR  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--preset", default="openvla-oft-7b")
    p.add_argument("--suite", default="libero_10")
    p.add_argument("--num-images", type=int, default=1)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    policy = random_policy(preset(args.preset, num_images=args.num_images), jnp.bfloat16)
    out = Path(args.out)
    policy.export_hf(out, dtype="bfloat16")
    shutil.copy(Path(TINY_TOKENIZER_DIR) / "tokenizer.json", out / "tokenizer.json")
    stats = ActionStats.identity(policy.cfg.action_dim, key=f"{args.suite}_no_noops").to_json()
    (out / "dataset_statistics.json").write_text(json.dumps(stats, indent=2))
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e9
    print(f"wrote {out}: {args.preset}, {size:.1f} GB, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
