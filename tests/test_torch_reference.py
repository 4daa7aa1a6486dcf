"""Self-checks of the independent PyTorch OpenVLA-OFT reference (tests/reference) used by the parity tests.

The expected key list is written out here from the checkpoint spec (openvla_oft.md §4.5), not read from the model.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.reference.hf_layout import (
    hf_config,
    random_dataset_statistics,
    random_inputs,
    random_proprio,
    write_hf_checkpoint,
)
from tests.reference.torch_oft import (
    ACTION_TOKEN_BEGIN,
    NUM_ACTION_TOKENS,
    OFTSizes,
    build_torch_oft,
    full_size_meta_keys,
    hf_state_dict,
    llama_config,
    tower_features,
)


def spec_keys(s: OFTSizes) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys and shapes as listed in openvla_oft.md §4.5, at the sizes ``s``."""
    keys: dict[str, tuple[int, ...]] = {}
    n = s.patches_per_image
    k, p = s.patch_size, s.proprio_dim

    def vit(prefix: str, d: int, mlp: int, depth: int, layerscale: bool) -> None:
        keys[f"{prefix}.pos_embed"] = (1, n, d)
        keys[f"{prefix}.patch_embed.proj.weight"] = (d, 3, k, k)
        keys[f"{prefix}.patch_embed.proj.bias"] = (d,)
        for i in range(depth):
            b = f"{prefix}.blocks.{i}"
            for norm in ("norm1", "norm2"):
                keys[f"{b}.{norm}.weight"] = keys[f"{b}.{norm}.bias"] = (d,)
            keys[f"{b}.attn.qkv.weight"], keys[f"{b}.attn.qkv.bias"] = (3 * d, d), (3 * d,)
            keys[f"{b}.attn.proj.weight"], keys[f"{b}.attn.proj.bias"] = (d, d), (d,)
            keys[f"{b}.mlp.fc1.weight"], keys[f"{b}.mlp.fc1.bias"] = (mlp, d), (mlp,)
            keys[f"{b}.mlp.fc2.weight"], keys[f"{b}.mlp.fc2.bias"] = (d, mlp), (d,)
            if layerscale:
                keys[f"{b}.ls1.scale_factor"] = keys[f"{b}.ls2.scale_factor"] = (d,)
        keys[f"{prefix}.norm.weight"] = keys[f"{prefix}.norm.bias"] = (d,)

    dino, sig = "vision_backbone.featurizer", "vision_backbone.fused_featurizer"
    vit(dino, s.dino_width, s.dino_mlp, s.dino_depth, layerscale=True)
    keys[f"{dino}.cls_token"], keys[f"{dino}.reg_token"] = (1, 1, s.dino_width), (1, s.dino_reg_tokens, s.dino_width)
    d, m = s.siglip_width, s.siglip_mlp
    vit(sig, d, m, s.siglip_depth, layerscale=False)
    pool = f"{sig}.attn_pool"
    keys.update({
        f"{pool}.latent": (1, 1, d), f"{pool}.q.weight": (d, d), f"{pool}.q.bias": (d,),
        f"{pool}.kv.weight": (2 * d, d), f"{pool}.kv.bias": (2 * d,), f"{pool}.proj.weight": (d, d),
        f"{pool}.proj.bias": (d,), f"{pool}.norm.weight": (d,), f"{pool}.norm.bias": (d,),
        f"{pool}.mlp.fc1.weight": (m, d), f"{pool}.mlp.fc1.bias": (m,),
        f"{pool}.mlp.fc2.weight": (d, m), f"{pool}.mlp.fc2.bias": (d,),
    })  # fmt: skip
    v, h, f = s.dino_width + s.siglip_width, s.llm_hidden, s.llm_intermediate
    keys.update({
        "projector.fc1.weight": (4 * v, v), "projector.fc1.bias": (4 * v,),
        "projector.fc2.weight": (h, 4 * v), "projector.fc2.bias": (h,),
        "projector.fc3.weight": (h, h), "projector.fc3.bias": (h,),
    })  # fmt: skip
    if p is not None:
        keys.update({"proprio_projector.fc1.weight": (h, p), "proprio_projector.fc1.bias": (h,),
                     "proprio_projector.fc2.weight": (h, h), "proprio_projector.fc2.bias": (h,)})  # fmt: skip
    lm = "language_model.model"
    keys[f"{lm}.embed_tokens.weight"] = (s.vocab_size, h)
    for i in range(s.llm_layers):
        b = f"{lm}.layers.{i}"
        for proj in "qkvo":
            keys[f"{b}.self_attn.{proj}_proj.weight"] = (h, h)
        keys[f"{b}.mlp.gate_proj.weight"] = keys[f"{b}.mlp.up_proj.weight"] = (f, h)
        keys[f"{b}.mlp.down_proj.weight"] = (h, f)
        keys[f"{b}.input_layernorm.weight"] = keys[f"{b}.post_attention_layernorm.weight"] = (h,)
    keys[f"{lm}.norm.weight"] = (h,)
    keys["language_model.lm_head.weight"] = (s.vocab_size, h)
    return keys


