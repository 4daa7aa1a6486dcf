"""openpi's π0 parameters <-> vlajax's `Pi0`, exactly (reshapes and transposes only, any dtype kept).

openpi stores the tree its linen modules make: the Gemma blocks and the SigLIP blocks scanned (each
leaf stacked over layers on axis 0), einsum weights per head ((N, D, H) q, (2, K, D, H) kv, (N, H, D)
out, (2, D, F) gate|up), the action expert's under the same names with a `_1` suffix. vlajax keeps one
`Linear` (in, out) per projection and one module per layer, so LoRA, sharding and remat treat π0 as
they treat OFT. `to_openpi(from_openpi(p))` gives `p` back bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import jax
import jax.numpy as jnp
from flax import nnx

from vlajax.model.pi0.config import GemmaConfig, Pi0Config
from vlajax.model.pi0.model import Pi0
from vlajax.model.vit import ViTConfig

__all__ = ["config_from_params", "from_openpi", "load_into", "to_openpi"]

_LLM, _IMG = ("PaliGemma", "llm"), ("PaliGemma", "img")
_ENC = _IMG + ("Transformer", "encoderblock")
_MHA, _MLP = "MultiHeadDotProductAttention_0", "MlpBlock_0"
_HEADS = ("state_proj", "action_in_proj", "action_time_mlp_in", "action_time_mlp_out", "action_out_proj")


def _get(tree: dict, path: tuple) -> Any:
    for i, k in enumerate(path):
        if not isinstance(tree, dict) or k not in tree:
            raise KeyError(f"openpi parameters have no {'/'.join(path[:i + 1])}")
        tree = tree[k]
    return tree


def _put(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _sfx(name: str, expert: int) -> str:
    return name if expert == 0 else f"{name}_{expert}"


def config_from_params(params: dict, *, action_horizon: int = 50, max_token_len: int = 48,
                       num_images: int = 3) -> Pi0Config:
    """The sizes the parameters have (what they do not say, the action horizon and prompt length,
    comes from the arguments: openpi keeps them in its training config)."""
    def gemma(e: int) -> GemmaConfig:
        q = np.shape(_get(params, _LLM + ("layers", "attn", _sfx("q_einsum", e), "w")))  # (L, N, D, H)
        kv = np.shape(_get(params, _LLM + ("layers", "attn", _sfx("kv_einsum", e), "w")))  # (L, 2, K, D, H)
        f = np.shape(_get(params, _LLM + ("layers", _sfx("mlp", e), "gating_einsum")))[-1]
        return GemmaConfig(width=q[2], depth=q[0], mlp_dim=f, num_heads=q[1], num_kv_heads=kv[2], head_dim=q[3])

    patch = np.shape(_get(params, _IMG + ("embedding", "kernel")))  # (p, p, 3, W)
    q = np.shape(_get(params, _ENC + (_MHA, "query", "kernel")))  # (L, W, heads, hd)
    pos = np.shape(_get(params, _IMG + ("pos_embedding",)))  # (1, N, W)
    side = int(round(np.sqrt(pos[1])))
    vision = ViTConfig(width=patch[3], depth=q[0], mlp_dim=np.shape(_get(params, _ENC + (_MLP, "Dense_0", "kernel")))[-1],
                       num_heads=q[2], patch_size=patch[0], image_size=side * patch[0], final_norm=True,
                       gelu_approximate=True)
    vocab = np.shape(_get(params, _LLM + ("embedder", "input_embedding")))[0]
    action_dim = np.shape(_get(params, ("action_in_proj", "kernel")))[0]
    return Pi0Config(vision=vision, llm=gemma(0), expert=gemma(1), vocab_size=vocab, action_dim=action_dim,
                     action_horizon=action_horizon, max_token_len=max_token_len, num_images=num_images)


def from_openpi(params: dict, cfg: Pi0Config) -> dict:
    """openpi's `params` tree (nested dicts of arrays) -> the pure dict of `Pi0(cfg)`'s state."""
    if "time_mlp_in" in params:
        raise ValueError("these are π0.5 parameters (adaRMS time MLP); vlajax's π0 family reads π0 (pi05=False)")
    out: dict = {"img": _vision_from(params, cfg.vision), "llm": _llm_from(params, cfg)}
    out["img_head"] = {k: np.asarray(v) for k, v in _get(params, _IMG + ("head",)).items()}
    for name in _HEADS:
        out[name] = {k: np.asarray(v) for k, v in _get(params, (name,)).items()}
    return out


def _vision_from(params: dict, v: ViTConfig) -> dict:
    enc = lambda *p: np.asarray(_get(params, _ENC + p))  # noqa: E731  (L, ...) stacked over blocks
    w = v.width
    blocks = {}
    for i in range(v.depth):
        qkv_k = [enc(_MHA, n, "kernel")[i].reshape(w, -1) for n in ("query", "key", "value")]
        qkv_b = [enc(_MHA, n, "bias")[i].reshape(-1) for n in ("query", "key", "value")]
        blocks[i] = {
            "norm1": {"scale": enc("LayerNorm_0", "scale")[i], "bias": enc("LayerNorm_0", "bias")[i]},
            "qkv": {"kernel": np.concatenate(qkv_k, axis=1), "bias": np.concatenate(qkv_b)},
            "proj": {"kernel": enc(_MHA, "out", "kernel")[i].reshape(-1, w), "bias": enc(_MHA, "out", "bias")[i]},
            "norm2": {"scale": enc("LayerNorm_1", "scale")[i], "bias": enc("LayerNorm_1", "bias")[i]},
            "fc1": {"kernel": enc(_MLP, "Dense_0", "kernel")[i], "bias": enc(_MLP, "Dense_0", "bias")[i]},
            "fc2": {"kernel": enc(_MLP, "Dense_1", "kernel")[i], "bias": enc(_MLP, "Dense_1", "bias")[i]},
        }
    norm = _get(params, _IMG + ("Transformer", "encoder_norm"))
    return {"patch_kernel": np.asarray(_get(params, _IMG + ("embedding", "kernel"))),
            "patch_bias": np.asarray(_get(params, _IMG + ("embedding", "bias"))),
            "pos_embed": np.asarray(_get(params, _IMG + ("pos_embedding",))),
            "blocks": blocks, "norm": {"scale": np.asarray(norm["scale"]), "bias": np.asarray(norm["bias"])}}


def _llm_from(params: dict, cfg: Pi0Config) -> dict:
    lay = lambda *p: np.asarray(_get(params, _LLM + ("layers",) + p))  # noqa: E731
    layers = {}
    for i in range(cfg.llm.depth):
        experts = {}
        for e, c in enumerate((cfg.llm, cfg.expert)):
            d = c.width
            gating = lay(_sfx("mlp", e), "gating_einsum")[i]  # (2, D, F)
            experts[e] = {
                "pre_attention_norm": {"scale": lay(_sfx("pre_attention_norm", e), "scale")[i]},
                "q_proj": {"kernel": lay("attn", _sfx("q_einsum", e), "w")[i].transpose(1, 0, 2).reshape(d, -1)},
                "kv_proj": {"kernel": lay("attn", _sfx("kv_einsum", e), "w")[i].transpose(2, 0, 1, 3).reshape(d, -1)},
                "o_proj": {"kernel": lay("attn", _sfx("attn_vec_einsum", e), "w")[i].reshape(-1, d)},
                "pre_ffw_norm": {"scale": lay(_sfx("pre_ffw_norm", e), "scale")[i]},
                "gate_proj": {"kernel": gating[0]}, "up_proj": {"kernel": gating[1]},
                "down_proj": {"kernel": lay(_sfx("mlp", e), "linear")[i]},
            }
        layers[i] = experts
    return {"embedding": np.asarray(_get(params, _LLM + ("embedder", "input_embedding"))), "layers": layers,
            "final_norms": {e: {"scale": np.asarray(_get(params, _LLM + (_sfx("final_norm", e), "scale")))}
                            for e in range(2)}}


def to_openpi(state: dict, cfg: Pi0Config) -> dict:
    """The inverse of `from_openpi`: vlajax's pure dict -> openpi's `params` tree."""
    out: dict = {}
    st = lambda xs: np.stack([np.asarray(x) for x in xs])  # noqa: E731
    v, img = cfg.vision, state["img"]
    blocks = [img["blocks"][i] for i in range(v.depth)]
    hd = v.width // v.num_heads
    _put(out, _IMG + ("embedding", "kernel"), np.asarray(img["patch_kernel"]))
    _put(out, _IMG + ("embedding", "bias"), np.asarray(img["patch_bias"]))
    _put(out, _IMG + ("pos_embedding",), np.asarray(img["pos_embed"]))
    for j, n in enumerate(("query", "key", "value")):
        cols = slice(j * v.width, (j + 1) * v.width)
        _put(out, _ENC + (_MHA, n, "kernel"), st(b["qkv"]["kernel"][:, cols].reshape(v.width, v.num_heads, hd)
                                                for b in blocks))
        _put(out, _ENC + (_MHA, n, "bias"), st(b["qkv"]["bias"][cols].reshape(v.num_heads, hd) for b in blocks))
    _put(out, _ENC + (_MHA, "out", "kernel"), st(b["proj"]["kernel"].reshape(v.num_heads, hd, v.width) for b in blocks))
    _put(out, _ENC + (_MHA, "out", "bias"), st(b["proj"]["bias"] for b in blocks))
    for ours, theirs in (("norm1", ("LayerNorm_0",)), ("norm2", ("LayerNorm_1",)), ("fc1", (_MLP, "Dense_0")),
                         ("fc2", (_MLP, "Dense_1"))):
        for k in blocks[0][ours]:
            _put(out, _ENC + theirs + (k,), st(b[ours][k] for b in blocks))
    for k in ("scale", "bias"):
        _put(out, _IMG + ("Transformer", "encoder_norm", k), np.asarray(img["norm"][k]))
    for k, x in state["img_head"].items():
        _put(out, _IMG + ("head", k), np.asarray(x))
    llm = state["llm"]
    _put(out, _LLM + ("embedder", "input_embedding"), np.asarray(llm["embedding"]))
    layers = [llm["layers"][i] for i in range(cfg.llm.depth)]
    for e, c in enumerate((cfg.llm, cfg.expert)):
        ex = [layer[e] for layer in layers]
        d, n, k, h = c.width, c.num_heads, c.num_kv_heads, c.head_dim
        lay = lambda *p: _LLM + ("layers",) + p  # noqa: E731
        _put(out, lay(_sfx("pre_attention_norm", e), "scale"), st(x["pre_attention_norm"]["scale"] for x in ex))
        _put(out, lay(_sfx("pre_ffw_norm", e), "scale"), st(x["pre_ffw_norm"]["scale"] for x in ex))
        _put(out, lay("attn", _sfx("q_einsum", e), "w"),
             st(x["q_proj"]["kernel"].reshape(d, n, h).transpose(1, 0, 2) for x in ex))
        _put(out, lay("attn", _sfx("kv_einsum", e), "w"),
             st(x["kv_proj"]["kernel"].reshape(d, 2, k, h).transpose(1, 2, 0, 3) for x in ex))
        _put(out, lay("attn", _sfx("attn_vec_einsum", e), "w"), st(x["o_proj"]["kernel"].reshape(n, h, d) for x in ex))
        _put(out, lay(_sfx("mlp", e), "gating_einsum"),
             st(np.stack([x["gate_proj"]["kernel"], x["up_proj"]["kernel"]]) for x in ex))
        _put(out, lay(_sfx("mlp", e), "linear"), st(x["down_proj"]["kernel"] for x in ex))
        _put(out, _LLM + (_sfx("final_norm", e), "scale"), np.asarray(llm["final_norms"][e]["scale"]))
    for name in _HEADS:
        out[name] = {k: np.asarray(x) for k, x in state[name].items()}
    return out


def load_into(model: Pi0, params: dict) -> Pi0:
    """Install openpi's `params` tree into `model` (a `Pi0` of the sizes they have); returns it."""
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, from_openpi(params, model.cfg)))
    nnx.update(model, state)
    return model
