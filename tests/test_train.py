"""End-to-end `vlajax train` on the built-in tabletop task (real Ray actors, MuJoCo, the small policy):
a run resumed from its checkpoint ends bit-identical to one that never stopped, and bad input fails
with clear errors before anything starts."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from vlajax.cli import main as cli_main
from vlajax.config import load_config
from vlajax.rl.checkpoint import CheckpointManager
from vlajax.train import train

TINY = [
    "actor_rollout_ref.model.image_size=56", "actor_rollout_ref.rollout.n=4", "data.train_batch_size=2",
    "env.train.num_envs=4", "env.train.max_episode_steps=16", "env.train.init_params.camera_heights=32",
    "env.train.init_params.camera_widths=32", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16", "data.val_num_trials_per_task=1",
    "trainer.test_freq=-1", "trainer.val_before_train=false", "trainer.save_freq=1", "data.filter_accuracy=false",
    "trainer.logger=[jsonl]",
]


def _final_params(run_dir):
    ck = CheckpointManager(run_dir / "checkpoints")
    r = ck.restore(ck.latest_step())
    ck.close()
    return r.step, jax.tree.map(np.asarray, r.params)


@pytest.mark.slow
def test_resumed_run_is_bit_identical_to_uninterrupted(tmp_path):
    straight = tmp_path / "straight"
    res = train(load_config(None, TINY + ["trainer.total_training_steps=3", f"trainer.default_local_dir={straight}"]))
    assert res.steps == 3 and len(res.history) == 3
    for m in res.history:
        assert 0.0 <= m["train/success_rate"] <= 1.0 and np.isfinite(m["actor/loss"])
    assert (straight / "learning_curve.png").stat().st_size > 0
    assert (straight / "eval" / "final.md").exists()
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/success_rate" in x] == [1, 2, 3]

    resumed = tmp_path / "resumed"
    train(load_config(None, TINY + ["trainer.total_training_steps=2", f"trainer.default_local_dir={resumed}"]))
    res2 = train(load_config(None, TINY + ["trainer.total_training_steps=3", f"trainer.default_local_dir={resumed}"]))
    assert [m["train/success_rate"] for m in res2.history] == [res.history[2]["train/success_rate"]]

    step_a, a = _final_params(straight)
    step_b, b = _final_params(resumed)
    assert step_a == step_b
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_clear_errors_before_anything_starts(tmp_path, capsys):
    assert cli_main(["train", "trainer.total_training_step=3"]) == 2
    assert "trainer.total_training_step" in capsys.readouterr().err
    assert cli_main(["train", "data.train_batch_size=abc"]) == 2
    assert "data.train_batch_size" in capsys.readouterr().err
    # demo.yaml sizes and initialises its preset; a checkpoint brings its own
    ckpt = ["actor_rollout_ref.model.image_size=null", "actor_rollout_ref.model.init_scheme=normal"]
    assert cli_main(["train", f"actor_rollout_ref.model.path={tmp_path / 'nope'}",
                     f"trainer.default_local_dir={tmp_path / 'r1'}"] + ckpt) == 2
    err = capsys.readouterr().err
    assert "actor_rollout_ref.model.path" in err and "does not exist" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert cli_main(["train", f"actor_rollout_ref.model.path={other}",
                     f"trainer.default_local_dir={tmp_path / 'r2'}"] + ckpt) == 2
    assert "model_type is 'llava'" in capsys.readouterr().err
    assert cli_main(["train", "ray.address=127.0.0.1:9", f"trainer.default_local_dir={tmp_path / 'r3'}"] + TINY) == 2
    assert "127.0.0.1:9" in capsys.readouterr().err
