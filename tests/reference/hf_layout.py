"""Write the reference model in the on-disk layout of a real Hugging Face OpenVLA-OFT checkpoint, and make valid inputs.

The layout (safetensors shards + index, ``config.json`` fields, ``dataset_statistics.json``) follows
/work/shared/reference/openvla_oft.md §4.3-§4.5, so the vlajax converter is tested on exactly what it will read.
Tokenizer and processor files are not written; callers copy them in when needed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tests.reference.torch_oft import (
    BOS_ID,
    N_ACTION_BINS,
    PAD_ID,
    PROMPT_END_ID,
    TIMM_MODEL_IDS,
    OFTSizes,
    TorchOFT,
    full_size_meta_keys,
    hf_state_dict,
)

__all__ = [
    "write_hf_checkpoint",
    "hf_config",
    "random_dataset_statistics",
    "random_inputs",
    "random_proprio",
    "full_size_meta_keys",
    "DINO_MEAN",
    "DINO_STD",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
]

DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _stats_block(rng: np.random.Generator, dim: int, mask: list[bool] | None) -> dict:
    """One {mean, std, max, min, q01, q99[, mask]} block with min < q01 < mean < q99 < max."""
    q01 = -rng.uniform(0.05, 1.0, dim)
    q99 = rng.uniform(0.05, 1.0, dim)
    block = {
        "mean": (q01 + (q99 - q01) * rng.uniform(0.3, 0.7, dim)).tolist(),
        "std": ((q99 - q01) * rng.uniform(0.15, 0.35, dim)).tolist(),
        "max": (q99 + rng.uniform(0.01, 0.3, dim)).tolist(),
        "min": (q01 - rng.uniform(0.01, 0.3, dim)).tolist(),
        "q01": q01.tolist(),
        "q99": q99.tolist(),
    }
    if mask is not None:
        block["mask"] = list(mask)
    return block


def random_dataset_statistics(
    seed: int, norm_key: str = "libero_10_no_noops", *, action_dim: int = 7, proprio_dim: int = 8
) -> dict:
    """Plausible ``dataset_statistics.json`` content: actions masked [True]*(dim-1)+[False] (gripper untouched)."""
    rng = np.random.default_rng(seed)
    action = _stats_block(rng, action_dim, [True] * (action_dim - 1) + [False])
    # The LIBERO gripper is already in [-1, 1]; real stats show it as min/q01 = -1, max/q99 = 1.
    for k, v in (("min", -1.0), ("q01", -1.0), ("q99", 1.0), ("max", 1.0), ("mean", 0.0), ("std", 1.0)):
        action[k][-1] = v
    return {
        norm_key: {
            "action": action,
            "proprio": _stats_block(rng, proprio_dim, None),
            "num_transitions": int(rng.integers(1_000, 100_000)),
            "num_trajectories": int(rng.integers(10, 500)),
        }
    }


def _text_config(sizes: OFTSizes, dtype_name: str) -> dict:
    """Real checkpoints carry 4 keys (all else is LlamaConfig's 7B defaults); smaller models must say their sizes."""
    cfg = {"model_type": "llama", "pad_token_id": PAD_ID, "torch_dtype": dtype_name, "vocab_size": sizes.vocab_size}
    if not sizes.is_full:
        cfg.update(
            hidden_size=sizes.llm_hidden,
            intermediate_size=sizes.llm_intermediate,
            num_hidden_layers=sizes.llm_layers,
            num_attention_heads=sizes.llm_heads,
            num_key_value_heads=sizes.llm_heads,
        )
    return cfg


def hf_config(sizes: OFTSizes, *, dtype: torch.dtype, norm_stats: dict, rl_style: bool = False) -> dict:
    """The ``config.json`` content of a real OpenVLA-OFT checkpoint (§4.4), plus test sizes for non-7B models."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    dtype_name = _DTYPE_NAMES[dtype]
    cfg = {
        "architectures": ["OpenVLAForActionPrediction"],
        "arch_specifier": "no-align+fused-gelu-mlp",
        "auto_map": {
            "AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
        },
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": "resize-naive",
        "image_sizes": [sizes.image_size, sizes.image_size],
        "llm_backbone_id": "llama2-7b-pure",
        "llm_max_length": 2048,
        "model_type": "openvla",
        "n_action_bins": N_ACTION_BINS,
        "norm_stats": norm_stats,
        "num_images_in_input": sizes.num_images,
        "output_projector_states": False,
        "pad_to_multiple_of": 64,
        "pad_token_id": PAD_ID,
        "text_config": _text_config(sizes, dtype_name),
        "timm_model_ids": list(TIMM_MODEL_IDS),
        "timm_override_act_layers": [None, None],
        "torch_dtype": dtype_name,
        "transformers_version": "4.40.1",
        "use_fused_vision_backbone": True,
        "vision_backbone_id": "dinosiglip-vit-so-224px",
    }
    if sizes.proprio_dim is not None:
        cfg.update(use_proprio=True, proprio_dim=sizes.proprio_dim)
    elif rl_style:  # SimpleVLA RL saves carry these even without proprio
        cfg.update(use_proprio=False, proprio_dim=7)
    if not sizes.is_full:
        # Not in real checkpoints: the timm ids above name the 7B towers, so a test-sized one states its own sizes.
        cfg["vlajax_test_sizes"] = dataclasses.asdict(sizes)
    return cfg


def _shard_names(state: dict[str, torch.Tensor], num_shards: int) -> dict[str, str]:
    """Key -> file name; keys stay in module order and fill shards sequentially to ~equal bytes, as save_pretrained does."""
    if num_shards == 1:
        return dict.fromkeys(state, "model.safetensors")
    if not 1 < num_shards <= len(state):
        raise ValueError(f"num_shards={num_shards} must be in 1..{len(state)} (number of tensors)")
    sizes = [t.numel() * t.element_size() for t in state.values()]
    total, done, shard, names = sum(sizes), 0, 0, {}
    keys = list(state)
    for i, (key, nbytes) in enumerate(zip(keys, sizes)):
        keys_left, shards_left = len(keys) - i, num_shards - shard
        if shard < num_shards - 1 and (done >= total * (shard + 1) / num_shards or keys_left == shards_left - 1):
            shard += 1
        names[key] = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        done += nbytes
    return names


def write_hf_checkpoint(
    model: TorchOFT,
    sizes: OFTSizes,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    num_shards: int = 2,
    dataset_statistics: dict | None = None,
    norm_key: str = "libero_10_no_noops",
    rl_style: bool = False,
    seed: int = 0,
) -> Path:
    """Write ``model`` as a Hugging Face OpenVLA-OFT directory and return its path.

    SFT style (default): weights (bf16 or fp32), ``config.json`` whose ``norm_stats`` hold only an unrelated OXE entry
    (``bridge_orig``; inherited from the base model in real SFT checkpoints) and ``dataset_statistics.json`` holding
    ``norm_key``. ``rl_style=True`` mimics a SimpleVLA RL save: ``norm_stats`` also holds ``norm_key``, the config has
    ``use_proprio``/``proprio_dim``, and there is no ``dataset_statistics.json``. Missing statistics are random (seeded).
    """
    if model.sizes != sizes:
        raise ValueError(f"model was built with {model.sizes}, not {sizes}")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    state = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in hf_state_dict(model).items()}
    names = _shard_names(state, num_shards)
    for fname in dict.fromkeys(names.values()):
        save_file({k: t for k, t in state.items() if names[k] == fname}, str(out / fname), metadata={"format": "pt"})
    if num_shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": names}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    action_dim = 7
    if dataset_statistics is None:
        dataset_statistics = random_dataset_statistics(
            seed, norm_key, action_dim=action_dim, proprio_dim=sizes.proprio_dim or 8
        )
    if norm_key not in dataset_statistics:
        raise KeyError(f"dataset_statistics has no entry {norm_key!r}; keys: {sorted(dataset_statistics)}")
    norm_stats = random_dataset_statistics(seed + 1, "bridge_orig", action_dim=action_dim)
    if rl_style:
        norm_stats.update(dataset_statistics)
    else:
        (out / "dataset_statistics.json").write_text(json.dumps(dataset_statistics, indent=2) + "\n")
    cfg = hf_config(sizes, dtype=dtype, norm_stats=norm_stats, rl_style=rl_style)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def random_inputs(
    sizes: OFTSizes, batch: int, prompt_lengths: list[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Valid policy inputs.

    Returns pixel_values (B, 6*num_images, S, S) float32 (a random uint8 image normalized with DINOv2's then SigLIP's
    mean/std, as the Prismatic processor stacks them), input_ids (B, max P) int64 ``[1, ids in 3..31743, 29871]``
    right-padded with 32000, attention_mask (B, max P) int64. ``prompt_lengths[b]`` = P_b counts BOS and 29871.
    """
    if len(prompt_lengths) != batch:
        raise ValueError(f"prompt_lengths has {len(prompt_lengths)} entries for batch {batch}")
    if min(prompt_lengths) < 2:
        raise ValueError(f"every prompt length must be >= 2 (BOS and 29871), got {prompt_lengths}")
    gen = torch.Generator().manual_seed(seed)
    s = sizes.image_size
    groups = []
    for _ in range(sizes.num_images):
        img = torch.randint(0, 256, (batch, 3, s, s), generator=gen).float() / 255.0
        mean_d, std_d = torch.tensor(DINO_MEAN)[:, None, None], torch.tensor(DINO_STD)[:, None, None]
        mean_s, std_s = torch.tensor(SIGLIP_MEAN)[:, None, None], torch.tensor(SIGLIP_STD)[:, None, None]
        groups += [(img - mean_d) / std_d, (img - mean_s) / std_s]
    pixel_values = torch.cat(groups, dim=1)

    p_max = max(prompt_lengths)
    input_ids = torch.full((batch, p_max), PAD_ID, dtype=torch.long)
    for b, p in enumerate(prompt_lengths):
        input_ids[b, 0] = BOS_ID
        input_ids[b, 1 : p - 1] = torch.randint(3, 31744, (p - 2,), generator=gen)
        input_ids[b, p - 1] = PROMPT_END_ID
    attention_mask = (input_ids != PAD_ID).long()
    return pixel_values, input_ids, attention_mask


def random_proprio(sizes: OFTSizes, batch: int, seed: int) -> torch.Tensor:
    """(B, proprio_dim) float32 in [-1, 1], like BOUNDS_Q99-normalized, clipped proprio."""
    if sizes.proprio_dim is None:
        raise ValueError("sizes.proprio_dim is None: this model takes no proprio")
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch, sizes.proprio_dim), generator=gen) * 2 - 1
