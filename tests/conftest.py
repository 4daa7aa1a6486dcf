"""Helpers shared by the test files (pytest loads this first; tests import them from `tests.conftest`,
never from another test module). Only the standard library and pytest at the top: worker processes
import this module too, so heavy imports stay inside the helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# -- short training runs --------------------------------------------------------------------------
# `key=value` overrides that make any run config a tiny one: small images and episodes, 2 GRPO groups
# of 4 per step, no validation, a checkpoint every step, jsonl metrics only. Files add their own on top
# (a later override of the same key wins).
TINY_RUN = [
    "actor_rollout_ref.model.image_size=56", "actor_rollout_ref.rollout.n=4", "data.train_batch_size=2",
    "env.train.num_envs=4", "env.train.max_episode_steps=16", "env.train.init_params.camera_heights=32",
    "env.train.init_params.camera_widths=32", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16", "data.val_num_trials_per_task=1",
    "trainer.test_freq=-1", "trainer.val_before_train=false", "trainer.save_freq=1", "data.filter_accuracy=false",
    "trainer.logger=[jsonl]",
]
# `libero_grpo` on real LIBERO on CPU: the small preset in float32, no GPUs, groups of 2 on 2 envs, 64 px.
LIBERO_SMALL_RUN = TINY_RUN + [
    "actor_rollout_ref.model.path=preset:small", "actor_rollout_ref.model.compute_dtype=float32",
    "actor_rollout_ref.model.enable_gradient_checkpointing=false", "trainer.n_env_gpus_per_node=0",
    "trainer.n_rollout_gpus_per_node=0", "env.train.num_envs=2", "actor_rollout_ref.rollout.n=2",
    "env.train.init_params.camera_heights=64", "env.train.init_params.camera_widths=64",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
]


# -- LIBERO -----------------------------------------------------------------------------------------
def libero_pack() -> str:
    """LIBERO's offline asset pack: $VLAJAX_LIBERO_ASSETS, else ../shared/libero-assets.tar.xz beside the
    repo (as CI lays it out); skips the test when there is none."""
    from vlajax.envs import libero_setup

    pack = os.environ.get(libero_setup.ASSETS_ENV)
    if not pack:
        shared = REPO.parent / "shared" / "libero-assets.tar.xz"
        pack = str(shared) if shared.exists() else None
    if pack is None:
        pytest.skip(f"no LIBERO asset pack: set {libero_setup.ASSETS_ENV} or put shared/ beside the repo")
    return pack


@pytest.fixture(scope="session")
def assets() -> str:
    """The extracted LIBERO assets folder (the pack extracted once, LIBERO's config written)."""
    from vlajax.envs import libero_setup

    return str(libero_setup.setup_libero(libero_pack()))
