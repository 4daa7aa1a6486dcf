"""GRPO update step (vlajax.rl.learner) of the OpenVLA-OFT 7B policy on one GPU: LoRA, and full-parameter
training where the memory plan fits the device. Reports step time, tokens/s, the measured peak memory
next to the plan, and model FLOP utilisation against a bf16 8192^3 matmul measured in the same run.

Model FLOPs of an update = 3 x the forward FLOPs of the mini-batch (`vlajax.model.oft.flops.forward_flops`,
as bench_policy_forward counts them: towers, projector, LLM, 56x256 head), the usual fwd + 2x bwd convention. It is
kept for LoRA too, where the real work is smaller (no weight gradients for the base, no backward through
the vision towers), so LoRA "MFU" overstates; remat's recomputation is not counted (hardware FLOPs are
higher than model FLOPs by up to one forward).

Random weights (N(0, 0.02), norms 1, biases 0: timing needs no checkpoint), random uint8 256x256 frames
preprocessed inside the step, prompts of --prompt-len tokens, every action token valid. One process,
configs run in order (LoRA first), one JSON line per config, all of it in --out.

    PYTHONPATH=. python benchmarks/bench_update.py --out $OUT/update.json           # H100 / H200, ~10 min
    PYTHONPATH=. python benchmarks/bench_update.py --preset small --steps 2          # CPU smoke run
"""

from __future__ import annotations

import os

# Full-parameter training needs ~88% of an H200: JAX preallocates only 75% by default.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from vlajax.distributed.sharding import make_mesh, maybe_initialize_distributed  # noqa: E402

maybe_initialize_distributed()  # before anything touches the jax backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from vlajax.model.oft.flops import forward_flops  # noqa: E402
from vlajax.model.oft.config import preset  # noqa: E402
from vlajax.model.oft.policy import OpenVLAOFT  # noqa: E402
from vlajax.rl.learner import Learner, LearnerConfig  # noqa: E402
from vlajax.rl.lora import LoraConfig, with_lora  # noqa: E402
from random_weights import random_policy  # noqa: E402

GB = 1e9
def make_batch(cfg, m: int, prompt_len: int, frame: int, seed: int = 0) -> dict:
    r = np.random.default_rng(seed)
    t = cfg.num_action_tokens
    ids = r.integers(3, 31000, (m, prompt_len)).astype(np.int32)
    ids[:, 0], ids[:, -1] = cfg.bos_id, cfg.prompt_end_id
    return dict(
        images=r.integers(0, 256, (m, cfg.num_images, frame, frame, 3), dtype=np.uint8),
        input_ids=ids, attention_mask=np.ones((m, prompt_len), np.int32),
        tokens=r.integers(0, cfg.n_bins, (m, t)).astype(np.int32),
        old_logp=(-np.log(cfg.n_bins) + r.normal(0, 0.1, (m, t))).astype(np.float32),
        advantages=r.normal(size=(m,)).astype(np.float32),
        mask=np.ones((m, t), np.float32),
        **({"proprio": r.normal(size=(m, cfg.proprio_dim)).astype(np.float32)} if cfg.proprio_dim else {}),
    )