@pytest.fixture(scope="module")
def tiny():
    return build_torch_oft(OFTSizes.tiny(), seed=0)


@pytest.fixture(scope="module")
def tiny_2img_proprio():
    return build_torch_oft(OFTSizes.tiny(proprio_dim=8, num_images=2), seed=1)


@pytest.mark.parametrize("variant", [{}, {"proprio_dim": 14, "num_images": 2}])
def test_tiny_keys_and_shapes_match_spec(variant):
    s = OFTSizes.tiny(**variant)
    got = {k: tuple(t.shape) for k, t in hf_state_dict(build_torch_oft(s, device="meta")).items()}
    assert got == spec_keys(s)


def test_full_size_keys_and_param_count_match_real_checkpoint():
    keys = full_size_meta_keys()
    assert len(keys) == 982
    assert sum(torch.Size(shape).numel() for shape in keys.values()) == 7_541_237_184
    assert keys == spec_keys(OFTSizes.full())
    with_proprio = full_size_meta_keys(proprio_dim=14)
    assert set(with_proprio) - set(keys) == {f"proprio_projector.fc{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}


def test_llama_attention_is_bidirectional(tiny):
    """Changing the last token changes position 0's logits; the same weights with causal attention do not."""
    llm = tiny.language_model
    causal = type(llm)(llama_config(tiny.sizes))
    causal.load_state_dict(llm.state_dict())
    causal.eval()
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 10, tiny.sizes.llm_hidden, generator=gen)
    changed = embeds.clone()
    changed[:, -1] += 1.0
    mask = torch.ones(1, 10, dtype=torch.long)
    with torch.no_grad():
        a, b = tiny.full_logits(embeds, mask), tiny.full_logits(changed, mask)
        ca, cb = causal(inputs_embeds=embeds).logits, causal(inputs_embeds=changed).logits
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-3
    torch.testing.assert_close(ca[:, :-1], cb[:, :-1])


