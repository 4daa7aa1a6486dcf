"""PPO clipped policy loss (verl semantics), jit-friendly, on per-element log-probs of whatever a
policy family samples (OFT: 56 action tokens per call; a Gaussian family: one per action dim).

Shapes (one row = one policy call = one action chunk, T = 56 for LIBERO):
  logp, old_logp, mask, entropy, ref_logp: (B, T); advantages: (B,) or (B, T).
All Python-level checks are on static shapes/hyper-parameters, so every function here can
be called inside `jax.jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["ppo_clip_loss", "kl_penalty", "masked_mean"]

_KL_TYPES = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")


def masked_mean(x: jax.Array, mask: jax.Array, denom: jax.Array | float | None = None) -> jax.Array:
    """sum(x*mask) / max(sum(mask), 1): 0 (not NaN) for an all-masked input.

    `jnp.where` (not a product) keeps NaN/inf in masked positions out of the value and
    the gradient.
    """
    mask = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(mask > 0, x * mask, 0.0))
    if denom is None:
        denom = jnp.sum(mask)
    return total / jnp.maximum(denom, 1.0)


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kl_type: str = "low_var_kl") -> jax.Array:
    """Per-token KL(pi || pi_ref) estimate from samples of pi (verl's `kl_penalty`).

    k1/"kl": logp - ref; "abs": |logp - ref|; k2/"mse": 0.5 (logp - ref)^2;
    k3/"low_var_kl": exp(ref - logp) - (ref - logp) - 1, clipped to [-10, 10] as verl.
    """
    if kl_type in ("k1", "kl"):
        return logp - ref_logp
    if kl_type == "abs":
        return jnp.abs(logp - ref_logp)
    if kl_type in ("k2", "mse"):
        return 0.5 * jnp.square(logp - ref_logp)
    if kl_type in ("k3", "low_var_kl"):
        d = jnp.clip(ref_logp - logp, -20.0, 20.0)
        return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown kl_type {kl_type!r}; known: {_KL_TYPES}")


def ppo_clip_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip_c: float | None = 3.0,
    log_ratio_clip: float = 20.0,
    entropy: jax.Array | None = None,
    entropy_coef: float = 0.0,
    ref_logp: jax.Array | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "low_var_kl",
    num_tokens: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-level PPO-clip loss with clip-higher and dual-clip (verl `compute_policy_loss`).

      ratio = exp(clip(logp - old_logp, -20, 20))
      pg    = max(-A*ratio, -A*clip(ratio, 1-clip_low, 1+clip_high))
      pg    = min(pg, -A*dual_clip_c)            where A < 0 (dual clip; None disables it,
                                                  as in SimpleVLA-RL)
      loss  = mean_valid(pg) - entropy_coef*mean_valid(entropy) + kl_coef*mean_valid(kl)

    mean_valid = sum(x*mask) / max(sum(mask), 1) ("token-mean"; an all-masked micro-batch
    gives loss 0 and zero, finite gradients). Pass `num_tokens` (e.g. the valid-token count
    of the whole mini-batch) to divide by that instead, so that summing micro-batch losses
    under gradient accumulation gives the mini-batch token mean.

    Metrics (all token means over valid tokens, stop-gradient):
      pg_loss, clipfrac (verl `pg_clipfrac`: the clipped term is the max, gradient cut),
      clipfrac_high (A>0 and ratio>1+clip_high), clipfrac_low (A<0 and ratio<1-clip_low),
      dual_clipfrac (A<0 and -A*c < clipped pg, i.e. verl's `pg_clipfrac_lower`),
      approx_kl_k1 = mean(old_logp - logp) (verl `ppo_kl`),
      approx_kl_k3 = mean(ratio - 1 - log ratio) (non-negative, low variance),
      ratio_mean, entropy (if given), kl_loss (if ref_logp given), valid_tokens.
    """
    _check_inputs(logp, old_logp, mask, dual_clip_c)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    advantages = jnp.broadcast_to(advantages, logp.shape)

    valid = mask.astype(bool)
    maskf = valid.astype(jnp.float32)
    logp = logp.astype(jnp.float32)
    # Sanitize masked positions first: garbage there (padding rows) must not reach exp().
    adv = jnp.where(valid, advantages.astype(jnp.float32), 0.0)
    log_ratio = jnp.where(valid, logp - old_logp.astype(jnp.float32), 0.0)
    log_ratio = jnp.clip(log_ratio, -log_ratio_clip, log_ratio_clip)
    ratio = jnp.exp(log_ratio)
    pg, clipped, dual_active = _clipped_pg(adv, ratio, clip_low, clip_high, dual_clip_c, valid)

    mean = lambda x: masked_mean(x, maskf, num_tokens)  # noqa: E731
    pg_loss = mean(pg)
    metrics = _ratio_metrics(pg_loss, adv, ratio, log_ratio, clipped, dual_active, maskf, clip_low, clip_high)
    loss = pg_loss
    ent = _entropy_term(metrics, entropy, entropy_coef, valid, maskf, mean)
    if ent is not None:
        loss = loss - ent
    kl = _kl_term(metrics, logp, ref_logp, kl_coef, kl_type, valid, mean)
    if kl is not None:
        loss = loss + kl
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics


def _check_inputs(logp, old_logp, mask, dual_clip_c) -> None:
    """Static checks (shapes, the dual-clip bound) for callers outside a config; a run's ranges are
    checked, naming the keys, where its config is loaded (`vlajax.config`)."""
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (verl asserts this), got {dual_clip_c}")
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp {logp.shape}, old_logp {old_logp.shape} and mask {mask.shape} must match"
        )


