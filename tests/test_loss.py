import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlajax.model.oft.actions import token_logprobs as token_logprobs_and_entropy
from vlajax.rl.loss import kl_penalty, ppo_clip_loss as _eager_loss

# jitted: one compile per static configuration is much cheaper than eager op-by-op dispatch
ppo_clip_loss = jax.jit(_eager_loss, static_argnames=(
    "clip_low", "clip_high", "dual_clip_c", "log_ratio_clip", "entropy_coef", "kl_coef", "kl_type"))

# One token per case; clip_low=0.2, clip_high=0.28, dual clip c=3:
#   a: A=+1, r=1.5 -> max(-1.5, -1.28) = -1.28      clip-high active
#   b: A=+1, r=0.5 -> max(-0.5, -0.8)  = -0.5       unclipped
#   c: A=-1, r=0.5 -> max(0.5, 0.8)    =  0.8       clip-low active
#   d: A=-1, r=4.0 -> max(4, 1.28) = 4 -> min(4, 3) = 3   dual clip active
#   e: A=-2, r=1.1 -> 2.2                           unclipped
#   f: masked, garbage inputs
RATIOS = np.array([1.5, 0.5, 0.5, 4.0, 1.1, 1.0])
ADV = np.array([1.0, 1.0, -1.0, -1.0, -2.0, 5.0], np.float32)
MASK = np.array([1, 1, 1, 1, 1, 0], np.float32)


def _inputs():
    old = np.array([-1.0, -2.0, -0.5, -3.0, -1.5, np.nan], np.float32)
    logp = (np.where(np.isnan(old), 0.0, old) + np.log(RATIOS)).astype(np.float32)
    return jnp.asarray(logp)[None], jnp.asarray(old)[None], jnp.asarray(ADV)[None], jnp.asarray(MASK)[None]


def test_ppo_clip_hand_values():
    logp, old, adv, mask = _inputs()
    loss, m = ppo_clip_loss(logp, old, adv, mask)
    np.testing.assert_allclose(loss, (-1.28 - 0.5 + 0.8 + 3.0 + 2.2) / 5, rtol=1e-5)
    np.testing.assert_allclose(m["pg_loss"], loss)
    np.testing.assert_allclose(m["clipfrac"], 2 / 5)  # a and c
    np.testing.assert_allclose(m["clipfrac_high"], 1 / 5)
    np.testing.assert_allclose(m["clipfrac_low"], 1 / 5)
    np.testing.assert_allclose(m["dual_clipfrac"], 1 / 5)
    np.testing.assert_allclose(m["ratio_mean"], (1.5 + 0.5 + 0.5 + 4 + 1.1) / 5, rtol=1e-5)
    np.testing.assert_allclose(m["approx_kl_k1"], -np.log(1.5 * 0.5 * 0.5 * 4 * 1.1) / 5, rtol=1e-5)
    r = RATIOS[:5]
    np.testing.assert_allclose(m["approx_kl_k3"], np.mean(r - 1 - np.log(r)), rtol=1e-5)
    assert float(m["valid_tokens"]) == 5


def test_ppo_clip_gradients():
    logp, old, adv, mask = _inputs()
    g = jax.jit(jax.grad(lambda lp: _eager_loss(lp, old, adv, mask)[0]))(logp)
    # d/dlogp of -A*r is -A*r where unclipped (b, e); 0 where clipped (a, c, d) or masked
    np.testing.assert_allclose(g[0], [0, -0.5 / 5, 0, 0, 2.2 / 5, 0], atol=1e-6)