def test_padded_keys_are_ignored_eager_equals_sdpa(tiny):
    """A pad key changes nothing for real rows; eager and sdpa attention agree (both non-causal)."""
    s = tiny.sizes
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 12, s.llm_hidden, generator=gen)
    mask = torch.tensor([[1] * 9 + [0] * 3])
    other = embeds.clone()
    other[:, 9:] = torch.randn(1, 3, s.llm_hidden, generator=gen)
    eager = build_torch_oft(s, seed=0, attn_implementation="eager")
    with torch.no_grad():
        a, b = tiny.full_logits(embeds, mask), tiny.full_logits(other, mask)
        unpadded = tiny.full_logits(embeds[:, :9], mask[:, :9])
        e = eager.full_logits(embeds, mask)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    torch.testing.assert_close(a[:, :9], unpadded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e[:, :9], a[:, :9], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tower", ["featurizer", "fused_featurizer"])
def test_tower_features_are_block_depth_minus_2(tiny, tower):
    vit = getattr(tiny.vision_backbone, tower)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 224, 224, generator=gen)
    with torch.no_grad():
        got = tower_features(vit, x)
        (prismatic,) = vit.get_intermediate_layers(x, n={len(vit.blocks) - 2})  # Prismatic's patched forward
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for blk in vit.blocks[:-1]:
            h = blk(h)
        manual = h[:, vit.num_prefix_tokens :]
        last = vit.blocks[-1](h)[:, vit.num_prefix_tokens :]
    assert got.shape == (2, 256, vit.embed_dim)
    assert vit.num_prefix_tokens == (5 if tower == "featurizer" else 0)
    torch.testing.assert_close(got, prismatic, rtol=0, atol=0)
    torch.testing.assert_close(got, manual)
    assert (got - last).abs().max() > 1e-3


def test_layerscale_scale_factor_is_used(tiny):
    vit = build_torch_oft(tiny.sizes, seed=0).vision_backbone.featurizer
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = tower_features(vit, x)
        vit.blocks[0].ls2.scale_factor.mul_(2.0)
        after = tower_features(vit, x)
    assert (before - after).abs().max() > 1e-3


def _manual_action_logits(model, pixel_values, input_ids, proprio):
    """Row-by-row rebuild of SimpleVLA's sequence, no padding: [BOS, patches, prompt[1:], 0 x 56, </s>]."""
    emb = model.language_model.get_input_embeddings()
    out = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][input_ids[b] != 32000]
        patches = model.project_patches(pixel_values[b : b + 1], None if proprio is None else proprio[b : b + 1])
        hidden = patches.shape[-1]
        seq = torch.cat([
            emb(ids[:1])[None], patches, emb(ids[1:])[None],
            torch.zeros(1, NUM_ACTION_TOKENS, hidden), emb(torch.tensor([2]))[None],
        ], dim=1)  # fmt: skip
        assert seq.shape[1] == ids.numel() + model.sizes.num_patches + NUM_ACTION_TOKENS + 1
        logits = model.language_model(inputs_embeds=seq).logits.float()
        start = model.sizes.num_patches + ids.numel() - 1
        out.append(logits[0, start : start + NUM_ACTION_TOKENS, ACTION_TOKEN_BEGIN:32000])
    return torch.stack(out)


@pytest.mark.parametrize("model_name", ["tiny", "tiny_2img_proprio"])
def test_action_logits_match_row_by_row_sequence(model_name, request):
    model = request.getfixturevalue(model_name)
    s = model.sizes
    pixel_values, input_ids, mask = random_inputs(s, 3, [9, 14, 5], seed=4)
    proprio = random_proprio(s, 3, seed=5) if s.proprio_dim else None
    with torch.no_grad():
        got = model.action_logits(pixel_values, input_ids, mask, proprio)
        want = _manual_action_logits(model, pixel_values, input_ids, proprio)
    assert got.shape == (3, 56, 256) and got.dtype == torch.float32
    assert 0.1 < float(got.std()) < 100.0  # non-degenerate distribution over bins
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_action_logits_reject_bad_inputs(tiny):
    pixel_values, input_ids, mask = random_inputs(tiny.sizes, 2, [6, 4], seed=6)
    left_padded = torch.roll(input_ids, 2, dims=1)
    with pytest.raises(ValueError, match="right-padded"):
        tiny.action_logits(pixel_values, left_padded, (left_padded != 32000).long())
    with pytest.raises(ValueError, match="attention_mask"):
        tiny.action_logits(pixel_values, input_ids, torch.ones_like(mask))
    with pytest.raises(ValueError, match="pixel_values"):
        tiny.action_logits(pixel_values[:, :3], input_ids, mask)
    with pytest.raises(ValueError, match="proprio"):
        tiny.action_logits(pixel_values, input_ids, mask, torch.zeros(2, 8))


