"""End-to-end `vlajax train` on the built-in tabletop task (real Ray actors, MuJoCo, the small policy):
a run resumed from its checkpoint ends bit-identical to one that never stopped, and bad input fails
with clear errors before anything starts."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from tests.conftest import TINY_RUN, final_params, same_params, success_rise, successes, two_proportion_z
from vlajax.cli import main as cli_main
from vlajax.config import ConfigError, load_config
from vlajax.rl.checkpoint import CheckpointManager
from vlajax.train import train


@pytest.mark.slow
def test_resumed_run_is_bit_identical_to_uninterrupted(tmp_path):
    straight = tmp_path / "straight"
    one_update = ["actor_rollout_ref.actor.ppo_epochs=1"]  # one mini-batch, one epoch: the update is on-policy
    res = train(load_config(None, TINY_RUN + one_update + ["trainer.total_training_steps=3",
                                                            f"trainer.default_local_dir={straight}"]))
    assert res.steps == 3 and len(res.history) == 3
    # the learner recomputes exactly the rollout's log-probs (same images, prompt, normalised proprio)
    for m in res.history:
        assert m["actor/updates"] == 1 and abs(m["actor/approx_kl_k3"]) < 1e-5 and abs(m["actor/ratio_mean"] - 1) < 1e-3
    for m in res.history:
        assert 0.0 <= m["train/success_rate"] <= 1.0 and np.isfinite(m["actor/loss"])
    assert (straight / "learning_curve.png").stat().st_size > 0
    assert (straight / "eval" / "final.md").exists()
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/success_rate" in x] == [1, 2, 3]

    resumed = tmp_path / "resumed"
    train(load_config(None, TINY_RUN + one_update + ["trainer.total_training_steps=2",
                                                     f"trainer.default_local_dir={resumed}"]))
    res2 = train(load_config(None, TINY_RUN + one_update + ["trainer.total_training_steps=3",
                                                             f"trainer.default_local_dir={resumed}"]))
    assert [m["train/success_rate"] for m in res2.history] == [res.history[2]["train/success_rate"]]

    step_a, a = final_params(straight)
    step_b, b = final_params(resumed)
    assert step_a == step_b and same_params(a, b)


def _steps(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_resume_from_another_runs_checkpoint(tmp_path, capsys):
    """trainer.resume=<path> starts a new run directory from another run's checkpoint (only read),
    continues exactly as that run would have, and says so; checkpoints are numbered by RL step."""
    first = tmp_path / "first"
    a = train(load_config(None, TINY_RUN + ["trainer.total_training_steps=2", f"trainer.default_local_dir={first}"]))
    assert _steps(first) == [1, 2]  # by training step, not by optimizer update
    second = tmp_path / "second"
    b = train(load_config(None, TINY_RUN + ["trainer.total_training_steps=2", f"trainer.default_local_dir={second}",
                                            f"trainer.resume={first / 'checkpoints' / '1'}"]))
    assert f"resumed from checkpoint {first / 'checkpoints' / '1'} at training step 1" in capsys.readouterr().out
    assert b.steps == 2 and len(b.history) == 1 and _steps(second) == [2] and _steps(first) == [1, 2]
    assert b.history[0]["actor/pg_loss"] == a.history[1]["actor/pg_loss"]  # what the first run computed
    assert final_params(second)[1].keys() == final_params(first)[1].keys()
    for x, y in zip(jax.tree.leaves(final_params(second)[1]), jax.tree.leaves(final_params(first)[1])):
        np.testing.assert_array_equal(x, y)
    # nothing is overwritten: a run directory with checkpoints of its own refuses another run's, and `disable`
    with pytest.raises(ConfigError, match="already has checkpoints of its own") as e:
        train(load_config(None, TINY_RUN + ["trainer.total_training_steps=3", f"trainer.default_local_dir={second}",
                                            f"trainer.resume={first}"]))
    assert e.value.key == "trainer.resume"
    with pytest.raises(ConfigError, match="collide"):
        train(load_config(None, TINY_RUN + ["trainer.total_training_steps=3", f"trainer.default_local_dir={second}",
                                            "trainer.resume=disable"]))


# The embedded default, shortened: sampled validation (4 episodes per state) so that the start is
# measured at the random-policy level on the same 48 states as the end.
LEARN = ["trainer.total_training_steps=80", "trainer.save_freq=40", "trainer.test_freq=-1", "trainer.logger=[jsonl]",
         "actor_rollout_ref.rollout.val_kwargs.do_sample=true", "actor_rollout_ref.rollout.val_kwargs.temperature=1.2",
         "actor_rollout_ref.rollout.val_kwargs.n=4"]


@pytest.mark.slow
def test_grpo_learns_the_tabletop_task_then_resumes(tmp_path):
    """GRPO from a fixed seed on the built-in task (the embedded default's config, 80 steps instead of
    400): success after training is significantly above the start, in validation on the same
    states and in the sampled rollouts; then the run resumes from its step-80 checkpoint and goes on
    from the learned policy."""
    run = tmp_path / "learn"
    res = train(load_config(None, LEARN + [f"trainer.default_local_dir={run}"]))
    assert res.steps == 80
    r = success_rise(run, res)
    assert r.n_val == 3 * 16 * 4
    before, z_val, z_train, (k0, n0) = r.before, r.z_val, r.z_train, r.first
    summary = (f"validation {before:.3f} -> {r.after:.3f} (z {z_val:.1f}); rollouts {k0 / n0:.3f} (steps 1-10) -> "
               f"{r.last[0] / r.last[1]:.3f} (steps 71-80) (z {z_train:.1f})")
    print(summary)
    assert before < 0.4 and z_val > 2.0 and z_train > 3.0, summary

    res2 = train(load_config(None, LEARN + [f"trainer.default_local_dir={run}", "trainer.total_training_steps=84"]))
    assert res2.steps == 84 and [m["train/success_rate"] for m in res2.history] and len(res2.history) == 4
    k2, n2 = successes(res2.history)
    assert two_proportion_z(k0, n0, k2, n2) > 2.0, (k0 / n0, k2 / n2)  # it resumed the learned policy
    steps = [x["step"] for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "train/success_rate" in x]
    assert steps == list(range(1, 85))  # the step-80 record is kept, none is doubled


def test_clear_errors_before_anything_starts(tmp_path, capsys):
    assert cli_main(["train", "trainer.total_training_step=3"]) == 2
    assert "trainer.total_training_step" in capsys.readouterr().err
    assert cli_main(["train", "data.train_batch_size=abc"]) == 2
    assert "data.train_batch_size" in capsys.readouterr().err
    # demo.yaml sizes and initialises its preset (and gives it action queries); a checkpoint brings its own
    ckpt = ["actor_rollout_ref.model.image_size=null", "actor_rollout_ref.model.init_scheme=normal",
            "actor_rollout_ref.model.action_queries=false"]
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
    assert cli_main(["train", "ray.address=127.0.0.1:9",
                     f"trainer.default_local_dir={tmp_path / 'r3'}"] + TINY_RUN) == 2
    assert "127.0.0.1:9" in capsys.readouterr().err


def test_refused_resume_changes_nothing_and_answers_first(tmp_path, capsys):
    """A command that would collide with a run's checkpoints is refused before anything starts or is
    written: the error is the resume's (not the unreachable Ray address it also names, found only once
    the model is built) and the run's config.yaml is left as it was."""
    run = tmp_path / "run"
    with CheckpointManager(run / "checkpoints") as ck:  # a real committed checkpoint of the run
        ck.save(3, {"w": np.zeros(4, np.float32)}, data_state={"rl_step": 3}, force=True)
    (run / "config.yaml").write_text("the finished run's config\n")
    later = ["ray.address=127.0.0.1:9"]
    (tmp_path / "empty").mkdir()
    for resume, says in (("disable", "collide"), (str(tmp_path / "empty"), "holds no vlajax checkpoint"),
                         (str(run / "checkpoints" / "3"), None)):
        other = f"trainer.default_local_dir={run if says else tmp_path / 'new'}"
        if says is None:  # another run directory with checkpoints of its own refuses this one
            with CheckpointManager(tmp_path / "new" / "checkpoints") as ck:
                ck.save(1, {"w": np.zeros(4, np.float32)}, force=True)
            says = "checkpoints of its own"
        assert cli_main(["train", f"trainer.resume={resume}", other] + later) == 2
        err = capsys.readouterr().err
        assert says in err and "127.0.0.1:9" not in err, err
    assert (run / "config.yaml").read_text() == "the finished run's config\n"
    assert not (tmp_path / "new" / "config.yaml").exists()


