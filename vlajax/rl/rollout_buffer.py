"""The arrays of one rollout, filled by trajectory row as env results and decodes arrive.

Results come back in any order and finished envs leave the batch, so every write names its rows;
a row's policy-call counter (`calls`) says where its next observation and decode go. The layout of
what `finish` returns is the rollout's (`vlajax.rl.rollout` module docstring).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vlajax.rl.policy_step import DecodeInputs
from vlajax.rl.samples import Trajectories

__all__ = ["RolloutError", "TrajectoryBuffer"]


class RolloutError(RuntimeError):
    """The rollout cannot complete (bad request, a simulator error that a restart cannot fix)."""


class TrajectoryBuffer:
    """N trajectories of at most C policy calls of T samples (of `sample_dtype`: the family's), K
    actions of A dims each."""

    def __init__(self, n: int, max_calls: int, num_tokens: int, chunk_len: int, action_dim: int,
                 sample_dtype=np.int32, sample_shape: tuple[int, ...] | None = None):
        self.max_calls, self.chunk_len, self.action_dim = max_calls, chunk_len, action_dim
        shape = tuple(sample_shape) if sample_shape else (num_tokens,)  # per call: the family's
        self.tokens = np.zeros((n, max_calls, *shape), sample_dtype)  # (N, C, T) or (N, C, ...)
        self.logp = np.zeros((n, max_calls, num_tokens), np.float32)  # (N, C, T)
        self.valid = np.zeros((n, max_calls), bool)  # (N, C)
        self.actions = np.zeros((n, max_calls, chunk_len, action_dim), np.float32)  # (N, C, K, A)
        self.success = np.zeros(n, bool)
        self.finish_step = np.zeros(n, np.int32)
        self.calls = np.zeros(n, np.int32)  # policy calls decoded so far = index of the next one
        self.echoed = np.zeros(n, bool)  # ids confirmed by the env worker's reset
        self.group_id = np.full(n, -1, np.int64)
        self.task_id = np.full(n, -1, np.int64)
        self.state_id = np.full(n, -1, np.int64)
        self.instructions = [""] * n
        # Allocated at the first reset / observation, whose shapes they take:
        self.prompt_ids: np.ndarray | None = None  # (N, P) int32
        self.prompt_mask: np.ndarray | None = None  # (N, P) int32
        self.images: np.ndarray | None = None  # (N, C, n_img, H, W, 3) uint8
        self.proprio: np.ndarray | None = None  # (N, C, D) float32

    def clear(self, rows: np.ndarray) -> None:
        """Forget the episodes of `rows` (their worker was replaced; they are re-run from the start)."""
        for arr in (self.tokens, self.logp, self.valid, self.actions, self.success, self.finish_step, self.calls,
                    self.echoed, self.images, self.proprio):
            if arr is not None:
                arr[rows] = 0

    def write_reset(self, rows: np.ndarray, task_id: np.ndarray, state_id: np.ndarray, group_id: np.ndarray,
                    instructions: Sequence[str], prompt_ids: np.ndarray, prompt_mask: np.ndarray) -> None:
        """The ids (n,) the worker echoed at reset, and the (n, P) prompts of the rows' instructions."""
        self.task_id[rows], self.state_id[rows], self.group_id[rows] = task_id, state_id, group_id
        self.echoed[rows] = True
        for r, text in zip(rows, instructions):
            self.instructions[r] = text
        if self.prompt_ids is None:
            self.prompt_ids = np.zeros((len(self.calls), prompt_ids.shape[1]), np.int32)
            self.prompt_mask = np.zeros((len(self.calls), prompt_ids.shape[1]), np.int32)
        self.prompt_ids[rows], self.prompt_mask[rows] = prompt_ids, prompt_mask

    def write_outcome(self, rows: np.ndarray, finish_step: np.ndarray, success: np.ndarray) -> None:
        """After a step: env steps executed so far and whether the task succeeded, (n,) each."""
        self.finish_step[rows] = finish_step
        self.success[rows] = success

    def write_observation(self, rows: np.ndarray, images: np.ndarray, proprio: np.ndarray) -> None:
        """The input of the rows' next policy call: images (n, n_img, H, W, 3) uint8, proprio (n, D)."""
        c = self.calls[rows]
        if (c >= self.max_calls).any():
            raise RolloutError(f"rows {rows[c >= self.max_calls].tolist()} still running after {self.max_calls} "
                               f"policy calls")
        if self.images is None:
            self.images = np.zeros((len(self.calls), self.max_calls) + images.shape[1:], np.uint8)
            self.proprio = np.zeros((len(self.calls), self.max_calls, proprio.shape[-1]), np.float32)
        self.images[rows, c] = images
        self.proprio[rows, c] = proprio

    def decode_inputs(self, rows: np.ndarray) -> DecodeInputs:
        """The next policy call of each of `rows` (their observations written)."""
        c = self.calls[rows]
        return DecodeInputs(images=self.images[rows, c], input_ids=self.prompt_ids[rows],
                            attention_mask=self.prompt_mask[rows], proprio=self.proprio[rows, c],
                            rows=rows.astype(np.int32), calls=c.astype(np.int32))

    def write_decode(self, rows: np.ndarray, calls: np.ndarray, tokens: np.ndarray, logp: np.ndarray,
                     actions: np.ndarray) -> None:
        """Policy call `calls` (n,) of `rows` decoded: samples / logp (n, T), env actions (n, K, A)."""
        self.tokens[rows, calls] = tokens
        self.logp[rows, calls] = logp
        self.actions[rows, calls] = actions
        self.valid[rows, calls] = True
        self.calls[rows] = calls + 1

    def finish(self) -> Trajectories:
        """The trajectories, checked: every row was reset, calls are contiguous."""
        if not self.echoed.all():
            raise RolloutError(f"rows {np.flatnonzero(~self.echoed).tolist()} were never reset")
        traj = Trajectories(actions_tokens=self.tokens, old_logp=self.logp, chunk_valid=self.valid,
                            success=self.success, finish_step=self.finish_step, group_id=self.group_id,
                            task_id=self.task_id)
        traj.validate(action_dim=self.action_dim, chunk_len=self.chunk_len)
        return traj
