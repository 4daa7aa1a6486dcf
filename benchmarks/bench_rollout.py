"""Pipelined vs serial rollout with real simulators in Ray actors and a small OpenVLA-OFT policy.

    python benchmarks/bench_rollout.py [--env tabletop|libero] [--workers 1] [--stages 2] [--envs 1]
        [--max-steps 64] [--image-size 128] [--render-every-substep] [--policy-image 56]
        [--rounds 3] [--pin] [--policy CKPT] [--mujoco-gl egl|osmesa] [--json OUT]

`--stages 1,2 --envs 16,8` measures several pool layouts in one process with one policy (the same
decode shapes when stages x envs is equal). `--policy` loads a checkpoint (HF or vlajax; bf16 compute)
instead of the small random preset, e.g. the 7B made by make_random_checkpoint.py.

One run measures, on the same requests and the same sampling key (so all loops produce the same
trajectories, which is checked):
  serial     EngineConfig(pipelined=False): every unit steps, then one decode for all, repeat
  pipelined  the default loop
  sim        bound 1: the pipelined loop replaying the recorded actions with no decode at all
             (wall time of the simulation alone, Ray round trips included)
  decode     bound 2: every policy call of the rollout decoded back to back, per (worker, stage)
             unit and call, with no simulator running (host gather + device + un-normalise)
and prints pipelined / max(sim, decode), the sim actors' busy fraction during the pipelined
run (time an env call ran / wall time, mean over actors) and the decoder's (its calls' device time,
timed per batch size before the rollouts, / wall time), for each loop's best round (on a shared
machine other load only ever adds time) and for the medians; the loops take turns round by round.
Every decode bucket is compiled before timing. Resets are excluded: each timed rollout
starts after `start_reset` + `reset_ready` (in training they overlap the learner's update).

--pin: this process (the JAX decode, one XLA thread) on CPU 0, the sim actors and their env
processes on the other CPUs, so simulation and decode do not compete for a core (on 2 cores:
one each). Without it, all share all cores.
"""

from __future__ import annotations

import argparse
import os
import sys

# Before JAX is imported: one XLA CPU thread when pinned (set here so it precedes `import jax`).
if "--pin" in sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1").strip()
os.environ.setdefault("LP_NUM_THREADS", "1")

import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from random_weights import small_random_policy  # noqa: E402
from vlajax.distributed.placement import Colocated  # noqa: E402
from vlajax.distributed.ray_sim import SimPool, init_ray  # noqa: E402
from vlajax.model.oft import Policy  # noqa: E402
from vlajax.rl.policy_step import DecodeInputs, DecodeOutputs, Decoder, PolicyDecoder  # noqa: E402
from vlajax.rl.rollout import EngineConfig, RolloutEngine  # noqa: E402


class ReplayDecoder(Decoder):
    """Returns the actions a previous rollout sent, instantly: the simulation-only bound."""

    def __init__(self, batch, like):
        self.batch = batch
        self.chunk_len, self.action_dim = like.chunk_len, like.action_dim
        self.num_tokens, self.num_images = like.num_tokens, like.num_images

    def encode_prompts(self, instructions):
        return np.zeros((len(instructions), 1), np.int32), np.ones((len(instructions), 1), np.int32)

    def dispatch(self, x: DecodeInputs, *, temperature, key):
        tr = self.batch.trajectories
        return DecodeOutputs(tr.actions_tokens[x.rows, x.calls], tr.old_logp[x.rows, x.calls],
                             self.batch.actions[x.rows, x.calls])

    def fetch(self, handle):
        return handle


def decode_bound(dec: PolicyDecoder, batch, pool: SimPool, temperature: float, key) -> float:
    """Seconds to run every policy call of `batch` back to back, one decode per unit and call."""
    tr = batch.trajectories
    e, s = pool.num_envs, pool.num_stages
    t0 = time.perf_counter()
    for unit in range(pool.num_workers * s):
        rows = np.arange(unit * e, (unit + 1) * e)
        for c in range(tr.chunk_valid.shape[1]):
            r = rows[tr.chunk_valid[rows, c]]
            if len(r) == 0:
                break
            x = DecodeInputs(images=batch.images[r, c], input_ids=batch.prompt_ids[r], attention_mask=batch.prompt_mask[r],
                             proprio=batch.proprio[r, c], rows=r.astype(np.int32),
                             calls=np.full(len(r), c, np.int32))
            dec.fetch(dec.dispatch(x, temperature=temperature, key=key))
    return time.perf_counter() - t0


