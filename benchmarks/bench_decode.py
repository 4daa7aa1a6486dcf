"""Rollout decoding of the 7B policy on the learner's own parameters (colocated: no inference copy).

A full-parameter `Learner` holds the fp32 master weights and AdamW state; the rollout's `PolicyDecoder`
(uint8 frames -> preprocess -> action_logits -> sample, one jitted call) reads the same arrays through
`policy.state`. Reported per batch size: ms per decode call (median, dispatch to fetched actions),
policy calls/s, model TFLOP/s, and device memory in use before and after the decoder exists and has
run, which shows that no second copy of the weights is made (7.5e9 bf16 weights would be 15 GB).

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.97 PYTHONPATH=. python benchmarks/bench_decode.py --out $OUT/decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from peak import jax_matmul_tflops  # noqa: E402
from random_weights import random_policy  # noqa: E402
from vlajax.model.oft.config import preset  # noqa: E402
from vlajax.model.oft.flops import forward_flops  # noqa: E402
from vlajax.model.tokenizer import load_tokenizer  # noqa: E402
from vlajax.rl.learner import Learner, LearnerConfig  # noqa: E402
from vlajax.rl.policy_step import DecodeInputs, PolicyDecoder  # noqa: E402

GB = 1e9


def in_use() -> float:
    return (jax.local_devices()[0].memory_stats() or {}).get("bytes_in_use", 0) / GB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="8,32,64")
    ap.add_argument("--preset", default="openvla-oft-7b", choices=["openvla-oft-7b", "small"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--frame", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = preset(args.preset)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
           "matmul_peak_tflops": jax_matmul_tflops(8192 if jax.default_backend() == "gpu" else 512)}
    policy = random_policy(cfg, jnp.float32)
    policy.tokenizer = load_tokenizer("tiny")
    learner = Learner(policy, LearnerConfig(micro_batch_size=8, remat="dots"))
    jax.block_until_ready(learner.state)
    res["mem_learner_gb"] = in_use()
    decoder = PolicyDecoder(learner.policy, params=learner.decode_params(), flip=True, unnorm_key=None,
                            gripper="libero", buckets=batches)
    res["mem_with_decoder_gb"] = in_use()
    ids, mask = decoder.encode_prompts(["put both the alphabet soup and the tomato sauce in the basket"])
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        x = DecodeInputs(images=rng.integers(0, 256, (b, 1, args.frame, args.frame, 3), dtype=np.uint8),
                         input_ids=np.repeat(ids, b, 0), attention_mask=np.repeat(mask, b, 0),
                         proprio=np.zeros((b, 8), np.float32), rows=np.arange(b, dtype=np.int32),
                         calls=np.zeros(b, np.int32))
        key = jax.random.key(b)
        t0 = time.perf_counter()
        decoder.fetch(decoder.dispatch(x, temperature=1.6, key=key))
        first = time.perf_counter() - t0
        ts = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            out = decoder.fetch(decoder.dispatch(x, temperature=1.6, key=key))
            ts.append(time.perf_counter() - t0)
        ms = 1e3 * float(np.median(ts))
        flops = forward_flops(cfg, b, decoder.prompt_len)  # prompts are padded to prompt_len: that is the work done
        row = {"batch": b, "ms": ms, "calls_per_s": b / ms * 1e3, "model_tflops": flops / ms / 1e9,
               "frac_peak": flops / ms / 1e9 / res["matmul_peak_tflops"], "first_call_s": first,
               "mem_in_use_gb": in_use(), "actions_shape": list(out.actions.shape)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    res["timings"] = rows
    stats = jax.local_devices()[0].memory_stats() or {}
    res["mem_peak_gb"] = stats.get("peak_bytes_in_use", 0) / GB
    print(json.dumps({k: v for k, v in res.items() if k != "timings"}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
