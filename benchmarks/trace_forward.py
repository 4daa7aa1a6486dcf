"""Where the full 7B forward's GPU time goes: a profiler trace of `Policy.action_logits` (random bf16
weights), its kernels summed by name and grouped (GEMM, attention, other fusions), per call.

    PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/trace_forward.py --batch 32 --out $OUT

Writes `forward_trace.json.gz` (Perfetto JSON, open in ui.perfetto.dev) and `kernels.json` under --out.
`--summarize FILE` re-reads a saved trace without a GPU.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GROUPS = (("attention", r"sdpa|fmha|flash|attn"),  # first: cuDNN's attention kernels also say "wgmma"
          ("gemm", r"gemm|cublas|cutlass|xmma|nvjet|wgmma|matmul"),
          ("memset", r"^Memset"))


def group_of(name: str) -> str:
    for g, pat in GROUPS:
        if re.search(pat, name, re.IGNORECASE):
            return g
    return "other"


def summarize(path: str, calls: int) -> dict:
    with gzip.open(path, "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in procs.items() if "GPU" in n or "gpu" in n}
    per_name = collections.Counter()
    count = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e:
            per_name[e["name"]] += e["dur"]
            count[e["name"]] += 1
    total = sum(per_name.values())
    groups = collections.Counter()
    for n, d in per_name.items():
        groups[group_of(n)] += d
    top = [{"name": n[:160], "ms_per_call": d / 1e3 / calls, "launches_per_call": count[n] / calls,
            "group": group_of(n)} for n, d in per_name.most_common(40)]
    return {"gpu_processes": [procs[p] for p in gpu], "kernel_ms_per_call": total / 1e3 / calls,
            "groups_ms_per_call": {g: d / 1e3 / calls for g, d in groups.items()}, "top": top}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=34)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--out", default=".")
    ap.add_argument("--summarize", default=None, help="a saved forward_trace.json.gz: print its summary and exit")
    args = ap.parse_args()
    if args.summarize:
        print(json.dumps(summarize(args.summarize, args.calls), indent=1))
        return

    import jax
    import jax.numpy as jnp

    from benchmarks.random_weights import random_policy
    from tests.reference.hf_layout import random_inputs
    from tests.reference.torch_oft import OFTSizes
    from vlajax.model.oft import preset

    policy = random_policy(preset("openvla-oft-7b"), jnp.bfloat16)
    pv, ids, mask = random_inputs(OFTSizes.full(), args.batch, [args.prompt_len] * args.batch, seed=2)
    x = (jnp.asarray(pv.numpy(), jnp.bfloat16), jnp.asarray(ids.numpy(), jnp.int32), jnp.asarray(mask.numpy(), jnp.int32))
    for _ in range(3):
        policy.action_logits(*x).block_until_ready()
    logdir = tempfile.mkdtemp(prefix="trace_")
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(args.calls):
            policy.action_logits(*x).block_until_ready()
    found = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
        raise SystemExit(f"no perfetto_trace.json.gz under {logdir}: {glob.glob(logdir + '/**', recursive=True)}")
    os.makedirs(args.out, exist_ok=True)
    dst = os.path.join(args.out, "forward_trace.json.gz")
    shutil.copy(found[0], dst)
    summary = summarize(dst, args.calls)
    summary.update(batch=args.batch, prompt_len=args.prompt_len, calls=args.calls)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
