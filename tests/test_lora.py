"""LoRA on the real small policy: targets, adapters-only training in the learner, merge for export."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from _learner_worker import CFG, flat_params, init_params, make_batch, make_policy  # noqa: E402

from vlajax.model.preprocess import preprocess_images  # noqa: E402
from vlajax.model.oft.pretrained import build_model  # noqa: E402
from vlajax.rl.learner import Learner, LearnerConfig  # noqa: E402
from vlajax.rl.lora import (  # noqa: E402
    LoraConfig, apply_lora, count_params, has_lora, merged_policy, trainable_filter, with_lora,
)

LLM_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.fixture(scope="module")
def params0():
    return init_params()


def test_apply_lora_targets(params0):
    model = build_model(CFG, params0)
    names = apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    layers = CFG.llm.num_layers
    assert sorted(names) == sorted(f"llm.layers.{i}.{p}_proj" for i in range(layers) for p in LLM_LINEARS)
    q = model.llm.layers[0].q_proj
    assert q.lora_a[...].shape == (CFG.llm.hidden, 4) and q.lora_b[...].shape == (4, CFG.llm.hidden)
    assert not np.any(np.asarray(q.lora_b[...]))  # B = 0: the adapted policy starts as the base one
    assert q.lora_a.get_metadata()["logical_axes"] == ("embed", "lora")
    assert q.lora_b.get_metadata()["logical_axes"] == ("lora", "qkv")
    assert q.lora_scale == 2.0
    d, f = CFG.llm.hidden, CFG.llm.intermediate
    per_layer = 4 * (4 * (d + d) + 2 * (d + f) + (f + d))
    assert count_params(nnx.state(model), trainable_filter(True)) == layers * per_layer
    assert has_lora(model)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, LoraConfig(rank=4))

    vit = build_model(CFG, params0)
    assert apply_lora(vit, LoraConfig(rank=2, targets=r"featurizer\.blocks\.\d+\.qkv")) == [
        f"featurizer.blocks.{i}.qkv" for i in range(CFG.dino.num_used_blocks)]
    with pytest.raises(ValueError, match=r"match no Linear layer.*llm\.layers"):
        apply_lora(build_model(CFG, params0), LoraConfig(targets=r"llm\.nothing"))


@pytest.mark.slow  # compiles a LoRA update and two forwards
def test_lora_learner_trains_adapters_only_and_merges(params0):
    """Production defaults (bf16 compute, bf16 frozen base) with uint8 images preprocessed in the step."""
    policy = with_lora(make_policy(params0, compute_dtype=jnp.bfloat16), LoraConfig(rank=4, alpha=8.0))
    learner = Learner(policy, LearnerConfig(micro_batch_size=4))
    n = learner.num_params()
    assert n["trainable"] == count_params(policy.state, nnx.LoRAParam) > 0
    assert n["frozen"] == sum(x.size for x in jax.tree.leaves(params0))
    assert {x.dtype for x in jax.tree.leaves(learner.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(learner.state.params)} == {jnp.dtype(jnp.float32)}
    # optimizer state only for the adapters
    mu = learner.state.opt_state[1].mu
    assert jax.tree.structure(mu) == jax.tree.structure(learner.state.params)

    base = flat_params(jax.device_get(learner.frozen))
    lora0 = flat_params(jax.device_get(learner.state.params))
    assert all(k.endswith(("lora_a", "lora_b")) for k in lora0)
    learner.set_lr(1e-2)
    batch = make_batch(7, images=True)
    for _ in range(3):
        m = jax.device_get(learner.update(batch))
        assert m["skipped"] == 0 and np.isfinite(m["loss"]) and m["grad_norm"] > 0
    for k, v in flat_params(jax.device_get(learner.frozen)).items():
        np.testing.assert_array_equal(v, base[k], err_msg=k)  # the base is untouched
    lora3 = flat_params(jax.device_get(learner.state.params))
    assert all(not np.array_equal(lora3[k], lora0[k]) for k in lora0)  # every adapter trained

    # export: the merged policy gives the LoRA policy's logits, and the adapters did change the weights
    merged = merged_policy(learner.policy)
    assert not merged.model_has_lora() and learner.policy.model_has_lora()
    with pytest.raises(ValueError, match="merge LoRA"):
        learner.policy.save("/nonexistent/never-written")
    q = "llm/layers/1/q_proj/kernel"
    w_merged = np.asarray(merged.state["llm"]["layers"][1]["q_proj"]["kernel"].get_value(), np.float32)
    w_base = base[q].astype(np.float32)
    assert np.abs(w_merged - w_base).max() > 0.1 * np.abs(w_base).max()
    pv = preprocess_images(jnp.asarray(batch["images"]), resize_to=CFG.image_size)
    args = (pv, batch["input_ids"], batch["attention_mask"])
    lo_lora = np.asarray(learner.policy.action_logits(*args))
    lo_merged = np.asarray(merged.action_logits(*args))
    # bf16 weights and compute: ~1% of the logit scale apart (the adapters move logits by ~150% of it)
    np.testing.assert_allclose(lo_merged, lo_lora, atol=0.03 * np.abs(lo_lora).max())


@pytest.mark.slow  # compiles a LoRA update with the KL term and two forwards
def test_lora_kl_reference_is_the_base_model(params0):
    """With LoRA the KL reference is the base model with the adapters off (no copy of the weights)."""
    f32 = dict(compute_dtype="float32", frozen_dtype="float32", micro_batch_size=4)
    learner = Learner(with_lora(make_policy(params0), LoraConfig(rank=4, alpha=8.0)), LearnerConfig(kl_coef=0.1, **f32))
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(learner.ref_params))
    batch = make_batch(7, images=True)
    learner.set_lr(1e-2)
    for _ in range(2):
        m = jax.device_get(learner.update(batch))
        assert np.isfinite(m["kl_loss"])
    assert m["kl_loss"] > 0
    base = Learner(make_policy(params0), LearnerConfig(**f32))
    want = np.asarray(base.logprobs(batch)[0])
    np.testing.assert_allclose(np.asarray(learner.ref_logprobs(batch)), want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(learner.logprobs(batch)[0]) - want).max() > 1e-3  # the adapters did move it
