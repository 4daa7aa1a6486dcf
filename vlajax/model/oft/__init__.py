"""The `oft` policy family: SimpleVLA-OFT (OpenVLA-OFT 7B with parallel decoding and action
chunking) in Flax NNX.

    from vlajax.model.oft import load_pretrained
    policy = load_pretrained("/path/to/hf_or_vlajax_checkpoint", dtype="float32")
    logits = policy.action_logits(pixel_values, input_ids, attention_mask)  # (B, 56, 256) float32
"""

from vlajax.model.family import register_family
from vlajax.model.oft.config import LlamaConfig, OFTConfig, ViTConfig, preset
from vlajax.model.oft.hf_convert import CheckpointError
from vlajax.model.oft.policy import OpenVLAOFT
from vlajax.model.oft.family import OFTFamily
from vlajax.model.oft.pretrained import Policy, build_model, load_pretrained

FAMILY = register_family(OFTFamily())

__all__ = ["FAMILY", "CheckpointError", "LlamaConfig", "OFTConfig", "OpenVLAOFT", "Policy", "ViTConfig", "build_model",
           "load_pretrained", "preset"]
