"""Model FLOPs of the OpenVLA-OFT forward: for TFLOP/s and MFU figures (benchmarks, training logs)."""

from __future__ import annotations


def forward_flops(cfg, batch: int, prompt_len: int) -> float:
    """Model FLOPs of one action_logits call (matmuls + attention), counting what the model needs:
    the towers up to block depth-2, the projector, the LLM (its last layer for the 56 action rows
    only), and the 56x256 logit slice. Padding tokens are not counted."""

    def vit(t, n):
        d, m, blocks = t.width, t.mlp_dim, t.num_used_blocks
        per = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
        return blocks * per + 2 * t.num_patches * (t.patch_size**2 * 3) * d

    n_dino = cfg.dino.num_patches + cfg.dino.num_prefix_tokens
    img = vit(cfg.dino, n_dino) + vit(cfg.siglip, cfg.siglip.num_patches)
    v = cfg.vision_dim
    proj = 2 * cfg.dino.num_patches * (v * 4 * v + 4 * v * cfg.llm.hidden + cfg.llm.hidden**2)
    L = prompt_len + cfg.num_vision_tokens + cfg.num_action_tokens + 1
    d, f = cfg.llm.hidden, cfg.llm.intermediate
    kv = cfg.llm.num_kv_heads * cfg.llm.head_dim
    na = cfg.num_action_tokens
    full = 2 * L * (2 * d * d + 2 * d * kv + 3 * d * f) + 4 * L * L * d
    # the last layer needs keys/values of all L tokens but queries, output and MLP of the 56 action rows
    last = 2 * L * 2 * d * kv + 2 * na * (2 * d * d + 3 * d * f) + 4 * na * L * d
    llm = (cfg.llm.num_layers - 1) * full + last
    head = 2 * cfg.num_action_tokens * d * cfg.n_bins
    return batch * (cfg.num_images * (img + proj) + llm + head)
