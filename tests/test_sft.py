"""`vlajax sft`: the action targets invert the decoder exactly, the nll objective is cross-entropy, bad
input is one named error, and on real LIBERO demonstrations of the scripted expert a fine-tuned small
preset predicts held-out demonstration actions far better than an untrained one, then starts a
`vlajax train libero_grpo` run from its Hugging Face-layout export."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import make_episode
from vlajax.cli import main as cli_main
from vlajax.config import ConfigError, load_config
from vlajax.data import DemoWriter
from vlajax.model.oft import Policy, build_model, preset
from vlajax.model.oft.actions import BIN_CENTERS, ActionStats, actions_to_tokens, normalized_to_tokens, tokens_to_actions
from vlajax.model.oft.actions import tokens_to_normalized
from vlajax.model.tokenizer import load_tokenizer
from vlajax.rl.learner import Learner, LearnerConfig
from vlajax.sft import action_chunks, batch_rows, split_held_out


# ----------------------------------------------------------------------------- targets


def test_action_tokens_round_trip():
    rng = np.random.default_rng(0)
    q01 = rng.uniform(-0.9, -0.1, 7).astype(np.float32)
    q99 = rng.uniform(0.1, 0.9, 7).astype(np.float32)
    stats = ActionStats("libero_object", q01, q99, np.array([True] * 6 + [False]))
    a = rng.uniform(q01, q99, (5, 8, 7)).astype(np.float32)
    a[..., 6] = rng.choice([-1.0, 1.0], (5, 8))  # LIBERO gripper: -1 open, +1 close
    tokens = actions_to_tokens(a, stats, "libero")
    assert tokens.shape == (5, 56) and tokens.dtype == np.int32 and tokens.min() >= 0 and tokens.max() <= 255
    back = tokens_to_actions(tokens, stats, chunk=8, action_dim=7, gripper="libero")
    half_bin = (q99 - q01) / 255 / 2 * 1.0001 + 1e-6
    assert np.all(np.abs(back[..., :6] - a[..., :6]) <= half_bin[:6])
    np.testing.assert_array_equal(back[..., 6], a[..., 6])
    # the decoder's bin centres are fixed points; -1 and +1 land in the end bins
    centers = normalized_to_tokens(BIN_CENTERS)
    np.testing.assert_array_equal(tokens_to_normalized(centers[None], 255, 1)[0, :, 0], BIN_CENTERS)
    assert list(normalized_to_tokens(np.array([-1.0, 1.0]))) == [255, 0]


def test_action_chunks_repeat_the_last_action():
    a = np.arange(4, dtype=np.float32)[:, None] * np.ones((1, 7), np.float32)
    c = action_chunks(a, 3)
    assert c.shape == (4, 3, 7)
    np.testing.assert_array_equal(c[:, :, 0], [[0, 1, 2], [1, 2, 3], [2, 3, 3], [3, 3, 3]])


def test_batch_rows_are_epochs_of_permutations():
    rows = np.concatenate([batch_rows(10, 4, s, seed=1, shuffle=True) for s in range(5)])  # 2 epochs
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))
    np.testing.assert_array_equal(batch_rows(10, 4, 3, seed=1, shuffle=True), rows[12:16])  # resumable


def test_split_held_out_keeps_a_training_episode_per_task():
    eps = [make_episode(3, i) for i in range(3)] + [make_episode(3, 9)]
    eps[3].task = "other"
    train, held = split_held_out(eps, 1)
    assert len(train) == 3 and [e.task for e in held] == [eps[0].task]


# ----------------------------------------------------------------------------- the objective


def test_nll_objective_is_numpy_cross_entropy():
    cfg = preset("small", image_size=28)
    policy = Policy(build_model(cfg, seed=0), tokenizer=load_tokenizer("tiny"), compute_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    m, t = 4, cfg.num_action_tokens
    ids, mask = policy.tokenizer.encode(["pick up the bowl", "open the drawer", "pick up the bowl", "a"], pad_to=32)
    batch = {"pixel_values": rng.normal(size=(m, 6, 28, 28)).astype(np.float32), "input_ids": ids,
             "attention_mask": mask, "tokens": rng.integers(0, 256, (m, t)).astype(np.int32),
             "mask": (rng.uniform(size=(m, t)) < 0.7).astype(np.float32)}
    batch["mask"][3] = 0  # a padding row
    logits = np.asarray(policy.action_logits(batch["pixel_values"], ids, mask), np.float64)  # before the update
    lcfg = LearnerConfig(objective="nll", micro_batch_size=2, compute_dtype="float32", remat=False, lr=1e-3)
    learner = Learner(policy, lcfg)
    held = jax.device_get(learner.evaluate(batch))
    got = jax.device_get(learner.update(batch))  # two micro-batches of 2
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["tokens"][..., None], -1)[..., 0]
    valid = batch["mask"] > 0
    want = nll[valid].mean()
    acc = (logits.argmax(-1) == batch["tokens"])[valid].mean()
    for m_ in (got, held):
        np.testing.assert_allclose(m_["loss"], want, rtol=1e-5)
        np.testing.assert_allclose(m_["nll"], want, rtol=1e-5)
        np.testing.assert_allclose(m_["token_accuracy"], acc, atol=1e-6)
        assert m_["valid_tokens"] == valid.sum()
    assert got["grad_norm"] > 0 and got["skipped"] == 0
    with pytest.raises(KeyError, match="missing"):
        learner.update({k: v for k, v in batch.items() if k != "mask"})


# ----------------------------------------------------------------------------- bad input


def _cli_error(capsys, argv) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("vlajax sft: error: ")
    return err[0]


def test_config_and_data_errors_name_the_key_file_and_field(tmp_path, capsys):
    small = ["actor_rollout_ref.model.path=preset:small", f"trainer.default_local_dir={tmp_path / 'run'}"]
    # the model path is the first error, before the (also missing) data
    line = _cli_error(capsys, ["sft", f"actor_rollout_ref.model.path={tmp_path / 'nope'}", "data.train_files=/nowhere"])
    assert "actor_rollout_ref.model.path" in line and "does not exist" in line
    line = _cli_error(capsys, ["sft", *small, "data.train_files=/nowhere"])
    assert "'data.train_files'" in line and "/nowhere" in line
    with pytest.raises(ConfigError, match="data.train_files.*required"):
        load_config("sft_libero", small + ["data.train_files=null"], purpose="sft")
    with pytest.raises(ConfigError, match="data.train_file'.*did you mean 'data.train_files'"):
        load_config("sft_libero", small + ["data.train_file=x"], purpose="sft")
    # a file of another suite, and one with 6-d actions: one line naming the file and the field
    ep = make_episode(4)
    with DemoWriter(tmp_path / "demos", "libero_goal", ep.task, ep.instruction) as w:
        w.append(ep)
    line = _cli_error(capsys, ["sft", *small, f"data.train_files={tmp_path / 'demos' / 'libero_goal'}"])
    assert f"{ep.task}_demo.hdf5" in line and "vlajax_suite" in line and "libero_spatial" in line
    ep = make_episode(4)
    ep.actions = ep.actions[:, :6]
    with DemoWriter(tmp_path / "six", "libero_spatial", ep.task, ep.instruction) as w:
        w.append(ep)
    line = _cli_error(capsys, ["sft", *small, f"data.train_files={tmp_path / 'six'}"])
    assert "data/demo_0/actions" in line and "(T, 7)" in line


# ----------------------------------------------------------------------------- real LIBERO


SUITE, TASK = "libero_object", 2  # In(salad dressing, basket)
SIZE = 64


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    pytest.importorskip("libero")
    pytest.importorskip("robosuite")
    from tests.conftest import libero_pack
    from vlajax.demos import episode_from_record
    from vlajax.envs import libero_setup
    from vlajax.envs.base import sampled_state_id
    from vlajax.envs.libero import LiberoEnv

    pack = libero_pack()
    root = tmp_path_factory.mktemp("demos")
    env = LiberoEnv(SUITE, assets_dir=str(libero_setup.setup_libero(pack)), cameras=("agentview",), image_size=SIZE,
                    max_episode_steps=280)
    kept = 0
    try:
        with DemoWriter(root, SUITE, env.tasks[TASK].name, env.tasks[TASK].instruction) as w:
            for seed in range(12):
                rec = env.demonstrate(TASK, sampled_state_id(seed))
                if rec["success"]:
                    w.append(episode_from_record(rec))
                    kept += 1
                if kept == 4:
                    break
    finally:
        env.close()
    assert kept == 4, f"the expert succeeded {kept} times"
    return root


def _greedy(policy, held, suite):
    """Greedy tokens of the held-out episode's frames through the rollout's decoder (its preprocessing,
    prompt and proprio path), and the targets under the policy's statistics."""
    from vlajax.rl.policy_step import DecodeInputs, PolicyDecoder
    from vlajax.sft import FrameSet

    dec = PolicyDecoder(policy, flip=True, center_crop=True, unnorm_key=suite, gripper="libero")
    frames = FrameSet([held], dec, policy.action_stats(suite), ("agentview",), "libero")
    n = len(frames)
    ids, mask = dec.encode_prompts([held.instruction] * n)
    out = dec.fetch(dec.dispatch(DecodeInputs(images=held.images["agentview"][:, None], input_ids=ids,
                                              attention_mask=mask, proprio=held.proprio, rows=np.arange(n),
                                              calls=np.zeros(n, np.int64)), temperature=0.0, key=jax.random.key(0)))
    target = action_chunks(held.actions, 8)
    return {"token_accuracy": float((out.tokens == frames.tokens).mean()),
            "l1": float(np.abs(out.actions[..., :6] - target[..., :6]).mean())}


