"""π0 in Flax NNX (vlajax.model.pi0): openpi's parameters and checkpoint layout convert exactly, the
prompt is tokenized in openpi's π0 format, and the model computes what openpi's own code computes on
the same random weights (tests/data/pi0_openpi, made by tests/reference/openpi_pi0_fixture.py)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import sentencepiece_model
from vlajax.model.pi0 import Pi0, preset
from vlajax.model.pi0.checkpoint import read_norm_stats, read_params, write_checkpoint
from vlajax.model.pi0.openpi_convert import config_from_params, from_openpi, load_into, to_openpi
from vlajax.model.pi0.tokenizer import Pi0Tokenizer

FIXTURE = Path(__file__).parent / "data" / "pi0_openpi"


def _flat(tree: dict) -> dict:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree.leaves_with_path(tree)}


def _same(a: dict, b: dict) -> bool:
    fa, fb = _flat(a), _flat(b)
    return fa.keys() == fb.keys() and all(
        np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype and np.array_equal(fa[k], fb[k]) for k in fa)


def test_openpi_parameters_convert_both_ways_bit_for_bit(tmp_path):
    """vlajax's tree -> openpi's -> vlajax's is the identity, and openpi's layout on disk (orbax params,
    norm stats json) reads back exactly, bfloat16 leaves included (openpi's released weights are bf16)."""
    cfg = preset("tiny")
    ours = nnx.to_pure_dict(nnx.state(Pi0(cfg, nnx.Rngs(0))))
    theirs = to_openpi(ours, cfg)
    assert config_from_params(theirs, action_horizon=cfg.action_horizon, max_token_len=cfg.max_token_len) == cfg
    assert _same(from_openpi(theirs, cfg), ours)
    theirs["PaliGemma"]["llm"]["embedder"]["input_embedding"] = np.asarray(
        jnp.asarray(theirs["PaliGemma"]["llm"]["embedder"]["input_embedding"], jnp.bfloat16))
    stats = {"tiny_robot": {"state": {"mean": np.arange(8.0), "std": np.ones(8)},
                            "actions": {"mean": np.zeros(8), "std": np.full(8, 2.0)}}}
    write_checkpoint(tmp_path / "ckpt", theirs, stats)
    back = read_params(tmp_path / "ckpt")
    assert _same(back, theirs)
    assert back["PaliGemma"]["llm"]["embedder"]["input_embedding"].dtype == jnp.bfloat16
    got = read_norm_stats(tmp_path / "ckpt")
    np.testing.assert_array_equal(got["state"]["mean"], np.arange(8.0))
    np.testing.assert_array_equal(got["actions"]["std"], np.full(8, 2.0))
    with pytest.raises(FileNotFoundError, match="asset ids there: tiny_robot"):
        read_norm_stats(tmp_path / "ckpt", "libero")


def test_the_prompt_is_tokenized_in_openpis_pi0_format(tmp_path):
    """BOS + the cleaned prompt + the separately encoded newline, padded with 0 (mask False), cut at max_len."""
    tok = Pi0Tokenizer(sentencepiece_model(tmp_path / "sp.model"), max_len=48)
    sp = tok.sp
    ids, mask = tok.encode(["  pick_up the red bowl\n", "put the mug"])
    want = [sp.bos_id()] + sp.encode("pick up the red bowl") + sp.encode("\n")
    assert ids[0, :len(want)].tolist() == want and mask[0].sum() == len(want)
    assert not ids[0, len(want):].any() and not mask[0, len(want):].any()
    assert ids.dtype == np.int32 and ids.shape == (2, 48)
    short = Pi0Tokenizer(tok.path, max_len=5).encode(["put the blue mug on the plate"])
    assert short[0].shape == (1, 5) and short[1].all()
    with pytest.raises(FileNotFoundError, match="π0 tokenizer .* does not exist"):
        Pi0Tokenizer(tmp_path / "missing.model")


def _fixture() -> tuple[dict, dict, dict]:
    """(openpi params tree, inputs, outputs) of the tiny π0 fixture."""
    z = np.load(FIXTURE / "tiny_fixture.npz")
    params: dict = {}
    for k in z.files:
        if k.startswith("params/"):
            node = params
            *path, leaf = k.split("/")[1:]
            for p in path:
                node = node.setdefault(p, {})
            node[leaf] = z[k]
    get = lambda prefix: {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}  # noqa: E731
    return params, get("inputs/"), get("outputs/")


CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # openpi's IMAGE_KEYS, in its order


def test_pi0_matches_openpi_on_the_same_random_weights():
    """Prefix embeddings, the velocity field and 10-step sampled actions for a fixed noise agree with
    openpi's own code (fp32) to 1e-4, a masked camera and padded prompt included."""
    params, x, want = _fixture()
    cfg = config_from_params(params, action_horizon=5, max_token_len=12)
    assert cfg == preset("tiny")
    model = load_into(Pi0(cfg, nnx.Rngs(0)), params)
    # [-1, 1] as openpi's Observation.from_dict makes it, in numpy (XLA's division rounds 1 ulp apart)
    images = jnp.asarray(np.stack([x[f"image/{c}"] for c in CAMERAS], axis=1).astype(np.float32) / 127.5 - 1.0)
    masks = jnp.stack([x[f"image_mask/{c}"] for c in CAMERAS], axis=1)
    assert not masks.all()  # sample 1's right wrist camera is off
    obs = (images, masks, jnp.asarray(x["tokenized_prompt"]), jnp.asarray(x["tokenized_prompt_mask"]))

    prefix = jax.jit(model.embed_prefix)(*obs)
    np.testing.assert_allclose(prefix[0], want["prefix_tokens"], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(prefix[1], want["prefix_mask"])
    np.testing.assert_array_equal(prefix[2], want["prefix_ar_mask"])
    suffix = model.embed_suffix(jnp.asarray(x["state"]), jnp.asarray(x["x_t"]), jnp.asarray(x["time"]))
    np.testing.assert_allclose(suffix[0], want["suffix_tokens"], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(suffix[2], want["suffix_ar_mask"])
    v_t = jax.jit(model.velocity)(prefix, jnp.asarray(x["state"]), jnp.asarray(x["x_t"]), jnp.asarray(x["time"]))
    np.testing.assert_allclose(v_t, want["v_t"], atol=1e-4, rtol=1e-4)
    actions = jax.jit(lambda *a: model.sample_actions(*a, num_steps=10))(*obs, jnp.asarray(x["state"]),
                                                                        jnp.asarray(x["noise"]))
    np.testing.assert_allclose(actions, want["actions"], atol=1e-4, rtol=1e-4)


def test_a_checkpoint_openpi_wrote_reads_exactly_and_writes_back_the_same(tmp_path):
    """tests/data/pi0_openpi/tiny_checkpoint was written by openpi's code (orbax params item, norm stats
    through openpi.shared.normalize): vlajax reads the same arrays, converts them to its model and
    back, and writes a checkpoint that reads back bit for bit."""
    params, _, _ = _fixture()
    got = read_params(FIXTURE / "tiny_checkpoint")
    assert _same(got, params)
    stats = read_norm_stats(FIXTURE / "tiny_checkpoint")
    assert set(stats) == {"state", "actions"} and stats["state"]["q99"].shape == (8,)
    cfg = config_from_params(got, action_horizon=5, max_token_len=12)
    again = to_openpi(from_openpi(got, cfg), cfg)
    write_checkpoint(tmp_path / "out", again, {"tiny_robot": stats})
    assert _same(read_params(tmp_path / "out"), params)
    assert _same(read_norm_stats(tmp_path / "out", "tiny_robot"), stats)


def _actor(temperature_noise: float = 0.5, **kw):
    """The tiny π0 with the fixture's weights as an RL actor (4 of its 5 actions, 7 of 8 dims executed)."""
    from vlajax.model.pi0.actor import Pi0Actor, Pi0ActorConfig

    params, x, _ = _fixture()
    cfg = config_from_params(params, action_horizon=5, max_token_len=12)
    actor = Pi0Actor(Pi0ActorConfig(model=cfg, chunk=4, action_dim=7, proprio_dim=8, num_steps=4,
                                    noise_level=temperature_noise, **kw), nnx.Rngs(0))
    load_into(actor.pi0, params)
    return actor, x


def test_the_flow_sde_actor_scores_its_own_samples_and_its_greedy_chain_is_openpis_ode():
    """Flow-SDE (vlajax.model.pi0.actor): the log-probs `sample_actions` returns are what `log_prob`
    computes for the same chain (what makes the PPO ratio 1 before an update); at temperature 0 the
    chain is the deterministic Euler ODE (4 steps here), ending where `Pi0.sample_actions` (openpi's
    sampler, matched above) does from the same noise; only the executed 4 x 7 elements are scored."""
    actor, x = _actor()
    images = jnp.asarray(np.stack([x[f"image/{c}"] for c in CAMERAS[:3]], axis=1))
    pv = actor.preprocess_images(images, flip=False)
    ids, mask = jnp.asarray(x["tokenized_prompt"]), jnp.asarray(x["tokenized_prompt_mask"]).astype(jnp.int32)
    state = jnp.asarray(x["state"])
    keys = jax.random.split(jax.random.key(3), 2)
    chain, logp = jax.jit(lambda k: actor.sample_actions(pv, ids, mask, state, k, temperature=1.6))(keys)
    assert chain.shape == (2, 5, 40) and logp.shape == (2, 28)
    again, ent, mode = jax.jit(lambda c: actor.log_prob(pv, ids, mask, state, c, temperature=1.6))(chain)
    np.testing.assert_allclose(again, logp, atol=1e-4, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(ent))) and mode.shape == (2, 28)
    greedy, zero = actor.sample_actions(pv, ids, mask, state, keys, temperature=0.0)
    assert not np.asarray(zero).any()
    noise = jax.vmap(lambda k: jax.random.normal(k, (5, 5, 8)))(keys)[:, 0]
    ode = actor.pi0.sample_actions(pv, jnp.ones((2, 3), bool), ids, mask > 0, state, noise, num_steps=4)
    np.testing.assert_allclose(np.asarray(greedy)[:, -1].reshape(2, 5, 8), ode, atol=1e-5)


def test_the_greedy_mean_chain_is_deterministic_and_the_most_likely_chain_of_the_flow_sde_policy():
    """greedy_chain="mean" from 0 (what a policy RL trained from scratch is validated with): every key
    gives the same chain, and under the policy at temperature 1 each of its steps sits at its Gaussian's
    mode (log-prob -log(scale) - log(2 pi) / 2 per step and element, the most any chain can score)."""
    import math

    actor, x = _actor(greedy_chain="mean", greedy_from_noise=False)
    images = jnp.asarray(np.stack([x[f"image/{c}"] for c in CAMERAS[:3]], axis=1))
    pv = actor.preprocess_images(images, flip=False)
    ids, mask = jnp.asarray(x["tokenized_prompt"]), jnp.asarray(x["tokenized_prompt_mask"]).astype(jnp.int32)
    state = jnp.asarray(x["state"])
    a, _ = actor.sample_actions(pv, ids, mask, state, jax.random.split(jax.random.key(0), 2), temperature=0.0)
    b, _ = actor.sample_actions(pv, ids, mask, state, jax.random.split(jax.random.key(1), 2), temperature=0.0)
    np.testing.assert_array_equal(a, b)
    assert not np.asarray(a)[:, 0].any()  # from the prior's mode
    logp, _, _ = actor.log_prob(pv, ids, mask, state, a, temperature=1.0)
    scale = 0.5 * math.sqrt(1 / 4)
    np.testing.assert_allclose(logp, 4 * (-math.log(scale) - 0.5 * math.log(2 * math.pi)), rtol=1e-5)
    ode, _ = _actor()[0].sample_actions(pv, ids, mask, state, jax.random.split(jax.random.key(0), 2), temperature=0.0)
    assert not np.allclose(np.asarray(ode)[:, -1], np.asarray(a)[:, -1], atol=1e-3)  # the ODE is another chain


def test_the_tiny_pi0_trains_through_vlajax_train_on_the_tabletop_task(tmp_path):
    """The `pi0` family end to end through the unchanged `vlajax train`: Flow-SDE chains from the decoder,
    stored whole by the rollout, scored by the learner (PPO ratio 1 on the first epoch's batches),
    then a greedy (ODE) evaluation."""
    import json

    from tests.conftest import TINY_RUN
    from vlajax.cli import main

    run = tmp_path / "run"
    assert main(["train", "pi0_tabletop", *TINY_RUN,
                 "trainer.total_training_steps=2", "trainer.save_freq=-1", f"trainer.default_local_dir={run}",
                 "actor_rollout_ref.model.enable_gradient_checkpointing=true"]) == 0  # remat through the steps
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "actor/ratio_mean" in r]
    assert len(steps) == 2 and all(abs(r["actor/ratio_mean"] - 1) < 0.02 for r in steps)
    # 2 steps x 8 episodes x 2 policy calls, each scoring 8 actions x 7 dims of its chain
    assert all(np.isfinite(r["actor/pg_loss"]) and r["actor/valid_tokens"] > 0 for r in steps)
    assert any((run / "eval").iterdir())  # the final greedy evaluation (the ODE) wrote its table


@pytest.mark.slow
def test_grpo_teaches_the_tiny_pi0_the_tabletop_task_from_scratch(tmp_path):
    """`vlajax train pi0_tabletop` as shipped, 120 steps instead of 300: greedy success (each Flow-SDE
    step's mean from a N(0, I) draw, on 192 fixed states: the draw makes it noisy, 0.30 and 0.38 at step
    100 under two keys) and the sampled rollouts' success rise significantly above their start (here:
    greedy 0.17 -> 0.41, z 5.2; sampled 0.21 -> 0.35, z 4.9). ~4.5 min on 2 cores."""
    from tests.conftest import success_rise
    from vlajax.config import load_config
    from vlajax.train import train

    run = tmp_path / "run"
    res = train(load_config("pi0_tabletop", [
        "trainer.total_training_steps=120", "trainer.test_freq=-1", "trainer.save_freq=-1", "trainer.logger=[jsonl]",
        "data.val_num_trials_per_task=64", f"trainer.default_local_dir={run}"]))
    assert res.steps == 120
    r = success_rise(run, res)
    assert r.n_val == 3 * 64
    before, z_val, z_train = r.before, r.z_val, r.z_train
    summary = (f"greedy {before:.3f} -> {r.after:.3f} (z {z_val:.1f}); sampled {r.first[0] / r.first[1]:.3f} "
               f"(steps 1-10) -> {r.last[0] / r.last[1]:.3f} (steps 111-120) (z {z_train:.1f})")
    print(summary)
    assert before < 0.3 and z_val > 2.5 and z_train > 3.0, summary


def test_vlajax_convert_carries_an_openpi_checkpoint_through_vlajax_exactly(tmp_path, capsys):
    from vlajax.cli import main

    assert main(["convert", "--family", "pi0", str(FIXTURE / "tiny_checkpoint"), str(tmp_path / "out")]) == 0
    assert "(openpi layout); 208,456 parameters" in capsys.readouterr().out
    assert _same(read_params(tmp_path / "out"), read_params(FIXTURE / "tiny_checkpoint"))
    assert _same(read_norm_stats(tmp_path / "out"), read_norm_stats(FIXTURE / "tiny_checkpoint"))
    assert main(["convert", "--family", "pi0", "--to", "hf", str(FIXTURE / "tiny_checkpoint"), str(tmp_path / "o2")]) != 0
    assert "--to hf does not apply to --family pi0" in capsys.readouterr().err


def _pi0_spec(path, **kw):
    from vlajax.model.family import PolicySpec

    opts = {"num_steps": 3, "noise_level": 0.5, "action_horizon": 5, **kw.pop("options", {})}
    return PolicySpec(path=str(path), num_images=2, proprio_dim=8, chunk=5, action_dim=7, compute_dtype="float32",
                      options=opts, **kw)


def test_an_openpi_checkpoint_loads_with_its_weights_norm_stats_and_tokenizer(tmp_path):
    """`actor_rollout_ref.model.path` = an openpi checkpoint: openpi's weights (cast to the run's
    dtype), z-score statistics per asset id (state in, actions out, over the robot's dims), PaliGemma's
    prompt format from the tokenizer file the run names."""
    from tests.conftest import openpi_checkpoint, sentencepiece_model
    from vlajax.model.family import get_family

    ckpt = openpi_checkpoint(tmp_path / "ckpt", "physical-intelligence/libero")
    sp = sentencepiece_model(tmp_path / "sp.model")
    family = get_family("pi0")
    assert family.recognizes(ckpt) and not family.recognizes(tmp_path)
    policy = family.load(_pi0_spec(ckpt, options={"tokenizer_path": str(sp)}))
    assert policy.cfg.model.action_horizon == 5 and policy.cfg.model.num_images == 2
    want = from_openpi(read_params(ckpt), policy.cfg.model)
    got = policy.params()["pi0"]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)))
    stats = read_norm_stats(ckpt, "physical-intelligence/libero")
    mean, std = policy.proprio_stats("physical-intelligence/libero")
    np.testing.assert_array_equal(mean, stats["state"]["mean"])
    chain = np.random.default_rng(0).normal(size=(2, 4, 5 * 8)).astype(np.float32)  # K + 1 = 4 states
    actions = policy.tokens_to_actions(chain, "physical-intelligence/libero")
    x0 = chain[:, -1].reshape(2, 5, 8)[:, :, :7]
    np.testing.assert_allclose(actions, x0 * (stats["actions"]["std"] + 1e-6) + stats["actions"]["mean"], rtol=1e-6)
    ids, mask = policy.tokenizer.encode(["put the red mug on the plate"], pad_to=24)
    assert ids.shape == (1, 24) and mask.dtype == np.int32 and ids[0, 0] == policy.tokenizer.sp.bos_id()