def _clipped_pg(adv, ratio, clip_low, clip_high, dual_clip_c, valid):
    """Per-token clipped policy-gradient term, whether the clip was the max (pg2 > pg1), and where
    the dual clip bound it."""
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_clipped = jnp.maximum(pg1, pg2)
    if dual_clip_c is None:
        return pg_clipped, pg2 > pg1, jnp.zeros_like(valid)
    pg3 = -adv * dual_clip_c
    pg = jnp.where(adv < 0, jnp.minimum(pg_clipped, pg3), pg_clipped)
    return pg, pg2 > pg1, (adv < 0) & (pg_clipped > pg3)


def _ratio_metrics(pg_loss, adv, ratio, log_ratio, clipped, dual_active, maskf, clip_low, clip_high) -> dict:
    """The stop-gradient metrics of the clipped term (token means over valid tokens)."""
    f = lambda b: masked_mean(b.astype(jnp.float32), maskf)  # noqa: E731
    sg = jax.lax.stop_gradient
    return {
        "pg_loss": sg(pg_loss),
        "clipfrac": f(sg(clipped)),
        "clipfrac_high": f(sg((adv > 0) & (ratio > 1.0 + clip_high))),
        "clipfrac_low": f(sg((adv < 0) & (ratio < 1.0 - clip_low))),
        "dual_clipfrac": f(sg(dual_active)),
        "approx_kl_k1": sg(masked_mean(-log_ratio, maskf)),
        "approx_kl_k3": sg(masked_mean(ratio - 1.0 - log_ratio, maskf)),
        "ratio_mean": sg(masked_mean(ratio, maskf)),
        "valid_tokens": jnp.sum(maskf),
    }


def _entropy_term(metrics, entropy, entropy_coef, valid, maskf, mean):
    """entropy_coef x mean entropy, None without a coefficient; records the `entropy` metric."""
    if entropy is None:
        if entropy_coef:
            raise ValueError("entropy_coef != 0 needs the per-token `entropy`")
        return None
    ent = mean(jnp.where(valid, entropy.astype(jnp.float32), 0.0))
    metrics["entropy"] = jax.lax.stop_gradient(masked_mean(jnp.where(valid, entropy, 0.0), maskf))
    return entropy_coef * ent if entropy_coef else None


def _kl_term(metrics, logp, ref_logp, kl_coef, kl_type, valid, mean):
    """kl_coef x mean KL to the reference, None without a coefficient; records the `kl_loss` metric."""
    if ref_logp is None:
        if kl_coef:
            raise ValueError("kl_coef != 0 needs `ref_logp`")
        return None
    safe_ref = jnp.where(valid, ref_logp.astype(jnp.float32), logp)
    kl = mean(jnp.where(valid, kl_penalty(logp, safe_ref, kl_type), 0.0))
    metrics["kl_loss"] = jax.lax.stop_gradient(kl)
    return kl_coef * kl if kl_coef else None
