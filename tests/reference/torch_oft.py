"""Independent PyTorch reference of the SimpleVLA-OFT policy (OpenVLA-OFT with token actions).

Built from the real libraries so that parity tests of the Flax port compare against
code nobody on this project wrote: timm's ``VisionTransformer`` for both vision
towers and transformers' ``LlamaForCausalLM`` made bidirectional, as the OFT fork
of transformers does. Module names equal the Hugging Face OpenVLA-OFT checkpoint
keys (see /work/shared/reference/openvla_oft.md §4.5), so ``model.state_dict()``
is a checkpoint.

Semantics follow SimpleVLA's ``generate_action_verl``: one forward over
``[BOS, patches(, proprio), prompt[1:], 56 zero embeddings, </s>, pad...]`` with a
key-padding mask only, and the (B, 56, 256) logits of the action-bin vocabulary slice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from tests.reference._torchvision_shim import ensure_torchvision_importable

ensure_torchvision_importable()

from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

BOS_ID = 1
EOS_ID = 2  # </s>, OFT's STOP_INDEX: appended after the action placeholders
PAD_ID = 32000  # <PAD>, first of the 64 padding rows of the 32064-row vocab
PROMPT_END_ID = 29871  # SentencePiece "▁" that ends every OFT prompt
VOCAB_NOPAD = 32000  # vocab_size - pad_to_multiple_of
N_ACTION_BINS = 256
ACTION_TOKEN_BEGIN = VOCAB_NOPAD - N_ACTION_BINS  # 31744: logit column 0 of the slice
NUM_ACTIONS_CHUNK = 8
ACTION_DIM = 7
NUM_ACTION_TOKENS = NUM_ACTIONS_CHUNK * ACTION_DIM  # 56
PLACEHOLDER_ID = 1  # value of the appended action ids; irrelevant, their embeddings are zeroed

TIMM_MODEL_IDS = ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224")


@dataclass(frozen=True)
class OFTSizes:
    """Every size of the policy. ``full()`` is the real OpenVLA-OFT 7B; ``tiny()`` runs on CPU in well under a second."""

    # DINOv2-like tower (timm vit_large_patch14_reg4_dinov2): cls + register tokens, LayerScale.
    dino_width: int
    dino_depth: int
    dino_mlp: int
    # SigLIP-like tower (timm vit_so400m_patch14_siglip_224): no prefix tokens, MAP head (unused).
    siglip_width: int
    siglip_depth: int
    siglip_mlp: int
    # Llama-2 language model.
    llm_hidden: int
    llm_intermediate: int
    llm_layers: int
    llm_heads: int
    dino_heads: int = 16
    dino_reg_tokens: int = 4
    siglip_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    vocab_size: int = 32064
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    proprio_dim: int | None = None
    num_images: int = 1

    def __post_init__(self) -> None:
        if self.num_images not in (1, 2):
            raise ValueError(f"OFTSizes.num_images must be 1 or 2, got {self.num_images}")
        if self.proprio_dim is not None and self.proprio_dim <= 0:
            raise ValueError(f"OFTSizes.proprio_dim must be None or positive, got {self.proprio_dim}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vocab_size < VOCAB_NOPAD + 1:
            raise ValueError(f"vocab_size {self.vocab_size} must hold the 32000 Llama ids and <PAD>=32000")
        for name in ("dino", "siglip"):
            width, heads = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
            if width % heads:
                raise ValueError(f"{name}_width {width} is not a multiple of {name}_heads {heads}")
        if self.llm_hidden % self.llm_heads:
            raise ValueError(f"llm_hidden {self.llm_hidden} is not a multiple of llm_heads {self.llm_heads}")
        if min(self.dino_depth, self.siglip_depth) < 2:
            raise ValueError("vision towers need depth >= 2: features are taken at block depth-2")

    @classmethod
    def full(cls, *, proprio_dim: int | None = None, num_images: int = 1) -> OFTSizes:
        """The real OpenVLA-OFT 7B (DINOv2-L/14-reg4 + SigLIP-SO400M/14 at 224 px, Llama-2-7B)."""
        return cls(
            dino_width=1024, dino_depth=24, dino_mlp=4096,
            siglip_width=1152, siglip_depth=27, siglip_mlp=4304,
            llm_hidden=4096, llm_intermediate=11008, llm_layers=32, llm_heads=32,
            proprio_dim=proprio_dim, num_images=num_images,
        )  # fmt: skip

    @classmethod
    def tiny(cls, *, proprio_dim: int | None = None, num_images: int = 1) -> OFTSizes:
        """CPU-sized: same structure (16-head towers, head dims 4 and 6; full 32064 vocab)."""
        return cls(
            dino_width=64, dino_depth=3, dino_mlp=128,
            siglip_width=96, siglip_depth=3, siglip_mlp=192,
            llm_hidden=64, llm_intermediate=128, llm_layers=2, llm_heads=4,
            proprio_dim=proprio_dim, num_images=num_images,
        )  # fmt: skip

    def replace(self, **changes) -> OFTSizes:
        return dataclasses.replace(self, **changes)

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_patches(self) -> int:
        """Tokens inserted after BOS: 256 per image, +1 proprio token."""
        return self.patches_per_image * self.num_images + (1 if self.proprio_dim is not None else 0)

    @property
    def vision_dim(self) -> int:
        """Fused feature width: [DINOv2 | SigLIP]."""
        return self.dino_width + self.siglip_width

    @property
    def is_full(self) -> bool:
        return self.replace(proprio_dim=None, num_images=1) == OFTSizes.full()


def _mlp_ratio(width: int, mlp: int) -> float:
    # timm sizes the MLP as int(width * mlp_ratio); the +0.5 makes the floor land on `mlp` exactly.
    return (mlp + 0.5) / width


class ScaleFactorLayerScale(nn.Module):
    """timm's LayerScale with its parameter named ``scale_factor``, as the HF OpenVLA patch renames ``gamma``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


