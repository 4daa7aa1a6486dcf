"""Metrics logging: JSONL and TensorBoard contents read back, resume purging, console line,
progress counters, the time breakdown, and the learning-curve PNG."""

from __future__ import annotations

import json
import math
import struct
import sys

import numpy as np
import pytest

from vlajax import metrics as M


def _records(n, rng, start=0):
    """Per-step metrics as a trainer would log them (numpy scalars, 0-d arrays, a nested dict)."""
    out = []
    for s in range(start, start + n):
        out.append({
            M.TRAIN_SUCCESS: np.float32(rng.uniform()),
            "actor": {"pg_loss": np.array(rng.normal()), "grad_norm": float(rng.uniform(0, 2))},
            M.ENV_STEPS_PER_S: int(rng.integers(100, 1000)),
            "train/all_failed": np.bool_(s % 2),
            **({M.VAL_SUCCESS: rng.uniform()} if s % 2 == 0 else {}),
        })
    return out


def _flat_expected(rec):
    return {k: float(v) for k, v in M.flatten_metrics(rec).items()}


def _tb_scalars(logdir, reader=None):
    """{tag: {step: value}} read back with TensorBoard's own reader, or, when tensorboard is not
    installed, by decoding the TFRecord files (no purge handling)."""
    try:
        if reader == "records":
            raise ImportError
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return _decode_event_files(logdir)
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _decode_event_files(logdir):
    M._summary_writer_cls()  # imports tensorboardX without torch
    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for f in sorted(logdir.glob("*tfevents*")):
        data, i = f.read_bytes(), 0
        while i < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack_from("<Q", data, i)
            ev = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


