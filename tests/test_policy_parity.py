"""Golden-logit parity: the Flax policy vs an independent PyTorch OpenVLA-OFT (timm ViTs +
transformers' Llama made bidirectional), both reading the same HF-layout checkpoint."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests.reference.torch_oft import OFTSizes, build_torch_oft  # noqa: E402  (imports torch, timm)
from tests.reference.hf_layout import random_inputs, random_proprio, write_hf_checkpoint
import torch

from vlajax.model.oft import load_pretrained


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize(
    "variant",
    [dict(), dict(num_images=2, proprio_dim=8)],
    ids=["1image", "2images+proprio"],
)
def test_action_logits_match_pytorch_fp32(tmp_path, variant):
    sizes = OFTSizes.tiny(**variant)
    ref = build_torch_oft(sizes, seed=3)
    ckpt = write_hf_checkpoint(ref, sizes, tmp_path / "hf", dtype=torch.float32, num_shards=2)

    policy = load_pretrained(ckpt, dtype="float32")
    assert policy.cfg.num_images == sizes.num_images
    assert policy.cfg.proprio_dim == sizes.proprio_dim

    lengths = [7, 12, 4]  # different prompt lengths in one batch: right padding per row
    pv, ids, mask = random_inputs(sizes, len(lengths), lengths, seed=5)
    proprio = random_proprio(sizes, len(lengths), seed=6) if sizes.proprio_dim else None
    with torch.no_grad():
        want = ref.action_logits(pv, ids, mask, proprio).numpy()
    got = policy.action_logits(
        jnp.asarray(pv.numpy()), jnp.asarray(ids.numpy(), jnp.int32), jnp.asarray(mask.numpy(), jnp.int32),
        None if proprio is None else jnp.asarray(proprio.numpy()),
    )
    assert got.shape == (3, 56, 256) and got.dtype == jnp.float32
    assert _rel_err(got, want) < 1e-4

    # each row is independent of the others' padding: row 2 alone gives the same logits
    alone = policy.action_logits(
        jnp.asarray(pv.numpy()[2:]), jnp.asarray(ids.numpy()[2:, :4], jnp.int32),
        jnp.asarray(mask.numpy()[2:, :4], jnp.int32),
        None if proprio is None else jnp.asarray(proprio.numpy()[2:]),
    )
    assert _rel_err(alone[0], want[2]) < 1e-4


def test_bf16_checkpoint_bf16_compute_close(tmp_path):
    """A bf16 checkpoint computed in bf16 stays within bf16 tolerance of the fp32 reference."""
    sizes = OFTSizes.tiny()
    ref = build_torch_oft(sizes, seed=4).to(torch.bfloat16).float()  # reference on bf16-rounded weights
    ckpt = write_hf_checkpoint(ref, sizes, tmp_path / "hf", dtype=torch.bfloat16, num_shards=1)
    policy = load_pretrained(ckpt, dtype="bfloat16")
    pv, ids, mask = random_inputs(sizes, 2, [9, 5], seed=1)
    with torch.no_grad():
        want = ref.action_logits(pv, ids, mask).numpy()
    got = policy.action_logits(jnp.asarray(pv.numpy()), jnp.asarray(ids.numpy(), jnp.int32),
                               jnp.asarray(mask.numpy(), jnp.int32))
    assert _rel_err(got, want) < 3e-2
    # greedy decisions mostly agree despite bf16 rounding
    agree = np.mean(np.argmax(np.asarray(got), -1) == np.argmax(want, -1))
    assert agree > 0.8
