"""GRPO/PPO update step (vlajax.rl.learner) of the π0 policy (`vlajax.model.pi0`, Flow-SDE actor) on one
GPU: LoRA, and full-parameter training where the memory plan fits the device. Reports step time,
samples/s, the measured peak memory next to the plan, and model FLOP utilisation against a bf16
8192^3 matmul measured in the same run. The π0 counterpart of `bench_update.py` (OpenVLA-OFT).

What one update row is: one policy call (`Pi0Actor.log_prob`): SigLIP on `num_images` frames and
the PaliGemma prefix (images + prompt) once, then the action expert's suffix (state token +
`action_horizon` noisy actions) once per denoising step against the prefix's keys and values, scoring
the stored chain x_K .. x_0 (`sample_shape` = (num_steps + 1, action_horizon x model action_dim)),
T = chunk x action_dim log-probs per row.

Model FLOPs of an update = 3 x the forward FLOPs of the mini-batch, the forward of a row being
`Pi0Family.flops_per_row` (towers and prefix once, the suffix once per denoising step: exactly what
`log_prob` runs; SigLIP's attention scores and the small action/time MLPs are not counted, a few %),
the usual fwd + 2x bwd convention. It is kept for LoRA too, where the real work is smaller (no weight
gradients for the base, no backward through SigLIP: nothing before the Gemma experts is trained), so
LoRA "MFU" overstates; remat's recomputation is not counted (hardware FLOPs are higher than model
FLOPs by up to one forward). `tokens_per_s` counts token positions run per row: prefix + num_steps x
suffix.

Random weights (as `init_scheme: normal`: N(0, 0.02); timing needs no checkpoint) for the policy
`Pi0Family.load` builds, drawn on the device in the param dtype (`build_policy`; LoRA: bf16, as the
learner holds the frozen base; full: fp32 master weights). Temperature 1 (π0's LIBERO recipe).
Random uint8 frames preprocessed inside the step, prompts of --prompt-len valid tokens, the chain
random N(0, 1), every action element valid; per-row advantages N(0, 1) broadcast over the row's T
elements (as `vlajax.rl.samples` lays a trajectory's advantage out); old_logp = the learner's own
log-probs of the batch before the first update (`Learner.logprobs`, same temperature), so the PPO
ratio starts at ~1. One process, configs run in order (LoRA first), one JSON line per config, all of
it in --out.

Memory plan (π0: 3.24e9 parameters, 3.05 TFLOP forward per row at 2 images, 48 prompt tokens, 10
steps): full = 16 B/param = 51.8 GB of state (+6.5 GB if XLA hoists a bf16 copy) + activations: fits
one H100 (skipped where the device gives JAX less than plan / 0.92); LoRA (rank 32 on both experts'
projections) = 2 B/param frozen bf16 base (6.5 GB) + adapters. The default micro-batches (LoRA 16, full 8
per device, x2 micro-batches) are measured to fit an H100 (39.6 / 65.8 GB peak; RESULTS.md).
The first step includes the compile (67-92 s on the H100: `log_prob` scans its denoising steps; unrolled
it took 480 s on the H200), and `Learner.logprobs` (old_logp) compiles a second, forward-only program.

    PYTHONPATH=. python benchmarks/bench_pi0_update.py --out $OUT/pi0_update.json      # H100 / H200
    PYTHONPATH=. python benchmarks/bench_pi0_update.py --preset tiny --steps 2          # CPU smoke run
"""

from __future__ import annotations

import os

# Full-parameter training keeps 16 B/param (51.8 GB for π0's 3.24e9): JAX preallocates only 75% by default.
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

from vlajax.model.family import PolicySpec, get_family  # noqa: E402
from vlajax.rl.learner import Learner, LearnerConfig  # noqa: E402
from vlajax.rl.lora import LoraConfig, with_lora  # noqa: E402
from bench_update import GB, matmul_peak, memory, plan_gb  # noqa: E402  (the OFT bench's, shared)

# the LIBERO setup a π0 run trains with: agent view + wrist camera, 8-dim robot state, 7-dim actions
NUM_IMAGES, PROPRIO_DIM, ACTION_DIM = 2, 8, 7


def policy_spec(args, param_dtype: str) -> PolicySpec:
    tiny = args.preset == "tiny"
    return PolicySpec(path=f"preset:{args.preset}", num_images=NUM_IMAGES, proprio_dim=PROPRIO_DIM, chunk=args.chunk,
                      action_dim=ACTION_DIM, param_dtype=param_dtype, compute_dtype="bfloat16",
                      image_size=args.image_size if tiny else None, seed=0,
                      options={"num_steps": args.num_steps, "noise_level": 0.5,
                               "action_horizon": args.action_horizon, "init_scheme": "normal"})


