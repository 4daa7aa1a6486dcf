"""Which initial states a run trains and evaluates on, and the lines its evaluation tables say that in.

Every evaluation (`vlajax eval`, training's validation and final evaluation, `vlajax sft`'s) starts from
the first stored states of each task (`select_pairs`); training draws (task, trial) slots
(`training_trials` of them per task), from stored or sampled states (`env.train.init_states`). Below
both `vlajax train` and `vlajax eval`, so neither imports the other.
"""

from __future__ import annotations

from typing import Sequence

from vlajax.config import RunConfig
from vlajax.envs.base import TaskSpec
from vlajax.envs.simulators import simulator

__all__ = ["select_pairs", "eval_states_line", "train_states_line", "training_trials"]


def select_pairs(tasks: Sequence[TaskSpec], task_ids: Sequence[int | str] | None, trials: int | None) -> list[tuple[int, int]]:
    """(task_id, state_id) pairs: the first `trials` init states of each selected task (by id or name).
    Every evaluation (`vlajax eval`, training's validation and final evaluation) starts from these
    stored states, whatever `env.train.init_states` says."""
    names = [t.name for t in tasks]
    if task_ids:
        chosen = []
        for t in task_ids:
            if isinstance(t, str) and not t.isdigit():
                if t not in names:
                    raise ValueError(f"--tasks: no task named {t!r}; tasks are {names}")
                chosen.append(names.index(t))
            else:
                i = int(t)
                if not 0 <= i < len(tasks):
                    raise ValueError(f"--tasks: task id {i} is out of range (the suite has {len(tasks)} tasks)")
                chosen.append(i)
    else:
        chosen = list(range(len(tasks)))
    if trials is not None and trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    stored = [t.num_init_states for t in tasks]
    return [(ti, s) for ti in chosen for s in range(min(trials or stored[ti], stored[ti]))]


def eval_states_line(simulator_type: str, tasks: Sequence[TaskSpec], state_ids: Sequence[int]) -> str:
    """The evaluation table's line on where its episodes started (always stored states: see
    `env.train.init_states`, which only moves training off them)."""
    ids = sorted({int(s) for s in state_ids})
    used = f"ids {ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else f"{len(ids)} ids"
    spec = simulator(simulator_type)
    if spec.init_states_per_task is not None:
        return f"init states: {spec.label}'s {min(t.num_init_states for t in tasks)} fixed states per task ({used} used)"
    return f"init states: the {spec.label} simulator's seeded states ({used} per task)"


def train_states_line(simulator_type: str, init_states: str, trials: int) -> str:
    """The final evaluation table's line on which states the run trained on."""
    spec = simulator(simulator_type)
    if init_states == "sampled":
        return (f"trained on: states {spec.label}'s placement sampler drew, a fresh seeded one per task and "
                "trial slot each epoch (env.train.init_states=sampled), none of the fixed ones")
    what = "fixed states" if spec.init_states_per_task is not None else "seeded states"
    return f"trained on: the {what} 0..{trials - 1} per task (env.train.init_states=fixed)"


def training_trials(cfg: RunConfig, tasks) -> int:
    """(task, trial) slots per task in a sampler epoch: `env.train.num_trials_per_task`, at most the
    stored states of the task that has fewest when training starts from stored states."""
    t = cfg.env.train
    return t.num_trials_per_task if t.init_states == "sampled" else min(t.num_trials_per_task, min(x.num_init_states for x in tasks))
