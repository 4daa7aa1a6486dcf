"""OpenVLA-OFT (SimpleVLA-OFT): fused DINOv2+SigLIP features -> projector -> bidirectional Llama,
one forward pass giving the logits of a whole action chunk (chunk x action_dim tokens, 256 bins).

Sequence per row (P = real prompt length incl. BOS and the trailing 29871):

    [BOS, vision tokens (Nv), prompt[1:P], 56 zero embeddings, emb(</s>), right padding]

(a from-scratch preset may replace the 56 zeros by learned embeddings, `OFTConfig.action_queries`;
logit row 0 is read at the last prompt token, so rows 1..55 read the states of queries 0..54)

Logits are read at rows Nv + P - 1 + arange(56) (the causal-LM shift: the last prompt token and
the first 55 placeholders) and only over the 256 action columns (ids 31744..31999), so the 32064
wide lm_head product is never formed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlajax.model.oft.actions import token_logprobs
from vlajax.model.preprocess import preprocess_images as prismatic_pixels
from vlajax.model.oft.config import OFTConfig
from vlajax.model.layers import Linear, gelu, param
from vlajax.model.oft.llama import Llama
from vlajax.model.vit import ViT


class Projector(nnx.Module):
    """Prismatic fused-GELU-MLP: 2176 -> 8704 -> GELU -> 4096 -> GELU -> 4096."""

    def __init__(self, din: int, dhidden: int, dout: int, rngs: nnx.Rngs):
        self.fc1 = Linear(din, dhidden, bias=True, axes=("vit_embed", "mlp"), rngs=rngs)
        self.fc2 = Linear(dhidden, dout, bias=True, axes=("mlp", "embed"), rngs=rngs)
        self.fc3 = Linear(dout, dout, bias=True, axes=("embed", "embed_out"), rngs=rngs)

    def __call__(self, x):
        x = gelu(self.fc1(x))
        x = gelu(self.fc2(x))
        return self.fc3(x)


class ProprioProjector(nnx.Module):
    """OFT proprio MLP: proprio_dim -> 4096 -> GELU -> 4096, one token after the patches."""

    def __init__(self, din: int, dout: int, rngs: nnx.Rngs):
        self.fc1 = Linear(din, dout, bias=True, axes=(None, "embed"), rngs=rngs)
        self.fc2 = Linear(dout, dout, bias=True, axes=("embed", "embed_out"), rngs=rngs)

    def __call__(self, x):
        return self.fc2(gelu(self.fc1(x)))


class OpenVLAOFT(nnx.Module):
    # LoRA's default targets (`vlajax.rl.lora`): every Linear of the LLM, as SimpleVLA-RL adapts
    LORA_TARGETS = r"llm\.layers\.\d+\.(q|k|v|o|gate|up|down)_proj"

    def __init__(self, cfg: OFTConfig, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.featurizer = ViT(cfg.dino, rngs)
        self.fused_featurizer = ViT(cfg.siglip, rngs)
        self.projector = Projector(
            cfg.vision_dim, cfg.projector_hidden_mult * cfg.vision_dim, cfg.llm.hidden, rngs
        )
        self.proprio_projector = ProprioProjector(cfg.proprio_dim, cfg.llm.hidden, rngs) if cfg.proprio_dim else None
        self.llm = Llama(cfg.llm, rngs)
        # (56, hidden) embeddings added at the placeholder rows (OFTConfig.action_queries); OFT has none
        self.action_query = (
            param(rngs, (cfg.num_action_tokens, cfg.llm.hidden), (None, "embed")) if cfg.action_queries else None
        )
        self.remat = False  # set by the learner: rematerialise blocks in the backward pass

    def vision_tokens(self, pixel_values: jax.Array, dtype) -> jax.Array:
        """pixel_values (B, 6*n_img, S, S) -> projected tokens (B, n_img*num_patches, hidden)."""
        cfg = self.cfg
        b, c, s, _ = pixel_values.shape
        if c != 6 * cfg.num_images:
            raise ValueError(
                f"pixel_values has {c} channels; this policy takes {cfg.num_images} image(s) = {6 * cfg.num_images}"
            )
        if s != cfg.image_size:
            raise ValueError(f"pixel_values are {s}x{s}; this policy takes {cfg.image_size}x{cfg.image_size}")
        x = pixel_values.reshape(b * cfg.num_images, 6, s, s)
        dino = self.featurizer(x[:, :3], dtype)
        sig = self.fused_featurizer(x[:, 3:], dtype)
        feats = jnp.concatenate([dino, sig], axis=-1)  # [DINOv2 | SigLIP]
        feats = feats.reshape(b, cfg.num_images * feats.shape[1], feats.shape[2])
        return self.projector(feats)

    def embed_sequence(self, pixel_values, input_ids, attention_mask, proprio=None, dtype=jnp.bfloat16):
        """Build the OFT input sequence. Returns (embeddings (B, L, D), lengths (B,), logit_rows (B, 56)).

        L = 1 + Nv + (Pmax - 1) + 56 + 1, rounded up to even, is fixed by the padded prompt width, so
        shapes are static."""
        cfg = self.cfg
        b, pmax = input_ids.shape
        na = cfg.num_action_tokens
        input_ids = input_ids.astype(jnp.int32)
        plen = attention_mask.astype(jnp.int32).sum(-1)  # (B,) P per row

        vis = self.vision_tokens(pixel_values, dtype)
        if self.proprio_projector is not None:
            if proprio is None:
                raise ValueError("this policy uses a proprio token: pass proprio (B, proprio_dim)")
            vis = jnp.concatenate([vis, self.proprio_projector(proprio.astype(dtype))[:, None]], axis=1)
        nv = vis.shape[1]

        # Tail after the vision tokens: prompt[1:P], 56 zeros, </s>, padding. s indexes the tail. One
        # more padding slot when L would be odd: cuDNN attention needs even lengths, and padding q, k, v
        # inside each of the 32 layers cost ~0.17 ms per layer at batch 32 on an H200.
        tail_len = pmax - 1 + na + 1
        tail_len += (1 + nv + tail_len) % 2
        s = jnp.arange(tail_len, dtype=jnp.int32)[None, :]
        p1 = plen[:, None] - 1  # prompt tokens after BOS
        src = jnp.minimum(s + 1, pmax - 1)
        shifted = jnp.take_along_axis(input_ids, jnp.broadcast_to(src, (b, s.shape[1])), axis=1)
        tail_ids = jnp.where(s < p1, shifted, jnp.where(s == p1 + na, cfg.eos_id, cfg.pad_id))
        keep = (s < p1) | (s == p1 + na)  # placeholders and padding are zero vectors
        tail = self.llm.embed(tail_ids, dtype) * keep[..., None].astype(dtype)
        if self.action_query is not None:
            slot = s - p1  # (B, T): action row index at the placeholders
            at = ((slot >= 0) & (slot < na))[..., None].astype(dtype)
            tail = tail + at * jnp.take(self.action_query[...].astype(dtype), jnp.clip(slot, 0, na - 1), axis=0)

        bos = self.llm.embed(input_ids[:, :1], dtype)
        x = jnp.concatenate([bos, vis, tail], axis=1)
        lengths = plen + nv + na + 1
        rows = nv + p1 + jnp.arange(na, dtype=jnp.int32)[None, :]
        return x, lengths, rows

    def action_logits(self, pixel_values, input_ids, attention_mask, proprio=None, dtype=jnp.bfloat16):
        """(B, 56, 256) float32 logits; column j is token id 31744 + j.

        pixel_values: (B, 6*n_img, S, S) float32 as the HF processor produces them;
        input_ids: (B, P) int32 BOS ... 29871 right-padded with 32000; attention_mask: (B, P)."""
        x, lengths, rows = self.embed_sequence(pixel_values, input_ids, attention_mask, proprio, dtype)
        h = self.llm.hidden_states(x, lengths, remat=self.remat, rows=rows)  # (B, 56, D)
        begin = self.cfg.action_token_begin
        return self.llm.logits(h, slice(begin, begin + self.cfg.n_bins))

    # -- the family's model interface (`vlajax.model.family.ActionModel`) --------------------------
    def preprocess_images(self, images, *, flip: bool, center_crop: bool, crop_offsets=None):
        """uint8 (B, n_img, H, W, 3) frames -> the Prismatic pixel_values (B, 6 n_img, S, S) both towers read."""
        return prismatic_pixels(images, flip=flip, center_crop=center_crop, resize_to=self.cfg.image_size,
                                crop_offsets=crop_offsets)

    def sample_actions(self, pixel_values, input_ids, attention_mask, proprio, keys, *, temperature: float,
                       dtype=jnp.bfloat16):
        """(tokens (B, 56) int32 bin columns, their log-probs (B, 56) f32): one 256-way categorical
        per token at `temperature`, drawn with row b's key `keys[b]`; greedy (argmax, log-probs at
        temperature 1) when `temperature == 0`."""
        logits = self.action_logits(pixel_values, input_ids, attention_mask, proprio, dtype=dtype)
        if temperature == 0:
            tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return tokens, token_logprobs(logits, tokens, 1.0)[0]
        z = logits.astype(jnp.float32) / temperature
        tokens = jax.vmap(lambda k, l: jax.random.categorical(k, l, axis=-1))(keys, z).astype(jnp.int32)
        return tokens, token_logprobs(logits, tokens, temperature)[0]

    def log_prob(self, pixel_values, input_ids, attention_mask, proprio, samples, *, temperature: float,
                 dtype=jnp.bfloat16):
        """(logp, entropy, mode), each (B, 56): the log-probs of `samples` (int bin columns) and the
        entropy of each token's distribution at `temperature`, and its argmax."""
        logits = self.action_logits(pixel_values, input_ids, attention_mask, proprio, dtype=dtype)
        logp, entropy = token_logprobs(logits, samples, temperature)
        return logp, entropy, jnp.argmax(logits, axis=-1).astype(jnp.int32)
