"""Evaluation report: per-task counts in markdown and CSV match the episodes, Wilson intervals
match scipy, the bar chart is written."""

from __future__ import annotations

import collections
import csv

import numpy as np
import pytest

from vlajax import eval_report as R

TASKS = ["pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate",
         "open the top drawer | and put the bowl inside", "reach_red"]


def _episodes(seed=0):
    rng = np.random.default_rng(seed)
    eps = []
    for t, n, p in zip(TASKS, (50, 20, 7), (0.9, 0.35, 0.0)):
        for i in range(n):
            ok = bool(rng.uniform() < p)
            eps.append(R.EpisodeResult(t, ok, int(rng.integers(40, 512)), state_id=i))
    order = rng.permutation(len(eps))
    return [eps[i] for i in order]


def _expected(eps):
    n, k, lengths = collections.Counter(), collections.Counter(), collections.defaultdict(list)
    for e in eps:
        n[e.task] += 1
        k[e.task] += e.success
        lengths[e.task].append(e.length)
    return n, k, lengths


def test_csv_and_markdown_match_the_episodes(tmp_path):
    eps = _episodes()
    rep = R.write_eval_report(eps, tmp_path / "eval", name="libero_10", title="libero_10, step 30")
    n, k, lengths = _expected(eps)
    first_seen = list(dict.fromkeys(e.task for e in eps))
    assert [t.task for t in rep.tasks] == first_seen

    rows = list(csv.DictReader(open(rep.paths["csv"], newline="")))
    assert [r["task"] for r in rows] == first_seen + [R.ALL]
    for r in rows[:-1]:
        t = r["task"]
        assert (int(r["episodes"]), int(r["successes"])) == (n[t], k[t])
        assert float(r["success_rate"]) == pytest.approx(k[t] / n[t], abs=1e-6)
        assert float(r["mean_length"]) == pytest.approx(np.mean(lengths[t]), abs=1e-3)
        assert float(r["ci_low"]) <= k[t] / n[t] <= float(r["ci_high"])
    tot = rows[-1]
    assert (int(tot["episodes"]), int(tot["successes"])) == (len(eps), sum(e.success for e in eps))
    assert float(tot["mean_length"]) == pytest.approx(np.mean([e.length for e in eps]), abs=1e-3)
    assert rep.overall.success_rate == pytest.approx(sum(e.success for e in eps) / len(eps))

    md = rep.paths["markdown"].read_text()
    assert md == rep.markdown and md.startswith("### libero_10, step 30\n")
    lines = md.strip().splitlines()
    assert lines[2].startswith("| task | episodes | successes | success rate |")
    body = lines[4:]
    assert len(body) == len(first_seen) + 1 and body[-1].startswith(f"| **{R.ALL}** | {len(eps)} |")
    for line, t in zip(body, first_seen):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert cells[0] == t.replace("|", r"\|")  # a '|' in a task name does not break the table
        assert cells[1:4] == [str(n[t]), str(k[t]), f"{100 * k[t] / n[t]:.1f}%"]

    eps_rows = list(csv.DictReader(open(rep.paths["episodes_csv"], newline="")))
    assert len(eps_rows) == len(eps) and sum(int(r["success"]) for r in eps_rows) == sum(e.success for e in eps)


def test_bar_chart_png(tmp_path):
    from matplotlib.image import imread

    tasks = R.summarize(_episodes(1))
    png = R.plot_success_bars(tasks, tmp_path / "bars.png", title="libero_10")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    img = imread(png)
    assert img.shape[1] == 9 * 110 and abs(img.shape[0] - (1.2 + 0.42 * len(tasks)) * 110) <= 1
    assert img[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.parametrize("k,n", [(0, 7), (7, 7), (13, 20), (45, 50), (1, 1)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert R.wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_mapping_inputs_and_errors(tmp_path):
    eps = [{"task": "a", "success": 1, "finish_step": 10}, {"task": "a", "success": 0, "finish_step": 30},
           {"task": "b", "success": True}]
    tasks = R.summarize(eps)
    assert [(t.task, t.episodes, t.successes, t.mean_length) for t in tasks] == [("a", 2, 1, 20.0), ("b", 1, 1, None)]
    assert R.overall(tasks).mean_length == 20.0  # over episodes with a known length
    assert "| b | 1 | 1 | 100.0% |" in R.to_markdown(tasks)
    with pytest.raises(ValueError, match="no episodes"):
        R.summarize([])
    with pytest.raises(ValueError, match="episode 1: needs 'task' and 'success'"):
        R.summarize([{"task": "a", "success": 1}, {"task": "a"}])


def test_notes_go_between_title_and_table(tmp_path):
    notes = ["init states: LIBERO's 50 fixed states per task (ids 0..49 used)", "trained on: sampled states"]
    rep = R.write_eval_report(_episodes(), tmp_path, name="final", title="final evaluation", notes=notes)
    lines = rep.paths["markdown"].read_text().splitlines()
    assert lines[:5] == ["### final evaluation", "", notes[0] + "  ", notes[1], ""]
    assert lines[5].startswith("| task |")
