"""Full-size OpenVLA-OFT forward on one GPU: vlajax (JAX, jitted) vs the PyTorch reference
(timm + transformers, eager and torch.compile), side by side in one run.

Also the full-size evidence for the converter: a random-weight 7B checkpoint in the real HF layout
(bf16 shards + index) is written by the PyTorch reference, loaded by `vlajax.model.load_pretrained`,
its key list / parameter count checked against the real checkpoint's (982 tensors,
7,541,237,184 parameters), and the bf16 action logits compared with PyTorch's.

    PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/bench_policy_forward.py \
        --batches 1,8,32,64 --compile-batches 32 --out $OUT/forward.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.reference.hf_layout import random_inputs, write_hf_checkpoint  # noqa: E402
from tests.reference.torch_oft import OFTSizes, build_torch_oft, full_size_meta_keys  # noqa: E402
from vlajax.model.oft import load_pretrained  # noqa: E402
from vlajax.model.oft.flops import forward_flops  # noqa: E402,F401  (re-exported for other benchmarks)
from vlajax.model.oft.hf_convert import entries, read_tensors  # noqa: E402


def time_it(fn, iters: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        sync(fn())
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def matmul_peak(n: int = 8192) -> dict:
    from benchmarks.peak import jax_matmul_tflops, torch_matmul_tflops

    return {"jax_tflops": jax_matmul_tflops(n), "torch_tflops": torch_matmul_tflops(n)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--compile-batches", default="32")
    ap.add_argument("--prompt-len", type=int, default=34)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--no-checkpoint", action="store_true",
                    help="skip writing/loading the 7B checkpoint: random JAX weights (timing only)")
    ap.add_argument("--no-torch", action="store_true",
                    help="time vlajax only (e.g. a second process under other XLA_FLAGS); implies --no-checkpoint")
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "jax": jax.__version__, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}
    print(res, flush=True)

    peak = matmul_peak()
    res["matmul_peak"] = peak
    print("bf16 8192^3 matmul peak:", peak, flush=True)

    sizes = OFTSizes.full()
    args.no_checkpoint |= args.no_torch
    ref = None if args.no_torch else build_torch_oft(sizes, seed=0, device="cuda", dtype=torch.bfloat16)
    if args.no_checkpoint:
        from benchmarks.random_weights import random_policy
        from vlajax.model.oft import preset

        policy = random_policy(preset("openvla-oft-7b"), jnp.bfloat16)
        cfg = policy.cfg
    else:
        # --- the 7B in the real on-disk layout, written by the reference, loaded by vlajax ---------------
        t0 = time.perf_counter()
        ckpt = args.ckpt_dir or tempfile.mkdtemp(prefix="oft7b_")
        write_hf_checkpoint(ref, sizes, ckpt, dtype=torch.bfloat16, num_shards=4)
        res["write_s"] = time.perf_counter() - t0
        tensors, _ = read_tensors(ckpt)
        meta = full_size_meta_keys()
        res["n_tensors"] = len(tensors)
        res["n_params"] = int(sum(t.size for t in tensors.values()))
        res["keys_match_real"] = {k: tuple(v.shape) for k, v in tensors.items()} == meta
        del tensors
        t0 = time.perf_counter()
        policy = load_pretrained(ckpt, dtype="bfloat16")
        res["load_s"] = time.perf_counter() - t0
        cfg = policy.cfg
        res["n_params_in_model"] = int(sum(x.size for x in jax.tree.leaves(policy.params())))
        res["n_unused_tensors"] = len(policy.unused)
        res["entries"] = len(entries(cfg))
        print({k: res[k] for k in ("n_tensors", "n_params", "keys_match_real", "n_params_in_model",
                                   "n_unused_tensors", "write_s", "load_s")}, flush=True)

        # --- bf16 parity on the full model ---------------------------------------------------------------
        lengths = [30, 41, 25, 34]
        pv, ids, mask = random_inputs(sizes, 4, lengths, seed=1)
        with torch.no_grad():
            want = ref.action_logits(pv.cuda().bfloat16(), ids.cuda(), mask.cuda()).float().cpu().numpy()
        got = np.asarray(policy.action_logits(jnp.asarray(pv.numpy(), jnp.bfloat16), jnp.asarray(ids.numpy(), jnp.int32),
                                              jnp.asarray(mask.numpy(), jnp.int32)))
        rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        mean_rel = float(np.mean(np.abs(got - want)) / np.mean(np.abs(want)))
        agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
        res["parity_bf16"] = {"max_rel_err": rel, "mean_rel_err": mean_rel, "greedy_agreement": agree,
                              "logit_std": float(want.std())}
        print("bf16 parity vs torch:", res["parity_bf16"], flush=True)


    # --- timings ----------------------------------------------------------------------------------
    peak_t = max(peak["jax_tflops"], peak["torch_tflops"])  # the better measured bf16 matmul
    res["timings"] = []
    compile_batches = {int(b) for b in args.compile_batches.split(",") if b and not args.no_torch}
    compiled = torch.compile(ref.action_logits) if compile_batches else None
    for b in [int(x) for x in args.batches.split(",")]:
        pv, ids, mask = random_inputs(sizes, b, [args.prompt_len] * b, seed=2)
        jx = (jnp.asarray(pv.numpy(), jnp.bfloat16), jnp.asarray(ids.numpy(), jnp.int32),
              jnp.asarray(mask.numpy(), jnp.int32))
        tx = None if ref is None else (pv.cuda().bfloat16(), ids.cuda(), mask.cuda())
        flops = forward_flops(cfg, b, args.prompt_len)
        row = {"batch": b, "tflop": flops / 1e12}
        row["vlajax_ms"] = 1e3 * time_it(lambda: policy.action_logits(*jx), args.iters, 3,
                                         lambda x: x.block_until_ready())
        if ref is not None:
            with torch.no_grad():
                row["torch_eager_ms"] = 1e3 * time_it(lambda: ref.action_logits(*tx), args.iters, 2,
                                                      lambda x: torch.cuda.synchronize())
                if b in compile_batches:
                    t0 = time.perf_counter()
                    compiled(*tx)
                    torch.cuda.synchronize()
                    row["torch_compile_first_call_s"] = time.perf_counter() - t0
                    row["torch_compile_ms"] = 1e3 * time_it(lambda: compiled(*tx), args.iters, 2,
                                                            lambda x: torch.cuda.synchronize())
        for k in ("vlajax", "torch_eager", "torch_compile"):
            if f"{k}_ms" in row:
                row[f"{k}_tflops"] = flops / (row[f"{k}_ms"] / 1e3) / 1e12
                row[f"{k}_frac_peak"] = row[f"{k}_tflops"] / peak_t
        if "torch_eager_ms" in row:
            row["speedup_vs_eager"] = row["torch_eager_ms"] / row["vlajax_ms"]
        if "torch_compile_ms" in row:
            row["speedup_vs_compile"] = row["torch_compile_ms"] / row["vlajax_ms"]
        res["timings"].append(row)
        print(json.dumps(row), flush=True)

    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