def test_dual_clip_off_and_advantage_shapes():
    logp, old, adv, mask = _inputs()
    loss, m = ppo_clip_loss(logp, old, adv, mask, dual_clip_c=None)
    np.testing.assert_allclose(loss, (-1.28 - 0.5 + 0.8 + 4.0 + 2.2) / 5, rtol=1e-5)
    assert float(m["dual_clipfrac"]) == 0.0
    # (B,) advantages are broadcast over tokens
    lp2, old2, mask2 = jnp.tile(logp, (2, 1)), jnp.tile(old, (2, 1)), jnp.tile(mask, (2, 1))
    l_vec, _ = ppo_clip_loss(lp2, old2, jnp.array([1.0, -1.0]), mask2)
    l_mat, _ = ppo_clip_loss(lp2, old2, jnp.array([[1.0] * 6, [-1.0] * 6]), mask2)
    np.testing.assert_allclose(l_vec, l_mat)
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        _eager_loss(logp, old, adv, mask, dual_clip_c=0.5)


def test_all_masked_microbatch_is_finite_with_zero_grad():
    logp = jnp.full((3, 56), -5.0)
    old = jnp.full((3, 56), jnp.nan)  # garbage in padding rows
    adv = jnp.full((3,), jnp.inf)
    mask = jnp.zeros((3, 56))
    ent = jnp.full((3, 56), jnp.nan)
    f = lambda lp: _eager_loss(lp, old, adv, mask, entropy=ent, entropy_coef=0.01,  # noqa: E731
                               ref_logp=old, kl_coef=0.1)
    (loss, m), g = jax.jit(jax.value_and_grad(f, has_aux=True))(logp)
    assert float(loss) == 0.0
    assert all(np.isfinite(np.asarray(v)) for v in m.values())
    assert np.all(np.asarray(g) == 0.0)


def test_entropy_kl_terms_and_num_tokens():
    logp = jnp.array([[-1.0, -2.0]])
    old = logp
    adv = jnp.array([[1.0, 1.0]])
    mask = jnp.array([[1.0, 1.0]])
    ent = jnp.array([[2.0, 4.0]])
    ref = jnp.array([[-1.5, -2.0]])
    loss, m = ppo_clip_loss(logp, old, adv, mask, entropy=ent, entropy_coef=0.1,
                            ref_logp=ref, kl_coef=0.5, kl_type="low_var_kl")
    k3 = np.exp(-0.5) + 0.5 - 1  # exp(ref - logp) - (ref - logp) - 1 on token 0; token 1: 0
    np.testing.assert_allclose(m["kl_loss"], k3 / 2, rtol=1e-5)
    np.testing.assert_allclose(m["entropy"], 3.0)
    np.testing.assert_allclose(loss, -1.0 - 0.1 * 3.0 + 0.5 * k3 / 2, rtol=1e-5)
    # num_tokens: divide by a mini-batch token count instead of this micro-batch's
    l4, _ = ppo_clip_loss(logp, old, adv, mask, num_tokens=4.0)
    np.testing.assert_allclose(l4, -2.0 / 4, rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(jnp.array(-1.0), jnp.array(-1.5), "k1"), 0.5)
    with pytest.raises(ValueError, match="unknown kl_type"):
        kl_penalty(logp, ref, "bogus")
    with pytest.raises(ValueError, match="entropy_coef"):
        _eager_loss(logp, old, adv, mask, entropy_coef=0.1)


def test_jit_matches_eager():
    logp, old, adv, mask = _inputs()
    eager = _eager_loss(logp, old, adv, mask)
    jitted = ppo_clip_loss(logp, old, adv, mask)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)


def test_token_logprobs_and_entropy_hand_values():
    temp = 1.6
    logits = np.zeros((1, 2, 256), np.float32)
    logits[0, 0, 5] = temp * np.log(257.0)  # z_5 = log 257 -> p_5 = 257/512, others 1/512
    tokens = jnp.array([[5, 9]])
    logp, ent = token_logprobs_and_entropy(jnp.asarray(logits), tokens, temp)
    p5, po = 257 / 512, 1 / 512
    np.testing.assert_allclose(logp[0], [np.log(p5), np.log(1 / 256)], rtol=1e-5)
    h0 = -(p5 * np.log(p5) + 255 * po * np.log(po))
    np.testing.assert_allclose(ent[0], [h0, np.log(256)], rtol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(jnp.asarray(logits), tokens, 0.0)
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs_and_entropy(jnp.asarray(logits), tokens[:, :1], 1.0)