SFT = [
    "actor_rollout_ref.model.path=preset:small", "actor_rollout_ref.model.image_size=56",
    "actor_rollout_ref.model.compute_dtype=float32", "actor_rollout_ref.model.enable_gradient_checkpointing=false",
    "actor_rollout_ref.model.lora_rank=0", "actor_rollout_ref.actor.optim.lr=1e-3",
    "actor_rollout_ref.actor.optim.weight_decay=0.0", f"env.train.task_suite_name={SUITE}",
    f"env.train.init_params.camera_heights={SIZE}", f"env.train.init_params.camera_widths={SIZE}",
    "data.train_batch_size=16", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
    "trainer.n_env_gpus_per_node=0", "trainer.n_rollout_gpus_per_node=0", "env.train.num_envs=1",
    "env.train.max_episode_steps=16", "data.val_num_trials_per_task=1", "trainer.logger=[jsonl]",
    "trainer.save_freq=40",
]


@pytest.mark.slow
def test_sft_on_expert_demos_beats_untrained_and_starts_grpo(demos, tmp_path, monkeypatch, capsys):
    from tests.conftest import LIBERO_SMALL_RUN, libero_pack
    from vlajax.data import read_dataset
    from vlajax.envs import libero_setup
    from vlajax.metrics import read_metrics
    from vlajax.model.oft import load_pretrained
    from vlajax.session import build_policy
    from vlajax.sft import sft

    monkeypatch.setenv(libero_setup.ASSETS_ENV, libero_pack())
    run = tmp_path / "run"
    args = SFT + [f"data.train_files={demos}", f"trainer.default_local_dir={run}", "trainer.test_freq=-1"]
    first = sft(load_config("sft_libero", args + ["trainer.total_training_steps=40"], purpose="sft"))
    assert first.steps == 40 and (run / "checkpoints" / "40").is_dir()
    # resumed from step 40 (trainer.resume=auto), with one simulator evaluation at the end
    res = sft(load_config("sft_libero", SFT + [f"data.train_files={demos}", f"trainer.default_local_dir={run}",
                                               "trainer.total_training_steps=120", "trainer.test_freq=120"],
                          purpose="sft"))
    assert "resumed from checkpoint" in capsys.readouterr().out and res.steps == 120 and len(res.history) == 80
    last = res.history[-1]
    assert 0.0 <= last["val/success_rate"] <= 1.0 and "val/token_accuracy" in last
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == list(range(1, 121))

    # the export: HF layout with tokenizer and the statistics under the suite's key
    exp = res.export_dir
    assert (exp / "config.json").is_file() and (exp / "tokenizer.json").is_file()
    stats = json.loads((exp / "dataset_statistics.json").read_text())
    assert set(stats[SUITE]) >= {"action", "proprio", "num_transitions"} and stats[SUITE]["num_trajectories"] == 3
    assert stats[SUITE]["action"]["max"][6] <= 1.0 and stats[SUITE]["action"]["min"][6] >= 0.0  # OFT's gripper

    # held-out demonstration frames, greedy through the rollout decoder: fine-tuned vs untrained
    held = read_dataset(demos, suite=SUITE, cameras=("agentview",))[-1]
    tuned = _greedy(load_pretrained(exp, compute_dtype="float32"), held, SUITE)
    cfg = load_config("sft_libero", args, purpose="sft")
    untrained = build_policy(cfg)
    untrained.dataset_statistics = stats
    base = _greedy(untrained, held, SUITE)
    print("held-out greedy: fine-tuned", tuned, "untrained", base, "logged", last["val/token_accuracy"])
    # measured: 0.113 vs 0.004 (the held-out accuracy the run logged is the decoder's, to 1e-8: training
    # and rollouts see the same pixels, prompt and targets). L1 is not asserted: 120 steps of a
    # from-scratch preset (zero action queries, as the HF format needs) do not yet beat the untrained
    # policy's near-midpoint guesses on it (0.38 vs 0.32).
    assert tuned["token_accuracy"] > max(base["token_accuracy"] + 0.05, 5 * base["token_accuracy"])
    assert abs(tuned["token_accuracy"] - last["val/token_accuracy"]) < 1e-3

    # GRPO starts from the export as from a downloaded checkpoint and completes a step
    from vlajax.train import train

    small = [o for o in LIBERO_SMALL_RUN
             if not o.startswith(("actor_rollout_ref.model.path", "actor_rollout_ref.model.image_size"))]
    grpo = train(load_config("libero_grpo", small + [
        f"actor_rollout_ref.model.path={exp}", f"env.train.task_suite_name={SUITE}", "trainer.total_training_steps=1",
        f"trainer.default_local_dir={tmp_path / 'grpo'}", "env.train.video_cfg.save_video=false"]))
    assert grpo.steps == 1 and grpo.history[0]["actor/updates"] >= 1
