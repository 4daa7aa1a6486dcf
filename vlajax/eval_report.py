"""Per-task success table of an evaluation: markdown (printed and saved), CSV, and a bar chart.

Input is one record per evaluated episode, so the same code serves `vlajax eval` (greedy rollouts
over a LIBERO suite's tasks and init states) and the final evaluation of a training run. Each task
row carries a Wilson 95% interval: with 50 init states per task, a difference of 10 points between
two checkpoints is often within noise, and the table should say so.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import textwrap
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from matplotlib.figure import Figure  # object API: no pyplot state, renders with Agg

__all__ = ["EpisodeResult", "TaskSummary", "EvalReport", "summarize", "overall", "wilson_interval",
           "to_markdown", "write_csv", "plot_success_bars", "write_eval_report"]

CSV_FIELDS = ("task", "episodes", "successes", "success_rate", "ci_low", "ci_high", "mean_length")
ALL = "all"


@dataclasses.dataclass(frozen=True)
class EpisodeResult:
    """One evaluated episode. length: env steps executed (success step included), if known."""

    task: str
    success: bool
    length: int | None = None
    state_id: int | None = None


@dataclasses.dataclass(frozen=True)
class TaskSummary:
    task: str
    episodes: int
    successes: int
    mean_length: float | None  # over episodes with a known length

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.episodes)


@dataclasses.dataclass(frozen=True)
class EvalReport:
    tasks: list[TaskSummary]
    overall: TaskSummary
    markdown: str
    paths: dict[str, Path]  # "markdown", "csv", "png", "episodes_csv"


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def _episode(e: EpisodeResult | Mapping[str, Any], i: int) -> EpisodeResult:
    if isinstance(e, EpisodeResult):
        return e
    if not isinstance(e, Mapping) or "task" not in e or "success" not in e:
        raise ValueError(f"episode {i}: needs 'task' and 'success', got {e!r}")
    length = e.get("length", e.get("episode_length", e.get("finish_step")))
    return EpisodeResult(task=str(e["task"]), success=bool(e["success"]),
                         length=None if length is None else int(length), state_id=e.get("state_id"))


def summarize(episodes: Iterable[EpisodeResult | Mapping[str, Any]]) -> list[TaskSummary]:
    """Per-task counts, tasks in order of first appearance (LIBERO's benchmark order when the
    episodes come in that order)."""
    acc: dict[str, list[EpisodeResult]] = {}
    for i, e in enumerate(episodes):
        ep = _episode(e, i)
        acc.setdefault(ep.task, []).append(ep)
    if not acc:
        raise ValueError("no episodes to summarize")
    out = []
    for task, eps in acc.items():
        lengths = [e.length for e in eps if e.length is not None]
        out.append(TaskSummary(task, len(eps), sum(e.success for e in eps),
                               sum(lengths) / len(lengths) if lengths else None))
    return out


def overall(tasks: Sequence[TaskSummary]) -> TaskSummary:
    """All episodes pooled (= the mean of the task rates when every task has as many episodes)."""
    n = sum(t.episodes for t in tasks)
    known = [(t.mean_length, t.episodes) for t in tasks if t.mean_length is not None]
    mean_len = sum(m * k for m, k in known) / sum(k for _, k in known) if known else None
    return TaskSummary(ALL, n, sum(t.successes for t in tasks), mean_len)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def to_markdown(tasks: Sequence[TaskSummary], title: str | None = None, notes: Sequence[str] = ()) -> str:
    """A GitHub-flavoured markdown table, one row per task and a final pooled row; `notes` (e.g. which
    initial states the episodes started from) are lines between the title and the table."""
    lines = [f"### {title}", ""] if title else []
    if notes:
        lines += [f"{n}  " for n in notes[:-1]] + [notes[-1], ""]  # two trailing spaces: a markdown line break
    lines += ["| task | episodes | successes | success rate | 95% CI | mean length |",
              "|---|---:|---:|---:|---|---:|"]
    for t, pooled in [(t, False) for t in tasks] + [(overall(tasks), True)]:
        name = f"**{ALL}**" if pooled else t.task.replace("|", r"\|")
        lo, hi = t.ci
        length = "" if t.mean_length is None else f"{t.mean_length:.1f}"
        lines.append(f"| {name} | {t.episodes} | {t.successes} | {_pct(t.success_rate)} | "
                     f"[{_pct(lo)}, {_pct(hi)}] | {length} |")
    return "\n".join(lines) + "\n"


def write_csv(tasks: Sequence[TaskSummary], path: str | os.PathLike) -> Path:
    """One row per task and a final "all" row; rates as fractions in [0, 1]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for t in list(tasks) + [overall(tasks)]:
            lo, hi = t.ci
            w.writerow([t.task, t.episodes, t.successes, f"{t.success_rate:.6f}", f"{lo:.6f}", f"{hi:.6f}",
                        "" if t.mean_length is None else f"{t.mean_length:.3f}"])
    return path


