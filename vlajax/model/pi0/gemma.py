"""π0's mixture transformer: Gemma blocks with one set of weights per expert (PaliGemma's Gemma for the
prefix, the action expert for the suffix) and one attention over all tokens, as openpi's
`models/gemma.py` computes it.

Per expert and block: RMSNorm with (1 + scale) -> q (N heads), k and v (K heads, GQA) -> RoPE on q and
k, q scaled by head_dim^-0.5 -> attention logits in fp32 over the experts' concatenated tokens under a
boolean (B, T, S) mask -> softmax -> each expert's output projection of its own rows -> residual;
then RMSNorm -> GeGLU MLP (tanh GELU) -> residual. Every projection is a `vlajax.model.layers.Linear`
(openpi's einsum weights reshaped: `openpi_convert`), so LoRA, sharding and remat work as for OFT.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlajax.model.layers import Linear, maybe_remat, param
from vlajax.model.pi0.config import GemmaConfig

__all__ = ["GemmaRMSNorm", "MixtureGemma", "apply_rope"]

BIG_NEG = -2.3819763e38  # the masked logit openpi (and Gemma) use


class GemmaRMSNorm(nnx.Module):
    """x / rms(x) * (1 + scale), computed in fp32, result in x's dtype."""

    def __init__(self, dim: int):
        self.scale = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-6))
        return (y * (1 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: float = 10_000.0) -> jax.Array:
    """RoPE of positions (B, L) on x (B, L, heads, D), in fp32 (halves rotated, not interleaved)."""
    freq_exponents = (2.0 / x.shape[-1]) * jnp.arange(x.shape[-1] // 2, dtype=jnp.float32)
    timescale = max_wavelength ** freq_exponents
    radians = (positions[..., None] / timescale[None, None, :])[..., None, :]
    sin, cos = jnp.sin(radians), jnp.cos(radians)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class ExpertBlock(nnx.Module):
    """One expert's weights in one block."""

    def __init__(self, cfg: GemmaConfig, rngs: nnx.Rngs):
        d, h = cfg.width, cfg.head_dim
        self.cfg = cfg
        self.pre_attention_norm = GemmaRMSNorm(d)
        self.q_proj = Linear(d, cfg.num_heads * h, bias=False, axes=("embed", "qkv"), rngs=rngs)
        self.kv_proj = Linear(d, 2 * cfg.num_kv_heads * h, bias=False, axes=("embed", "qkv"), rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * h, d, bias=False, axes=("qkv", "embed"), rngs=rngs)
        self.pre_ffw_norm = GemmaRMSNorm(d)
        self.gate_proj = Linear(d, cfg.mlp_dim, bias=False, axes=("embed", "mlp"), rngs=rngs)
        self.up_proj = Linear(d, cfg.mlp_dim, bias=False, axes=("embed", "mlp"), rngs=rngs)
        self.down_proj = Linear(cfg.mlp_dim, d, bias=False, axes=("mlp", "embed"), rngs=rngs)

    def qkv(self, x: jax.Array, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        c = self.cfg
        b, t, _ = x.shape
        h = self.pre_attention_norm(x)
        q = self.q_proj(h, dtype).reshape(b, t, c.num_heads, c.head_dim)
        kv = self.kv_proj(h, dtype).reshape(b, t, 2, c.num_kv_heads, c.head_dim)
        return q, kv[:, :, 0], kv[:, :, 1]

    def mlp(self, x: jax.Array, dtype) -> jax.Array:
        h = self.pre_ffw_norm(x)
        gate = jax.nn.gelu(self.gate_proj(h, dtype), approximate=True)
        return x + self.down_proj(gate * self.up_proj(h, dtype), dtype)


def _block(experts: Sequence[ExpertBlock], xs: list, positions, mask, cache, dtype):
    """One block over the experts' token lists (None: that expert has no tokens in this call);
    cache: the (k, v) of earlier tokens (the prefix) or None. Returns the new xs and this call's
    (k, v) with the cache in front."""
    parts = [(e, x) for e, x in zip(experts, xs) if x is not None]
    qkvs = [e.qkv(x, dtype) for e, x in parts]
    q, k, v = (jnp.concatenate(y, axis=1) for y in zip(*qkvs))
    c = experts[0].cfg
    q = apply_rope(q, positions) * jnp.asarray(c.head_dim ** -0.5, q.dtype)
    k = apply_rope(k, positions)
    if cache is not None:
        k = jnp.concatenate([cache[0], k], axis=1)
        v = jnp.concatenate([cache[1], v], axis=1)
    b, t = q.shape[:2]
    q = q.reshape(b, t, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None, :, :], logits, BIG_NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    enc = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, c.num_heads * c.head_dim)
    out, start = [], 0
    for e, x in zip(experts, xs):
        if x is None:
            out.append(None)
            continue
        end = start + x.shape[1]
        out.append(e.mlp(x + e.o_proj(enc[:, start:end], dtype), dtype))
        start = end
    return out, (k, v)


class MixtureGemma(nnx.Module):
    """Gemma blocks over two experts' tokens; the token embedding is the first expert's."""

    def __init__(self, experts: Sequence[GemmaConfig], vocab_size: int, rngs: nnx.Rngs):
        self.configs = tuple(experts)
        self.embedding = param(rngs, (vocab_size, experts[0].width), ("vocab", "embed"))
        self.layers = nnx.List([nnx.List([ExpertBlock(c, rngs) for c in experts]) for _ in range(experts[0].depth)])
        self.final_norms = nnx.List([GemmaRMSNorm(c.width) for c in experts])
        self.remat = False  # set by the learner (vlajax.rl.learner.set_remat)

    def embed(self, tokens: jax.Array, dtype) -> jax.Array:
        """(B, L) ids -> (B, L, width) embeddings scaled by sqrt(width)."""
        x = self.embedding[...][tokens]
        return (x * jnp.sqrt(jnp.float32(x.shape[-1])).astype(x.dtype)).astype(dtype)

    def __call__(self, xs: Sequence[jax.Array | None], positions: jax.Array, mask: jax.Array,
                 kv_cache: Sequence[tuple[jax.Array, jax.Array]] | None = None, dtype=jnp.float32):
        """xs: per expert (B, T_i, width_i) or None; positions (B, sum T_i); mask (B, sum T_i, S) bool
        with S = the cached tokens + sum T_i. Returns (per expert the final-normed outputs or None,
        per block its (k, v) for S tokens: the cache a later call passes as `kv_cache`)."""
        xs = [None if x is None else x.astype(dtype) for x in xs]
        run = maybe_remat(lambda experts, xs, cache: _block(experts, xs, positions, mask, cache, dtype), self.remat)
        caches = []
        for i, experts in enumerate(self.layers):
            xs, kv = run(experts, xs, None if kv_cache is None else kv_cache[i])
            caches.append(kv)
        return [None if x is None else n(x) for n, x in zip(self.final_norms, xs)], caches
