"""Per-step metrics of a run: TensorBoard, a JSONL file, the console, and W&B when asked for;
progress bars for rollouts and updates; a time breakdown; the learning-curve plot.

Metric names are flat "group/name" strings (TensorBoard groups by the first part). The names this
module gives meaning to (the console line, the plot) are the constants below; everything else is
logged as given. A per-task success rate goes under `<TRAIN_SUCCESS>/<task name>`.

The run directory gets `metrics.jsonl` (one JSON object per step: `step`, `time`, then the metrics;
non-finite values are written as null) and `tensorboard/` (event files).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure  # object API: no pyplot state, renders with Agg
from tqdm import tqdm

__all__ = [
    "MetricsLogger", "Progress", "Timer", "plot_learning_curve", "read_metrics", "flatten_metrics",
    "TRAIN_SUCCESS", "VAL_SUCCESS", "EPISODE_LENGTH", "ENV_STEPS_PER_S", "POLICY_TFLOPS", "PHASES",
    "METRICS_FILE", "TENSORBOARD_DIR", "BACKENDS",
]

TRAIN_SUCCESS = "train/success_rate"  # rollouts of the step, before dynamic-sampling filtering
VAL_SUCCESS = "val/success_rate"  # validation (greedy unless val_kwargs.do_sample)
EPISODE_LENGTH = "train/episode_length"  # env steps, success step included
ENV_STEPS_PER_S = "perf/env_steps_per_s"
POLICY_TFLOPS = "perf/policy_tflops"
PHASES = ("reset", "sim", "decode", "update", "checkpoint", "idle")  # `Timer` breakdown, always reported
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
BACKENDS = ("console", "tensorboard", "jsonl", "wandb")

# (key, label, format) of the one-line console summary, in order; absent keys are skipped.
CONSOLE_FIELDS = (
    (TRAIN_SUCCESS, "success", "{:.3f}"),
    (VAL_SUCCESS, "val", "{:.3f}"),
    ("actor/pg_loss", "pg_loss", "{:+.4f}"),
    ("actor/grad_norm", "grad", "{:.3g}"),
    ("actor/clipfrac", "clip", "{:.3f}"),
    (EPISODE_LENGTH, "len", "{:.1f}"),
    (ENV_STEPS_PER_S, "env/s", "{:.0f}"),
    ("timing/step_s", "s/step", "{:.1f}"),
)


def _scalar(key: str, value: Any) -> float:
    """A Python float from a number, bool, or a 1-element numpy/jax array; anything else is an error."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, numbers.Number):
        return float(value)
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - report what it was
        arr = None
    if arr is None or arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        shape = getattr(arr, "shape", None)
        raise ValueError(f"metric {key!r} must be a scalar number, got {type(value).__name__}"
                         + (f" of shape {shape}" if shape is not None else ""))
    return float(arr.reshape(()))


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested mappings -> flat {"a/b": float}; values must be scalars (see `_scalar`)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, key + "/"))
        else:
            out[key] = _scalar(key, v)
    return out


