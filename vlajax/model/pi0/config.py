"""π0's sizes: PaliGemma (SigLIP So400m/14 + Gemma 2B) with the Gemma-300M action expert, and a tiny
preset for CPU tests. Field names follow openpi (`Pi0Config`, `gemma.Config`), so a checkpoint's
config reads across."""

from __future__ import annotations

import dataclasses

from vlajax.model.vit import ViTConfig

__all__ = ["GemmaConfig", "Pi0Config", "PRESETS", "preset"]


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """One expert of the mixture transformer (openpi `gemma.Config`, without LoRA: vlajax adds its own)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


GEMMA_2B = GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256)
GEMMA_300M = GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)
SO400M = ViTConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, image_size=224,
                   final_norm=True, gelu_approximate=True)


@dataclasses.dataclass(frozen=True)
class Pi0Config:
    """π0 (openpi `Pi0Config` with `pi05=False`): the prefix (images, prompt) runs through the
    PaliGemma weights, the suffix (state token, `action_horizon` noisy actions with the flow time)
    through the action expert's, in one attention."""

    vision: ViTConfig = SO400M
    llm: GemmaConfig = GEMMA_2B
    expert: GemmaConfig = GEMMA_300M
    vocab_size: int = 257_152
    action_dim: int = 32  # openpi pads robot actions / state to this many dims
    action_horizon: int = 50
    max_token_len: int = 48
    num_images: int = 3  # base, left wrist, right wrist (openpi's IMAGE_KEYS)

    def validate(self) -> None:
        a, b = self.llm, self.expert
        if (a.depth, a.num_heads, a.num_kv_heads, a.head_dim) != (b.depth, b.num_heads, b.num_kv_heads, b.head_dim):
            raise ValueError("the PaliGemma LLM and the action expert share every attention: they need the same depth, "
                             f"heads, kv heads and head dim; got {a} and {b}")
        if a.num_heads % a.num_kv_heads:
            raise ValueError(f"num_heads {a.num_heads} is not a multiple of num_kv_heads {a.num_kv_heads}")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(f"image size {self.vision.image_size} is not a multiple of the patch {self.vision.patch_size}")

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches


PRESETS = {
    "pi0": Pi0Config(),
    # the parity fixture's size (tests/reference/openpi_pi0_fixture.py)
    "tiny": Pi0Config(
        vision=ViTConfig(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=14, image_size=224, final_norm=True,
                         gelu_approximate=True),
        llm=GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
        expert=GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16),
        vocab_size=1024, action_dim=8, action_horizon=5, max_token_len=12),
}


def preset(name: str, **overrides) -> Pi0Config:
    if name not in PRESETS:
        raise KeyError(f"no π0 preset {name!r}; the presets are {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
