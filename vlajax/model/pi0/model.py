"""π0 (openpi's `Pi0`, pi05=False) in Flax NNX: PaliGemma sees the images and the prompt (the prefix),
the action expert sees the robot state and the noisy action chunk with the flow time (the suffix),
and the velocity of the flow comes out of the expert's action rows.

Attention (openpi's `make_attn_mask`): each token has a block id, the cumulative sum of its
"starts a new block" flag; a token attends to every valid token of its own block and the ones
before. Prefix = images + prompt (one block, full attention), then the state token (a block of
its own), then the action tokens (one block): so the prefix never sees the state or the actions,
and the state never sees the actions. Positions count valid tokens only.

Sampling integrates the flow ODE with Euler steps from t = 1 (noise) to t = 0 (actions), dt =
-1 / num_steps, with the prefix's keys and values computed once (openpi's convention, the reverse of
the paper's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlajax.model.layers import Linear
from vlajax.model.pi0.config import Pi0Config
from vlajax.model.pi0.gemma import MixtureGemma
from vlajax.model.vit import ViT

__all__ = ["Pi0", "make_attn_mask", "posemb_sincos"]


def make_attn_mask(input_mask: jax.Array, ar_mask: jax.Array) -> jax.Array:
    """(B, N, N) bool: query i sees key j iff both are valid and j's block id <= i's (module docstring).
    input_mask (B, N) bool; ar_mask (N,) or (B, N) bool, True where a new block starts."""
    ar_mask = jnp.broadcast_to(ar_mask, input_mask.shape)
    block = jnp.cumsum(ar_mask, axis=1)
    return (block[:, None, :] <= block[:, :, None]) & (input_mask[:, None, :] & input_mask[:, :, None])


def posemb_sincos(t: jax.Array, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> jax.Array:
    """(B,) scalars -> (B, dim) [sin, cos] features over periods geometric in [min_period, max_period]."""
    if dim % 2:
        raise ValueError(f"embedding dim {dim} must be even")
    fraction = jnp.linspace(0.0, 1.0, dim // 2)
    period = min_period * (max_period / min_period) ** fraction
    x = jnp.einsum("i,j->ij", t, 1.0 / period * 2 * jnp.pi, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


class Pi0(nnx.Module):
    """Shapes: images (B, n_img, S, S, 3) float in [-1, 1] (S = `cfg.vision.image_size`), image_masks
    (B, n_img) bool; tokens / token_mask (B, L) int32 / bool; state (B, A) float; actions, noise
    (B, H, A) with H = `cfg.action_horizon`, A = `cfg.action_dim`; time (B,) in [0, 1]."""

    def __init__(self, cfg: Pi0Config, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        e = cfg.expert.width
        self.img = ViT(cfg.vision, rngs)
        self.img_head = Linear(cfg.vision.width, cfg.llm.width, bias=True, axes=("vit_embed", "embed"), rngs=rngs)
        self.llm = MixtureGemma([cfg.llm, cfg.expert], cfg.vocab_size, rngs)
        self.state_proj = Linear(cfg.action_dim, e, bias=True, axes=(None, "embed"), rngs=rngs)
        self.action_in_proj = Linear(cfg.action_dim, e, bias=True, axes=(None, "embed"), rngs=rngs)
        self.action_time_mlp_in = Linear(2 * e, e, bias=True, axes=("embed", "mlp"), rngs=rngs)
        self.action_time_mlp_out = Linear(e, e, bias=True, axes=("mlp", "embed"), rngs=rngs)
        self.action_out_proj = Linear(e, cfg.action_dim, bias=True, axes=("embed", None), rngs=rngs)

    # -- embeddings ----------------------------------------------------------------------------------
    def embed_prefix(self, images, image_masks, tokens, token_mask, dtype=jnp.float32):
        """(tokens (B, n_img * patches + L, width), valid (B, ·) bool, new-block flags (·,) bool)."""
        b, n_img = images.shape[:2]
        pixels = images.reshape(b * n_img, *images.shape[2:]).transpose(0, 3, 1, 2)  # (B n_img, 3, S, S)
        feats = self.img(pixels, dtype=dtype)
        img = self.img_head(feats, dtype).reshape(b, n_img * feats.shape[1], -1)
        img_valid = jnp.repeat(image_masks.astype(bool), feats.shape[1], axis=1)
        text = self.llm.embed(tokens, dtype)
        x = jnp.concatenate([img.astype(dtype), text], axis=1)
        valid = jnp.concatenate([img_valid, token_mask.astype(bool)], axis=1)
        return x, valid, jnp.zeros((x.shape[1],), bool)

    def embed_suffix(self, state, noisy_actions, time, dtype=jnp.float32):
        """(tokens (B, 1 + H, expert width), valid, new-block flags): the state token, then the actions
        mixed with the flow time's sin-cos features by an MLP."""
        b, h = noisy_actions.shape[:2]
        state_tok = self.state_proj(state.astype(dtype), dtype)[:, None, :]
        act = self.action_in_proj(noisy_actions.astype(dtype), dtype)
        t = posemb_sincos(time, act.shape[-1]).astype(dtype)
        at = jnp.concatenate([act, jnp.broadcast_to(t[:, None, :], act.shape)], axis=-1)
        at = self.action_time_mlp_out(nnx.swish(self.action_time_mlp_in(at, dtype)), dtype)
        x = jnp.concatenate([state_tok, at], axis=1)
        ar = jnp.array([True, True] + [False] * (h - 1))
        return x, jnp.ones((b, 1 + h), bool), ar

    # -- the flow --------------------------------------------------------------------------------------
    def velocity(self, prefix: tuple, state, x_t, time, dtype=jnp.float32) -> jax.Array:
        """(B, H, A) velocity at (x_t, time) given `embed_prefix`'s output, in one forward of prefix and
        suffix (what training differentiates)."""
        p_tok, p_valid, p_ar = prefix
        s_tok, s_valid, s_ar = self.embed_suffix(state, x_t, time, dtype)
        valid = jnp.concatenate([p_valid, s_valid], axis=1)
        mask = make_attn_mask(valid, jnp.concatenate([p_ar, s_ar]))
        positions = jnp.cumsum(valid, axis=1) - 1
        (_, out), _ = self.llm([p_tok, s_tok], positions, mask, dtype=dtype)
        return self.action_out_proj(out[:, -self.cfg.action_horizon:], dtype).astype(jnp.float32)

    def sample_actions(self, images, image_masks, tokens, token_mask, state, noise, *, num_steps: int = 10,
                       dtype=jnp.float32) -> jax.Array:
        """(B, H, A) actions: Euler integration of the flow from `noise` at t = 1 to t = 0."""
        p_tok, p_valid, p_ar = self.embed_prefix(images, image_masks, tokens, token_mask, dtype)
        positions = jnp.cumsum(p_valid, axis=1) - 1
        _, cache = self.llm([p_tok, None], positions, make_attn_mask(p_valid, p_ar), dtype=dtype)
        dt = -1.0 / num_steps
        b = noise.shape[0]

        def step(_, carry):
            x_t, time = carry
            s_tok, s_valid, s_ar = self.embed_suffix(state, x_t, jnp.broadcast_to(time, (b,)), dtype)
            to_prefix = jnp.broadcast_to(p_valid[:, None, :], (b, s_tok.shape[1], p_valid.shape[1]))
            mask = jnp.concatenate([to_prefix, make_attn_mask(s_valid, s_ar)], axis=-1)
            pos = jnp.sum(p_valid, axis=-1)[:, None] + jnp.cumsum(s_valid, axis=-1) - 1
            (_, out), _ = self.llm([None, s_tok], pos, mask, kv_cache=cache, dtype=dtype)
            v_t = self.action_out_proj(out[:, -self.cfg.action_horizon:], dtype).astype(jnp.float32)
            return x_t + dt * v_t, time + dt

        x_0, _ = jax.lax.fori_loop(0, num_steps, step, (noise.astype(jnp.float32), jnp.float32(1.0)))
        return x_0
