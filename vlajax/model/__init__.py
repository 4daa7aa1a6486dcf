"""The SimpleVLA-OFT policy (OpenVLA-OFT 7B with parallel decoding and action chunking) in Flax NNX.

    from vlajax.model import load_pretrained
    policy = load_pretrained("/path/to/hf_or_vlajax_checkpoint", dtype="float32")
    logits = policy.action_logits(pixel_values, input_ids, attention_mask)  # (B, 56, 256) float32
"""

from vlajax.model.config import LlamaConfig, OFTConfig, ViTConfig, preset
from vlajax.model.hf_convert import CheckpointError
from vlajax.model.policy import OpenVLAOFT
from vlajax.model.pretrained import Policy, build_model, load_pretrained

__all__ = ["CheckpointError", "LlamaConfig", "OFTConfig", "OpenVLAOFT", "Policy", "ViTConfig", "build_model",
           "load_pretrained", "preset"]
