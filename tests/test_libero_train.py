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


@pytest.mark.slow
def test_pi0_libero_grpo_trains_an_openpi_checkpoint_and_vlajax_eval_runs_it(tmp_path, monkeypatch, capsys):
    """`pi0_libero_grpo.yaml` on real LIBERO from an openpi checkpoint (the tiny π0 openpi's code wrote,
    with LIBERO norm stats under openpi's asset id): both cameras rotated, the 8-dim state z-scored,
    Flow-SDE chains scored by the learner, a checkpoint, the final table; then `vlajax eval` of the
    openpi checkpoint itself, which it recognises as π0."""
    from tests.conftest import openpi_checkpoint, sentencepiece_model

    monkeypatch.setenv(libero_setup.ASSETS_ENV, libero_pack())
    ckpt = openpi_checkpoint(tmp_path / "pi0_libero", "physical-intelligence/libero")
    sp = sentencepiece_model(tmp_path / "paligemma.model")
    small = [f"actor_rollout_ref.model.tokenizer_path={sp}", "actor_rollout_ref.model.num_steps=2",
             "actor_rollout_ref.model.action_horizon=8", "actor_rollout_ref.model.compute_dtype=float32",
             "actor_rollout_ref.model.enable_gradient_checkpointing=false", "env.actor.model.num_action_chunks=4",
             "env.train.max_episode_steps=8", "env.train.num_envs=2", "env.train.init_params.camera_heights=64",
             "env.train.init_params.camera_widths=64", "trainer.n_env_gpus_per_node=0", "trainer.n_rollout_gpus_per_node=0"]
    run = tmp_path / "run"
    cfg = load_config("pi0_libero_grpo", [f"actor_rollout_ref.model.path={ckpt}", "actor_rollout_ref.rollout.n=2",
                                          "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                                          "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
                                          "data.val_num_trials_per_task=1", "trainer.test_freq=-1",
                                          "trainer.val_before_train=false", "data.filter_accuracy=false",
                                          "trainer.logger=[jsonl]", "trainer.total_training_steps=1",
                                          f"trainer.default_local_dir={run}", *small])
    assert cfg.actor_rollout_ref.actor.num_images_in_input == 2 and cfg.actor_rollout_ref.model.family == "pi0"
    res = train(cfg)
    assert res.steps == 1 and res.history[0]["actor/updates"] >= 1
    assert abs(res.history[0]["actor/ratio_mean"] - 1) < 0.02  # the learner scores the rollout's own chains
    with CheckpointManager(run / "checkpoints") as ck:
        assert ck.latest_step() == 1
    assert len(csv_rows(run / "eval" / "final.csv")) == 10 + 1

    assert cli_main(["eval", str(ckpt), "--suite", "libero_10", "--trials", "1", "--tasks", "0",
                     "--out", str(tmp_path / "ev"), *small]) == 0
    out = capsys.readouterr().out
    assert "greedy success on libero_10" in out