def _dinov2_tower(s: OFTSizes) -> VisionTransformer:
    """Configured like timm ``vit_large_patch14_reg4_dinov2`` created with img_size=224, num_classes=0."""
    vit = VisionTransformer(
        img_size=s.image_size, patch_size=s.patch_size, embed_dim=s.dino_width, depth=s.dino_depth,
        num_heads=s.dino_heads, mlp_ratio=_mlp_ratio(s.dino_width, s.dino_mlp), init_values=1e-5,
        reg_tokens=s.dino_reg_tokens, no_embed_class=True, class_token=True, global_pool="token",
        num_classes=0, act_layer=None,
    )  # fmt: skip
    for blk in vit.blocks:
        blk.ls1 = ScaleFactorLayerScale(s.dino_width)
        blk.ls2 = ScaleFactorLayerScale(s.dino_width)
    return vit


def _siglip_tower(s: OFTSizes) -> VisionTransformer:
    """Configured like timm ``vit_so400m_patch14_siglip_224`` created with num_classes=0 (keeps the unused MAP head)."""
    return VisionTransformer(
        img_size=s.image_size, patch_size=s.patch_size, embed_dim=s.siglip_width, depth=s.siglip_depth,
        num_heads=s.siglip_heads, mlp_ratio=_mlp_ratio(s.siglip_width, s.siglip_mlp), class_token=False,
        global_pool="map", num_classes=0, act_layer=None,
    )  # fmt: skip


