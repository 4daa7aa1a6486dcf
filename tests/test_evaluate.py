"""`vlajax eval` on a real training run and on a saved policy checkpoint (real Ray simulators, MuJoCo
tabletop task, orbax checkpoints), the new training options it exercises (proprio token, from-scratch
init, lr warm-up), and a run stopped with SIGTERM leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import psutil
import pytest

from tests.conftest import TINY_RUN, csv_rows
from vlajax.cli import main as cli_main
from vlajax.config import load_config
from vlajax.train import train

REPO = Path(__file__).resolve().parents[1]
RUN = TINY_RUN + ["actor_rollout_ref.actor.use_proprio=true", "actor_rollout_ref.model.init_scheme=scratch",
                  "actor_rollout_ref.actor.optim.lr=1e-3", "actor_rollout_ref.actor.optim.lr_warmup_steps=4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step run of the small policy with a proprio token, scratch init and lr warm-up."""
    d = tmp_path_factory.mktemp("evalrun") / "run"
    res = train(load_config(None, RUN + ["trainer.total_training_steps=2", f"trainer.default_local_dir={d}"]))
    assert res.steps == 2
    # lr warm-up: 1e-3 * (step + 1) / 4 in training steps 0 and 1
    assert [round(m["actor/lr"], 9) for m in res.history] == [2.5e-4, 5e-4]
    return d


def test_learning_rate_warms_up_linearly_then_stays():
    cfg = load_config("demo", ["actor_rollout_ref.actor.optim.lr=1e-3", "actor_rollout_ref.actor.optim.lr_warmup_steps=4"])
    optim = cfg.actor_rollout_ref.actor.optim
    assert [optim.learning_rate(s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    no_warmup = ["actor_rollout_ref.actor.optim.lr=2e-4", "actor_rollout_ref.actor.optim.lr_warmup_steps=0"]
    assert load_config("demo", no_warmup).actor_rollout_ref.actor.optim.learning_rate(0) == 2e-4


def test_eval_of_a_training_run(run_dir, capsys):
    assert cli_main(["eval", str(run_dir), "--trials", "2", "--video"]) == 0
    out = capsys.readouterr().out
    # the demo config validates greedily (val_kwargs), as the recipe does
    assert "greedy success on tabletop_anchored" in out and "| **all** | 6 |" in out
    ev = run_dir / "eval"
    rows = csv_rows(ev / "tabletop_anchored_step2.csv")
    assert [r["task"] for r in rows] == ["reach_red", "reach_green", "reach_blue", "all"]
    assert all(int(r["episodes"]) == 2 for r in rows[:3])
    episodes = csv_rows(ev / "tabletop_anchored_step2_episodes.csv")
    assert sorted((e["task"], e["state_id"]) for e in episodes) == sorted(
        (t, str(s)) for t in ("reach_red", "reach_green", "reach_blue") for s in (0, 1))
    assert (ev / "tabletop_anchored_step2.png").stat().st_size > 0
    videos = sorted(p.name for p in (ev / "videos").iterdir())
    # every episode is recorded, named after its simulator stage (the stages share the folder)
    for t in ("reach_red", "reach_green", "reach_blue"):
        for s in (0, 1):
            assert any(f"_{t}_state{s:04d}_" in v for v in videos), (t, s, videos)
    assert all(v.startswith("sim0.stage") for v in videos)

    # an earlier training step, chosen by its training-step number
    assert cli_main(["eval", str(run_dir), "--step", "1", "--trials", "1", "--tasks", "reach_blue,0",
                     "--temperature", "1.6", "--out", str(run_dir / "eval1")]) == 0
    assert "run at step 1: sampled (temperature 1.6) success" in capsys.readouterr().out
    assert [r["task"] for r in csv_rows(run_dir / "eval1" / "tabletop_anchored_step1.csv")] == ["reach_blue", "reach_red", "all"]


def test_eval_errors_name_the_problem(run_dir, tmp_path, capsys, monkeypatch):
    assert cli_main(["eval", str(run_dir), "--step", "7", "--trials", "1"]) == 2
    assert "no checkpoint of training step 7" in capsys.readouterr().err
    assert cli_main(["eval", str(run_dir), "--tasks", "reach_purple", "--trials", "1"]) == 2
    assert "no task named 'reach_purple'" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "set VLAJAX_TRACEBACK=1 to see where" in err and "Traceback" not in err
    monkeypatch.setenv("VLAJAX_TRACEBACK", "1")  # the same error with where it was raised
    assert cli_main(["eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "does not exist" in err
    monkeypatch.delenv("VLAJAX_TRACEBACK")
    assert cli_main(["eval", str(run_dir), "--suite", "libero_99"]) == 2
    assert "libero_99" in capsys.readouterr().err


def test_eval_of_a_saved_policy_checkpoint(tmp_path, capsys):
    from vlajax.model.oft import Policy, build_model, preset
    from vlajax.model.tokenizer import load_tokenizer

    ckpt = tmp_path / "policy"
    Policy(build_model(preset("small", image_size=28), seed=1), tokenizer=load_tokenizer("tiny"),
           compute_dtype=jnp.float32).save(ckpt)
    args = ["eval", str(ckpt), "--suite", "tabletop_anchored", "--trials", "1", "--out", str(tmp_path / "ev"),
            "env.train.num_envs=2", "env.train.max_episode_steps=16", "actor_rollout_ref.model.compute_dtype=float32"]
    assert cli_main(args) == 0
    assert "success on tabletop_anchored" in capsys.readouterr().out
    assert len(csv_rows(tmp_path / "ev" / "tabletop_anchored_episodes.csv")) == 3


@pytest.mark.slow
def test_sigterm_stops_a_run_and_everything_it_started(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlajax.cli", "train"] + TINY_RUN + [
        "trainer.total_training_steps=500", f"trainer.default_local_dir={run}", "trainer.save_freq=-1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 240
        while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(1)
        assert metrics.exists(), "no training step within 240 s"
        started = psutil.Process(proc.pid).children(recursive=True)
        assert len(started) >= 3  # Ray's processes and the simulator actor with its env workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        gone, alive = psutil.wait_procs(started, timeout=60)
        assert not alive, [(p.pid, p.cmdline()[:2]) for p in alive]
        assert json.loads(metrics.read_text().splitlines()[0])["step"] == 1
    finally:
        if proc.poll() is None:
            proc.kill()


def test_eval_of_a_lora_run_restores_its_adapters(tmp_path):
    run = tmp_path / "lora"
    res = train(load_config(None, TINY_RUN + ["actor_rollout_ref.model.lora_rank=4", "trainer.total_training_steps=1",
                                              f"trainer.default_local_dir={run}"]))
    assert res.steps == 1
    from vlajax.evaluate import eval_config, load_eval_policy

    policy, step = load_eval_policy(eval_config(run, None), run)
    assert step == 1 and policy.model_has_lora()
    assert cli_main(["eval", str(run), "--trials", "1", "--temperature", "0"]) == 0
    assert len(csv_rows(run / "eval" / "tabletop_anchored_step1_episodes.csv")) == 3
