"""From-scratch init schemes (vlajax.model.init): fan-in kernels, unit tables, ordinal action head."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from vlajax.model import build_model, preset
from vlajax.model.actions import tokens_to_normalized
from vlajax.model.init import apply_init, bin_values


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
