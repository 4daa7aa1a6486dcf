"""The `vlajax` command: `train` (config-driven GRPO runs), `sft` (supervised fine-tuning on
demonstrations), `eval` (greedy success tables),
`convert` (HF <-> vlajax checkpoints), `demos` (scripted-expert demonstrations) and `demo` (the
untrained policy on the built-in task).

Each subcommand imports its own stack (JAX, Ray, simulators) when it runs, so `vlajax --help` and a
mistyped argument answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from vlajax import stopping
from vlajax.config import ConfigError
from vlajax.model.family import family_names

TRACEBACK_ENV = "VLAJAX_TRACEBACK"  # "1": errors also print their traceback


def _absolute(path: str | None) -> Path | None:
    """A user-given path made absolute once, where the command line is read (orbax refuses
    relative paths)."""
    return None if path is None else Path(os.path.abspath(os.path.expanduser(path)))


def _convert(args) -> int:
    from vlajax.model.family import get_family

    print(get_family(args.family).convert(_absolute(args.src), _absolute(args.dst), args.to, dtype=args.dtype,
                                          export_dtype=args.export_dtype))
    return 0


def _demo(args) -> int:
    from vlajax.demo import run_demo

    return run_demo(episodes=args.episodes, num_envs=args.num_envs, seed=args.seed)


def _train(args) -> int:
    from vlajax.config import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # `vlajax train key=value ...`: no config named
        config, overrides = None, [config] + overrides
    cfg = load_config(config, overrides)
    if cfg.trainer.nnodes > 1:  # one trainer process per node: launch them, or be one of them
        from vlajax.distributed.launch import in_multiprocess_job

        if not in_multiprocess_job():
            return _launch(([config] if config is not None else []) + overrides, cfg)
    job = _join(cfg.trainer.nnodes)
    from vlajax.train import train

    try:
        res = train(cfg, job)
    except (KeyboardInterrupt, stopping.Terminated) as e:
        print(f"vlajax train: stopped by {stopping.name(e)}; {_resume_hint(cfg)}", file=sys.stderr, flush=True)
        return stopping.exit_code(e)
    except Exception as e:
        if job.lost_peer(e):  # say which process was lost (the watchdog does), not gloo's anonymous error
            job.await_peer_verdict()
        raise
    fe = res.final_eval or {}
    if res.primary:  # one summary per job
        print(f"run directory: {res.run_dir} ({res.steps} steps); final greedy success rate "
              f"{fe.get('success_rate', float('nan')):.2f}; learning curve: {res.run_dir / 'learning_curve.png'}")
    return 0


def _resume_hint(cfg) -> str:
    """Where a stopped run continues from: its latest committed checkpoint (the run has unwound, so a
    save in flight has finished or was discarded)."""
    from vlajax.rl.checkpoint import latest_committed_step

    root = cfg.run_dir / "checkpoints"
    step = latest_committed_step(root)
    if step is None:
        return f"no checkpoint was written in {cfg.run_dir}: the same command starts the run again from step 0"
    return (f"the same command (trainer.resume=auto) resumes from {root / str(step)} "
            f"(step {step} of {cfg.trainer.total_training_steps})")


def _launch(argv: list[str], cfg) -> int:
    """`vlajax train ... trainer.nnodes=N` on the head node of a Ray cluster: N trainer processes,
    one per node, each running this same command as a launched child (vlajax.distributed.launch)."""
    from vlajax.distributed.launch import LaunchError, launch_train

    try:
        res = launch_train(argv, cfg.trainer.nnodes, cfg.ray.address)
    except LaunchError as e:
        print(f"vlajax train: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"vlajax train: {len(res.exit_codes)} trainer processes finished (nodes {', '.join(res.node_ips)}; "
          f"coordinator {res.coordinator})")
    return 0


def _join(nnodes: int):
    """Join this process's job (a launcher's child, SLURM's srun, JAX_* variables; one process: a
    no-op) before anything touches JAX's backend, and say where a multi-process job's process stands,
    so that the cluster can be checked from the logs."""
    import socket

    import jax

    from vlajax.distributed.job import Job

    job = Job.join()
    if not job.multi:
        return job
    # stderr: a Ray launch shows every process's stderr (stdout: process 0's only)
    print(f"vlajax: process {jax.process_index()} of {jax.process_count()} on {socket.gethostname()}, "
          f"devices local {jax.local_device_count()} / global {jax.device_count()}", file=sys.stderr, flush=True)
    if job.num_processes != nnodes:
        print(f"vlajax train: warning: trainer.nnodes={nnodes} but the job has {job.num_processes} processes "
              f"(one per node expected)", file=sys.stderr, flush=True)
    return job


def _demos(args) -> int:
    from vlajax.config import load_config
    from vlajax.demos import make_demos

    cfg = load_config(args.config, list(args.overrides))
    tasks = [int(t) for t in args.tasks.split(",") if t] if args.tasks else None
    out = _absolute(args.out)
    try:
        make_demos(cfg, out, per_task=args.per_task, tasks=tasks, max_attempts=args.max_attempts,
                   progress_bar=not args.no_progress)
    except KeyboardInterrupt:
        print(f"vlajax demos: interrupted; the finished episodes are kept in {out / cfg.env.train.task_suite_name}: "
              f"rerun the same command to continue", file=sys.stderr)
        return 130
    return 0


def _sft(args) -> int:
    from vlajax.config import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # `vlajax sft key=value ...`: the packaged sft_libero
        config, overrides = None, [config] + overrides
    # the config (model path first) is checked before any data is read or anything starts
    cfg = load_config(config or "sft_libero", overrides, purpose="sft")
    from vlajax.sft import sft

    try:
        res = sft(cfg)
    except KeyboardInterrupt:  # sft() said what it kept
        return 130
    print(f"run directory: {res.run_dir} ({res.steps} steps); policy for `vlajax train ... "
          f"actor_rollout_ref.model.path=`: {res.export_dir}")
    return 0


def _eval(args) -> int:
    from vlajax.evaluate import run_eval

    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    res = run_eval(_absolute(args.checkpoint), suite=args.suite, trials=args.trials, tasks=tasks,
                   out_dir=_absolute(args.out),
                   video=args.video, step=args.step, temperature=args.temperature, overrides=list(args.overrides))
    print(res.report.markdown)
    print(f"written: {', '.join(str(p) for p in res.report.paths.values())}"
          + (f"; videos in {res.out_dir / 'videos'}" if args.video else ""))
    return 0


# cuBLAS instead of XLA's Triton GEMMs: measured on an H200 +3.6% for the 7B forward at batch 32 and +4%
# for the full-parameter update (benchmarks/RESULTS.md); ignored on CPU. Set before jax starts its backend.
DEFAULT_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


def _default_xla_flags() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in DEFAULT_XLA_FLAGS if f.split("=")[0] not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags] + extra).strip()


def _default_compilation_cache() -> None:
    """JAX's persistent compilation cache, on unless $JAX_COMPILATION_CACHE_DIR says where: a resumed or
    relaunched run loads the programs (update, decode) an earlier process compiled instead of compiling
    them again (a minute each for the 7B). Default folder: $XDG_CACHE_HOME/vlajax/jax (~/.cache)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlajax" / "jax"
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    if "jax" in sys.modules:  # imported already (a caller of `main`): its config was read at import
        sys.modules["jax"].config.update("jax_compilation_cache_dir", str(folder))


