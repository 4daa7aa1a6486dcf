"""Initialisations for policies trained from scratch (the `preset:` models; checkpoints bring theirs).

`init_scheme="normal"`: every weight N(0, 0.02), norms 1, biases 0 (the HF/Llama convention; what
tests and benchmarks use). `init_scheme="scratch"`: what a small model needs to learn with RL from
scratch (measured on the tabletop task, see benchmarks/RESULTS.md):

* Linear and patch kernels N(0, 1/fan_in), embedding tables (tokens, positions, class and register
  tokens) N(0, 1). With 0.02 everywhere a width-64 model carries signals of RMS 0.002-0.02, the
  action rows are zero placeholders whose hidden state is tiny, and the final RMSNorm multiplies it
  by ~45: the first Adam step (every weight moves by lr) changed the action distribution by a KL of
  1.2 nats at lr 1e-4 and the policy collapsed. (For the 7B, 1/sqrt(4096) = 0.016 ~ 0.02 anyway.)
* An ordinal action head (below).

Why an ordinal action head: with the default N(0, 0.02) init the 256 action-token columns of the
LM head are unrelated, so the policy starts uniform over the bins and a policy-gradient step raises
only the bins that happened to be sampled; neighbouring bins (almost the same action) learn nothing
from it, and GRPO from a binary reward barely moves the distribution (measured on the tabletop task:
entropy 5.540 -> 5.522 nats in 18 steps at lr 1e-3, success at the random level). A pretrained
OpenVLA has learned ordered action embeddings; a from-scratch policy gets the same structure here:
column j of the action slice starts as

    W[:, 31744 + j] += scale * (u1 * f1(v_j) + u2 * f2(v_j)),   v_j = the bin value of column j,

with f1 = v and f2 = v^2 (both standardised over the 256 columns) and u1, u2 orthonormal random
directions of the hidden space. The logits then hold a tilt and a curvature term, exp(a v + b v^2)
- a discretised Gaussian whose mean and width the hidden state moves with two numbers, and whose
gradient is shared by all bins. The random N(0, 0.02) part is kept.

Why action queries (`OFTConfig.action_queries`, a deviation from OFT that a preset's config turns on;
under "scratch" their table starts N(0, 1) like the other tables): OFT feeds zero embeddings at the
56 action rows. A zero row has a zero query in the first layer, so it
attends uniformly and every action row leaves that layer with the same state; later layers can only
tell them apart through RoPE. A from-scratch model then tilts dx, dy, dz, ... alike and can learn
only diagonal moves (on `tabletop_anchored`, the block to the upper left stayed near the random
level). With one learned embedding per row (and the proprio normalised, which came in the same
change), the demo's GRPO run reached 0.90 greedy success at step 200, where the zero-row model had
0.08 greedy and 0.4-0.6 sampled after 300 steps (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlajax.model.layers import init_fan_in
from vlajax.model.oft.actions import BIN_CENTERS, N_BINS

INIT_SCHEMES = ("normal", "scratch")
_TABLES = ("embed_tokens", "pos_embed", "cls_token", "reg_token", "action_query")


def bin_values() -> np.ndarray:
    """(256,) the normalised action value each logit column decodes to (`actions.tokens_to_normalized`)."""
    return BIN_CENTERS[np.clip(N_BINS - 1 - np.arange(N_BINS), 0, N_BINS - 2)]


def init_ordinal_action_head(model: nnx.Module, seed: int = 0, scale: float = 1.0) -> None:
    """Add the ordinal structure (module docstring) to `model.llm.lm_head`'s action columns, in place."""
    cfg = model.cfg
    v = bin_values().astype(np.float64)
    feats = np.stack([v, v**2], axis=-1)
    feats = (feats - feats.mean(0)) / feats.std(0)  # (256, 2)
    u, _ = np.linalg.qr(np.random.default_rng([int(seed), 0x0D1]).normal(size=(cfg.llm.hidden, 2)))
    begin = cfg.action_token_begin
    w = model.llm.lm_head
    extra = jnp.asarray(scale * (u @ feats.T), w[...].dtype)  # (hidden, 256)
    w[...] = w[...].at[:, begin:begin + N_BINS].add(extra)


def apply_init(model: nnx.Module, scheme: str = "normal", seed: int = 0) -> None:
    """Apply an `INIT_SCHEMES` scheme to a freshly built model (in place; "normal" keeps it)."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {INIT_SCHEMES}")
    if scheme == "scratch":
        init_fan_in(model, seed, tables={name: 1.0 for name in _TABLES})
        init_ordinal_action_head(model, seed)
