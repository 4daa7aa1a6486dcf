"""The training "dataset" of VLA RL: (task, initial state) pairs, drawn in shuffled epochs.

SimpleVLA-RL's train set is every task of a suite x `num_trials_per_task` init states; each RL step
takes `train_batch_size` of them and runs `n` rollouts from each (one GRPO group per pair). The
sampler is deterministic under its seed and its position is part of the checkpoint, so a resumed
run draws exactly the initial states the uninterrupted run would have drawn.

`init_states="sampled"` keeps the epochs of (task, trial) slots but gives each slot, in each epoch, a
fresh state the simulator samples (a sampled state id, `vlajax.envs.base`) instead of a stored one, so
training never starts from the states evaluation uses. Its seed is a function of (sampler seed, epoch,
slot), i.e. of the checkpointed position: a resumed run draws the same sampled states too.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vlajax.envs.base import sampled_state_id

INIT_STATES = ("fixed", "sampled")  # env.train.init_states


@dataclasses.dataclass(frozen=True)
class Group:
    """One GRPO group: `n` rollouts from the same initial state. `group_id` is unique in a run."""

    group_id: int
    task_id: int
    state_id: int


class StateSampler:
    """(task, state) pairs in shuffled epochs of num_tasks x num_trials_per_task slots; `init_states`:
    "fixed" = slot i's state is stored state i % num_trials, "sampled" = a fresh sampled state."""

    def __init__(self, num_tasks: int, num_trials_per_task: int, seed: int = 0, shuffle: bool = True,
                 init_states: str = "fixed"):
        if num_tasks < 1 or num_trials_per_task < 1:
            raise ValueError(f"need at least one task and one trial, got {num_tasks} x {num_trials_per_task}")
        if init_states not in INIT_STATES:
            raise ValueError(f"init_states must be one of {', '.join(INIT_STATES)}, got {init_states!r}")
        self.num_tasks, self.num_trials, self.seed, self.shuffle = num_tasks, num_trials_per_task, seed, shuffle
        self.init_states = init_states
        self.epoch = 0
        self.position = 0
        self.next_group_id = 0

    def __len__(self) -> int:
        return self.num_tasks * self.num_trials

    def _order(self, epoch: int) -> np.ndarray:
        idx = np.arange(len(self))
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(idx)
        return idx

    def next_groups(self, k: int) -> list[Group]:
        """The next k (task, state) pairs, wrapping into a new shuffled epoch as needed."""
        out = []
        while len(out) < k:
            order = self._order(self.epoch)
            take = order[self.position : self.position + (k - len(out))]
            for i in take:
                out.append(Group(self.next_group_id, int(i) // self.num_trials, self._state_id(self.epoch, int(i))))
                self.next_group_id += 1
            self.position += len(take)
            if self.position >= len(self):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def _state_id(self, epoch: int, slot: int) -> int:
        """The state of `slot` (task * num_trials + trial) in `epoch`."""
        if self.init_states == "fixed":
            return slot % self.num_trials
        seed = np.random.SeedSequence([self.seed, epoch, slot]).generate_state(1, np.uint32)[0]
        return sampled_state_id(int(seed))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "next_group_id": self.next_group_id,
                "seed": self.seed, "num_tasks": self.num_tasks, "num_trials": self.num_trials,
                "init_states": self.init_states}

    def load_state_dict(self, d: dict) -> None:
        mode = d.get("init_states", "fixed")  # checkpoints from before the option trained on fixed states
        if (d["num_tasks"], d["num_trials"], d["seed"], mode) != (
                self.num_tasks, self.num_trials, self.seed, self.init_states):
            raise ValueError(
                f"sampler state is for {d['num_tasks']} tasks x {d['num_trials']} trials (seed {d['seed']}, "
                f"{mode} init states), this run has {self.num_tasks} x {self.num_trials} (seed {self.seed}, "
                f"{self.init_states} init states)"
            )
        self.epoch, self.position, self.next_group_id = int(d["epoch"]), int(d["position"]), int(d["next_group_id"])
