"""The forward's speed-motivated shortcuts give the same numbers as the plain computation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlajax.model.oft import preset
from vlajax.model.oft.init import apply_init
from vlajax.model.layers import gelu
from vlajax.model.oft.pretrained import build_model


def test_gelu_is_exact_erf_gelu():
    x = np.linspace(-12.0, 12.0, 24001)
    want = x * 0.5 * np.vectorize(math.erfc)(-x / math.sqrt(2.0))
    got = np.asarray(gelu(jnp.asarray(x, jnp.float32)), np.float64)
    ref = np.asarray(jax.nn.gelu(jnp.asarray(x, jnp.float32), approximate=False), np.float64)
    tiny = np.abs(want) > 1e-30
    assert np.max(np.abs(got - want)) < 1e-6
    # relative precision in both tails, as good as XLA's own fp32 erf (within 2x)
    assert np.max(np.abs(got - want)[tiny] / np.abs(want[tiny])) < 2 * np.max(np.abs(ref - want)[tiny] / np.abs(want[tiny]))
    # bf16 in, bf16 out: the correctly rounded GELU of the bf16 input
    xb = jnp.asarray(x, jnp.bfloat16)
    xs = np.asarray(xb.astype(jnp.float32), np.float64)
    exact = xs * 0.5 * np.vectorize(math.erfc)(-xs / math.sqrt(2.0))
    rounded = np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
    assert gelu(xb).dtype == jnp.bfloat16
    assert np.mean(np.asarray(gelu(xb).astype(jnp.float32)) == rounded) > 0.999


@pytest.mark.parametrize("remat", [False, "dots"])
def test_last_layer_on_action_rows_only_matches_the_full_sequence(remat):
    """`hidden_states(rows=...)` computes the last layer for those rows alone: same states as the full
    sequence read at the rows (odd and even row counts, rows that differ per batch element)."""
    cfg = preset("small", image_size=28)
    model = build_model(cfg, seed=0)
    apply_init(model, "scratch")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 40, cfg.llm.hidden)), jnp.float32)
    lengths = jnp.asarray([40, 31], jnp.int32)
    full = model.llm.hidden_states(x, lengths)
    for rows in (np.array([[3, 4, 5, 9], [0, 2, 30, 7]]), np.array([[1, 2, 3], [20, 21, 22]])):
        rows = jnp.asarray(rows, jnp.int32)
        got = nnx.jit(lambda m, x, r: m.llm.hidden_states(x, lengths, remat=remat, rows=r))(model, x, rows)
        want = jnp.take_along_axis(full, rows[..., None], axis=1)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_sequences_are_padded_to_even_length_without_changing_the_logits():
    """An odd OFT length gets one masked padding slot (cuDNN needs even lengths); a prompt one token
    wider flips the parity, and the logits of the same prompts agree."""
    cfg = preset("small", image_size=28)
    model = build_model(cfg, seed=0)
    apply_init(model, "scratch")
    rng = np.random.default_rng(1)
    pv = jnp.asarray(rng.normal(size=(2, 6, 28, 28)), jnp.float32)
    ids = np.array([[1, 50, 60, 70, 29871], [1, 80, 29871, 32000, 32000]], np.int32)
    mask = (ids != 32000).astype(np.int32)
    wide_ids = np.pad(ids, ((0, 0), (0, 1)), constant_values=32000)
    wide_mask = np.pad(mask, ((0, 0), (0, 1)))
    outs = []
    for i, m in ((ids, mask), (wide_ids, wide_mask)):
        x, lengths, rows = model.embed_sequence(pv, jnp.asarray(i), jnp.asarray(m), dtype=jnp.float32)
        assert x.shape[1] % 2 == 0
        assert int(lengths.max()) <= x.shape[1]
        outs.append(np.asarray(model.action_logits(pv, jnp.asarray(i), jnp.asarray(m), dtype=jnp.float32)))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
