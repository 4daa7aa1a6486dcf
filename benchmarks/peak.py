"""The bf16 matmul ceiling the benchmarks report fractions of, measured in the same run.

Each round issues `reps` back-to-back n^3 products and synchronises once, so the per-call host
dispatch and sync (~0.1-0.3 ms, up to 20% of one 8192^3 product on an H100/H200) is not counted;
the median round is reported. Random inputs (zeros run faster)."""

from __future__ import annotations

import time

import numpy as np


def jax_matmul_tflops(n: int = 8192, reps: int = 10, rounds: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        outs = [f(a, b) for _ in range(reps)]
        jax.block_until_ready(outs)
        ts.append((time.perf_counter() - t0) / reps)
    return 2 * n**3 / float(np.median(ts[1:])) / 1e12


def torch_matmul_tflops(n: int = 8192, reps: int = 10, rounds: int = 5) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    ts = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) / reps)
    return 2 * n**3 / float(np.median(ts[1:])) / 1e12
