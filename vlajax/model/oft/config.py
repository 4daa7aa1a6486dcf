"""Frozen configs of the OpenVLA-OFT policy and its presets.

Sizes of a Hugging Face checkpoint are read from its `config.json` (LLM) and tensor shapes (vision
towers) by `vlajax.model.oft.hf_convert`; the presets here are for building a model from scratch.
"""

from __future__ import annotations

import dataclasses

from vlajax.model.vit import ViTConfig


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    hidden: int = 4096
    intermediate: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    vocab_size: int = 32064  # 32000 Llama tokens + 64 padding rows
    pad_to_multiple_of: int = 64
    rms_eps: float = 1e-6  # LlamaConfig default; OpenVLA never overrides it (not Llama-2's 1e-5)
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads


@dataclasses.dataclass(frozen=True)
class OFTConfig:
    """OpenVLA-OFT with parallel decoding: one forward pass yields chunk x action_dim tokens."""

    dino: ViTConfig
    siglip: ViTConfig
    llm: LlamaConfig
    num_images: int = 1
    proprio_dim: int | None = None
    # Learned embeddings at the 56 action rows in place of OFT's zeros: for policies trained from
    # scratch (presets) only; HF checkpoints have none. See vlajax.model.oft.init for why.
    action_queries: bool = False
    chunk: int = 8
    action_dim: int = 7
    n_bins: int = 256
    projector_hidden_mult: int = 4  # fc1: 2176 -> 4 * 2176
    # token ids
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 32000
    prompt_end_id: int = 29871  # SentencePiece "▁", appended to every prompt

    @property
    def num_action_tokens(self) -> int:
        return self.chunk * self.action_dim

    @property
    def sample_dtype(self) -> str:
        """What `sample_actions` draws: bin columns (`vlajax.model.family.ActionModel`)."""
        return "int32"

    @property
    def vision_dim(self) -> int:
        return self.dino.width + self.siglip.width

    @property
    def vocab_nopad(self) -> int:
        return self.llm.vocab_size - self.llm.pad_to_multiple_of

    @property
    def action_token_begin(self) -> int:
        """Token id of logit column 0: the last n_bins ids of the unpadded vocab (31744)."""
        return self.vocab_nopad - self.n_bins

    @property
    def num_vision_tokens(self) -> int:
        return self.dino.num_patches * self.num_images + (1 if self.proprio_dim else 0)

    @property
    def image_size(self) -> int:
        return self.dino.image_size

    def validate(self) -> None:
        if self.dino.num_patches != self.siglip.num_patches:
            raise ValueError(
                f"vision towers disagree on patches: dino {self.dino.num_patches}, siglip {self.siglip.num_patches}"
            )
        if self.num_images not in (1, 2, 3):
            raise ValueError(f"num_images must be 1..3, got {self.num_images}")
        if self.llm.hidden % self.llm.num_heads or self.llm.num_heads % self.llm.num_kv_heads:
            raise ValueError(f"inconsistent LLM heads: {self.llm}")
        for name, t in (("dino", self.dino), ("siglip", self.siglip)):
            if t.width % t.num_heads:
                raise ValueError(f"{name}: width {t.width} not divisible by {t.num_heads} heads")


def openvla_oft_7b(num_images: int = 1, proprio_dim: int | None = None, action_queries: bool = False) -> OFTConfig:
    return OFTConfig(
        dino=ViTConfig(width=1024, depth=24, mlp_dim=4096, class_token=True, num_registers=4, layer_scale=True),
        siglip=ViTConfig(width=1152, depth=27, mlp_dim=4304),
        llm=LlamaConfig(),
        num_images=num_images,
        proprio_dim=proprio_dim,
        action_queries=action_queries,
    )


def small(num_images: int = 1, proprio_dim: int | None = None, image_size: int = 224,
          action_queries: bool = False) -> OFTConfig:
    """CPU-sized model with the same structure (both towers, 16 heads, registers, LayerScale,
    vocab 32064 so that action ids are 31744..31999): for tests, demos and learning from scratch."""
    return OFTConfig(
        dino=ViTConfig(
            width=64, depth=3, mlp_dim=128, class_token=True, num_registers=4, layer_scale=True,
            image_size=image_size,
        ),
        siglip=ViTConfig(width=96, depth=3, mlp_dim=192, image_size=image_size),
        llm=LlamaConfig(hidden=64, intermediate=128, num_layers=2, num_heads=4, num_kv_heads=4),
        num_images=num_images,
        proprio_dim=proprio_dim,
        action_queries=action_queries,
    )


PRESETS = {"openvla-oft-7b": openvla_oft_7b, "small": small}


def preset(name: str, **kw) -> OFTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name](**kw)
    cfg.validate()
    return cfg
