"""ViT towers: the two timm towers of the Prismatic "dinosiglip" backbone, as OpenVLA uses them,
and big_vision's SigLIP as PaliGemma (π0) uses it.

DINOv2 ViT-L/14 (class token + 4 registers, LayerScale) and SigLIP SO400M/14 (no prefix tokens):
pre-LN blocks, fused qkv with bias, exact GELU, LayerNorm eps 1e-6. OpenVLA's feature is the output
of block depth-2 with prefix tokens dropped and no final norm, so only depth-1 blocks are built.
PaliGemma's (`final_norm=True`) is every block, then the final LayerNorm, with tanh-approximated GELU
(flax's `nn.gelu` default).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vlajax.model.layers import LayerNorm, Linear, attention, gelu, maybe_remat, param


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """A timm-style ViT tower. Only blocks 0..depth-2 are kept: OpenVLA takes the output of block
    depth-2 without final norm, so the last block is dead compute."""

    width: int
    depth: int  # blocks in the original model (the checkpoint has all of them)
    mlp_dim: int
    num_heads: int = 16
    class_token: bool = False
    num_registers: int = 0
    layer_scale: bool = False
    patch_size: int = 14
    image_size: int = 224
    ln_eps: float = 1e-6
    final_norm: bool = False  # every block and the final LayerNorm (big_vision) instead of block depth-2's output
    gelu_approximate: bool = False  # tanh GELU (big_vision / flax) instead of the exact one (timm)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_used_blocks(self) -> int:
        return self.depth if self.final_norm else self.depth - 1

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_registers


class ViTBlock(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        d = cfg.width
        self.num_heads = cfg.num_heads
        self.gelu_approximate = cfg.gelu_approximate
        self.norm1 = LayerNorm(d, cfg.ln_eps, "vit_embed")
        self.qkv = Linear(d, 3 * d, bias=True, axes=("vit_embed", "vit_qkv"), rngs=rngs)
        self.proj = Linear(d, d, bias=True, axes=("vit_qkv", "vit_embed"), rngs=rngs)
        self.norm2 = LayerNorm(d, cfg.ln_eps, "vit_embed")
        self.fc1 = Linear(d, cfg.mlp_dim, bias=True, axes=("vit_embed", "vit_mlp"), rngs=rngs)
        self.fc2 = Linear(cfg.mlp_dim, d, bias=True, axes=("vit_mlp", "vit_embed"), rngs=rngs)
        if cfg.layer_scale:
            self.ls1 = param(rngs, (d,), ("vit_embed",), init="ones")
            self.ls2 = param(rngs, (d,), ("vit_embed",), init="ones")
        else:
            self.ls1 = self.ls2 = None

    def __call__(self, x: jax.Array, kv_lengths: jax.Array | None = None) -> jax.Array:
        """x: (B, N, D); kv_lengths: (B,) real tokens when N carries a padding token, else None."""
        b, n, d = x.shape
        h = self.norm1(x)
        qkv = self.qkv(h).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        a = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], kv_lengths).reshape(b, n, d)
        a = self.proj(a)
        if self.ls1 is not None:
            a = a * self.ls1[...].astype(a.dtype)
        x = x + a
        h = self.fc1(self.norm2(x))
        h = _tanh_gelu(h) if self.gelu_approximate else gelu(h)
        m = self.fc2(h)
        if self.ls2 is not None:
            m = m * self.ls2[...].astype(m.dtype)
        return x + m


def _tanh_gelu(x: jax.Array) -> jax.Array:
    """flax's default `nn.gelu` (tanh approximation), in fp32, result in x's dtype."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


class ViT(nnx.Module):
    """pixels (B, 3, H, W) normalised float -> patch features (B, num_patches, width)."""

    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.width
        # Conv2d(3, d, k=p, s=p) as a (kh, kw, in, out) kernel applied to non-overlapping patches.
        self.patch_kernel = param(rngs, (p, p, 3, d), ("patch", "patch", "patch", "vit_embed"))
        self.patch_bias = param(rngs, (d,), ("vit_embed",), init="zeros")
        self.pos_embed = param(rngs, (1, cfg.num_patches, d), (None, None, "vit_embed"))
        self.cls_token = param(rngs, (1, 1, d), (None, None, "vit_embed")) if cfg.class_token else None
        self.reg_token = (
            param(rngs, (1, cfg.num_registers, d), (None, None, "vit_embed")) if cfg.num_registers else None
        )
        self.blocks = nnx.List([ViTBlock(cfg, rngs) for _ in range(cfg.num_used_blocks)])
        self.norm = LayerNorm(d, cfg.ln_eps, "vit_embed") if cfg.final_norm else None
        self.remat = False  # set by the learner (vlajax.rl.learner.set_remat): checkpoint each block

    def __call__(self, pixels: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
        cfg = self.cfg
        b, c, h, w = pixels.shape
        p = cfg.patch_size
        gh, gw = h // p, w // p
        x = pixels.astype(dtype).reshape(b, c, gh, p, gw, p)
        x = jnp.einsum("bciujv,uvcd->bijd", x, self.patch_kernel[...].astype(dtype))
        x = x.reshape(b, gh * gw, cfg.width) + self.patch_bias[...].astype(dtype)
        # DINOv2 (no_embed_class) and SigLIP both add pos_embed to the patches only.
        x = x + self.pos_embed[...].astype(dtype)
        prefix = []
        if self.cls_token is not None:
            prefix.append(jnp.broadcast_to(self.cls_token[...].astype(dtype), (b, 1, cfg.width)))
        if self.reg_token is not None:
            prefix.append(jnp.broadcast_to(self.reg_token[...].astype(dtype), (b, cfg.num_registers, cfg.width)))
        if prefix:
            x = jnp.concatenate(prefix + [x], axis=1)
        # An odd token count (DINOv2: 256 patches + 5 prefix) gets one masked padding token here, once
        # for the tower: cuDNN attention needs even lengths, and padding inside every block cost a
        # pad and a slice of q, k, v per block (~37 us of ~770 at batch 32 on an H200).
        n = x.shape[1]
        kv_lengths = None
        if n % 2:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
            kv_lengths = jnp.full((b,), n, jnp.int32)
        run = maybe_remat(lambda blk, x: blk(x, kv_lengths), self.remat)
        for blk in self.blocks:
            x = run(blk, x)
        x = x[:, cfg.num_prefix_tokens:n]
        return x if self.norm is None else self.norm(x)