def _quiet_abandoned_calls() -> None:
    """Ray prints an 'Unhandled error' traceback for each failed call whose result nobody fetched. The
    rollout fetches every call it waits for; the ones it abandons (a hung simulator's, replaced by a
    restart, or those in flight when a run stops) failing is expected, and the reason is already the
    error or warning vlajax printed."""
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")


def _one_line_errors() -> tuple[type[BaseException], ...]:
    """The errors printed as one line: bad input or files (ConfigError is a ValueError; OSError covers
    missing files, a damaged checkpoint (CheckpointReadError), an unreachable cluster (ConnectionError)),
    a rollout that cannot go on (RolloutError) and a simulator that cannot start or run (EnvError, GL
    set-up included), when their modules are loaded: the CLI imports nothing heavy up front."""
    loaded = [(sys.modules.get(m), name) for m, name in (("vlajax.rl.rollout_buffer", "RolloutError"),
                                                         ("vlajax.envs.base", "EnvError"))]
    return (OSError, ValueError, KeyError) + tuple(getattr(m, name) for m, name in loaded if m is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlajax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face OpenVLA-OFT directory to a vlajax checkpoint or back")
    c.add_argument("--family", default="oft", choices=family_names(), help="policy family (default oft)")
    c.add_argument("src", help="HF directory (config.json + safetensors) or vlajax policy checkpoint")
    c.add_argument("dst", help="output directory")
    c.add_argument("--to", choices=["vlajax", "hf"], default=None,
                   help="target format (default: the other one than src)")
    c.add_argument("--dtype", default="float32", help="parameter dtype held in memory/saved by vlajax")
    c.add_argument("--export-dtype", default=None,
                   help="dtype of exported HF tensors (default: each tensor's original dtype)")
    c.set_defaults(fn=_convert)

    t = sub.add_parser("train", help="GRPO training run from a config (default: the embedded demo)")
    t.add_argument("config", nargs="?", default=None,
                   help="YAML file or packaged config name (demo, libero_grpo, libero_grpo_disagg); default demo")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.total_training_steps=10")
    t.set_defaults(fn=_train)

    f = sub.add_parser("sft", help="supervised fine-tuning on LIBERO demonstrations (default config: sft_libero)")
    f.add_argument("config", nargs="?", default=None,
                   help="YAML file or packaged config name (default sft_libero)")
    f.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.train_files=demos/libero_spatial")
    f.set_defaults(fn=_sft)

    e = sub.add_parser("eval", help="evaluation of a checkpoint over a suite's tasks and init states")
    e.add_argument("checkpoint", help="training run directory (config.yaml + checkpoints/), vlajax policy "
                                      "checkpoint or Hugging Face OpenVLA-OFT directory")
    e.add_argument("--suite", default=None, help="libero_spatial | libero_object | libero_goal | libero_10 | "
                                                 "libero_90 | tabletop | isaac_*; default: the run's suite")
    e.add_argument("--trials", type=int, default=None,
                   help="init states per task (default: all 50 for LIBERO, data.val_num_trials_per_task else)")
    e.add_argument("--tasks", default=None, help="comma list of task ids or names (default: all)")
    e.add_argument("--step", type=int, default=None, help="training step of a run directory (default: latest)")
    e.add_argument("--out", default=None, help="output directory (default: <run>/eval or ./eval/<suite>)")
    e.add_argument("--video", action="store_true", help="write one mp4 per episode under <out>/videos")
    e.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: the config's actor_rollout_ref.rollout.val_kwargs (LIBERO recipe: greedy)")
    e.add_argument("overrides", nargs="*", help="config overrides, e.g. env.train.num_envs=4 ray.address=auto")
    e.set_defaults(fn=_eval)

    m = sub.add_parser("demos", help="demonstrations by the simulator's scripted expert (LIBERO HDF5 files)")
    m.add_argument("config", help="YAML file or packaged config name whose env section names the suite "
                                  "(e.g. libero_grpo env.train.task_suite_name=libero_spatial)")
    m.add_argument("overrides", nargs="*", help="config overrides, e.g. env.train.num_envs=8")
    m.add_argument("--out", default="demos", help="output folder; files go to <out>/<suite>/<task>_demo.hdf5")
    m.add_argument("--per-task", type=int, default=50, help="successful episodes to keep per task")
    m.add_argument("--tasks", default=None, help="comma list of task ids (default: all)")
    m.add_argument("--max-attempts", type=int, default=None, help="attempts per task at most (default 4 x --per-task)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(fn=_demos)

    d = sub.add_parser("demo", help="run the small preset policy (untrained) on the built-in tabletop task")
    d.add_argument("--episodes", type=int, default=2)
    d.add_argument("--num-envs", type=int, default=2)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_demo)

    _default_xla_flags()
    _default_compilation_cache()
    _quiet_abandoned_calls()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also follow the options (`vlajax eval RUN --trials 5 env.train.num_envs=4`)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    restore_signals = stopping.install()  # Ctrl-C and SIGTERM unwind the run (vlajax.stopping)
    try:
        return args.fn(args)
    except _one_line_errors() as e:
        if os.environ.get(TRACEBACK_ENV) == "1":
            traceback.print_exc()
        print(f"vlajax {args.command}: error: {e}", file=sys.stderr)
        if not isinstance(e, ConfigError) and os.environ.get(TRACEBACK_ENV) != "1":
            print(f"(set {TRACEBACK_ENV}=1 to see where it was raised)", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, stopping.Terminated) as e:  # one line, not the traceback of wherever it landed
        print(f"vlajax {args.command}: stopped by {stopping.name(e)}", file=sys.stderr, flush=True)
        return stopping.exit_code(e)
    finally:
        restore_signals()


if __name__ == "__main__":
    sys.exit(main())