def memory() -> dict:
    stats = jax.local_devices()[0].memory_stats() or {}
    return {k: stats[k] / GB for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


def plan_gb(n_trainable: int, n_frozen: int, frozen_bytes: int) -> float:
    """Learner memory plan for the state: 16 B per trained param (fp32 weight, grad, Adam mu, nu)."""
    return (16 * n_trainable + frozen_bytes * n_frozen) / GB


def matmul_peak(n: int) -> float:
    from peak import jax_matmul_tflops

    return jax_matmul_tflops(n)


def run_config(name: str, args, cfg, peak_tflops: float) -> dict:
    lora = name == "lora"
    mbs = args.lora_mbs if lora else args.full_mbs
    remat = args.lora_remat if lora else args.full_remat
    remat = {"true": True, "false": False}.get(remat, remat)
    mesh = make_mesh()
    n_dev = mesh.size
    mini = mbs * n_dev * args.micro_batches
    row = {"config": name, "remat": remat, "micro_batch_size": mbs, "micro_batches": args.micro_batches,
           "mini_batch": mini, "devices": n_dev, "prompt_len": args.prompt_len}
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        nnx.state(nnx.eval_shape(lambda: OpenVLAOFT(cfg, nnx.Rngs(0))))))
    limit = memory().get("bytes_limit")
    if not lora and limit is not None:
        need = plan_gb(n_params, 0, 0) / n_dev
        if need > 0.92 * limit:
            row.update(skipped=f"full-parameter state needs {need:.1f} GB/device (16 B/param) > 92% of "
                               f"the {limit:.1f} GB this device gives JAX")
            return row
    t0 = time.perf_counter()
    # LoRA keeps the frozen base in bf16 anyway: build it so, not as an fp32 copy first.
    policy = random_policy(cfg, jnp.bfloat16 if lora else jnp.float32)
    policy = with_lora(policy, LoraConfig(rank=args.lora_rank, alpha=args.lora_rank) if lora else None)
    lcfg = LearnerConfig(micro_batch_size=mbs, remat=remat)
    learner = Learner(policy, lcfg, mesh=mesh)
    del policy
    counts = learner.num_params()
    row.update(n_trainable=counts["trainable"], n_frozen=counts["frozen"],
               plan_state_gb=plan_gb(counts["trainable"], counts["frozen"], 2 if lora else 4),
               setup_s=time.perf_counter() - t0)
    batch = learner.prepare_batch(make_batch(cfg, mini, args.prompt_len, args.frame))
    t0 = time.perf_counter()
    m = learner.update(batch)
    jax.block_until_ready((m, learner.state))
    row["first_step_s"] = time.perf_counter() - t0  # compile + one step
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        m = learner.update(batch)
        jax.block_until_ready((m, learner.state))
        times.append(time.perf_counter() - t0)
    m = jax.device_get(m)
    step = float(np.median(times))
    seq = args.prompt_len + cfg.num_vision_tokens + cfg.num_action_tokens + 1
    flops = 3 * forward_flops(cfg, mini, args.prompt_len)
    row.update(
        step_s=step, step_s_all=times, seq_len=seq, tokens_per_s=mini * seq / step, samples_per_s=mini / step,
        model_tflop_per_step=flops / 1e12, model_tflops=flops / step / 1e12,
        mfu_vs_measured_peak=flops / step / 1e12 / peak_tflops,
        loss=float(m["loss"]), grad_norm=float(m["grad_norm"]), skipped_total=int(m["skipped_total"]),
        num_micro_batches=int(m["num_micro_batches"]))
    row.update({f"mem_{k}": v for k, v in memory().items()})
    del learner, batch, m
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="openvla-oft-7b", choices=["openvla-oft-7b", "small"])
    ap.add_argument("--image-size", type=int, default=None, help="small preset only (e.g. 56)")
    ap.add_argument("--configs", default="lora,full", help="comma list of lora, full (run in this order)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the compile step")
    ap.add_argument("--micro-batches", type=int, default=2, help="micro-batches per mini-batch (grad accumulation)")
    ap.add_argument("--lora-mbs", type=int, default=None, help="LoRA micro-batch per device (7B: 16)")
    ap.add_argument("--full-mbs", type=int, default=None, help="full-parameter micro-batch per device (7B: 8)")
    ap.add_argument("--lora-remat", default="dots", help="true | false | full | dots")
    ap.add_argument("--full-remat", default="full", help="true | false | full | dots")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=34)
    ap.add_argument("--frame", type=int, default=256, help="raw camera frame side (LIBERO: 256)")
    ap.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak (GPU 8192, CPU 1024)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gpu = jax.default_backend() == "gpu"
    small = args.preset == "small"
    cfg = preset(args.preset, **({"image_size": args.image_size} if small and args.image_size else {}))
    args.lora_mbs = args.lora_mbs or (2 if small else 16)
    args.full_mbs = args.full_mbs or (2 if small else 8)
    if small and not gpu:
        args.frame = min(args.frame, cfg.image_size + 8)
    peak_n = args.peak_n or (8192 if gpu else 1024)

    res = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "n_devices": jax.device_count(),
           "jax": jax.__version__, "preset": args.preset, "date": time.strftime("%Y-%m-%d"),
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "args": vars(args)}
    peak = matmul_peak(peak_n)
    res["matmul_peak_tflops"] = peak
    res["matmul_peak_n"] = peak_n
    print(json.dumps({k: res[k] for k in ("device", "jax", "preset", "matmul_peak_tflops", "matmul_peak_n")}),
          flush=True)
    res["runs"] = []

    def dump():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=2)

    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        if name not in ("lora", "full"):
            raise SystemExit(f"unknown config {name!r}; choose from lora, full")
        try:
            row = run_config(name, args, cfg, peak)
        except Exception as e:  # an OOM in one config must not lose the other's numbers
            row = {"config": name, "error": f"{type(e).__name__}: {str(e)[:2000]}",
                   "traceback": traceback.format_exc()[-3000:], **{f"mem_{k}": v for k, v in memory().items()}}
            gc.collect()
        res["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        dump()
    dump()


if __name__ == "__main__":
    main()