def test_jsonl_and_tensorboard_hold_what_was_logged(tmp_path, capsys):
    rng = np.random.default_rng(0)
    recs = _records(4, rng)
    with M.MetricsLogger(tmp_path, total_steps=4, config={"data": {"train_batch_size": 4}}) as log:
        for s, r in enumerate(recs):
            flat = log.log(s, r)
            assert flat == _flat_expected(r)
        log.log(4, {"actor/pg_loss": float("nan")})
    rows = [json.loads(line) for line in (tmp_path / M.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for row, r in zip(rows, recs):
        exp = _flat_expected(r)
        assert set(row) == {"step", "time"} | set(exp)
        for k, v in exp.items():
            assert row[k] == pytest.approx(v, rel=1e-7)
    assert rows[4]["actor/pg_loss"] is None  # NaN -> null (strict JSON)

    for reader in ("tensorboard", "records"):
        tb = _tb_scalars(tmp_path / M.TENSORBOARD_DIR, reader)
        for s, r in enumerate(recs):
            for k, v in _flat_expected(r).items():
                assert tb[k][s] == pytest.approx(v, rel=1e-6), (k, s)
        assert math.isnan(tb["actor/pg_loss"][4])
        assert set(tb[M.VAL_SUCCESS]) == {0, 2}

    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and out[0].startswith("step 0/4 | success ")
    assert f"success {float(recs[2][M.TRAIN_SUCCESS]):.3f}" in out[2] and "val " in out[2] and "val " not in out[1]


def test_resume_drops_steps_past_the_checkpoint(tmp_path):
    rng = np.random.default_rng(1)
    with M.MetricsLogger(tmp_path, backends=("tensorboard", "jsonl")) as log:
        for s, r in enumerate(_records(6, rng)):
            log.log(s, r)
    # the process died after step 5 with its last checkpoint at step 2: the next one starts at 3
    resumed = _records(2, rng, start=3)
    with M.MetricsLogger(tmp_path, backends=("tensorboard", "jsonl"), start_step=3) as log:
        for s, r in zip((3, 4), resumed):
            log.log(s, r)
    rows = M.read_metrics(tmp_path / M.METRICS_FILE)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    raw_steps = [json.loads(x)["step"] for x in (tmp_path / M.METRICS_FILE).read_text().splitlines()]
    assert raw_steps == [0, 1, 2, 3, 4]
    assert rows[3][M.TRAIN_SUCCESS] == pytest.approx(float(resumed[0][M.TRAIN_SUCCESS]))
    pytest.importorskip("tensorboard", reason="the purge on resume is applied by TensorBoard's reader")
    tb = _tb_scalars(tmp_path / M.TENSORBOARD_DIR)[M.TRAIN_SUCCESS]
    assert sorted(tb) == [0, 1, 2, 3, 4]
    assert tb[4] == pytest.approx(float(resumed[1][M.TRAIN_SUCCESS]), rel=1e-6)


def test_read_metrics_keeps_the_last_record_of_a_step(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "a": 1}\n{"step": 0, "a": 0}\n\n{"step": 1, "a": 2}\n')
    assert M.read_metrics(p) == [{"step": 0, "a": 0}, {"step": 1, "a": 2}]
    p.write_text('{"step": 0}\nnot json\n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        M.read_metrics(p)


def test_bad_metrics_and_backends_are_named(tmp_path, monkeypatch):
    with M.MetricsLogger(tmp_path, backends=("jsonl",)) as log:
        with pytest.raises(ValueError, match="'actor/logits'.*shape \\(3,\\)"):
            log.log(0, {"actor": {"logits": np.zeros(3)}})
        with pytest.raises(ValueError, match="'note'"):
            log.log(0, {"note": "hello"})
    with pytest.raises(ValueError, match="'mlflow'"):
        M.MetricsLogger(tmp_path, backends=("console", "mlflow"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    with pytest.raises(RuntimeError, match="pip install wandb"):
        M.MetricsLogger(tmp_path, backends=("wandb",))


def test_timer_breakdown_with_a_stepped_clock():
    t = [0.0]
    timer = M.Timer(clock=lambda: t[0])
    timer.start()
    with timer("reset"):
        t[0] += 1.0
    with timer("decode"):
        t[0] += 2.0
    t[0] += 4.0  # unaccounted -> idle
    timer.add("sim", 3.0)  # measured in a worker
    with timer("update"):
        t[0] += 3.0
    with pytest.raises(RuntimeError, match="'update'"):
        with timer("update"):
            with timer("update"):
                pass
    b = timer.breakdown()
    wall = 10.0
    expect = {"reset": 1.0, "decode": 2.0, "sim": 3.0, "update": 3.0, "checkpoint": 0.0}
    expect["idle"] = wall - sum(expect.values())
    assert b["timing/step_s"] == wall
    for p, s in expect.items():
        assert b[f"timing/{p}_s"] == pytest.approx(s) and b[f"timing/{p}_frac"] == pytest.approx(s / wall)
    assert set(b) == {"timing/step_s"} | {f"timing/{p}_{x}" for p in M.PHASES for x in ("s", "frac")}
    timer.start()
    t[0] += 1.0
    assert timer.breakdown(prefix="")["idle_s"] == 1.0
    with pytest.raises(ValueError, match="'sim'"):
        timer.add("sim", -1.0)


def test_progress_counts_success_and_env_steps():
    with M.Progress(total=24, desc="rollout", disable=True) as bar:
        bar.update(8, successes=2, env_steps=512)
        bar.update(16, successes=10, env_steps=1024, loss=np.float32(0.5))
        assert (bar.successes, bar.episodes, bar.env_steps) == (12, 24, 1536)
        assert bar.success_rate == 12 / 24 and bar.env_steps_per_s > 0
        assert bar.extra == {"loss": 0.5}
        bar.update(1, successes=1, episodes=4)  # several episodes per tick
        assert bar.episodes == 28


def test_learning_curve_png(tmp_path):
    from matplotlib.image import imread

    rng = np.random.default_rng(2)
    with M.MetricsLogger(tmp_path, backends=("jsonl",)) as log:
        for s, r in enumerate(_records(12, rng)):
            log.log(s, r)
    png = M.plot_learning_curve(tmp_path / M.METRICS_FILE, tmp_path / "plots" / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    h, w, _ = imread(png).shape
    assert (w, h) == (7 * 120, round(4.2 * 120))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"step": 0, "actor/pg_loss": 0.1}\n')
    with pytest.raises(ValueError, match="train/success_rate"):
        M.plot_learning_curve(empty, tmp_path / "x.png")