def _pin_process(pid: int, cpus: set[int]) -> None:
    """All threads of `pid` (sched_setaffinity on a pid pins only its main thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass


def pin(pool: SimPool) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs")
    _pin_process(os.getpid(), {cpus[0]})  # threads created later (JAX) inherit this
    for info in pool.infos:
        for pid in [info["pid"], *info["env_pids"]]:
            _pin_process(pid, set(cpus[1:]))


def decode_times(dec: PolicyDecoder, image_hw, temperature: float, key, reps: int = 3) -> dict[int, float]:
    """Seconds per decode call at each bucket size (median of `reps`, compiled first): with the
    rollout's calls per bucket, the decoder's busy time."""
    h, w = image_hw
    ids, mask = dec.encode_prompts(["pick up the black bowl and place it on the plate"])
    out = {}
    for b in dec.buckets:
        x = DecodeInputs(images=np.random.default_rng(b).integers(0, 255, (b, dec.num_images, h, w, 3), np.uint8),
                         input_ids=np.repeat(ids, b, 0), attention_mask=np.repeat(mask, b, 0),
                         proprio=np.zeros((b, 8), np.float32), rows=np.arange(b, dtype=np.int32),
                         calls=np.zeros(b, np.int32))
        dec.fetch(dec.dispatch(x, temperature=temperature, key=key))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dec.fetch(dec.dispatch(x, temperature=temperature, key=key))
            ts.append(time.perf_counter() - t0)
        out[b] = statistics.median(ts)
    return out


def load_policy(args) -> Policy:
    if args.policy is None:
        return small_random_policy(args.policy_image)
    from vlajax.model.oft import load_pretrained

    return load_pretrained(args.policy, dtype="bfloat16", compute_dtype="bfloat16")


def measure_layout(args, policy, stages: int, envs: int, key) -> dict:
    """Serial / pipelined / sim-bound / decode-bound rollouts of one pool layout (module docstring)."""
    n_cpus = len(os.sched_getaffinity(0))
    if args.env == "tabletop":
        from vlajax.envs.tabletop import make_tabletop_vector_env

        env_fn = functools.partial(make_tabletop_vector_env, image_size=args.image_size,
                                   max_episode_steps=args.max_steps)
        n_tasks, flip, gripper, unnorm = 3, False, None, None
    else:
        from vlajax.envs.libero import make_libero_vector_env

        env_fn = functools.partial(make_libero_vector_env, args.suite, assets_dir=args.assets,
                                   image_size=args.image_size, max_episode_steps=args.max_steps)
        n_tasks, flip, gripper = 10, True, "libero"
        unnorm = args.suite if policy.dataset_statistics else None
    placement = Colocated.standalone(env_workers_per_node=args.workers, env_cpus_per_worker=n_cpus / args.workers)
    pool = SimPool(env_fn, num_envs=envs, num_stages=stages, placement=placement,
                   render_every_substep=args.render_every_substep, mujoco_gl=args.mujoco_gl)
    try:
        if args.pin:
            pin(pool)
        dec = PolicyDecoder(policy, prompt_len=64 if args.policy else 48, flip=flip, gripper=gripper,
                            unnorm_key=unnorm, capacity=pool.capacity)
        per_call = decode_times(dec, (args.image_size, args.image_size), args.temperature, key)
        load0 = f"{os.getloadavg()[0]:.2f}"
        n = pool.capacity
        tasks, states = np.arange(n) % n_tasks, np.arange(n) // n_tasks
        cfg = EngineConfig(temperature=args.temperature)
        serial_eng = RolloutEngine(pool, dec, dataclass_replace(cfg, pipelined=False))
        pipe_eng = RolloutEngine(pool, dec, cfg)
        pipe_eng.rollout(tasks, states, key=key)  # warm-up (first resets build the scenes)

        def run(eng):
            """One rollout, timed from its first step: the resets are issued and finished before
            (in training they overlap the learner's update via start_reset)."""
            eng.start_reset(tasks, states)
            eng.reset_ready()
            return eng.rollout(key=key)

        rows = {k: [] for k in ("serial", "pipelined", "sim", "decode", "busy", "busy_s", "sim_busy_s", "dec_busy_s")}
        ref = None
        for _ in range(args.rounds):
            a = run(serial_eng)
            b = run(pipe_eng)
            for other in (a,) + ((ref,) if ref is not None else ()):
                if not (np.array_equal(other.trajectories.actions_tokens, b.trajectories.actions_tokens)
                        and np.array_equal(other.trajectories.finish_step, b.trajectories.finish_step)):
                    print("WARNING: serial and pipelined trajectories differ")
            ref = b
            sim_eng = RolloutEngine(pool, ReplayDecoder(b, dec), cfg)
            c = run(sim_eng)
            assert np.array_equal(c.trajectories.finish_step, b.trajectories.finish_step)
            rows["serial"].append(a.stats.wall_s)
            rows["pipelined"].append(b.stats.wall_s)
            rows["sim"].append(c.stats.wall_s)
            rows["sim_busy_s"].append(float(np.mean(c.stats.sim_busy_s)))
            rows["decode"].append(decode_bound(dec, b, pool, args.temperature, key))
            rows["busy"].append(b.stats.sim_busy_fraction)
            rows["busy_s"].append(float(np.mean(b.stats.sim_busy_s)))
            rows["dec_busy_s"].append(sum(per_call[k] * v for k, v in b.stats.decode_buckets.items()))
        tr = ref.trajectories
        print(f"env={args.env} workers={args.workers} stages={stages} envs/stage={envs} "
              f"({n} trajectories) camera={args.image_size}px render_every_substep={args.render_every_substep} "
              f"max_steps={args.max_steps} policy={args.policy or f'small@{args.policy_image}px'} pin={args.pin} "
              f"cpus={n_cpus} renderer={pool.infos[0].get('renderer')}")
        print("decode seconds per call by batch size: " + ", ".join(f"{k}: {v * 1e3:.1f} ms" for k, v in per_call.items()))
        # Calls a stage made after the other stages of its actor had no running env left: there is
        # nothing to overlap them with (early-finished envs leave the batch).
        calls = tr.chunk_valid.sum(1).reshape(args.workers, stages, envs).max(-1)
        alone = int((calls.max(1) - np.sort(calls, 1)[:, -2]).sum()) if stages > 1 else int(calls.sum())
        print(f"stage calls with no other stage of the actor left to overlap: {alone} of {int(calls.sum())}")
        print(f"policy calls per rollout: {int(tr.chunk_valid.sum())}, env steps: {int(tr.finish_step.sum())}, "
              f"successes: {int(tr.success.sum())}, decode calls (pipelined): {ref.stats.decode_calls}; "
              f"load average before/after: {load0} / {os.getloadavg()[0]:.2f}")
        summary = {"stages": stages, "envs_per_stage": envs, "trajectories": n, "decode_s_per_call": per_call,
                   "env_steps": int(tr.finish_step.sum()), "per_round": rows}
        # Each loop's best round (other load on a shared machine only ever adds time), and medians.
        for name, agg in (("best", min), ("median", statistics.median)):
            m = {k: agg(v) for k, v in rows.items()}
            m["busy"] = max(rows["busy"]) if name == "best" else m["busy"]
            bound = max(m["sim"], m["decode"])
            which = "sim" if m["sim"] >= m["decode"] else "decode"
            dec_frac = m["dec_busy_s"] / m["pipelined"]
            print(f"{name} of {args.rounds} rounds (s/rollout): serial {m['serial']:.3f} | pipelined "
                  f"{m['pipelined']:.3f} ({m['serial'] / m['pipelined']:.2f}x serial) | sim bound {m['sim']:.3f} "
                  f"(actors busy {m['sim_busy_s']:.3f}) | decode bound {m['decode']:.3f}")
            print(f"  pipelined / max(sim, decode) = {m['pipelined'] / bound:.3f} ({which}-bound); "
                  f"sim busy fraction (pipelined) = {m['busy']:.3f} (busy {m['busy_s']:.3f} s); "
                  f"decoder busy fraction = {dec_frac:.3f} ({m['dec_busy_s']:.3f} s)")
            summary[name] = {**m, "ratio": m["pipelined"] / bound, "bound": which, "decoder_busy_fraction": dec_frac,
                             "env_steps_per_s": summary["env_steps"] / m["pipelined"]}
        ratios = [pl / max(si, de) for pl, si, de in zip(rows["pipelined"], rows["sim"], rows["decode"])]
        print(f"per-round pipelined / max(sim, decode): median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}); per-round busy fraction: median "
              f"{statistics.median(rows['busy']):.3f} (min {min(rows['busy']):.3f})")
        print("per round:", {k: [round(x, 3) for x in v] for k, v in rows.items()}, flush=True)
        return summary
    finally:
        pool.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", choices=("tabletop", "libero"), default="tabletop")
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--assets", default=None, help="LIBERO assets (else $VLAJAX_LIBERO_ASSETS)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--stages", default="2", help="pipeline stages per worker; a comma list runs each")
    p.add_argument("--envs", default="1", help="envs per stage per worker; a comma list pairs with --stages")
    p.add_argument("--max-steps", type=int, default=64)
    p.add_argument("--image-size", type=int, default=128, help="camera resolution")
    p.add_argument("--render-every-substep", action="store_true", help="render all 8 sub-steps of a chunk")
    p.add_argument("--policy-image", type=int, default=56, help="policy input resolution (small preset)")
    p.add_argument("--policy", default=None, help="checkpoint to decode with (HF or vlajax), bf16")
    p.add_argument("--mujoco-gl", default=None, help="egl | osmesa for the sim workers (default: as the env finds)")
    p.add_argument("--temperature", type=float, default=1.6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pin", action="store_true")
    p.add_argument("--json", default=None, help="write the summaries here")
    args = p.parse_args(argv)
    stages = [int(x) for x in args.stages.split(",")]
    envs = [int(x) for x in args.envs.split(",")]
    if len(envs) == 1:
        envs = envs * len(stages)
    n_cpus = len(os.sched_getaffinity(0))
    session = init_ray(num_cpus=n_cpus, log_to_driver=False)
    try:
        policy = load_policy(args)
        key = jax.random.key(0)
        out = [measure_layout(args, policy, s, e, key) for s, e in zip(stages, envs)]
    finally:
        session.shutdown()
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "layouts": out}, f, indent=1, default=str)


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


if __name__ == "__main__":
    main()
