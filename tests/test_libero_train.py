"""End-to-end smoke run of `libero_grpo.yaml` (SimpleVLA-RL's recipe) on real LIBERO with the small preset
policy: two GRPO steps in Ray simulator actors, checkpoints, the final per-task evaluation table with
videos, and `vlajax eval` of the run. Sizes are cut down (2 envs, 16-step episodes, 64 px) so it fits CI;
the recipe's structure (GRPO, PPO-clip, 2 pipeline stages, greedy validation) is the file's."""

from __future__ import annotations


import pytest

pytest.importorskip("libero")
pytest.importorskip("robosuite")

from tests.conftest import LIBERO_SMALL_RUN, csv_rows, libero_pack  # noqa: E402
from vlajax.cli import main as cli_main  # noqa: E402
from vlajax.config import load_config  # noqa: E402
from vlajax.envs import libero_setup  # noqa: E402
from vlajax.rl.checkpoint import CheckpointManager  # noqa: E402
from vlajax.train import train  # noqa: E402

@pytest.mark.slow
def test_libero_grpo_recipe_runs_checkpoints_and_evaluates(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(libero_setup.ASSETS_ENV, libero_pack())
    run = tmp_path / "run"
    cfg = load_config("libero_grpo", LIBERO_SMALL_RUN + ["trainer.total_training_steps=2",
                                                         f"trainer.default_local_dir={run}"])
    assert cfg.env.train.task_suite_name == "libero_10" and cfg.env.train.video_cfg.save_video
    res = train(cfg)

    assert res.steps == 2 and [m["train/episodes"] for m in res.history] == [4, 4]
    for m in res.history:
        assert m["actor/updates"] >= 1 and m["rollout/restarts"] == 0
        # libero_10's prompts differ in length: one prompt width for the run, so every update ran the
        # executable compiled before step 1 (or the bucket below, compiled after the one before)
        assert m["perf/updates_precompiled"] == m["actor/updates"], m
    n_buckets = 1 + sum(m["actor/updates"] for m in res.history)  # the fullest, then one per update at most
    assert sum(m["perf/compiles/update"] for m in res.history) <= n_buckets
    with CheckpointManager(run / "checkpoints") as ck:
        assert ck.restore(ck.latest_step(), restore_train_state=False).data_state["rl_step"] == 2
    final = csv_rows(run / "eval" / "final.csv")
    assert len(final) == 10 + 1 and final[-1]["task"] == "all" and int(final[-1]["episodes"]) == 10
    assert (run / "eval" / "final.md").read_text().count("\n|") >= 11
    videos = list((run / "videos").glob("*.mp4"))
    assert len(videos) >= 10 and all(v.stat().st_size > 0 for v in videos)

    assert cli_main(["eval", str(run), "--trials", "1", "--tasks", "0,9"]) == 0
    assert "greedy success on libero_10" in capsys.readouterr().out
    rows = csv_rows(run / "eval" / "libero_10_step2.csv")
    assert [int(r["episodes"]) for r in rows] == [1, 1, 2]