def test_random_inputs_are_valid_prompts():
    s = OFTSizes.tiny(num_images=2)
    pixel_values, input_ids, mask = random_inputs(s, 3, [7, 2, 5], seed=7)
    assert pixel_values.shape == (3, 12, 224, 224) and pixel_values.dtype == torch.float32
    assert input_ids.shape == mask.shape == (3, 7) and input_ids.dtype == torch.long
    assert mask.sum(1).tolist() == [7, 2, 5]
    for row, p in zip(input_ids, [7, 2, 5]):
        assert row[0] == 1 and row[p - 1] == 29871 and bool((row[p:] == 32000).all())
        assert bool(((row[1 : p - 1] >= 3) & (row[1 : p - 1] < ACTION_TOKEN_BEGIN)).all())
    # SigLIP copy = (u - 0.5) / 0.5 of the same image the DINOv2 copy normalizes.
    u = pixel_values[:, 3:6] * 0.5 + 0.5
    dino = (u - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(pixel_values[:, 0:3], dino)


def test_write_hf_checkpoint_sharded_fp32_round_trips(tiny_2img_proprio, tmp_path):
    model, s = tiny_2img_proprio, tiny_2img_proprio.sizes
    out = write_hf_checkpoint(model, s, tmp_path, dtype=torch.float32, num_shards=3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    loaded = {}
    for name in shards:
        loaded.update(load_file(str(out / name)))
    state = hf_state_dict(model)
    assert set(index["weight_map"]) == set(loaded) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    for key, t in state.items():
        assert loaded[key].dtype == torch.float32
        torch.testing.assert_close(loaded[key], t, rtol=0, atol=0)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "openvla" and cfg["torch_dtype"] == "float32"
    assert cfg["use_proprio"] is True and cfg["proprio_dim"] == 8 and cfg["num_images_in_input"] == 2
    assert (cfg["pad_token_id"], cfg["pad_to_multiple_of"], cfg["n_action_bins"]) == (32000, 64, 256)
    assert cfg["timm_model_ids"] == ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
    assert cfg["text_config"]["hidden_size"] == 64 and cfg["text_config"]["num_attention_heads"] == 4
    stats = json.loads((out / "dataset_statistics.json").read_text())["libero_10_no_noops"]
    assert stats["action"]["mask"] == [True] * 6 + [False]
    assert all(lo < hi for lo, hi in zip(stats["action"]["q01"], stats["action"]["q99"]))
    assert len(stats["proprio"]["q01"]) == 8
    assert "libero_10_no_noops" not in cfg["norm_stats"]


def test_write_hf_checkpoint_single_bf16_rl_style(tiny, tmp_path):
    stats = random_dataset_statistics(3, "libero_spatial_no_noops")
    out = write_hf_checkpoint(
        tiny, tiny.sizes, tmp_path, num_shards=1, dataset_statistics=stats, norm_key="libero_spatial_no_noops",
        rl_style=True,
    )  # fmt: skip
    assert not (out / "model.safetensors.index.json").exists() and not (out / "dataset_statistics.json").exists()
    loaded = load_file(str(out / "model.safetensors"))
    state = hf_state_dict(tiny)
    assert set(loaded) == set(state)
    key = "vision_backbone.featurizer.blocks.0.ls1.scale_factor"
    assert loaded[key].dtype == torch.bfloat16
    torch.testing.assert_close(loaded[key], state[key].to(torch.bfloat16), rtol=0, atol=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["norm_stats"]["libero_spatial_no_noops"] == stats["libero_spatial_no_noops"]
    assert cfg["use_proprio"] is False and cfg["torch_dtype"] == "bfloat16"


def test_full_size_config_text_config_has_exactly_the_real_four_keys():
    cfg = hf_config(OFTSizes.full(), dtype=torch.bfloat16, norm_stats={})
    assert cfg["text_config"] == {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16",
                                  "vocab_size": 32064}  # fmt: skip
    assert "vlajax_test_sizes" not in cfg and "use_proprio" not in cfg