def plot_success_bars(tasks: Sequence[TaskSummary], path: str | os.PathLike, title: str | None = None) -> Path:
    """Horizontal bars of per-task success (%) with 95% intervals and the pooled rate as a line."""
    n = len(tasks)
    fig = Figure(figsize=(9, 1.2 + 0.42 * n), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    y = list(range(n))[::-1]  # first task at the top
    rates = [100 * t.success_rate for t in tasks]
    lo = [max(0.0, 100 * (t.success_rate - t.ci[0])) for t in tasks]  # >= 0 despite rounding
    hi = [max(0.0, 100 * (t.ci[1] - t.success_rate)) for t in tasks]
    ax.barh(y, rates, xerr=[lo, hi], color="#4C72B0", ecolor="#333333", capsize=3, height=0.65)
    for yi, t in zip(y, tasks):  # right of the interval, so that it never overlaps the error bar
        ax.text(100 * t.ci[1] + 1.5, yi, f"{t.successes}/{t.episodes}", va="center", fontsize=8)
    pooled = overall(tasks)
    ax.axvline(100 * pooled.success_rate, color="#C44E52", linestyle="--", linewidth=1.2)
    ax.set_yticks(y, ["\n".join(textwrap.wrap(t.task.replace("_", " "), 45)) or t.task for t in tasks], fontsize=8)
    ax.set_xlim(0, 112)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel(f"success rate (%) with 95% Wilson interval; dashed: all tasks "
                  f"{_pct(pooled.success_rate)} ({pooled.successes}/{pooled.episodes})")
    ax.grid(True, axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_eval_report(
    episodes: Iterable[EpisodeResult | Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    name: str = "eval",
    title: str | None = None,
    notes: Sequence[str] = (),
) -> EvalReport:
    """Write `<name>.md`, `<name>.csv`, `<name>.png` and `<name>_episodes.csv` into out_dir.

    episodes: `EpisodeResult`s or mappings with "task", "success" and optionally "length"
    (or "episode_length" / "finish_step") and "state_id".
    notes: lines printed under the title of the markdown table.
    """
    eps = [_episode(e, i) for i, e in enumerate(episodes)]
    tasks = summarize(eps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(tasks, title, notes)
    paths = {"markdown": out / f"{name}.md", "csv": out / f"{name}.csv", "png": out / f"{name}.png",
             "episodes_csv": out / f"{name}_episodes.csv"}
    paths["markdown"].write_text(md, encoding="utf-8")
    write_csv(tasks, paths["csv"])
    plot_success_bars(tasks, paths["png"], title)
    with open(paths["episodes_csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["task", "state_id", "success", "length"])
        for e in eps:
            w.writerow([e.task, "" if e.state_id is None else e.state_id, int(e.success),
                        "" if e.length is None else e.length])
    return EvalReport(tasks, overall(tasks), md, paths)
