"""Where `vlajax train` and `vlajax sft` continue from: `trainer.resume` read against the checkpoints on
disk before anything starts (`resume_source`), then the learner restored from them (`restore_from`)."""

from __future__ import annotations

from pathlib import Path

from vlajax.config import ConfigError, RunConfig
from vlajax.rl.checkpoint import CheckpointManager, latest_committed_step, locate_checkpoint
from vlajax.rl.learner import Learner

__all__ = ["resume_source", "restore_from"]


def resume_source(cfg: RunConfig) -> tuple[str, int] | None:
    """The checkpoint (root, step) that `trainer.resume` continues from, None = start fresh: `auto` =
    the run directory's latest (if any), `disable` = none (an error if the run directory already has
    checkpoints, which the new run's would collide with), or a path (a run directory, its
    `checkpoints/`, or one step folder). From the files alone, so a refused command has started and
    changed nothing (not even the run's config.yaml)."""
    r, key = cfg.trainer.resume, "trainer.resume"
    own_root = str(cfg.run_dir / "checkpoints")
    own = latest_committed_step(own_root)
    if r == "disable":
        if own is not None:
            raise ConfigError(f"is 'disable' but the run directory {cfg.run_dir} already has checkpoints (latest "
                              f"step {own}) that the new run would collide with: use trainer.resume=auto to "
                              "continue it, or another trainer.default_local_dir", key=key)
        return None
    if r == "auto":
        return None if own is None else (own_root, own)
    root, step = locate_checkpoint(r)
    if own is not None and Path(root) != Path(own_root):
        raise ConfigError(f"names {r}, but the run directory {cfg.run_dir} already has checkpoints of its "
                          f"own (latest step {own}): use trainer.resume=auto to continue this run, or "
                          "another trainer.default_local_dir to start from that checkpoint", key=key)
    if step is None:
        step = latest_committed_step(root)
        if step is None:
            raise FileNotFoundError(f"trainer.resume={r}: no finished checkpoint in {root}")
    return root, step


def restore_from(learner: Learner, ckpt: CheckpointManager, root: str, step: int | None):
    """`learner.restore` from `root` (this run's own manager, or another run's, opened read-only);
    `vlajax train` and `vlajax sft` alike, from what `resume_source` chose."""
    if Path(root) == Path(ckpt.directory):
        return learner.restore(ckpt, step)
    with CheckpointManager(root, read_only=True) as source:
        return learner.restore(source, step)