def make_batch(family, policy, m: int, prompt_len: int, frame: int, seed: int = 0) -> dict:
    """Every key `family.batch_spec` names, random, m rows. old_logp is a placeholder (zeros): the
    caller replaces it with the learner's own log-probs."""
    r = np.random.default_rng(seed)
    spec = family.batch_spec(policy, image_shape=(frame, frame), prompt_width=prompt_len)
    vocab = policy.cfg.model.vocab_size
    out = {}
    for k, f in spec.items():
        shape = (m, *f.shape)
        if k == "images":
            x = r.integers(0, 256, shape, dtype=np.uint8)
        elif k == "input_ids":
            x = r.integers(1, vocab, shape)
        elif k in ("attention_mask", "mask"):
            x = np.ones(shape)
        elif k == "tokens":  # the denoising chain x_K .. x_0
            x = r.normal(size=shape)
        elif k == "old_logp":
            x = np.zeros(shape)
        elif k == "advantages":  # one advantage per row (trajectory), on each of its T elements
            x = np.broadcast_to(r.normal(size=(m,) + (1,) * len(f.shape)), shape)
        elif k == "proprio":
            x = r.normal(size=shape)
        else:
            raise KeyError(f"batch_spec names {k!r}, which this benchmark does not know how to fill")
        out[k] = np.ascontiguousarray(x).astype(f.dtype)
    return out


def build_policy(family, spec: PolicySpec):
    """The policy `family.load(spec)` builds (its graph and config: the load runs abstractly, under
    `nnx.eval_shape`), with random weights drawn leaf by leaf on the device straight in the param dtype
    (one small program per distinct shape, as `random_weights.random_policy` does for OFT). Why not
    `family.load` itself: it draws every weight in fp32 first (13 GB for π0) and casts after, a
    transient that would be the LoRA config's measured peak. Same values as `init_scheme: normal`:
    N(0, 0.02) kernels, tables and position embeddings, biases 0, LayerNorm scales 1, Gemma RMSNorm
    scales 0 (weight 1 + scale). The prompt tokenizer is the presets' own (the update never uses it)."""
    from vlajax.model.pi0.family import Pi0Policy
    from vlajax.model.tokenizer import load_tokenizer

    graphdef, state = nnx.split(nnx.eval_shape(lambda: family.load(spec).model))
    dtype = jnp.dtype(spec.param_dtype)
    normal = jax.jit(lambda k, shape: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype),
                     static_argnums=1)
    key = jax.random.key(spec.seed)
    pure = nnx.to_pure_dict(state)
    flat = jax.tree_util.tree_flatten_with_path(pure)[0]
    values = []
    for i, (path, x) in enumerate(flat):
        names = [str(getattr(p, "key", p)) for p in path]
        if names[-1].endswith("bias"):
            values.append(jnp.zeros(x.shape, dtype))
        elif names[-1] == "scale":  # LayerNorm (SigLIP): 1; Gemma's RMSNorm multiplies by 1 + scale: 0
            values.append((jnp.zeros if "llm" in names else jnp.ones)(x.shape, dtype))
        else:
            values.append(normal(jax.random.fold_in(key, i), tuple(x.shape)))
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(jax.tree.structure(pure), values))
    return Pi0Policy(nnx.merge(graphdef, state), tokenizer=load_tokenizer("tiny"), dataset_statistics={},
                     compute_dtype=jnp.dtype(spec.compute_dtype))


def count_params(family, args) -> int:
    """Parameters of the policy, without drawing them (`jax.eval_shape` of the family's load)."""
    shapes = jax.eval_shape(lambda: family.load(policy_spec(args, "float32")).state)
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)))


