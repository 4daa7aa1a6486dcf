"""Building blocks shared by the vision towers and the LLM.

Parameters are stored in float32 (or the dtype asked for at load time) and cast to the compute
dtype at use, so the learner keeps fp32 master weights while the forward runs in bf16. Every
parameter carries `logical_axes` metadata (names from `vlajax.distributed.sharding`) so that one
rules table decides how it is sharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


def param(rngs: nnx.Rngs | None, shape, axes, *, init="normal", scale=0.02, dtype=jnp.float32) -> nnx.Param:
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (scale * jax.random.normal(rngs.params(), shape)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


REMAT_POLICIES = {
    # recompute everything inside the block in the backward pass: only the block input is saved
    "full": None,
    # also keep matmul outputs (no batch dims: the Linear layers), recompute the rest (norms,
    # activations, attention): ~2.7 MB/token more for the 7B LLM, no second matmul pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(fn, remat):
    """Wrap a per-block `fn(block, x, ...)` in `nnx.remat` (activation checkpointing).

    remat: False/None/"none" = off; True or "full" = save only block inputs; "dots" = also save
    the outputs of the Linear layers (see REMAT_POLICIES)."""
    if remat in (False, None, "none"):
        return fn
    name = "full" if remat is True else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose False, True or one of {sorted(REMAT_POLICIES)}")
    return nnx.remat(fn, policy=REMAT_POLICIES[name])


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), kernel stored (in, out) like Flax (torch stores (out, in)).

    LoRA: `enable_lora(rank, alpha)` adds `lora_a` (in, r) and `lora_b` (r, out) as
    `nnx.LoRAParam`, initialised so that the layer's output is unchanged (b = 0)."""

    def __init__(self, din: int, dout: int, *, bias: bool, axes: tuple, rngs: nnx.Rngs, dtype=jnp.float32):
        self.kernel = param(rngs, (din, dout), axes, dtype=dtype)
        self.bias = param(rngs, (dout,), (axes[-1],), init="zeros", dtype=dtype) if bias else None
        self.lora_a = None
        self.lora_b = None
        self.lora_scale = 0.0

    def enable_lora(self, rank: int, alpha: float, rngs: nnx.Rngs) -> None:
        din, dout = self.kernel[...].shape
        a = jax.random.normal(rngs.params(), (din, rank), jnp.float32) / jnp.sqrt(din)
        # nnx.data: the attributes were created as static None; flax >= 0.12 needs the switch to data explicit
        self.lora_a = nnx.data(nnx.LoRAParam(a, logical_axes=(self.kernel.logical_axes[0], "lora")))
        self.lora_b = nnx.data(nnx.LoRAParam(jnp.zeros((rank, dout), jnp.float32),
                                             logical_axes=("lora", self.kernel.logical_axes[1])))
        self.lora_scale = float(alpha) / rank

    def merge_lora(self) -> None:
        if self.lora_a is None:
            return
        k = self.kernel[...]
        delta = (self.lora_a[...] @ self.lora_b[...]) * self.lora_scale
        self.kernel.set_value((k.astype(jnp.float32) + delta).astype(k.dtype))
        self.lora_a = self.lora_b = None
        self.lora_scale = 0.0

    def __call__(self, x: Array, dtype=None, out_dtype=None) -> Array:
        dtype = dtype or x.dtype
        x = x.astype(dtype)
        y = jnp.matmul(x, self.kernel[...].astype(dtype), preferred_element_type=out_dtype)
        if self.lora_a is not None:
            lo = (x @ self.lora_a[...].astype(dtype)) @ self.lora_b[...].astype(dtype)
            y = y + (lo * self.lora_scale).astype(y.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm computed in fp32 (as torch autocast does), result in the input dtype."""

    def __init__(self, dim: int, eps: float, axis_name: str, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), logical_axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Llama RMSNorm: normalise in fp32, cast back to the input dtype, then scale (HF order)."""

    def __init__(self, dim: int, eps: float, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.weight[...].astype(x.dtype)


# erfc(z) ~ t * exp(-z^2 + P(t)), t = 1 / (1 + z/2): the Chebyshev fit of Numerical Recipes' erfcc,
# fractional error < 1.2e-7 for all z >= 0, so both tails keep their relative precision.
_ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
                0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, x * Phi(x), computed in fp32 with the result in x's dtype (as torch computes
    it for bf16 inputs). Phi comes from the erfc fit above: on an H200 XLA's own erf is compute-bound
    (~1.2 TB/s on a ViT MLP activation, 6.4 ms of the 7B forward at batch 32), the fit runs near the
    copy rate; its error matches XLA's fp32 erf, and bf16 results are the correctly rounded GELU
    (`jax.nn.gelu` on bf16 inputs, with bf16 intermediates, missed it in 38% of values);
    benchmarks/gelu_variants.py."""
    x32 = x.astype(jnp.float32)
    z = jnp.abs(x32) * 0.7071067811865476
    t = 1.0 / (1.0 + 0.5 * z)
    p = _ERFC_COEFFS[-1]
    for c in _ERFC_COEFFS[-2::-1]:
        p = p * t + c
    tail = 0.5 * t * jnp.exp(p - z * z)  # Phi(-|x|) = erfc(|x| / sqrt 2) / 2
    return (x32 * jnp.where(x32 >= 0, 1.0 - tail, tail)).astype(x.dtype)


def attention(q: Array, k: Array, v: Array, kv_lengths: Array | None = None, implementation: str | None = None) -> Array:
    """Non-causal fused attention. q, k, v: (B, T, H, Dh); kv_lengths: (B,) int32 valid keys per row
    (right padding), or None for no mask. Uses cuDNN flash attention on GPU in bf16/fp16."""
    impl = implementation
    if impl is None and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        impl = "cudnn"
    if impl == "cudnn" and (q.shape[1] % 2 or k.shape[1] % 2):
        # jax's cuDNN path rejects odd sequence lengths when differentiated (the learner's update:
        # 261 ViT tokens, ~347 LLM tokens); pad to even with one masked key / discarded query.
        return attention_even(q, k, v, kv_lengths, impl)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths, implementation=impl)


def attention_even(q: Array, k: Array, v: Array, kv_lengths: Array | None, implementation: str | None) -> Array:
    """`attention` on sequences padded to even length: the padded keys are masked out through
    `kv_lengths`, the padded query rows dropped, so the result (and its gradient) is unchanged."""
    t, s = q.shape[1], k.shape[1]
    if kv_lengths is None:
        kv_lengths = jnp.full((k.shape[0],), s, jnp.int32)

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))

    out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), key_value_seq_lengths=kv_lengths,
                                       implementation=implementation)
    return out[:, :t]


def init_fan_in(model: nnx.Module, seed: int = 0, tables: dict[str, float] | None = None) -> None:
    """Re-draw a freshly built model's weights for training from scratch, in place: every kernel
    N(0, 1/fan_in) (Flax's lecun-normal scale), each parameter named in `tables` (embedding tables)
    N(0, std^2); norms and biases unchanged. Why: with N(0, 0.02) everywhere a narrow model carries
    signals of RMS 0.002-0.02 and its first RL steps move the wrong things (`vlajax.model.oft.init`)."""
    tables = tables or {}
    key = jax.random.key(seed)
    for i, (path, p) in enumerate(nnx.iter_graph(model)):
        if not isinstance(p, nnx.Param) or not path:
            continue
        name, x = str(path[-1]), p[...]
        if name.endswith("kernel"):
            std = 1.0 / np.sqrt(np.prod(x.shape[:-1]))  # (in, out) or (kh, kw, c, out)
        elif name in tables:
            std = tables[name]
        else:
            continue
        p[...] = (std * jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)).astype(x.dtype)