def test_runs_without_ray(tmp_path):
    """`ray.enable=false`: the simulators run on `LocalSimPool`'s threads of the trainer's process, and
    the run never imports Ray (a fresh process, so other tests' imports do not count)."""
    import subprocess
    import sys

    code = ("import sys\nfrom vlajax.cli import main\n"
            f"rc = main(['train', 'ray.enable=false', 'trainer.total_training_steps=1', "
            f"'trainer.default_local_dir={tmp_path / 'run'}', *{TINY_RUN!r}])\n"
            "assert rc == 0, rc\nassert 'ray' not in sys.modules, 'ray was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 1 and record["train/episodes"] == 8


@pytest.mark.parametrize("ray_enable", ["true", "false"])
def test_a_simulator_that_cannot_start_is_one_line(tmp_path, capsys, ray_enable):
    """A sim worker whose GL cannot open (OSMesa asked for, not installed) ends the run with one line
    naming the worker and the cause, from a Ray actor as from LocalSimPool's thread."""
    import ctypes.util

    if ctypes.util.find_library("OSMesa"):
        pytest.skip("libOSMesa is installed here: OSMesa would open")
    rc = cli_main(["train", f"ray.enable={ray_enable}", "env.train.mujoco_gl=osmesa", "trainer.total_training_steps=1",
                   f"trainer.default_local_dir={tmp_path / 'run'}", *TINY_RUN])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("vlajax train: error:")]
    assert len(lines) == 1 and "sim worker 0" in lines[0] and "MUJOCO_GL=osmesa" in lines[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.slow
def test_a_resumed_process_compiles_nothing_the_first_one_did(tmp_path):
    """With the persistent compilation cache (the CLI's default), a resumed process loads the update the
    first process compiled; each step's record says what it compiled and where its rollout time went."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    run = tmp_path / "run"
    one_chunk = ["env.train.max_episode_steps=8"]  # one chunk per trajectory: every mini-batch has 8 rows
    for steps in (1, 2):
        out = subprocess.run([sys.executable, "-m", "vlajax.cli", "train", *TINY_RUN, *one_chunk,
                              f"trainer.total_training_steps={steps}", f"trainer.default_local_dir={run}"],
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    first, second = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train/' in x]
    assert first["perf/compiles/update"] >= 1 and first["perf/compile_s"] > 0
    assert second["perf/compiles/update"] == 0 and second["perf/compile_cache_hits"] > 0, second
    for m in (first, second):  # the rollout's time, split: waiting for resets, for simulators, on decodes
        assert m["perf/updates_precompiled"] == m["actor/updates"] > 0, m  # compiled before the step needed it
        assert m["timing/reset_s"] > 0 and m["timing/sim_s"] > 0 and m["timing/decode_s"] > 0, m


def test_async_rollout_samples_with_the_weights_from_before_the_update(tmp_path):
    """`actor_rollout_ref.rollout.mode=async`: the next step's rollout runs during the update and decodes
    with the weights from before it; the log-probs it records (the PPO ratio's denominator) are those
    weights', not the updated ones'."""
    import jax.numpy as jnp
    from flax import nnx

    from vlajax.metrics import Timer
    from vlajax.model.oft.actions import token_logprobs
    from vlajax.model.preprocess import preprocess_images
    from vlajax.train import Trainer

    cfg = load_config("demo", TINY_RUN + ["actor_rollout_ref.rollout.mode=async", "ray.enable=false",
                                          # a first update that moves every weight (5% decay), advantages or not
                                          "actor_rollout_ref.actor.optim.lr_warmup_steps=0",
                                          "actor_rollout_ref.actor.optim.lr=0.05", "actor_rollout_ref.actor.optim.weight_decay=1.0",
                                          f"trainer.default_local_dir={tmp_path / 'run'}"])
    with Trainer(cfg) as tr:
        first, _ = tr.collect(Timer())
        before = jax.tree.map(np.asarray, tr.learner.decode_params())  # what the next rollout decodes with
        tr.start_next_rollout()
        assert tr.update(first)  # donates the learner's arrays; the rollout in flight has a copy
        after = jax.tree.map(np.asarray, tr.learner.decode_params())
        nxt = tr.next_rollout(Timer())[0].trajectories
        dec = tr.sim.decoder
        traj = nxt["traj"]
        rows = np.flatnonzero(traj.chunk_valid[:, 0])[:4]  # first policy calls (all ran)
        pixels = preprocess_images(jnp.asarray(nxt["images"][rows, 0]), **dec.preprocess)
        proprio = dec.model_proprio(nxt["proprio"][rows, 0])
        tokens = jnp.asarray(traj.actions_tokens[rows, 0])

        def logp(params):
            model = nnx.merge(tr.policy.graphdef, params)
            logits = model.action_logits(pixels, nxt["prompt_ids"][rows], nxt["prompt_mask"][rows], proprio,
                                         dtype=jnp.float32)
            return np.asarray(token_logprobs(logits, tokens, cfg.actor_rollout_ref.rollout.temperature)[0])

        recorded = traj.old_logp[rows, 0]
        np.testing.assert_allclose(recorded, logp(before), atol=1e-4)
        assert np.abs(recorded - logp(after)).max() > 1e-3  # the update moved them: the check can tell


@pytest.mark.slow
def test_async_run_resumed_equals_uninterrupted(tmp_path):
    """An async run (rollouts during updates except before a validation, a checkpoint or the last step)
    resumed from its step-2 checkpoint computes what the uninterrupted run did, bit for bit; every step
    logged once, validation where due."""
    base = TINY_RUN + ["actor_rollout_ref.rollout.mode=async", "ray.enable=false", "trainer.save_freq=2",
                       "trainer.test_freq=2", "actor_rollout_ref.actor.ppo_epochs=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    res = train(load_config("demo", base + ["trainer.total_training_steps=4", f"trainer.default_local_dir={straight}"]))
    waits = [m.get("timing/rollout_wait_s") for m in res.history]
    assert [w is not None for w in waits] == [False, True, False, True], waits  # steps 2, 4 rolled out ahead
    assert all(m["timing/sim_s"] > 0 and m["timing/decode_s"] > 0 for m in res.history)
    train(load_config("demo", base + ["trainer.total_training_steps=2", f"trainer.default_local_dir={resumed}"]))
    res2 = train(load_config("demo", base + ["trainer.total_training_steps=4", f"trainer.default_local_dir={resumed}"]))
    key = lambda m: (m["train/success_rate"], m["actor/loss"], m["actor/ratio_mean"])  # noqa: E731
    assert [key(m) for m in res2.history] == [key(m) for m in res.history[2:]]
    assert res2.history[1].get("timing/rollout_wait_s") is not None  # the resumed run's step 4 ran ahead too
    recs = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "train/success_rate" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in recs if "val/success_rate" in r] == [2, 4]
    (sa, a), (sb, b) = final_params(straight), final_params(resumed)
    assert sa == sb == 4 and same_params(a, b)
