"""Exact-GELU formulations on a ViT MLP activation (B*N, mlp) in bf16: time and max error vs float64.

    PYTHONPATH=. python benchmarks/gelu_variants.py --rows 8352 --cols 4096
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from vlajax.model.layers import gelu


def erf_as(x):
    """Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), f32."""
    a = jnp.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * jnp.exp(-a * a)
    return jnp.sign(x) * y


VARIANTS = {
    "vlajax.model.layers.gelu": lambda x: gelu(x),
    "jax.nn.gelu(bf16)": lambda x: jax.nn.gelu(x, approximate=False),
    "jax.nn.gelu(f32)": lambda x: jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype),
    "x*ndtr(x) f32": lambda x: (x.astype(jnp.float32) * jax.scipy.special.ndtr(x.astype(jnp.float32))).astype(x.dtype),
    "erfc form f32": lambda x: (0.5 * x.astype(jnp.float32)
                                * jax.lax.erfc(-x.astype(jnp.float32) * np.float32(math.sqrt(0.5)))).astype(x.dtype),
    "A&S erf f32": lambda x: (0.5 * x.astype(jnp.float32)
                              * (1.0 + erf_as(x.astype(jnp.float32) * np.float32(math.sqrt(0.5))))).astype(x.dtype),
    "tanh approx (not exact)": lambda x: jax.nn.gelu(x, approximate=True),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8352)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    x = (2.0 * jax.random.normal(jax.random.key(0), (args.rows, args.cols), jnp.float32)).astype(jnp.bfloat16)
    xs = np.asarray(x[:256].astype(jnp.float32), np.float64)
    want = xs * 0.5 * (1.0 + np.vectorize(math.erf)(xs / math.sqrt(2.0)))
    for name, fn in VARIANTS.items():
        f = jax.jit(fn)
        f(x).block_until_ready()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            outs = [f(x) for _ in range(args.reps)]
            jax.block_until_ready(outs)
            ts.append((time.perf_counter() - t0) / args.reps)
        got = np.asarray(f(x)[:256].astype(jnp.float32), np.float64)
        err = np.abs(got - want)
        ulp = np.abs(got - np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)))
        gbs = 2 * x.size * 2 / np.median(ts) / 1e9
        print(f"{name:26s} {np.median(ts) * 1e6:7.1f} us  {gbs:6.0f} GB/s  max|err| {err.max():.2e}"
              f"  differs from correctly rounded bf16 in {np.mean(ulp > 0) * 100:.2f}% of values", flush=True)


if __name__ == "__main__":
    main()