class MetricsLogger:
    """Writes one dict of scalars per training step to the chosen backends.

    Args:
      run_dir: the run directory (created).
      backends: any of "console", "tensorboard", "jsonl", "wandb" (`trainer.logger`).
      wandb_project: W&B project (only with "wandb"); default "vlajax".
      experiment_name: TensorBoard text / W&B run name.
      config: the run config as a nested dict (`vlajax.config.to_dict`): W&B config and a
        TensorBoard text entry.
      start_step: the first step this process logs. Records at or after it, left by an earlier
        process that ran past its last checkpoint, are dropped from metrics.jsonl and purged from
        TensorBoard, so a resumed run's curves have no duplicate steps.
      total_steps: shown in the console line ("step 12/60").
      console_every: print the console line every this many steps.

    Use as a context manager or call `close()`.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        backends: Sequence[str] = ("console", "tensorboard", "jsonl"),
        wandb_project: str | None = None,
        *,
        experiment_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        start_step: int = 0,
        total_steps: int | None = None,
        console_every: int = 1,
    ):
        if isinstance(backends, str):
            backends = (backends,)
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"unknown metrics backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.backends = tuple(backends)
        self.total_steps = total_steps
        self.console_every = max(1, int(console_every))
        self._tb = self._jsonl = self._wandb = None
        if "wandb" in self.backends:
            self._wandb = self._start_wandb(wandb_project or "vlajax", experiment_name, config)
        if "jsonl" in self.backends:
            path = self.run_dir / METRICS_FILE
            _truncate_jsonl(path, start_step)
            self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if "tensorboard" in self.backends:
            SummaryWriter = _summary_writer_cls()
            # tensorboardX names event files by the second; a suffix that sorts in time keeps a run
            # resumed within the same second from overwriting (or sorting before) the earlier file.
            self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR),
                                     purge_step=start_step if start_step > 0 else None, flush_secs=30,
                                     filename_suffix=f".{time.time_ns()}")
            if config is not None and start_step == 0:
                self._tb.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def _start_wandb(self, project: str, name: str | None, config):
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                "trainer.logger includes 'wandb' but the wandb package is not installed: "
                "pip install wandb (or drop 'wandb' from trainer.logger)") from None
        return wandb.init(project=project, name=name, dir=str(self.run_dir),
                          config=dict(config) if config is not None else None, resume="allow")

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Log the scalars of one step (nested mappings are flattened with "/"); returns them flat."""
        flat = flatten_metrics(metrics)
        step = int(step)
        now = time.time()
        if self._jsonl is not None:
            rec = {"step": step, "time": round(now, 3)}
            rec.update({k: (v if math.isfinite(v) else None) for k, v in flat.items()})
            self._jsonl.write(json.dumps(rec) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in flat.items():
                self._tb.add_scalar(k, v, step, walltime=now)
        if self._wandb is not None:
            self._wandb.log(flat, step=step)
        if "console" in self.backends and step % self.console_every == 0:
            _write_console(self.format_console(step, flat))
        return flat

    def format_console(self, step: int, flat: Mapping[str, float]) -> str:
        """The compact one-line summary printed per step."""
        head = f"step {step}" + (f"/{self.total_steps}" if self.total_steps else "")
        parts = [head]
        for key, label, fmt in CONSOLE_FIELDS:
            if key in flat:
                v = flat[key]
                parts.append(f"{label} {fmt.format(v) if math.isfinite(v) else v}")
        if len(parts) == 1:  # none of the known keys: show the first few
            parts += [f"{k} {v:.4g}" for k, v in list(flat.items())[:6]]
        return " | ".join(parts)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _summary_writer_cls():
    """tensorboardX's SummaryWriter, imported without importing torch.

    tensorboardX.writer does `try: import torch` at import time only to accept torch tensors. With
    torch installed (the test extra, many GPU machines) that costs ~5 s and ~0.5 GB in the training
    process and loads torch's CUDA libraries next to JAX's. We log Python floats only, so the import
    runs with torch masked as absent (unless torch is already imported, which costs nothing more).
    """
    if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _write_console(line: str) -> None:
    tqdm.write(line, file=sys.stdout)  # does not tear an active progress bar


def _truncate_jsonl(path: Path, start_step: int) -> None:
    """Keep only records with step < start_step (atomic rewrite)."""
    if not path.exists():
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                if int(json.loads(line)["step"]) < start_step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a crash
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    tmp.replace(path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl sorted by step; for a step logged twice the later record wins."""
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not a metrics record ({e})") from None
    return [by_step[s] for s in sorted(by_step)]


# --------------------------------------------------------------------------------------------------
# Progress and timing
# --------------------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar for rollouts or updates that shows the running success rate and env steps/s.

        with Progress(total=32, desc="rollout", unit="traj") as bar:
            ...
            bar.update(8, successes=3, env_steps=512)     # 8 episodes finished, 3 succeeded

    `update(n, successes=, episodes=, env_steps=, **extra)`: n advances the bar; episodes defaults
    to n when successes is given; extra scalars (e.g. loss=) are shown as they are.
    disable=None hides the bar when stderr is not a terminal (CI logs stay clean).
    """

    def __init__(self, total: int | None, desc: str = "rollout", unit: str = "traj", *,
                 disable: bool | None = None, leave: bool = False):
        self._bar = tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=leave, dynamic_ncols=True)
        self._t0 = time.perf_counter()
        self.successes = 0
        self.episodes = 0
        self.env_steps = 0
        self.extra: dict[str, float] = {}

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else float("nan")

    @property
    def env_steps_per_s(self) -> float:
        dt = time.perf_counter() - self._t0
        return self.env_steps / dt if dt > 0 else 0.0

    def update(self, n: int = 1, *, successes: int | None = None, episodes: int | None = None,
               env_steps: int = 0, **extra: float) -> None:
        if successes is not None:
            self.successes += int(successes)
            self.episodes += int(n if episodes is None else episodes)
        self.env_steps += int(env_steps)
        self.extra.update({k: _scalar(k, v) for k, v in extra.items()})
        post = {}
        if self.episodes:
            post["success"] = f"{self.success_rate:.2f}"
        if self.env_steps:
            post["env/s"] = f"{self.env_steps_per_s:.0f}"
        post.update({k: f"{v:.4g}" for k, v in self.extra.items()})
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Timer:
    """Wall-time breakdown of a training step into phases (reset, sim, decode, update, checkpoint,
    idle, or any other name).

        timer = Timer()
        timer.start()                       # beginning of a step
        with timer("update"): ...
        timer.add("sim", seconds_measured_in_a_worker)
        metrics.update(timer.breakdown())   # {"timing/update_s": .., "timing/update_frac": .., ...}

    Fractions are of the step's wall time (start() to breakdown()). Phases timed in this process
    with `with timer(...)` are disjoint unless nested; times added with `add` (e.g. simulator time
    reported by a worker) may overlap others, so fractions can sum above 1 in a pipelined rollout.
    "idle", unless recorded explicitly, is the wall time no phase accounts for (>= 0).
    """

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self.start()

    def start(self) -> None:
        self._t0 = self._clock()
        self._acc: dict[str, float] = {}
        self._concurrent: set[str] = set()  # phases that ran beside this process (not in "idle"'s sum)
        self._open: set[str] = set()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if phase in self._open:
            raise RuntimeError(f"Timer phase {phase!r} is already being timed (nested twice)")
        self._open.add(phase)
        t = self._clock()
        try:
            yield
        finally:
            self._open.discard(phase)
            self.add(phase, self._clock() - t)

    def add_phases(self, other: "Timer", *, concurrent: bool = True) -> None:
        """Another timer's phases (e.g. a rollout that ran on a thread during this step's update)."""
        for phase, seconds in other._acc.items():
            self.add(phase, seconds, concurrent=concurrent or phase in other._concurrent)

    def add(self, phase: str, seconds: float, *, concurrent: bool = False) -> None:
        """`concurrent`: work done elsewhere while this process did other things (simulators stepping
        during decodes); reported, but not subtracted from the wall time to get "idle"."""
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError(f"Timer phase {phase!r}: seconds must be finite and >= 0, got {seconds}")
        self._acc[phase] = self._acc.get(phase, 0.0) + float(seconds)
        if concurrent:
            self._concurrent.add(phase)

    @property
    def seconds(self) -> dict[str, float]:
        return dict(self._acc)

    def breakdown(self, prefix: str = "timing/") -> dict[str, float]:
        """{prefix+phase+"_s", prefix+phase+"_frac"} for every standard and recorded phase, and
        prefix+"step_s" (wall time since start())."""
        wall = self._clock() - self._t0
        acc = dict(self._acc)
        if "idle" not in acc:
            acc["idle"] = max(0.0, wall - sum(v for k, v in acc.items() if k not in self._concurrent))
        out = {f"{prefix}step_s": wall}
        for phase in list(PHASES) + [p for p in acc if p not in PHASES]:
            s = acc.get(phase, 0.0)
            out[f"{prefix}{phase}_s"] = s
            out[f"{prefix}{phase}_frac"] = s / wall if wall > 0 else 0.0
        return out


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------


def plot_learning_curve(
    metrics_jsonl: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    keys: Iterable[tuple[str, str]] = (
        (TRAIN_SUCCESS, "train (sampled rollouts)"), (VAL_SUCCESS, "validation (greedy)")),
    title: str | None = None,
) -> Path:
    """Success rate (train and validation) vs training step, as a PNG. Returns its path.

    Raises ValueError naming the keys if the file has none of them.
    """
    records = read_metrics(metrics_jsonl)
    keys = list(keys)
    series = []
    for key, label in keys:
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            series.append((key, label, pts))
    if not series:
        raise ValueError(f"{metrics_jsonl} has no values for {', '.join(k for k, _ in keys)}: nothing to plot")
    fig = Figure(figsize=(7, 4.2), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for i, (key, label, pts) in enumerate(series):
        x, y = zip(*pts)
        ax.plot(x, y, marker="o" if i else ".", markersize=5 if i else 3, linewidth=1.5 if i else 1.0, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or f"learning curve ({Path(metrics_jsonl).parent.name})")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def resource_metrics() -> dict:
    """Peak accelerator memory (GB, largest over the local devices; absent on CPU) and this process's
    peak resident memory (GB; the simulators' processes not included)."""
    out = {"perf/host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    import jax  # the accelerator's own counters; metrics.py imports no jax at load

    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    if any(p is not None for p in peaks):
        out["perf/device_peak_gb"] = max(p or 0 for p in peaks) / 1e9
    return out