def tower_features(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Output of block ``depth-2``, no final norm, prefix tokens stripped: (B, 3, H, W) -> (B, patches, width).

    Same as Prismatic's patched forward ``get_intermediate_layers(x, n={depth-2})``; ``stop_early`` skips the
    dead last block.
    """
    (feats,) = vit.forward_intermediates(
        images, indices=[len(vit.blocks) - 2], norm=False, stop_early=True, output_fmt="NLC", intermediates_only=True
    )
    return feats


class VisionBackbone(nn.Module):
    """Fused DINOv2 + SigLIP backbone; each 6-channel image group gives [DINOv2 | SigLIP] patch features."""

    def __init__(self, s: OFTSizes) -> None:
        super().__init__()
        self.num_images = s.num_images
        self.featurizer = _dinov2_tower(s)
        self.fused_featurizer = _siglip_tower(s)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 6*num_images, H, W) -> (B, 256*num_images, dino_width + siglip_width)."""
        groups = torch.split(pixel_values, 6, dim=1)
        feats = [
            torch.cat([tower_features(self.featurizer, g[:, :3]), tower_features(self.fused_featurizer, g[:, 3:])], 2)
            for g in groups
        ]
        return torch.cat(feats, dim=1)


class FusedProjector(nn.Module):
    """Prismatic ``no-align+fused-gelu-mlp``: vision_dim -> 4*vision_dim -> llm -> llm, exact GELU."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gelu = nn.functional.gelu
        return self.fc3(gelu(self.fc2(gelu(self.fc1(x)))))


class ProprioProjector(nn.Module):
    """SimpleVLA/OFT proprio MLP: proprio_dim -> llm -> llm, exact GELU; its output is one extra token."""

    def __init__(self, proprio_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(proprio)))


def llama_config(s: OFTSizes, attn_implementation: str = "sdpa") -> LlamaConfig:
    return LlamaConfig(
        vocab_size=s.vocab_size, hidden_size=s.llm_hidden, intermediate_size=s.llm_intermediate,
        num_hidden_layers=s.llm_layers, num_attention_heads=s.llm_heads, num_key_value_heads=s.llm_heads,
        rms_norm_eps=s.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
        max_position_embeddings=s.max_position_embeddings, tie_word_embeddings=False, pad_token_id=PAD_ID,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, attention_bias=False, mlp_bias=False,
        attn_implementation=attn_implementation,
    )  # fmt: skip


def make_bidirectional(llm: LlamaForCausalLM) -> None:
    """Turn off causal masking everywhere, as the OFT transformers fork does for parallel decoding.

    Each attention module's ``is_causal`` flag is what transformers' sdpa integration uses when it gets no mask;
    ``config.is_causal=False`` makes ``create_causal_mask`` build a bidirectional (key-padding only) mask from a
    2-D attention mask. ``TorchOFT.action_logits`` passes its own 4-D key-padding mask anyway, which transformers
    uses as-is for both the sdpa and eager paths.
    """
    llm.config.is_causal = False
    for layer in llm.model.layers:
        layer.self_attn.is_causal = False


def key_padding_mask_4d(mask2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) {0,1} -> (B, 1, L, L) additive mask: 0 for real keys, finfo.min for pad keys, every query row the same.

    This is the OFT fork's mask (last row of the causal+padding mask broadcast to all rows); with right padding no
    query row is fully masked.
    """
    add = torch.zeros(mask2d.shape, dtype=dtype, device=mask2d.device)
    add = add.masked_fill(mask2d == 0, torch.finfo(dtype).min)
    b, n = mask2d.shape
    return add[:, None, None, :].expand(b, 1, n, n)


class TorchOFT(nn.Module):
    """OpenVLA-OFT policy with HF checkpoint module names (vision_backbone, projector, [proprio_projector], language_model)."""

    def __init__(self, sizes: OFTSizes, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.sizes = sizes
        self.vision_backbone = VisionBackbone(sizes)
        self.projector = FusedProjector(sizes.vision_dim, sizes.llm_hidden)
        if sizes.proprio_dim is not None:
            self.proprio_projector = ProprioProjector(sizes.proprio_dim, sizes.llm_hidden)
        else:
            self.proprio_projector = None
        self.language_model = LlamaForCausalLM(llama_config(sizes, attn_implementation))
        make_bidirectional(self.language_model)

    def project_patches(self, pixel_values: torch.Tensor, proprio: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 6*num_images, H, W) [, (B, proprio_dim)] -> (B, num_patches, llm_hidden); proprio token last."""
        patches = self.projector(self.vision_backbone(pixel_values))
        if self.proprio_projector is not None:
            patches = torch.cat([patches, self.proprio_projector(proprio)[:, None, :]], dim=1)
        return patches

    def build_inputs(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        proprio: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """The multimodal sequence fed to Llama.

        Returns ``embeds`` (B, L, hidden), ``mask`` (B, L) int64 and ``action_rows`` (B, 56) int64, the rows whose
        logits predict the 56 action tokens, with L = num_patches + P_max + 57. Row b is
        ``[emb(BOS), patches, emb(ids[1:P_b]), 0 x 56, emb(</s>), pad x (P_max - P_b)]``.
        """
        self._check_inputs(pixel_values, input_ids, attention_mask, proprio)
        b, p_max = input_ids.shape
        dev = input_ids.device
        prompt_len = (input_ids != PAD_ID).sum(dim=1, keepdim=True)  # (B, 1): P incl. BOS and 29871
        text_len = p_max + NUM_ACTION_TOKENS + 1
        pos = torch.arange(text_len, device=dev)[None, :]
        ids = torch.full((b, text_len), PAD_ID, dtype=torch.long, device=dev)
        ids[:, :p_max] = input_ids
        is_action = (pos >= prompt_len) & (pos < prompt_len + NUM_ACTION_TOKENS)
        ids = torch.where(is_action, PLACEHOLDER_ID, ids)
        ids = torch.where(pos == prompt_len + NUM_ACTION_TOKENS, EOS_ID, ids)
        text_mask = (pos <= prompt_len + NUM_ACTION_TOKENS).long()

        text = self.language_model.get_input_embeddings()(ids)
        text = text * (~is_action)[..., None].to(text.dtype)  # OFT zeroes the action-placeholder embeddings
        patches = self.project_patches(pixel_values, proprio).to(text.dtype)
        n = patches.shape[1]
        embeds = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
        mask = torch.cat([text_mask[:, :1], torch.ones((b, n), dtype=torch.long, device=dev), text_mask[:, 1:]], 1)
        action_rows = n + (prompt_len - 1) + torch.arange(NUM_ACTION_TOKENS, device=dev)[None, :]
        return embeds, mask, action_rows

    def full_logits(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Bidirectional Llama over ``embeds`` (B, L, hidden), positions 0..L-1 -> fp32 logits (B, L, vocab)."""
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=key_padding_mask_4d(mask, embeds.dtype), use_cache=False
        )
        return out.logits.float()  # the 4.40.1 fork casts logits to fp32 inside LlamaForCausalLM

    def action_logits(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        proprio: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """SimpleVLA ``generate_action_verl`` logits: (B, 56, 256) fp32, column j <-> token 31744 + j.

        pixel_values (B, 6*num_images, 224, 224) float; input_ids (B, P_max) int64 ``BOS ... 29871`` right-padded
        with 32000; attention_mask (B, P_max) equal to ``input_ids != 32000``; proprio (B, proprio_dim) iff the
        model has a proprio projector.
        """
        embeds, mask, rows = self.build_inputs(pixel_values, input_ids, attention_mask, proprio)
        logits = self.full_logits(embeds, mask)
        picked = torch.gather(logits, 1, rows[..., None].expand(-1, -1, logits.shape[-1]))
        return picked[..., ACTION_TOKEN_BEGIN:VOCAB_NOPAD]

    def _check_inputs(self, pixel_values, input_ids, attention_mask, proprio) -> None:
        s = self.sizes
        want = (input_ids.shape[0], 6 * s.num_images, s.image_size, s.image_size)
        if tuple(pixel_values.shape) != want:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, expected {want}")
        if input_ids.ndim != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be (B, P) int64, got {tuple(input_ids.shape)} {input_ids.dtype}")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        real = input_ids != PAD_ID
        if not torch.equal(real, attention_mask != 0):
            raise ValueError("attention_mask must be 1 exactly where input_ids != 32000 (<PAD>)")
        n_real = real.sum(1, keepdim=True)
        if not torch.equal(real, torch.arange(input_ids.shape[1], device=real.device)[None] < n_real):
            raise ValueError("input_ids must be right-padded with 32000 (no pad before a real token)")
        if bool((input_ids[:, 0] != BOS_ID).any()):
            raise ValueError("every input_ids row must start with BOS=1")
        last = input_ids.gather(1, n_real - 1)[:, 0]
        if bool((last != PROMPT_END_ID).any()):
            raise ValueError(f"every prompt must end with {PROMPT_END_ID} ('▁'); got last ids {last.tolist()}")
        if (proprio is None) != (self.proprio_projector is None):
            raise ValueError(f"proprio given: {proprio is not None}, but model proprio_dim={s.proprio_dim}")
        if proprio is not None and tuple(proprio.shape) != (input_ids.shape[0], s.proprio_dim):
            raise ValueError(f"proprio has shape {tuple(proprio.shape)}, expected {(input_ids.shape[0], s.proprio_dim)}")


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Deterministic random weights with scales that make every parameter matter in a parity test.

    Linear/conv weights ~ N(0, 1/fan_in) (unit-scale activations), biases ~ N(0, 0.05^2), norm weights ~ 1 + N(0, 0.1^2),
    LayerScale ~ U(0.05, 0.5), token/position embeddings ~ N(0, 0.5^2) (Llama's embedding ~ N(0, 1)).
    """
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "scale_factor":
            p.uniform_(0.05, 0.5, generator=gen)
        elif leaf == "bias":
            p.normal_(0.0, 0.05, generator=gen)
        elif p.ndim == 1:  # LayerNorm / RMSNorm weights
            p.normal_(1.0, 0.1, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            p.normal_(0.0, 1.0, generator=gen)
        elif leaf in ("cls_token", "reg_token", "pos_embed", "latent"):
            p.normal_(0.0, 0.5, generator=gen)
        else:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)


def build_torch_oft(
    sizes: OFTSizes, seed: int = 0, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> TorchOFT:  # fmt: skip
    """Build the reference in eval mode with ``randomize_(seed)`` weights; on ``device="meta"`` no memory, no init."""
    device = torch.device(device)
    with torch.device(device):
        model = TorchOFT(sizes, attn_implementation)
    if device.type != "meta":
        randomize_(model, seed)
    return model.to(dtype).eval()


def hf_state_dict(model: TorchOFT) -> dict[str, torch.Tensor]:
    """Tensors under the real HF OpenVLA-OFT checkpoint names (the module names already match)."""
    return dict(model.state_dict())


def full_size_meta_keys(*, proprio_dim: int | None = None, num_images: int = 1) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the full-size 7B reference, built on the meta device (no memory)."""
    model = build_torch_oft(OFTSizes.full(proprio_dim=proprio_dim, num_images=num_images), device="meta")
    return {k: tuple(v.shape) for k, v in hf_state_dict(model).items()}
