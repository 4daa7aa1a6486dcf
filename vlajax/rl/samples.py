"""Trajectories (one row per episode) -> training samples (one row per policy call).

Every policy call (one "chunk") becomes an independent PPO sample with its own
T = chunk_len * action_dim action tokens (8 * 7 = 56 for LIBERO), exactly as the
reference recipes flatten `[B, 64, 56]` to `[B*64, 56]`.

Token validity (the convention implemented here)
-----------------------------------------------
Token t of chunk c belongs to env step s = chunk_len*c + t // action_dim (token layout
`[step0: dim0..dim6, step1: dim0..dim6, ...]`). It is valid iff

    chunk_valid[n, c]  and  s < finish_step[n]

where `finish_step` is the number of env steps actually executed, the success step
included (success at 0-based env step k gives finish_step = k + 1; a failed episode
gives the step budget, e.g. 512). This is exact at the token level, and it is what both
references compute:

* SimpleVLA-RL masks the flat response `[C*56]` with `arange < finish_step * 7`, its env
  worker counting `finish_step += 1` per executed action and stopping at `done`;
  `7 * finish_step` is exactly "tokens of env steps < finish_step".
* verl's `compute_response_mask` keeps env sub-steps up to and including the first one
  with `complete=True`, then `repeat_interleave(7)`: the same set.

So the actions of the success chunk that come after the success step (never executed,
or executed after the episode was over) are masked out, as are all later chunks.

Reward = binary success per trajectory; the trajectory's advantage (from
`vlajax.rl.advantages`) is broadcast to each of its valid tokens and is 0 elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

__all__ = ["Trajectories", "Samples", "token_mask", "make_samples", "pad_samples"]


@dataclasses.dataclass(frozen=True)
class Trajectories:
    """A rollout batch, N episodes of up to C policy calls each (numpy, host memory).

    actions_tokens: (N, C, T) or (N, C, ...)  what the policy sampled (OFT: int32 256-way bin ids;
                                      a continuous family: float32, one per action dim; a flow
                                      policy: its denoising chain)
    old_logp:       (N, C, T) float32 log-prob of each under the sampling policy
    chunk_valid:    (N, C)    bool    the policy call happened / its chunk was sent to the env
    success:        (N,)      bool
    finish_step:    (N,)      int32   env steps executed, success step included
    group_id:       (N,)      int64   same id = same initial state (GRPO group)
    task_id:        (N,)      any     task index or name, carried through for metrics
    """

    actions_tokens: np.ndarray
    old_logp: np.ndarray
    chunk_valid: np.ndarray
    success: np.ndarray
    finish_step: np.ndarray
    group_id: np.ndarray
    task_id: np.ndarray

    def __len__(self) -> int:
        return int(np.shape(self.success)[0])

    def validate(self, *, action_dim: int = 7, chunk_len: int = 8) -> None:
        """Raise ValueError naming the offending field if shapes/values are inconsistent."""
        tok = np.asarray(self.actions_tokens)
        if tok.ndim < 3:
            raise ValueError(f"actions_tokens must be (N, C, T), got shape {tok.shape}")
        n, c = tok.shape[:2]
        # T: the log-prob elements per call; a family may sample more per call than it scores (a flow
        # policy keeps its whole denoising chain), then old_logp says how many
        t = tok.shape[2] if tok.ndim == 3 else np.shape(self.old_logp)[-1]
        if t != action_dim * chunk_len:
            raise ValueError(
                f"actions_tokens has T={t} tokens per chunk, expected "
                f"chunk_len*action_dim = {chunk_len}*{action_dim} = {chunk_len * action_dim}"
            )
        expected = {
            "old_logp": (n, c, t),
            "chunk_valid": (n, c),
            "success": (n,),
            "finish_step": (n,),
            "group_id": (n,),
            "task_id": (n,),
        }
        for name, shape in expected.items():
            got = np.shape(getattr(self, name))
            if got != shape:
                raise ValueError(f"Trajectories.{name} has shape {got}, expected {shape}")
        fs = np.asarray(self.finish_step)
        if not np.issubdtype(fs.dtype, np.integer):
            raise TypeError(f"finish_step must be integer, got {fs.dtype}")
        if np.any(fs < 0) or np.any(fs > c * chunk_len):
            bad = int(np.flatnonzero((fs < 0) | (fs > c * chunk_len))[0])
            raise ValueError(
                f"finish_step[{bad}]={fs[bad]} outside [0, C*chunk_len={c * chunk_len}]"
            )
        # A chunk containing an executed env step must have been executed.
        needed = np.arange(c)[None, :] * chunk_len < fs[:, None]
        missing = needed & ~np.asarray(self.chunk_valid, bool)
        if missing.any():
            i, j = map(int, np.argwhere(missing)[0])
            raise ValueError(
                f"trajectory {i}: finish_step={fs[i]} covers chunk {j} but chunk_valid[{i},{j}] is False"
            )


@dataclasses.dataclass(frozen=True)
class Samples:
    """Flat training samples, one per policy call (M rows).

    tokens:      (M, T)           the samples (their dtype: the family's)
    old_logp:    (M, T) float32
    mask:        (M, T) float32   1 = valid token (see module docstring)
    advantages:  (M, T) float32   trajectory advantage on valid tokens, 0 elsewhere
    reward:      (M,)   float32   trajectory reward (binary success)
    traj_index:  (M,)   int32     row of the source trajectory (to gather images/prompts)
    chunk_index: (M,)   int32     policy-call index within the trajectory
    group_id:    (M,)   int64
    task_id:     (M,)   any
    """

    tokens: np.ndarray
    old_logp: np.ndarray
    mask: np.ndarray
    advantages: np.ndarray
    reward: np.ndarray
    traj_index: np.ndarray
    chunk_index: np.ndarray
    group_id: np.ndarray
    task_id: np.ndarray

    def __len__(self) -> int:
        return int(np.shape(self.tokens)[0])

    def take(self, idx) -> "Samples":
        """Row subset (mini-batch slicing, shuffling)."""
        return jax.tree.map(lambda x: x[idx], self)


# Pytrees, so that GroupBuffer / jax.tree utilities can slice and concatenate them.
jax.tree_util.register_dataclass(Trajectories)
jax.tree_util.register_dataclass(Samples)


def token_mask(traj: Trajectories, *, action_dim: int = 7, chunk_len: int = 8) -> np.ndarray:
    """(N, C, T) bool validity mask (module docstring gives the convention)."""
    traj.validate(action_dim=action_dim, chunk_len=chunk_len)
    c, t = np.shape(traj.old_logp)[1:]
    step = chunk_len * np.arange(c)[:, None] + np.arange(t)[None, :] // action_dim  # (C, T)
    fs = np.asarray(traj.finish_step)[:, None, None]
    return (step[None] < fs) & np.asarray(traj.chunk_valid, bool)[:, :, None]


def make_samples(
    traj: Trajectories,
    advantages: Any,
    *,
    action_dim: int = 7,
    chunk_len: int = 8,
    drop_empty: bool = True,
) -> Samples:
    """Flatten trajectories into per-call samples.

    Args:
      traj: the rollout batch (N trajectories).
      advantages: (N,) per-trajectory advantages, e.g. from `compute_advantages`.
      drop_empty: drop policy calls with no valid token (chunks after success, never-run
        chunks). They would add exactly 0 to the loss at full compute cost; the references
        keep them.

    Returns:
      Samples, rows ordered by (trajectory, chunk).
    """
    mask = token_mask(traj, action_dim=action_dim, chunk_len=chunk_len)  # (N, C, T)
    n, c, t = mask.shape
    adv = np.asarray(advantages, np.float32)
    if adv.shape != (n,):
        raise ValueError(f"advantages must have shape ({n},) (one per trajectory), got {adv.shape}")
    if not np.all(np.isfinite(adv)):
        raise ValueError("advantages contain NaN/inf")
    ti, ci = np.meshgrid(np.arange(n), np.arange(c), indexing="ij")
    keep = mask.any(-1) if drop_empty else np.ones((n, c), bool)
    ti, ci = ti[keep], ci[keep]
    m = mask[ti, ci].astype(np.float32)
    reward = np.asarray(traj.success, np.float32)
    return Samples(
        tokens=np.asarray(traj.actions_tokens)[ti, ci],
        old_logp=np.asarray(traj.old_logp, np.float32)[ti, ci],
        mask=m,
        advantages=adv[ti][:, None] * m,
        reward=reward[ti],
        traj_index=ti.astype(np.int32),
        chunk_index=ci.astype(np.int32),
        group_id=np.asarray(traj.group_id)[ti],
        task_id=np.asarray(traj.task_id)[ti],
    )


def pad_samples(samples: Samples, multiple: int) -> Samples:
    """Pad rows to a multiple of `multiple` (fixed jit shapes, even sharding).

    Padding rows copy row 0's indices (so image gathers stay in range) with mask = 0 and
    advantage = 0: they add nothing to the loss or its gradient.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    m = len(samples)
    if m == 0:
        raise ValueError("cannot pad an empty Samples (nothing to copy indices from)")
    extra = (-m) % multiple
    if extra == 0:
        return samples

    def pad(x):
        return np.concatenate([x, np.repeat(x[:1], extra, axis=0)], axis=0)

    out = jax.tree.map(pad, samples)
    zero = np.zeros((extra,) + samples.mask.shape[1:], np.float32)
    return dataclasses.replace(
        out,
        mask=np.concatenate([samples.mask, zero]),
        advantages=np.concatenate([samples.advantages, zero]),
    )


def trim_prompts(ids: np.ndarray, mask: np.ndarray, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Drop the all-padding columns of right-padded prompts (kept to a multiple of `multiple`, so
    the update compiles for few widths). The decoder pads to a fixed width (64 by default) that a
    short prompt does not need; the padding keys are masked, so the logits are the same, and the
    update's sequence is shorter (demo: 138 -> ~90 tokens)."""
    width = min(ids.shape[1], multiple * math.ceil(int(mask.sum(1).max(initial=1)) / multiple))
    return ids[:, :width], mask[:, :width]
