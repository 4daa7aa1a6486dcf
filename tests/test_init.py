"""From-scratch init schemes (vlajax.model.oft.init): fan-in kernels, unit tables, ordinal action head."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from vlajax.model.oft import build_model, preset
from vlajax.model.oft.actions import tokens_to_normalized
from vlajax.model.oft.init import apply_init, bin_values


def _flat(model):
    return {".".join(map(str, k)): np.asarray(v) for k, v in
            traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


@pytest.fixture(scope="module")
def models():
    cfg = preset("small", image_size=56, proprio_dim=8)
    normal = build_model(cfg, seed=0)
    scratch = build_model(cfg, seed=0)
    apply_init(scratch, "scratch", seed=0)
    return cfg, _flat(normal), _flat(scratch)


def test_bin_values_are_what_tokens_decode_to():
    cols = np.arange(256)[None]
    assert np.array_equal(bin_values(), np.asarray(tokens_to_normalized(cols, 1, 256))[0, 0])
    assert bin_values()[0] == bin_values()[1] > 0.99 and bin_values()[-1] < -0.99  # column 0 = top value


def test_scratch_init_scales_kernels_by_fan_in_and_tables_to_unit(models):
    _, normal, scratch = models
    for name in ("llm.layers.0.q_proj.kernel", "llm.layers.1.down_proj.kernel", "projector.fc1.kernel",
                 "proprio_projector.fc1.kernel", "featurizer.patch_kernel", "fused_featurizer.blocks.0.qkv.kernel"):
        w = scratch[name]
        fan_in = int(np.prod(w.shape[:-1]))
        assert abs(w.std() * np.sqrt(fan_in) - 1.0) < 0.15, (name, w.std(), fan_in)
        assert abs(normal[name].std() - 0.02) < 0.003
    for name in ("llm.embed_tokens", "featurizer.pos_embed", "featurizer.reg_token", "fused_featurizer.pos_embed"):
        assert abs(scratch[name].std() - 1.0) < 0.2, name
    for name in ("llm.norm.weight", "featurizer.blocks.0.ls1", "projector.fc1.bias", "featurizer.blocks.0.norm1.bias"):
        assert np.array_equal(scratch[name], normal[name]), name  # norms, LayerScale, biases untouched


def test_ordinal_head_orders_the_action_columns_and_leaves_the_rest(models):
    cfg, normal, scratch = models
    begin = cfg.action_token_begin
    w_n, w_s = normal["llm.lm_head"], scratch["llm.lm_head"]
    assert np.array_equal(np.delete(w_s, np.s_[begin:begin + 256], axis=1) != 0,
                          np.delete(w_n, np.s_[begin:begin + 256], axis=1) != 0)
    extra = w_s[:, begin:begin + 256] - w_n[:, begin:begin + 256]  # (hidden, 256), rank 2
    s = np.linalg.svd(extra, compute_uv=False)
    assert s[1] > 1.0 and s[2] < 1e-3 * s[0]
    # every hidden state adds a tilt a*v plus a curvature b*v^2 (a discretised Gaussian), nothing else
    v = bin_values().astype(np.float64)
    basis = np.stack([np.ones(256), v, v**2], -1)
    h = np.random.default_rng(0).normal(size=(16, extra.shape[0]))
    logits = h @ extra
    coef, *_ = np.linalg.lstsq(basis, logits.T, rcond=None)
    assert np.abs(basis @ coef - logits.T).max() < 1e-4 * np.abs(logits).max()
    # and some hidden state tilts it monotonically toward the top value
    tilt, *_ = np.linalg.lstsq(extra.T, v, rcond=None)
    assert np.all(np.diff(tilt @ extra) <= 1e-6)  # columns run from the top value down


def test_normal_scheme_changes_nothing_and_unknown_scheme_is_an_error():
    cfg = preset("small", image_size=28)
    m = build_model(cfg, seed=3)
    before = _flat(m)
    apply_init(m, "normal")
    after = _flat(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="unknown init scheme 'xavier'"):
        apply_init(m, "xavier")


def test_scratch_action_rows_carry_unit_scale_signals():
    """The reason for the scheme: with N(0, 0.02) a width-64 model's action rows (zero placeholders)
    hold hidden states of RMS ~0.02, which the final RMSNorm multiplies by ~50: the first optimizer
    step then moves the action distribution by a KL of ~1 nat (measured) and the policy collapses."""
    cfg = preset("small", image_size=28)
    rng = np.random.default_rng(0)
    pv = jnp.asarray(rng.normal(size=(4, 6, 28, 28)), jnp.float32)
    ids = jnp.asarray(np.array([[1, 50, 60, 70, 29871]] * 4), jnp.int32)
    rms = {}
    for scheme in ("normal", "scratch"):
        m = build_model(cfg, seed=0)
        apply_init(m, scheme)
        x, lengths, rows = m.embed_sequence(pv, ids, jnp.ones_like(ids), dtype=jnp.float32)
        h = jnp.take_along_axis(m.llm.hidden_states(x, lengths), rows[..., None], axis=1)
        rms[scheme] = float(jnp.sqrt(jnp.mean(h**2)))
    assert rms["normal"] < 0.05 and 0.5 < rms["scratch"] < 3.0, rms


def _inputs(cfg, b=2):
    from vlajax.model.tokenizer import load_tokenizer

    rng = np.random.default_rng(0)
    ids, mask = load_tokenizer("tiny").encode(["move the gripper to the red block", "go"])
    pv = jnp.asarray(rng.normal(size=(b, 6, cfg.image_size, cfg.image_size)), jnp.float32)
    return pv, jnp.asarray(ids), jnp.asarray(mask)


def test_action_queries_tell_the_action_rows_apart():
    """OFT's zero placeholders make every action row identical after the first layer (zero queries
    attend uniformly); learned queries give each row its own state."""
    cfg = preset("small", image_size=28)
    pv, ids, mask = _inputs(cfg)
    plain = build_model(cfg, seed=0)
    apply_init(plain, "scratch")
    x, _, rows = plain.embed_sequence(pv, ids, mask, dtype=jnp.float32)
    placeholders = np.asarray(jnp.take_along_axis(x, rows[:, 1:, None], axis=1))
    assert np.all(placeholders == 0)  # OFT: zero embeddings

    qcfg = preset("small", image_size=28, action_queries=True)
    model = build_model(qcfg, seed=0)
    apply_init(model, "scratch")
    q = np.asarray(model.action_query[...])
    assert q.shape == (56, qcfg.llm.hidden) and abs(q.std() - 1.0) < 0.2  # a unit table under "scratch"
    x, lengths, rows = model.embed_sequence(pv, ids, mask, dtype=jnp.float32)
    got = np.asarray(jnp.take_along_axis(x, rows[:, 1:, None], axis=1))  # rows 1..55 are placeholders 0..54
    np.testing.assert_allclose(got, np.broadcast_to(q[:55], got.shape), rtol=0, atol=0)
    # the </s> row and the padding are untouched: the sequence ends where OFT's does
    eos = np.asarray(x[np.arange(2), np.asarray(lengths) - 1])
    np.testing.assert_allclose(eos, np.asarray(model.llm.embed(jnp.full((2,), qcfg.eos_id), jnp.float32)))
    logits = np.asarray(model.action_logits(pv, ids, mask, dtype=jnp.float32))
    assert np.abs(logits[:, 1:] - logits[:, 1:2]).max() > 1e-2  # rows differ


def test_action_queries_survive_save_and_load_but_not_hf_export(tmp_path):
    from vlajax.model.oft import Policy, load_pretrained

    cfg = preset("small", image_size=28, action_queries=True)
    model = build_model(cfg, seed=1)
    apply_init(model, "scratch", seed=1)
    Policy(model).save(tmp_path / "p")
    back = load_pretrained(tmp_path / "p")
    assert back.cfg.action_queries
    np.testing.assert_array_equal(np.asarray(back.model.action_query[...]), np.asarray(model.action_query[...]))
    with pytest.raises(ValueError, match="action-query embeddings"):
        back.export_hf(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_build_policy_checks_a_checkpoint_against_the_config(tmp_path):
    from vlajax.config import ConfigError, load_config
    from vlajax.model.oft import Policy
    from vlajax.model.tokenizer import load_tokenizer
    from vlajax.session import build_policy

    Policy(build_model(preset("small", image_size=28), seed=0), tokenizer=load_tokenizer("tiny")).save(tmp_path / "p")
    base = [f"actor_rollout_ref.model.path={tmp_path / 'p'}", "actor_rollout_ref.model.image_size=null",
            "actor_rollout_ref.model.init_scheme=normal"]
    with pytest.raises(ConfigError, match="has no action queries") as e:
        build_policy(load_config("demo", base + ["actor_rollout_ref.actor.use_proprio=false"]))
    assert e.value.key == "actor_rollout_ref.model.action_queries"
    with pytest.raises(ConfigError, match="has no proprio projector") as e:
        build_policy(load_config("demo", base + ["actor_rollout_ref.model.action_queries=false"]))
    assert e.value.key == "actor_rollout_ref.actor.use_proprio"
    ok = ["actor_rollout_ref.model.action_queries=false", "actor_rollout_ref.actor.use_proprio=false"]
    assert not build_policy(load_config("demo", base + ok)).cfg.action_queries


def test_tabletop_presets_carry_the_env_proprio_range():
    """A from-scratch tabletop policy gets statistics as an OFT checkpoint has them: identity actions,
    and the env's proprio range, which the decoder (and, through it, the learner) maps to [-1, 1]."""
    from vlajax.config import load_config
    from vlajax.envs.tabletop import PROPRIO_HIGH, PROPRIO_LOW, Z_START
    from vlajax.model.family import get_family
    from vlajax.rl.policy_step import PolicyDecoder
    from vlajax.session import build_policy

    TABLETOP_STATS_KEY = get_family("oft").adapter("tabletop").stats_key
    policy = build_policy(load_config("demo", ["actor_rollout_ref.model.image_size=28"]))
    assert policy.cfg.action_queries and policy.cfg.proprio_dim == 8
    stats = policy.dataset_statistics[TABLETOP_STATS_KEY]
    np.testing.assert_array_equal(stats["proprio"]["q01"], PROPRIO_LOW)
    dec = PolicyDecoder(policy, flip=False, unnorm_key=TABLETOP_STATS_KEY, gripper=None)
    raw = np.array([PROPRIO_LOW, PROPRIO_HIGH, [0.13, -0.13, Z_START, np.pi, 0, 0, 0.02, 0.0]], np.float32)
    np.testing.assert_allclose(dec.model_proprio(raw), [[-1] * 8, [1] * 8, [0.5, -0.5, 0.0, 0, 0, 0, 1, -1]], atol=1e-5)
    # the identity action statistics decode bins to the normalised values themselves
    tokens = np.arange(56, dtype=np.int32)[None] * 4
    np.testing.assert_allclose(policy.tokens_to_actions(tokens, TABLETOP_STATS_KEY, None),
                               policy.tokens_to_actions(tokens, None, None), atol=1e-6)
