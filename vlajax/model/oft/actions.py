"""From action logits to robot actions, following OpenVLA-OFT's ActionTokenizer and SimpleVLA.

Logit column j <-> token 31744 + j. Token t decodes to bin index clip(255 - j, 0, 254) (d = 32000 - t,
idx = clip(d - 1, 0, 254)) of the 255 bin centers of linspace(-1, 1, 256): a higher column means a
smaller value, and columns 0 and 1 both map to the top center. Normalised actions are mapped back
with the checkpoint's BOUNDS_Q99 statistics (q01/q99) where the mask is True; the gripper dim is
not normalised, then binarised and inverted for LIBERO.

The way back (`actions_to_tokens`, SFT targets) is OpenVLA's ActionTokenizer encode: LIBERO gripper
-1 open / +1 close -> 1 - clip(g, 0, 1) (OFT's `libero_dataset_transform`), BOUNDS_Q99 normalisation
clipped to [-1, 1], then `token = 32000 - digitize(a_n, linspace(-1, 1, 256))`, i.e. column
256 - digitize. Decoding a target gives back the action within half a bin (the round trip is tested).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

N_BINS = 256
BIN_EDGES = np.linspace(-1, 1, N_BINS)  # float64, as OpenVLA's ActionTokenizer `bins`
BIN_CENTERS = ((np.linspace(-1, 1, N_BINS)[:-1] + np.linspace(-1, 1, N_BINS)[1:]) / 2).astype(np.float32)


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """Log-probs of `tokens` (B, T) and entropies, both (B, T) fp32, of softmax(logits / temperature)
    over the 256-way slice: exactly the distribution rollouts sample from.

    logits: (B, T, 256) already sliced to the action bins (the reference slices
    `logits[..., 31744:32000]` of the Llama vocab); tokens: (B, T) int in [0, 256) (vocab id - 31744;
    out-of-range ids cannot be checked under jit: take_along_axis clamps them); temperature: the
    sampling temperature (1.6 in SimpleVLA-RL), the same for rollout, old log-probs and update."""
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"action_logits {logits.shape} and tokens {tokens.shape} disagree on (B, T)")
    z = logits.astype(jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def tokens_to_normalized(tokens: jax.Array | np.ndarray, chunk: int, action_dim: int):
    """(B, chunk*action_dim) columns -> (B, chunk, action_dim) normalised actions in [-1, 1]."""
    xp = jnp if isinstance(tokens, jax.Array) else np
    idx = xp.clip(N_BINS - 1 - tokens, 0, N_BINS - 2)
    a = xp.asarray(BIN_CENTERS)[idx]
    return a.reshape(a.shape[0], chunk, action_dim)


def normalized_to_tokens(a_n: np.ndarray) -> np.ndarray:
    """(..., D) normalised actions -> (..., D) int32 columns 0..255, the inverse of
    `tokens_to_normalized` (ActionTokenizer: token = 32000 - digitize(clip(a_n, -1, 1), bins))."""
    d = np.digitize(np.clip(np.asarray(a_n, np.float64), -1.0, 1.0), BIN_EDGES)  # 1..256
    return (N_BINS - d).astype(np.int32)


@dataclass(frozen=True)
class ActionStats:
    """BOUNDS_Q99 statistics of one dataset key of `dataset_statistics.json`."""

    key: str
    q01: np.ndarray  # (A,)
    q99: np.ndarray  # (A,)
    mask: np.ndarray  # (A,) bool: True = normalised dim

    def unnormalize(self, a_n: np.ndarray, eps: float = 1e-8) -> np.ndarray:
        """a = 0.5 (a_n + 1)(q99 - q01 + eps) + q01 where mask, else a_n (SimpleVLA `_unnormalize_actions`)."""
        a_n = np.asarray(a_n, np.float32)
        if a_n.shape[-1] != self.q01.shape[0]:
            raise ValueError(f"actions have {a_n.shape[-1]} dims, statistics {self.key!r} have {self.q01.shape[0]}")
        a = 0.5 * (a_n + 1.0) * (self.q99 - self.q01 + eps) + self.q01
        return np.where(self.mask, a, a_n).astype(np.float32)

    def normalize(self, a: np.ndarray, eps: float = 1e-8) -> np.ndarray:
        """BOUNDS_Q99: a_n = clip(2 (a - q01) / (q99 - q01 + eps) - 1, -1, 1) where mask, else a (OFT
        `normalize_action_and_proprio`); the inverse of `unnormalize` inside [q01, q99]."""
        a = np.asarray(a, np.float32)
        if a.shape[-1] != self.q01.shape[0]:
            raise ValueError(f"actions have {a.shape[-1]} dims, statistics {self.key!r} have {self.q01.shape[0]}")
        a_n = np.clip(2.0 * (a - self.q01) / (self.q99 - self.q01 + eps) - 1.0, -1.0, 1.0)
        return np.where(self.mask, a_n, a).astype(np.float32)

    @staticmethod
    def identity(action_dim: int = 7, key: str = "identity") -> "ActionStats":
        """Statistics that leave [-1, 1] actions as they are (for policies trained from scratch)."""
        return ActionStats(key, -np.ones(action_dim, np.float32), np.ones(action_dim, np.float32),
                           np.array([True] * (action_dim - 1) + [False]))

    def to_json(self) -> dict:
        return {self.key: {"action": {"q01": self.q01.tolist(), "q99": self.q99.tolist(), "mask": self.mask.tolist()}}}


def load_action_stats(stats: str | dict, key: str) -> ActionStats:
    """Read `key` from a `dataset_statistics.json` (path or parsed dict). A bare suite name such as
    `libero_10` resolves to `libero_10_no_noops` when only that exists, as SimpleVLA does."""
    if isinstance(stats, (str, os.PathLike)):
        with open(stats) as f:
            stats = json.load(f)
    if key not in stats and f"{key}_no_noops" in stats:
        key = f"{key}_no_noops"
    if key not in stats:
        raise KeyError(f"no action statistics for {key!r}; dataset_statistics.json has {sorted(stats)}")
    a = stats[key]["action"]
    q01 = np.asarray(a["q01"], np.float32)
    q99 = np.asarray(a["q99"], np.float32)
    mask = np.asarray(a.get("mask", [True] * len(q01)), bool)
    return ActionStats(key, q01, q99, mask)


def libero_gripper(actions: np.ndarray) -> np.ndarray:
    """SimpleVLA post-processing for LIBERO: gripper g in [0, 1] (1 = open) -> sign(2g - 1) -> * -1,
    giving -1 = open, +1 = close as the env expects."""
    out = np.array(actions, np.float32, copy=True)
    g = out[..., -1]
    out[..., -1] = -np.sign(2.0 * g - 1.0)
    return out


def libero_gripper_target(actions: np.ndarray) -> np.ndarray:
    """The training target of LIBERO's gripper, OFT's `libero_dataset_transform`: env g (-1 open,
    +1 close) -> 1 - clip(g, 0, 1) (1 = open, 0 = close), which `libero_gripper` maps back to the
    env's sign. A 0 command (the scripted expert's "hold") becomes open, as in OFT."""
    out = np.array(actions, np.float32, copy=True)
    out[..., -1] = 1.0 - np.clip(out[..., -1], 0.0, 1.0)
    return out


def gripper_target(actions: np.ndarray, gripper: str | None) -> np.ndarray:
    """Env actions -> what the policy is trained to output, per gripper convention (see
    `tokens_to_actions`); also what dataset statistics are computed over."""
    if gripper == "libero":
        return libero_gripper_target(actions)
    if gripper is not None:
        raise ValueError(f"unknown gripper post-processing {gripper!r} (use 'libero' or None)")
    return np.asarray(actions, np.float32)


def actions_to_tokens(actions: np.ndarray, stats: ActionStats, gripper: str | None = "libero") -> np.ndarray:
    """(B, chunk, action_dim) env actions -> (B, chunk*action_dim) int32 columns: the SFT targets,
    the inverse of `tokens_to_actions` (time-major, token 7k + d)."""
    a = np.asarray(actions, np.float32)
    cols = normalized_to_tokens(stats.normalize(gripper_target(a, gripper)))
    return cols.reshape(a.shape[0], -1)


def tokens_to_actions(tokens: np.ndarray, stats: ActionStats, chunk: int = 8, action_dim: int = 7,
                      gripper: str | None = "libero") -> np.ndarray:
    """(B, chunk*action_dim) sampled columns -> (B, chunk, action_dim) env actions."""
    a = stats.unnormalize(tokens_to_normalized(np.asarray(tokens), chunk, action_dim))
    if gripper == "libero":
        a = libero_gripper(a)
    elif gripper is not None:
        raise ValueError(f"unknown gripper post-processing {gripper!r} (use 'libero' or None)")
    return a
