"""Where the 7B forward's time goes, on a few full-width layers (fast to build and compile):
Llama blocks as vlajax runs them vs with fused qkv / gate-up matmuls, and the two ViT towers.
Per-layer times extrapolate to the full model (32 LLM layers, 23 + 26 ViT blocks).

    PYTHONPATH=. python benchmarks/profile_forward.py --batch 32 --layers 4
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.bench_policy_forward import time_it  # noqa: E402
from vlajax.model.oft.config import LlamaConfig, preset  # noqa: E402
from vlajax.model.layers import attention  # noqa: E402
from vlajax.model.oft.llama import Llama, rope  # noqa: E402
from vlajax.model.vit import ViT  # noqa: E402


def bf16_module(make):
    m = make()
    nnx.update(m, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(m)))
    return nnx.split(m)


def fused_llm_fn(cfg: LlamaConfig, n_layers: int):
    """Same math with one qkv and one gate|up matmul per layer (weights pre-fused)."""
    d, f, h = cfg.hidden, cfg.intermediate, cfg.num_heads
    k = jax.random.key(0)
    w = [dict(qkv=jax.random.normal(k, (d, 3 * d), jnp.bfloat16) * 0.02,
              o=jax.random.normal(k, (d, d), jnp.bfloat16) * 0.02,
              gu=jax.random.normal(k, (d, 2 * f), jnp.bfloat16) * 0.02,
              down=jax.random.normal(k, (f, d), jnp.bfloat16) * 0.02,
              n1=jnp.ones((d,), jnp.bfloat16), n2=jnp.ones((d,), jnp.bfloat16)) for _ in range(n_layers)]

    def norm(x, g):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(x.dtype) * g

    def fn(w, x, lengths):
        b, t, _ = x.shape
        pos = jnp.arange(t)
        for lw in w:
            qkv = (norm(x, lw["n1"]) @ lw["qkv"]).reshape(b, t, 3, h, d // h)
            q, kk, v = rope(qkv[:, :, 0], pos, 1e4), rope(qkv[:, :, 1], pos, 1e4), qkv[:, :, 2]
            x = x + attention(q, kk, v, lengths).reshape(b, t, d) @ lw["o"]
            gu = norm(x, lw["n2"]) @ lw["gu"]
            x = x + (jax.nn.silu(gu[..., :f]) * gu[..., f:]) @ lw["down"]
        return x

    return jax.jit(fn), w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=347)
    ap.add_argument("--peak-size", type=int, default=8192)
    args = ap.parse_args()
    b, L, n = args.batch, args.seq, args.layers
    print("XLA_FLAGS", os.environ.get("XLA_FLAGS"), "batch", b, "seq", L, flush=True)
    cfg = preset("openvla-oft-7b")
    d, f = cfg.llm.hidden, cfg.llm.intermediate
    layer_flops = 2 * b * L * (4 * d * d + 3 * d * f) + 4 * b * L * L * d
    sync = lambda x: x.block_until_ready()  # noqa: E731

    ps = args.peak_size
    a = jax.random.normal(jax.random.key(0), (ps, ps), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    mm2 = jax.jit(lambda x, w: x @ w)
    t = time_it(lambda: mm(a), 20, 3, sync)
    print(f"matmul {ps}^3: {2 * ps**3 / t / 1e12:.0f} TFLOP/s", flush=True)
    for m_ in (b * L,):
        x = jax.random.normal(jax.random.key(1), (m_, d), jnp.bfloat16)
        for name, wshape in (("qkv-sep", (d, d)), ("qkv-fused", (d, 3 * d)), ("gate-sep", (d, f)),
                             ("gateup-fused", (d, 2 * f)), ("down", (f, d))):
            w = jax.random.normal(jax.random.key(2), wshape, jnp.bfloat16)
            xi = x if wshape[0] == d else jax.random.normal(jax.random.key(1), (m_, f), jnp.bfloat16)
            t = time_it(lambda: mm2(xi, w), 20, 3, sync)
            print(f"  gemm {name} M={m_} {wshape}: {2 * m_ * wshape[0] * wshape[1] / t / 1e12:.0f} TFLOP/s", flush=True)

    llm_cfg = LlamaConfig(num_layers=n)
    gd, st = bf16_module(lambda: Llama(llm_cfg, nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (b, L, d), jnp.bfloat16)
    lengths = jnp.full((b,), L - 5, jnp.int32)
    llm = jax.jit(lambda st, x, le: nnx.merge(gd, st).hidden_states(x, le))
    t = time_it(lambda: llm(st, x, lengths), 10, 3, sync)
    print(f"llama x{n} (vlajax): {t / n * 1e3:.2f} ms/layer, {layer_flops / (t / n) / 1e12:.0f} TFLOP/s", flush=True)
    fused, w = fused_llm_fn(llm_cfg, n)
    t = time_it(lambda: fused(w, x, lengths), 10, 3, sync)
    print(f"llama x{n} (fused):  {t / n * 1e3:.2f} ms/layer, {layer_flops / (t / n) / 1e12:.0f} TFLOP/s", flush=True)
    att = jax.jit(lambda q: attention(q, q, q, lengths))
    q = jax.random.normal(jax.random.key(1), (b, L, 32, 128), jnp.bfloat16)
    t = time_it(lambda: att(q), 10, 3, sync)
    print(f"attention (B,{L},32,128): {t * 1e3:.2f} ms, {4 * b * L * L * d / t / 1e12:.0f} TFLOP/s", flush=True)

    for name, vc in (("dino", cfg.dino), ("siglip", cfg.siglip)):
        import dataclasses

        small = dataclasses.replace(vc, depth=n + 1)
        gd, st = bf16_module(lambda: ViT(small, nnx.Rngs(0)))
        pv = jax.random.normal(jax.random.key(1), (b, 3, 224, 224), jnp.float32)
        vit = jax.jit(lambda st, p: nnx.merge(gd, st)(p, jnp.bfloat16))
        t = time_it(lambda: vit(st, pv), 10, 3, sync)
        ntok = vc.num_patches + vc.num_prefix_tokens
        blk = 2 * b * ntok * (4 * vc.width**2 + 2 * vc.width * vc.mlp_dim) + 4 * b * ntok**2 * vc.width
        print(f"{name} x{n}: {t / n * 1e3:.2f} ms/block (incl. patch embed), {blk / (t / n) / 1e12:.0f} TFLOP/s;"
              f" full tower ~{t / n * vc.num_used_blocks * 1e3:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