def test_pi0_normalises_the_robot_state_with_z_scores_in_the_decoder(tmp_path):
    """π0 policies say how their robot state is normalised (`proprio_norm`): the decoder and the
    learner's batches apply openpi's (x - mean) / (std + 1e-6), unclipped; a preset trained from scratch
    gets the simulator's q01 / q99 as mean / std, so q01..q99 still maps onto [-1, 1]."""
    from tests.conftest import openpi_checkpoint, sentencepiece_model
    from vlajax.envs.tabletop import scratch_statistics
    from vlajax.model.family import get_family
    from vlajax.model.pi0.family import openpi_statistics
    from vlajax.rl.policy_step import PolicyDecoder

    ckpt = openpi_checkpoint(tmp_path / "ckpt", "tabletop")
    policy = get_family("pi0").load(_pi0_spec(ckpt, options={"tokenizer_path": str(sentencepiece_model(tmp_path / "s"))}))
    dec = PolicyDecoder(policy, prompt_len=16, flip=False, unnorm_key="tabletop", gripper=None)
    state = np.random.default_rng(1).normal(0, 3, (4, 8)).astype(np.float32)
    st = read_norm_stats(ckpt, "tabletop")["state"]
    np.testing.assert_allclose(dec.model_proprio(state), (state - st["mean"]) / (st["std"] + 1e-6), rtol=1e-5)
    assert np.abs(dec.model_proprio(state)).max() > 1  # not clipped as OFT's bounds are

    scratch = scratch_statistics(7, "tabletop")["tabletop"]
    z = openpi_statistics({"t": scratch_statistics(7, "t")["t"]})["t"]
    lo, hi = np.asarray(scratch["proprio"]["q01"]), np.asarray(scratch["proprio"]["q99"])
    np.testing.assert_allclose((lo - z["state"]["mean"]) / z["state"]["std"], -1, atol=1e-6)
    np.testing.assert_allclose((hi - z["state"]["mean"]) / z["state"]["std"], 1, atol=1e-6)
    assert z["actions"]["mean"].tolist() == [0.0] * 7 and z["actions"]["std"].tolist() == [1.0] * 7


