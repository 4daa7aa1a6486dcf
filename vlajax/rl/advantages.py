"""Outcome-reward advantage estimators (GRPO, REINFORCE++), one scalar per trajectory.

Computed on the host in numpy, once per rollout: the inputs are a few hundred scalars,
group ids are arbitrary integers (grouping needs `np.unique`, i.e. data-dependent shapes,
which jit cannot do), and the result is broadcast to tokens by `vlajax.rl.samples`.
Statistics are taken in float64 and returned as float32.

Groups are given as integer ids per trajectory, never by position: the verl VLA recipe
lost its GRPO grouping because the group key did not survive its flattening step.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "GROUP_ESTIMATORS",
    "compute_advantages",
    "grpo_advantages",
    "reinforce_plus_plus_advantages",
]


def _as_1d(name: str, x, dtype=None) -> np.ndarray:
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per trajectory), got shape {a.shape}")
    return a


def grpo_advantages(
    rewards, group_ids, *, norm_by_std: bool = True, eps: float = 1e-6
) -> np.ndarray:
    """GRPO: A_i = (R_i - mean_g) / (std_g + eps) within each group g.

    Args:
      rewards: (N,) float, one outcome reward per trajectory (binary success here).
      group_ids: (N,) int, trajectories with equal id share an initial state; any order.
      norm_by_std: if False, A_i = R_i - mean_g (Dr.GRPO-style, no division).
      eps: added to the std (1e-6 in verl / SimpleVLA-RL).

    Returns:
      (N,) float32 advantages.

    `std_g` is the unbiased estimate (ddof=1, `torch.std` semantics, as the reference).
    A group of a single trajectory gets mean 0 and std 1, so A = R (verl's rule: the
    unbiased std of one sample is undefined).
    """
    r = _as_1d("rewards", rewards, np.float64)
    g = _as_1d("group_ids", group_ids)
    if r.shape != g.shape:
        raise ValueError(f"rewards {r.shape} and group_ids {g.shape} must have the same length")
    if not np.issubdtype(g.dtype, np.integer):
        raise TypeError(f"group_ids must be integers, got dtype {g.dtype}")
    if not np.all(np.isfinite(r)):
        raise ValueError("rewards contain NaN/inf")
    _, inv, counts = np.unique(g, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    mean = sums / counts
    sq = np.bincount(inv, weights=(r - mean[inv]) ** 2)
    std = np.sqrt(sq / np.maximum(counts - 1, 1))
    single = counts == 1
    mean = np.where(single, 0.0, mean)
    std = np.where(single, 1.0, std)
    adv = r - mean[inv]
    if norm_by_std:
        adv = adv / (std[inv] + eps)
    return adv.astype(np.float32)


def reinforce_plus_plus_advantages(
    rewards, *, weights=None, eps: float = 1e-6
) -> np.ndarray:
    """REINFORCE++ (outcome reward, gamma=1): global whitening over the whole batch.

    A_i = (R_i - mean) / (std + eps), no per-group baseline.

    Args:
      rewards: (N,) float.
      weights: optional (N,) non-negative counts, e.g. the number of valid tokens of each
        trajectory: the verl recipe whitens over all valid *tokens* of the batch, which is
        this formula with frequency weights (mean = sum(w R)/sum(w),
        var = sum(w (R-mean)^2)/(sum(w)-1)). None = every trajectory counts once.
      eps: added to the std.

    Returns:
      (N,) float32 advantages. std is unbiased (ddof=1); with a single sample (or a single
      unit of weight) the std is taken as 0.
    """
    r = _as_1d("rewards", rewards, np.float64)
    if r.size == 0:
        return np.zeros((0,), np.float32)
    w = np.ones_like(r) if weights is None else _as_1d("weights", weights, np.float64)
    if w.shape != r.shape:
        raise ValueError(f"weights {w.shape} and rewards {r.shape} must have the same length")
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    total = w.sum()
    mean = (w * r).sum() / total
    var = (w * (r - mean) ** 2).sum() / max(total - 1.0, 1.0)
    return ((r - mean) / (np.sqrt(var) + eps)).astype(np.float32)


def _grpo(rewards, group_ids=None, *, token_weights=None, norm_by_std: bool = True, **kw):
    del token_weights  # each trajectory counts once within its group
    if group_ids is None:
        raise ValueError("advantage estimator 'grpo' needs group_ids")
    return grpo_advantages(rewards, group_ids, norm_by_std=norm_by_std, **kw)


def _rpp(rewards, group_ids=None, *, token_weights=None, norm_by_std: bool = True, **kw):
    del group_ids, norm_by_std  # global baseline, always whitened: groups are irrelevant
    if token_weights is not None:
        kw["weights"] = token_weights
    return reinforce_plus_plus_advantages(rewards, **kw)


# name -> estimator(rewards (N,), group_ids (N,), *, token_weights (N,) valid tokens per trajectory,
# norm_by_std) -> (N,). Every estimator takes all the inputs and uses what it needs, so adding one is
# one function and one entry here (config checks names against this table).
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., np.ndarray]] = {
    "grpo": _grpo,
    "reinforce_plus_plus": _rpp,
}
# Estimators whose baseline is the other rollouts of the same state (need rollout.n >= 2).
GROUP_ESTIMATORS = frozenset({"grpo"})


def compute_advantages(name: str, rewards, group_ids=None, **kwargs) -> np.ndarray:
    """Dispatch by name: "grpo" | "reinforce_plus_plus"; kwargs go to the estimator."""
    try:
        fn = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
    return fn(rewards, group_ids, **kwargs)
