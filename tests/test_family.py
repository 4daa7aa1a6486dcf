"""The policy-family interface (vlajax.model.family): a run's family is picked by
`actor_rollout_ref.model.family`, the OFT family answers for SimpleVLA-OFT, and a family registered
from outside is selectable by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlajax.config import ConfigError, load_config
from vlajax.model.family import (BatchField, IOAdapter, PolicyFamily, PolicySpec, SpecError, family_names, get_family,
                                 register_family)


def test_an_unknown_family_is_a_config_error_naming_the_key_and_the_families():
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["actor_rollout_ref.model.family=pi7"])
    assert e.value.key == "actor_rollout_ref.model.family"
    assert "'pi7' is not a policy family" in str(e.value) and "oft" in str(e.value)
    with pytest.raises(KeyError, match="no policy family 'pi7'; the families are oft"):
        get_family("pi7")


def test_the_oft_family_builds_the_demo_policy_and_describes_its_update_rows():
    from vlajax.model.oft.flops import forward_flops
    from vlajax.session import build_policy

    cfg = load_config("demo")
    assert cfg.actor_rollout_ref.model.family == "oft"
    policy = build_policy(cfg)
    family = get_family("oft")
    spec = family.batch_spec(policy, image_shape=(32, 32), prompt_width=24)
    c = policy.cfg
    assert {k: (f.shape, f.dtype) for k, f in spec.items()} == {
        "images": ((c.num_images, 32, 32, 3), np.uint8), "input_ids": ((24,), np.int32),
        "attention_mask": ((24,), np.int32), "tokens": ((56,), np.int32), "old_logp": ((56,), np.float32),
        "advantages": ((56,), np.float32), "mask": ((56,), np.float32), "proprio": ((c.proprio_dim,), np.float32)}
    assert family.flops_per_row(policy, 24) == forward_flops(c, 1, 24) > 0
    assert family.lora_targets == type(policy.model).LORA_TARGETS


def test_a_spec_the_checkpoint_cannot_meet_names_the_config_key():
    """The family's SpecError names a PolicySpec field; the run turns it into its own key."""
    from vlajax.session import build_policy

    with pytest.raises(ConfigError) as e:
        build_policy(load_config("demo", ["env.actor.model.num_action_chunks=4", "env.train.max_episode_steps=64"]))
    assert e.value.key == "env.actor.model.num_action_chunks"
    assert "decodes 8 actions of 7 dims per call, not 4 of 7" in str(e.value)


class _Registered(PolicyFamily):
    """A family defined outside vlajax's packages: only its registration is under test here."""

    name = "registered-elsewhere"
    adapters = {"tabletop": IOAdapter()}

    def load(self, spec: PolicySpec):
        raise SpecError(f"{spec.path}: this family loads nothing", "path")

    def load_checkpoint(self, path: Path, **kw):
        raise SpecError(f"{path}: this family loads nothing", "path")

    def batch_spec(self, policy, *, image_shape, prompt_width):
        return {"actions": BatchField((8, 7), np.dtype(np.float32))}

    def flops_per_row(self, policy, prompt_len):
        return 0.0

    @property
    def lora_targets(self):
        return r"head"

    def convert(self, src: Path, dst: Path, to=None, *, dtype="float32", export_dtype=None):
        return "nothing to convert"


def test_a_family_registered_from_outside_is_selected_by_name():
    from vlajax.session import build_policy

    family = register_family(_Registered())
    assert "registered-elsewhere" in family_names() and get_family("registered-elsewhere") is family
    cfg = load_config("demo", ["actor_rollout_ref.model.family=registered-elsewhere"])
    with pytest.raises(ConfigError, match="this family loads nothing") as e:
        build_policy(cfg)
    assert e.value.key == "actor_rollout_ref.model.path"


def test_a_linear_gaussian_family_learns_the_tabletop_task_through_vlajax_train(tmp_path, capsys):
    """A family with nothing of OFT (float samples, closed-form log-likelihoods, no vision tower,
    `tests/toy_family.py`) registered from outside trains through the unchanged `vlajax train`:
    the decoder samples through its `sample_actions`, the rollout stores its float samples, the
    learner scores them with its `log_prob`, and greedy success rises from 0 (its mean starts at 0:
    the gripper does not move). Seeds 0, 1, 2 reached 0.54, 0.42, 0.58 after 20 steps (~65 s each)."""
    import json

    from tests import toy_family
    from vlajax.cli import main

    run = tmp_path / "run"
    rc = main(["train", "demo", f"actor_rollout_ref.model.family={toy_family.NAME}",
               "actor_rollout_ref.model.path=preset:linear",
               "actor_rollout_ref.actor.optim.lr=1e-2",  # a linear model: Adam's per-step move is lr
               "actor_rollout_ref.actor.optim.lr_warmup_steps=0", "trainer.total_training_steps=20",
               # the recipe these seeds were measured with (demo.yaml's before it moved to 1 epoch at T = 1.2)
               "actor_rollout_ref.actor.ppo_epochs=2", "actor_rollout_ref.rollout.temperature=1.6",
               "trainer.test_freq=10", "trainer.save_freq=-1", f"trainer.default_local_dir={run}",
               "trainer.logger=[jsonl]"])
    assert rc == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/success_rate"] for r in rows if "val/success_rate" in r}
    assert val[0] < 0.1 and val[20] >= 0.3, val
    train = [r for r in rows if "actor/ratio_mean" in r]
    assert len(train) == 20 and all(abs(r["actor/ratio_mean"] - 1) < 0.05 for r in train)
    assert "final greedy success rate" in capsys.readouterr().out


def test_a_family_without_an_adapter_for_the_simulator_is_a_config_error_naming_it():
    """How a policy's images, gripper and statistics meet a simulator is the family's (its adapters):
    a family that has never met the run's simulator says so before anything is built."""
    from tests import toy_family
    from vlajax.session import build_policy

    cfg = load_config("libero_grpo", [f"actor_rollout_ref.model.family={toy_family.NAME}",
                                      "actor_rollout_ref.model.path=preset:linear"])
    with pytest.raises(ConfigError, match="has no input/output adapter for the libero simulator") as e:
        build_policy(cfg)
    assert e.value.key == "env.train.simulator_type"
    oft = get_family("oft")
    assert oft.adapter("libero").image_flip and oft.adapter("libero").gripper == "libero"
    assert not oft.adapter("tabletop").image_flip and oft.adapter("tabletop").gripper is None