def test_what_a_pi0_run_cannot_load_is_a_config_error_naming_the_key(tmp_path):
    from tests.conftest import TINY_RUN, openpi_checkpoint, sentencepiece_model
    from vlajax.config import ConfigError, load_config
    from vlajax.session import build_policy

    ckpt = openpi_checkpoint(tmp_path / "ckpt", "tabletop")
    base = ["actor_rollout_ref.model.family=pi0", f"actor_rollout_ref.model.path={ckpt}",
            "actor_rollout_ref.model.image_size=null", *TINY_RUN[1:]]
    with pytest.raises(ConfigError, match=r"actor_rollout_ref.model.tokenizer_path=.*missing.model.*does not exist"):
        build_policy(load_config("pi0_tabletop", base + [f"actor_rollout_ref.model.tokenizer_path={tmp_path}/missing.model"]))
    sp = sentencepiece_model(tmp_path / "sp.model")
    with pytest.raises(ConfigError, match=r"actor_rollout_ref.model.image_size=56 .* sees 224 px images"):
        build_policy(load_config("pi0_tabletop", base + [f"actor_rollout_ref.model.tokenizer_path={sp}",
                                                         "actor_rollout_ref.model.image_size=56"]))
    with pytest.raises(ConfigError, match=r"actor_rollout_ref.model.path=.* is not an openpi checkpoint"):
        build_policy(load_config("pi0_tabletop", base[:1] + [f"actor_rollout_ref.model.path={tmp_path}"] + base[2:]
                                 + [f"actor_rollout_ref.model.tokenizer_path={sp}"]))
    with pytest.raises(ConfigError, match=r"actor_rollout_ref.model.num_steps=0 .* must be >= 1"):
        build_policy(load_config("pi0_tabletop", ["actor_rollout_ref.model.num_steps=0"]))
    # a key of another family is an error where it is set, not ignored
    with pytest.raises(ConfigError, match=r"actor_rollout_ref.model.action_queries=True does not apply to the pi0 policy"):
        build_policy(load_config("pi0_tabletop", ["actor_rollout_ref.model.action_queries=true"]))
    with pytest.raises(ConfigError, match=r"actor_rollout_ref.model.num_steps=4 does not apply to the oft policy family"):
        build_policy(load_config("demo", ["actor_rollout_ref.model.num_steps=4"]))


