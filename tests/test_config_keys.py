"""Every key of the run config does what it says: each leaf key is read by the code that runs a
training (two short real runs cover the optional paths), or it is on the explicit list of keys
accepted only so that verl configs load (`VERL_COMPAT_KEYS`, which warn when set)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.conftest import TINY_RUN
from vlajax import config as C
from vlajax.config import load_config
from vlajax.train import train

# validation before and during training, so that its keys are read too
# (2 envs per pipeline stage: each run spawns 4 simulator processes instead of TINY_RUN's 8; a step
# then takes 2 rollout rounds, as a config with fewer envs than trajectories does)
RUN = TINY_RUN + ["trainer.test_freq=1", "trainer.val_before_train=true", "trainer.total_training_steps=2",
                  "env.train.num_envs=2"]
# The other branch of every optional path: LoRA with a KL term to the base model, REINFORCE++,
# sampled validation with videos, verl's global micro-batch key, warm-up, other dynamic-sampling
# bounds. (`trainer.resume=<path>` is tested in test_train.)
VARIANT = [
    "actor_rollout_ref.model.lora_rank=4", "actor_rollout_ref.model.lora_alpha=8",
    "actor_rollout_ref.model.target_modules=[q_proj,v_proj]", "actor_rollout_ref.actor.use_kl_loss=true",
    "actor_rollout_ref.actor.kl_loss_coef=0.01", "actor_rollout_ref.actor.kl_loss_type=k1",
    "algorithm.adv_estimator=reinforce_plus_plus", "actor_rollout_ref.rollout.val_kwargs.do_sample=true",
    "actor_rollout_ref.rollout.val_kwargs.temperature=1.0", "env.train.video_cfg.save_video=true",
    "actor_rollout_ref.actor.ppo_micro_batch_size=16", "actor_rollout_ref.actor.optim.lr_warmup_steps=2",
    "data.filter_accuracy=true", "data.accuracy_lower_bound=0.0", "data.accuracy_upper_bound=1.0",
    "trainer.logger=[jsonl,console]", "data.max_sampling_rounds=1", "ray.enable=true",
]


@pytest.mark.slow
def test_every_config_key_is_read(tmp_path):
    first = tmp_path / "first"
    with C.track_reads() as reads:
        res = train(load_config(None, RUN + [f"trainer.default_local_dir={first}", "trainer.logger=[jsonl]"]))
        assert res.steps == 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # dynamic sampling: a random policy's groups
            res = train(load_config(None, RUN + VARIANT + [
                f"trainer.default_local_dir={tmp_path / 'variant'}",
                f"env.train.video_cfg.video_base_dir={tmp_path / 'videos'}"]))
        # the disaggregated layout's keys are read where its placement is built (a run of it needs
        # Ray nodes marked `sim`: tests/test_ray_sim.py places one)
        assert load_config(None, ["env.disagg_sim.enable=true", "env.disagg_sim.nnodes=2"]).placement().sim_nnodes == 2
    assert res.steps == 2
    assert all(np.isfinite(m["actor/kl_loss"]) and np.isfinite(m["actor/loss"]) for m in res.history if m["actor/updates"])
    assert list((tmp_path / "videos").glob("**/*.mp4"))
    leaves = set(C.flatten(C.RunConfig()))
    unread = sorted(leaves - reads - set(C.VERL_COMPAT_KEYS) - set(C.SFT_KEYS))
    assert not unread, f"config keys no code reads (make them work, or list them in VERL_COMPAT_KEYS): {unread}"
