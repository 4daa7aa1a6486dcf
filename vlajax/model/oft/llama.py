"""Llama-2 decoder as OpenVLA-OFT uses it: bidirectional attention with a key-padding mask only.

The OFT fork of transformers makes SDPA non-causal and keeps only the padding row of the mask, so
every token (prompt, patches, action placeholders) attends to every real token. Positions are
0..L-1 over the whole multimodal sequence, which is why padding must be on the right.

Layers are a Python loop, not `lax.scan`: on an H100 the scanned version was 1.9x slower at
batch 1 (anchors.md D.4), and rollout decoding runs at small batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlajax.model.oft.config import LlamaConfig
from vlajax.model.layers import Linear, RMSNorm, attention, maybe_remat, param


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """HF rotate_half RoPE. x: (B, T, H, Dh); positions: (T,) or (B, T). Computed in fp32."""
    dh = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # (T | B, T, Dh/2)
    ang = jnp.concatenate([ang, ang], axis=-1)[..., None, :]  # broadcasts over B (if absent) and H
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : dh // 2], x32[..., dh // 2 :]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rot * sin).astype(x.dtype)


class LlamaBlock(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden, cfg.intermediate
        kv = cfg.num_kv_heads * cfg.head_dim
        self.cfg = cfg
        self.input_layernorm = RMSNorm(d, cfg.rms_eps)
        self.q_proj = Linear(d, d, bias=False, axes=("embed", "qkv"), rngs=rngs)
        self.k_proj = Linear(d, kv, bias=False, axes=("embed", "qkv"), rngs=rngs)
        self.v_proj = Linear(d, kv, bias=False, axes=("embed", "qkv"), rngs=rngs)
        self.o_proj = Linear(d, d, bias=False, axes=("qkv", "embed"), rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_eps)
        self.gate_proj = Linear(d, f, bias=False, axes=("embed", "mlp"), rngs=rngs)
        self.up_proj = Linear(d, f, bias=False, axes=("embed", "mlp"), rngs=rngs)
        self.down_proj = Linear(f, d, bias=False, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, lengths: jax.Array | None,
                 rows: jax.Array | None = None) -> jax.Array:
        """x: (B, T, D) -> (B, T, D); with rows (B, R) only those rows are computed -> (B, R, D)
        (keys and values still come from all T tokens)."""
        cfg = self.cfg
        b, t, d = x.shape
        h = self.input_layernorm(x)
        k = self.k_proj(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        k = rope(k, positions, cfg.rope_theta)
        qpos = positions
        if rows is not None:
            x = jnp.take_along_axis(x, rows[..., None], axis=1)
            h = jnp.take_along_axis(h, rows[..., None], axis=1)
            qpos = rows
        q = rope(self.q_proj(h).reshape(b, h.shape[1], cfg.num_heads, cfg.head_dim), qpos, cfg.rope_theta)
        a = attention(q, k, v, lengths).reshape(b, h.shape[1], d)
        x = x + self.o_proj(a)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden), ("vocab", "embed"))
        self.layers = nnx.List([LlamaBlock(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        # (hidden, vocab): torch's lm_head.weight transposed
        self.lm_head = param(rngs, (cfg.hidden, cfg.vocab_size), ("embed", "vocab"))

    def embed(self, ids: jax.Array, dtype) -> jax.Array:
        return jnp.take(self.embed_tokens[...], ids, axis=0).astype(dtype)

    def hidden_states(self, x: jax.Array, lengths: jax.Array | None, remat: bool | str = False,
                      rows: jax.Array | None = None) -> jax.Array:
        """x: (B, T, D) input embeddings -> (B, T, D) last-layer states before the final norm, or
        (B, R, D) at `rows` (B, R) only: the last layer then computes queries, attention output and
        MLP for those rows alone (for OFT's 56 of ~350 rows, ~2% of the LLM's FLOPs saved).
        remat: per-block activation checkpointing (`layers.maybe_remat`)."""
        positions = jnp.arange(x.shape[1], dtype=jnp.int32)

        def run(block, x, rows):
            return block(x, positions, lengths, rows)

        run = maybe_remat(run, remat)
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            x = run(block, x, rows if i == last else None)
        return x

    def logits(self, h: jax.Array, columns: slice) -> jax.Array:
        """Final norm + lm_head restricted to vocab `columns`, in fp32. h: (B, T, D)."""
        h = self.norm(h)
        w = self.lm_head[...][:, columns].astype(h.dtype)
        return jnp.matmul(h, w, preferred_element_type=jnp.float32)