def test_vlajax_eval_recognises_an_openpi_checkpoint_and_runs_it_as_pi0(tmp_path, capsys):
    """`vlajax eval <openpi checkpoint> --suite ...`: the pi0 family claims the layout, its config for
    the simulator gives the settings (configs/pi0_tabletop.yaml here), the checkpoint's statistics
    un-normalise the actions."""
    from tests.conftest import openpi_checkpoint, sentencepiece_model
    from vlajax.cli import main
    from vlajax.evaluate import eval_config

    ckpt = openpi_checkpoint(tmp_path / "ckpt", "tabletop")
    sp = sentencepiece_model(tmp_path / "sp.model")
    cfg = eval_config(ckpt, "tabletop_anchored", [f"actor_rollout_ref.model.tokenizer_path={sp}"])
    assert cfg.actor_rollout_ref.model.family == "pi0" and cfg.trainer.experiment_name == "pi0_tabletop"
    assert main(["eval", str(ckpt), "--suite", "tabletop_anchored", "--trials", "2", "--out", str(tmp_path / "ev"),
                 f"actor_rollout_ref.model.tokenizer_path={sp}", "actor_rollout_ref.model.num_steps=2",
                 "actor_rollout_ref.model.action_horizon=8", "env.train.num_envs=2", "env.train.max_episode_steps=16",
                 "env.train.init_params.camera_heights=32", "env.train.init_params.camera_widths=32"]) == 0
    assert "greedy success on tabletop_anchored" in capsys.readouterr().out
    assert (tmp_path / "ev" / "tabletop_anchored.md").exists() or any((tmp_path / "ev").iterdir())
