"""Cost of cross-process collectives in one GRPO update, on CPU: 2 processes x 2 devices vs 1 x 4.

Both runs use the same 4-device mesh (data=1 x fsdp=4 by default), the same policy, batch and
update; only the process boundary differs. In the 2-process run the FSDP all-gathers of the
parameters, the gradient reductions and the global-norm clip cross processes (gloo over TCP
loopback), so the step-time difference is what the process boundary costs. Also timed:
an all-gather of every parameter (the FSDP gather of one forward), `multihost.global_batch` and
`multihost.aggregate_metrics` (the per-step host collectives a trainer adds).

On one machine the processes share the cores, so this measures the collectives' software overhead
(serialization, gloo, synchronization), not a network; on a cluster run the worker under SLURM
(one task per node) to measure the interconnect.

    PYTHONPATH=. python benchmarks/bench_collectives.py                       # ~3-5 min on 2 cores
    PYTHONPATH=. python benchmarks/bench_collectives.py --steps 5 --out /tmp/coll.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(sorted(times)[len(times) // 2])


def worker(args) -> None:
    """One process of a run: time the update and the collectives; process 0 writes the JSON."""
    from vlajax.distributed.multihost import aggregate_metrics, global_batch, initialize, local_rows

    initialize(f"localhost:{args.port}", args.processes, args.process_id, initialization_timeout=120)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from random_weights import random_policy

    from vlajax.distributed.sharding import make_mesh
    from vlajax.model.oft.config import preset
    from vlajax.model.oft.pretrained import Policy, build_model
    from vlajax.rl.learner import Learner, LearnerConfig

    cfg = preset("small", image_size=args.image_size)
    # random weights made on the host's first device, then as numpy: identical in every process
    params = jax.device_get(__import__("flax").nnx.to_pure_dict(random_policy(cfg, jnp.float32).state))
    mesh = make_mesh(args.data, -1)
    learner = Learner(Policy(build_model(cfg, params), compute_dtype=jnp.float32),
                      LearnerConfig(micro_batch_size=args.mbs, compute_dtype=args.dtype), mesh=mesh)
    m = args.batch
    r = np.random.default_rng(0)
    t = cfg.num_action_tokens
    ids = r.integers(3, 31000, (m, 12)).astype(np.int32)
    ids[:, 0], ids[:, -1] = cfg.bos_id, cfg.prompt_end_id
    full = dict(images=r.integers(0, 256, (m, cfg.image_size, cfg.image_size, 3), dtype=np.uint8),
                input_ids=ids, attention_mask=np.ones((m, 12), np.int32),
                tokens=r.integers(0, cfg.n_bins, (m, t)).astype(np.int32),
                old_logp=np.full((m, t), -np.log(cfg.n_bins), np.float32),
                advantages=r.normal(size=(m,)).astype(np.float32), mask=np.ones((m, t), np.float32))
    rows = local_rows(mesh, m)
    local = {k: v[rows] for k, v in full.items()}

    def step():
        metrics = learner.update(local)
        jax.block_until_ready((metrics, learner.state.params))

    t0 = time.perf_counter()
    step()  # compile
    compile_s = time.perf_counter() - t0
    step_s = _median_s(step, args.steps)

    repl = NamedSharding(mesh, P())
    gather = jax.jit(lambda tree: tree, out_shardings=jax.tree.map(lambda _: repl, learner.state.params))
    jax.block_until_ready(gather(learner.state.params))
    gather_s = _median_s(lambda: jax.block_until_ready(gather(learner.state.params)), args.reps)
    batch_s = _median_s(lambda: jax.block_until_ready(global_batch(local, mesh)), args.reps)
    metrics = {"train/success_rate": 0.5, "train/episodes": 8.0, "perf/env_steps_per_s": 100.0}
    agg_s = _median_s(lambda: aggregate_metrics(metrics), args.reps)
    leaves = jax.tree.leaves(learner.state.params)
    n_params = sum(x.size for x in leaves)
    n_sharded = sum(any(a is not None for a in x.sharding.spec) for x in leaves)  # arrays the gather moves
    res = dict(processes=args.processes, devices_per_process=jax.local_device_count(),
               mesh=dict(mesh.shape), batch=m, micro_batch_size=args.mbs, dtype=args.dtype, params=int(n_params),
               sharded_arrays=int(n_sharded),
               compile_s=compile_s, step_s=step_s, param_allgather_s=gather_s, global_batch_s=batch_s,
               aggregate_metrics_s=agg_s, steps=args.steps, jax=jax.__version__)
    multihost_utils.sync_global_devices("timed")
    if args.process_id == 0:
        Path(args.out).write_text(json.dumps(res))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run(processes: int, devices: int, args, tmp: Path) -> dict:
    """Launch one run (all processes at once), wait, kill leftovers; process 0's JSON."""
    out, port = tmp / f"{processes}x{devices}.json", _free_port()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    common = ["--worker", "--processes", str(processes), "--port", str(port), "--out", str(out),
              "--steps", str(args.steps), "--reps", str(args.reps), "--batch", str(args.batch), "--mbs", str(args.mbs),
              "--data", str(args.data), "--image-size", str(args.image_size), "--dtype", args.dtype]
    procs = [subprocess.Popen([sys.executable, __file__, *common, "--process-id", str(i)], env=env,
                              stdout=subprocess.DEVNULL)  # gloo's connection chatter; errors go to stderr
             for i in range(processes)]
    try:
        codes = [p.wait(args.timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(codes):
        raise RuntimeError(f"{processes}x{devices} run failed: exit codes {codes}")
    return json.loads(out.read_text())


def table(a: dict, b: dict) -> str:
    """Markdown table: the two runs, and b - a."""
    rows = [("update step (median)", "step_s"), ("  compile + first step", "compile_s"),
            ("all-gather of all params", "param_allgather_s"), ("global_batch", "global_batch_s"),
            ("aggregate_metrics", "aggregate_metrics_s")]
    name = lambda r: f"{r['processes']} proc x {r['devices_per_process']} dev"  # noqa: E731
    lines = [f"| ms | {name(a)} | {name(b)} | difference |", "|---|---:|---:|---:|"]
    for label, k in rows:
        lines.append(f"| {label} | {1e3 * a[k]:.1f} | {1e3 * b[k]:.1f} | {1e3 * (b[k] - a[k]):+.1f} |")
    n = a["sharded_arrays"]
    per = lambda r: 1e3 * r["param_allgather_s"] / n  # noqa: E731
    lines.append(f"| per all-gather ({n} sharded arrays) | {per(a):.2f} | {per(b):.2f} | {per(b) - per(a):+.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed update steps after the compile step")
    ap.add_argument("--reps", type=int, default=10, help="repetitions of the collective-only timings")
    ap.add_argument("--batch", type=int, default=8, help="global mini-batch (samples)")
    ap.add_argument("--mbs", type=int, default=1, help="micro-batch per device")
    ap.add_argument("--data", type=int, default=1, help="mesh data axis (fsdp = 4 / data)")
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--dtype", default="float32", help="compute dtype of the update")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per run")
    ap.add_argument("--out", default=None, help="JSON with both runs")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, 4, args, Path(tmp))  # one after the other: they would share the cores
        two = run(2, 2, args, Path(tmp))
    print(f"\nsmall policy ({one['params'] / 1e6:.1f}M params), mesh {one['mesh']}, batch {one['batch']}, "
          f"micro-batch {one['micro_batch_size']}/device, {one['dtype']}, jax {one['jax']}, "
          f"CPU, {os.cpu_count()} cores "
          f"(load average {load:.1f} at start)")
    print(table(one, two))
    if args.out:
        Path(args.out).write_text(json.dumps({"1x4": one, "2x2": two}, indent=1))


if __name__ == "__main__":
    main()