def run_config(name: str, args, family, peak_tflops: float) -> dict:
    lora = name == "lora"
    mbs = args.lora_mbs if lora else args.full_mbs
    remat = args.lora_remat if lora else args.full_remat
    remat = {"true": True, "false": False}.get(remat, remat)
    mesh = make_mesh()
    n_dev = mesh.size
    mini = mbs * n_dev * args.micro_batches
    row = {"config": name, "remat": remat, "micro_batch_size": mbs, "micro_batches": args.micro_batches,
           "mini_batch": mini, "devices": n_dev, "prompt_len": args.prompt_len, "frame": args.frame,
           "num_steps": args.num_steps, "chunk": args.chunk, "action_horizon": args.action_horizon}
    if lora:
        row["lora_rank"] = args.lora_rank
    n_params = count_params(family, args)
    row["n_params"] = n_params
    limit = memory().get("bytes_limit")  # GB
    if not lora and limit is not None:
        need = plan_gb(n_params, 0, 0) / n_dev
        if need > 0.92 * limit:
            row.update(skipped=f"full-parameter state needs {need:.1f} GB/device (16 B/param) > 92% of "
                               f"the {limit:.1f} GB this device gives JAX")
            return row
    t0 = time.perf_counter()
    # LoRA keeps the frozen base in bf16 anyway: build it so, not as an fp32 copy first.
    policy = build_policy(family, policy_spec(args, "bfloat16" if lora else "float32"))
    if lora:
        policy = with_lora(policy, LoraConfig(rank=args.lora_rank, alpha=args.lora_rank,
                                              targets=family.lora_targets))
    c = policy.cfg
    fwd_row = family.flops_per_row(policy, args.prompt_len)
    batch = make_batch(family, policy, mini, args.prompt_len, args.frame)
    # temperature 1: π0's LIBERO recipe (configs/pi0_libero_grpo.yaml; the SDE noise = 0.5 x it), not
    # LearnerConfig's OFT default 1.6. The step's work does not depend on it.
    learner = Learner(policy, LearnerConfig(micro_batch_size=mbs, remat=remat, temperature=1.0), mesh=mesh)
    del policy
    counts = learner.num_params()
    prefix = c.num_images * c.model.vision.num_patches + args.prompt_len
    suffix = 1 + c.model.action_horizon
    row.update(n_trainable=counts["trainable"], n_frozen=counts["frozen"],
               plan_state_gb=plan_gb(counts["trainable"], counts["frozen"], 2 if lora else 4),
               setup_s=time.perf_counter() - t0, temperature=learner.cfg.temperature,
               sample_shape=list(c.sample_shape), logp_elements=c.num_action_tokens,
               prefix_len=prefix, suffix_len=suffix)
    # old_logp: the learner's own log-probs of this batch (same forward, temperature, dtype), so the
    # PPO ratio starts at ~1 and the step exercises the unclipped path
    t0 = time.perf_counter()
    logp, _ = learner.logprobs(batch)
    batch["old_logp"] = np.asarray(jax.device_get(logp), np.float32)
    row["old_logp_s"] = time.perf_counter() - t0  # compile + one forward
    row["old_logp_mean"] = float(np.mean(batch["old_logp"]))
    del logp
    batch = learner.prepare_batch(batch)
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
    flops = 3 * fwd_row * mini
    row.update(
        step_s=step, step_s_all=times, tokens_per_row=prefix + args.num_steps * suffix,
        tokens_per_s=mini * (prefix + args.num_steps * suffix) / step, samples_per_s=mini / step,
        fwd_gflop_per_row=fwd_row / 1e9, model_tflop_per_step=flops / 1e12, model_tflops=flops / step / 1e12,
        mfu_vs_measured_peak=flops / step / 1e12 / peak_tflops,
        loss=float(m["loss"]), ratio_mean=float(m["ratio_mean"]), clipfrac=float(m["clipfrac"]),
        approx_kl_k3=float(m["approx_kl_k3"]), grad_norm=float(m["grad_norm"]),
        skipped_total=int(m["skipped_total"]), num_micro_batches=int(m["num_micro_batches"]))
    row.update({f"mem_{k}": v for k, v in memory().items()})
    del learner, batch, m
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="pi0", choices=["pi0", "tiny"])
    ap.add_argument("--image-size", type=int, default=None, help="tiny preset only (default 56)")
    ap.add_argument("--configs", default="lora,full", help="comma list of lora, full (run in this order)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the compile step")
    ap.add_argument("--micro-batches", type=int, default=2, help="micro-batches per mini-batch (grad accumulation)")
    ap.add_argument("--lora-mbs", type=int, default=None,
                    help="LoRA micro-batch per device (π0: 16, 39.6 GB on an H100; tiny: 2)")
    ap.add_argument("--full-mbs", type=int, default=None,
                    help="full-parameter micro-batch per device (π0: 8, 65.8 GB on an H100; tiny: 2)")
    ap.add_argument("--lora-remat", default="dots", help="true | false | full | dots")
    ap.add_argument("--full-remat", default="full", help="true | false | full | dots")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=48, help="prompt tokens (openpi's max_token_len: 48)")
    ap.add_argument("--frame", type=int, default=224, help="raw camera frame side")
    ap.add_argument("--num-steps", type=int, default=None,
                    help="denoising (Euler) steps (π0: 10; tiny: 3, to keep the CPU compile short)")
    ap.add_argument("--chunk", type=int, default=5, help="actions executed per call (scored: chunk x 7)")
    ap.add_argument("--action-horizon", type=int, default=None, help="actions the model makes per call (π0: 50; tiny: 10)")
    ap.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak (GPU 8192, CPU 1024)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gpu = jax.default_backend() == "gpu"
    tiny = args.preset == "tiny"
    args.lora_mbs = args.lora_mbs or (2 if tiny else 16)
    args.full_mbs = args.full_mbs or (2 if tiny else 8)
    args.action_horizon = args.action_horizon or (10 if tiny else 50)
    args.num_steps = args.num_steps or (3 if tiny else 10)
    if tiny:
        args.image_size = args.image_size or 56
        if not gpu:
            args.frame = min(args.frame, args.image_size + 8)
    elif args.image_size is not None:
        raise SystemExit("--image-size applies to --preset tiny only (π0's SigLIP sees 224 px)")
    family = get_family("pi0")
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
            row = run_config(name, args, family, peak)
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
