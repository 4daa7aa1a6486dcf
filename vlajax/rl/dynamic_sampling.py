"""Dynamic sampling: keep only GRPO groups with a mixed outcome, accumulate them across
rollout rounds until a training batch (counted in groups) is full.

A group whose trajectories all succeed or all fail has zero GRPO advantage everywhere:
it costs a full forward/backward and teaches nothing. SimpleVLA-RL (`RayTrainer.filter`)
keeps a group iff `lower <= mean(success) <= upper` (both bounds inclusive, defaults
0.1 / 0.9) and keeps rolling out new prompts until the batch is full. Differences here:
groups are found by id (not by position), the number of rounds is bounded, and the groups
beyond a full batch can be kept for the next step (SimpleVLA-RL drops them: its
`add_to_buffer` truncates, the buffer push is commented out).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import numpy as np

__all__ = ["filter_groups", "GroupBuffer", "GroupBatch"]


def filter_groups(
    success, group_ids, *, lower: float = 0.1, upper: float = 0.9
) -> tuple[np.ndarray, dict[str, float]]:
    """Per-trajectory keep mask: True iff its group's success rate is in [lower, upper].

    Args:
      success: (N,) bool/0-1 outcome per trajectory.
      group_ids: (N,) int group id per trajectory (any order).

    Returns:
      keep (N,) bool, and stats: groups, kept_groups, kept_fraction (of groups),
      all_success_groups, all_fail_groups.
    """
    s = np.asarray(success, np.float64)
    g = np.asarray(group_ids)
    if s.ndim != 1 or s.shape != g.shape:
        raise ValueError(f"success {s.shape} and group_ids {g.shape} must be equal 1-D shapes")
    if not 0.0 <= lower <= upper <= 1.0:
        raise ValueError(f"need 0 <= lower <= upper <= 1, got lower={lower}, upper={upper}")
    if s.size == 0:
        return np.zeros(0, bool), dict(groups=0, kept_groups=0, kept_fraction=0.0,
                                       all_success_groups=0, all_fail_groups=0)
    _, inv, counts = np.unique(g, return_inverse=True, return_counts=True)
    acc = np.bincount(inv, weights=s) / counts
    keep_group = (acc >= lower) & (acc <= upper)
    stats = dict(
        groups=int(acc.size),
        kept_groups=int(keep_group.sum()),
        kept_fraction=float(keep_group.mean()),
        all_success_groups=int((acc == 1.0).sum()),
        all_fail_groups=int((acc == 0.0).sum()),
    )
    return keep_group[inv], stats


def _take(tree: Any, idx: np.ndarray) -> Any:
    return jax.tree.map(lambda x: np.asarray(x)[idx], tree)


def _concat(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *trees)


@dataclasses.dataclass
class GroupBatch:
    """What `GroupBuffer.pop` returns: the trajectories and how they were gathered."""

    trajectories: Any  # same pytree type as given to `add`, rows grouped by group
    num_groups: int
    full: bool  # False when the round bound was hit first
    metrics: dict[str, float]


class GroupBuffer:
    """Collects kept groups over rollout rounds until `groups_per_batch` are available.

    Usage, once per training step::

        buf.start_step()
        while not buf.done:
            trajs = rollout(...)                      # one round
            buf.add(trajs, trajs.success, trajs.group_id)
        batch = buf.pop()                             # GroupBatch or None

    Trajectories can be any pytree of arrays with leading dim N (e.g.
    `vlajax.rl.samples.Trajectories`). Group ids must be unique across rounds (use a
    running counter), otherwise two different initial states would be merged into one
    GRPO group; `add` raises if an id is already buffered.

    Args:
      groups_per_batch: target batch size, in groups.
      lower, upper: inclusive success-rate bounds of a kept group.
      max_rounds: rollout rounds allowed per training step; when reached before the
        batch is full, `pop` warns and returns what it has.
      keep_excess: keep the groups beyond a full batch for the next step (FIFO, they are
        then one policy update old: PPO's ratio to their behaviour log-probs corrects
        for it); False drops them, as SimpleVLA-RL does.
    """

    def __init__(
        self,
        groups_per_batch: int,
        *,
        lower: float = 0.1,
        upper: float = 0.9,
        max_rounds: int = 8,
        keep_excess: bool = False,
    ):
        if groups_per_batch < 1 or max_rounds < 1:
            raise ValueError(
                f"groups_per_batch and max_rounds must be >= 1, got {groups_per_batch}, {max_rounds}"
            )
        self.groups_per_batch = groups_per_batch
        self.lower, self.upper = lower, upper
        self.max_rounds = max_rounds
        self.keep_excess = keep_excess
        self._groups: list[tuple[Any, Any]] = []  # (group id, pytree of that group's rows)
        self.start_step()

    def start_step(self) -> None:
        """Reset the per-step counters (buffered groups are kept)."""
        self.rounds = 0
        self._seen = 0
        self._kept = 0
        self._carried = len(self._groups)

    @property
    def num_groups(self) -> int:
        return len(self._groups)

    @property
    def full(self) -> bool:
        return len(self._groups) >= self.groups_per_batch

    @property
    def done(self) -> bool:
        """Stop rolling out: the batch is full or the round bound is reached."""
        return self.full or self.rounds >= self.max_rounds

    def add(self, trajectories: Any, success, group_ids) -> dict[str, float]:
        """Add one rollout round; returns `filter_groups` stats of the round."""
        g = np.asarray(group_ids)
        n = g.shape[0]
        for leaf in jax.tree.leaves(trajectories):
            if np.shape(leaf)[:1] != (n,):
                raise ValueError(
                    f"every trajectory field needs leading dim {n} (len(group_ids)), got {np.shape(leaf)}"
                )
        keep, stats = filter_groups(success, g, lower=self.lower, upper=self.upper)
        buffered = {int(gid) for gid, _ in self._groups}
        kept_ids = np.unique(g[keep])  # sorted: deterministic order
        clash = buffered.intersection(int(x) for x in kept_ids)
        if clash:
            raise ValueError(
                f"group ids {sorted(clash)[:5]} are already buffered from an earlier round; "
                "group ids must be unique across rollout rounds"
            )
        for gid in kept_ids:
            self._groups.append((int(gid), _take(trajectories, np.flatnonzero(g == gid))))
        self.rounds += 1
        self._seen += stats["groups"]
        self._kept += stats["kept_groups"]
        return stats

    def pop(self, limit: int | None = None) -> GroupBatch | None:
        """Take up to `groups_per_batch` groups (oldest first), at most `limit` if given (a
        multi-process step trains the same number of groups on every process, see
        `vlajax.train.Trainer.collect`). None if nothing is taken."""
        size = self.groups_per_batch if limit is None else max(0, min(limit, self.groups_per_batch))
        full = self.full and size == self.groups_per_batch  # a limit below the batch size: not full
        take, rest = self._groups[:size], self._groups[size:]
        self._groups = rest if self.keep_excess else []
        metrics = dict(
            rounds=float(self.rounds),
            groups_seen=float(self._seen),
            groups_kept=float(self._kept),
            kept_fraction=self._kept / self._seen if self._seen else 0.0,
            carried_in=float(self._carried),
            carried_out=float(len(self._groups)),
            dropped_excess=float(0 if self.keep_excess else len(rest)),
        )
        if not full:
            msg = (
                f"dynamic sampling: only {len(take)}/{self.groups_per_batch} groups with success "
                f"rate in [{self.lower}, {self.upper}] after {self.rounds} rollout rounds "
                f"(max_rounds={self.max_rounds}); training on {len(take)} groups"
            )
            # one channel: a logged copy as well printed every such step twice
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        self.start_step()
        if not take:
            return None
        return GroupBatch(
            trajectories=_concat([t for _, t in take]),
            num_groups=len(take),
            full=full,
            metrics=metrics,
        )
