"""Hugging Face OpenVLA-OFT checkpoints <-> vlajax parameters.

Import reads `config.json` (LLM sizes from `text_config` with `LlamaConfig` defaults for absent
fields: real checkpoints carry only 4 keys there) and infers the vision towers from tensor shapes.
Every tensor is accounted for: a missing, unexpected or mis-shaped tensor, an unsupported dtype, a
truncated shard or a dangling index entry is an error that names it. Tensors the model never uses
(final ViT norms, the last ViT block, SigLIP's attention-pool head) are kept aside unchanged so
that export writes back exactly the same key set, shapes and dtypes: HF -> vlajax -> HF is bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from vlajax.model.oft.config import LlamaConfig, OFTConfig, ViTConfig

SUPPORTED_DTYPES = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "F16": np.float16}
DINO = "vision_backbone.featurizer."
SIGLIP = "vision_backbone.fused_featurizer."
LM = "language_model."
# LlamaConfig() defaults of transformers 4.40 (the version OpenVLA-OFT was saved with).
LLAMA_DEFAULTS = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, vocab_size=32000, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=2048,
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as an OpenVLA-OFT policy; the message names the cause."""


# ----------------------------------------------------------------------------- reading files


def _safetensors_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index} names shard {f.name}, which does not exist")
        return files, weight_map
    single = path / "model.safetensors"
    if single.exists():
        return [single], None
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
    """All tensors of a HF checkpoint dir as numpy arrays in their stored dtype, plus the index's
    weight_map (None for a single file)."""
    path = Path(path)
    files, weight_map = _safetensors_files(path)
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                for k in st.keys():
                    dtype = st.get_slice(k).get_dtype()
                    if dtype not in SUPPORTED_DTYPES:
                        raise CheckpointError(f"tensor {k!r} in {f.name} has unsupported dtype {dtype}; "
                                              f"supported: {sorted(SUPPORTED_DTYPES)}")
                    if k in tensors:
                        raise CheckpointError(f"tensor {k!r} appears in more than one shard ({f.name})")
                    tensors[k] = st.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises on truncated / corrupt headers and data
            raise CheckpointError(f"cannot read shard {f} (truncated or corrupt?): {e}") from e
    if weight_map is not None:
        for k, shard in weight_map.items():
            if k not in tensors:
                raise CheckpointError(f"index lists tensor {k!r} in {shard}, but that shard does not contain it")
        for k in tensors:
            if k not in weight_map:
                raise CheckpointError(f"tensor {k!r} is in a shard but missing from model.safetensors.index.json")
    return tensors, weight_map


def read_config(path: str | os.PathLike) -> dict:
    f = Path(path) / "config.json"
    if not f.exists():
        raise CheckpointError(f"{path}: no config.json")
    cfg = json.loads(f.read_text())
    if cfg.get("model_type") != "openvla":
        raise CheckpointError(
            f"{f}: model_type is {cfg.get('model_type')!r}, expected 'openvla' (an OpenVLA-OFT checkpoint)"
        )
    return cfg


# ----------------------------------------------------------------------------- sizes


def _vit_config(tensors: dict, prefix: str, image_size_hint: int | None) -> ViTConfig:
    try:
        pos = tensors[prefix + "pos_embed"]
        patch_w = tensors[prefix + "patch_embed.proj.weight"]
    except KeyError as e:
        raise CheckpointError(f"missing tensor {e.args[0]!r}") from e
    depth = len({int(m.group(1)) for k in tensors if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))})
    if depth < 2:
        raise CheckpointError(f"{prefix}blocks: found {depth} blocks, need at least 2")
    width, patch = pos.shape[-1], patch_w.shape[-1]
    grid = int(round(pos.shape[1] ** 0.5))
    image_size = grid * patch
    if image_size_hint and image_size_hint != image_size:
        raise CheckpointError(f"{prefix}pos_embed implies {image_size}px images, config.json says {image_size_hint}")
    reg = tensors.get(prefix + "reg_token")
    return ViTConfig(
        width=width,
        depth=depth,
        mlp_dim=tensors[prefix + "blocks.0.mlp.fc1.weight"].shape[0],
        num_heads=16,
        class_token=prefix + "cls_token" in tensors,
        num_registers=0 if reg is None else reg.shape[1],
        layer_scale=prefix + "blocks.0.ls1.scale_factor" in tensors,
        patch_size=patch,
        image_size=image_size,
    )


def config_from_hf(hf_cfg: dict, tensors: dict, num_images: int | None = None) -> OFTConfig:
    tc = {**LLAMA_DEFAULTS, **{k: v for k, v in hf_cfg.get("text_config", {}).items() if v is not None}}
    if tc["num_key_value_heads"] is None:
        tc["num_key_value_heads"] = tc["num_attention_heads"]
    llm = LlamaConfig(
        hidden=tc["hidden_size"], intermediate=tc["intermediate_size"], num_layers=tc["num_hidden_layers"],
        num_heads=tc["num_attention_heads"], num_kv_heads=tc["num_key_value_heads"], vocab_size=tc["vocab_size"],
        pad_to_multiple_of=hf_cfg.get("pad_to_multiple_of", 64), rms_eps=tc["rms_norm_eps"],
        rope_theta=tc["rope_theta"], max_position_embeddings=tc["max_position_embeddings"],
    )
    sizes = hf_cfg.get("image_sizes") or [None]
    proprio_dim = None
    if "proprio_projector.fc1.weight" in tensors:
        proprio_dim = tensors["proprio_projector.fc1.weight"].shape[1]
    elif hf_cfg.get("use_proprio"):
        raise CheckpointError("config.json sets use_proprio but tensor 'proprio_projector.fc1.weight' is missing")
    cfg = OFTConfig(
        dino=_vit_config(tensors, DINO, sizes[0]),
        siglip=_vit_config(tensors, SIGLIP, sizes[-1]),
        llm=llm,
        num_images=num_images or hf_cfg.get("num_images_in_input", 1),
        proprio_dim=proprio_dim,
        n_bins=hf_cfg.get("n_action_bins", 256),
        pad_id=hf_cfg.get("pad_token_id", 32000),
    )
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- the key table


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_key: str
    path: tuple  # path in nnx.to_pure_dict(nnx.state(model, nnx.Param))
    kind: str  # "same" | "T" (torch Linear (out,in) <-> (in,out)) | "conv" ((out,in,kh,kw) <-> (kh,kw,in,out))


def _linear(hf: str, path: tuple, bias: bool) -> Iterator[Entry]:
    yield Entry(hf + ".weight", path + ("kernel",), "T")
    if bias:
        yield Entry(hf + ".bias", path + ("bias",), "same")


def _vit_entries(prefix: str, name: str, cfg: ViTConfig) -> Iterator[Entry]:
    p = (name,)
    for k in ("cls_token", "reg_token"):
        if (k == "cls_token" and cfg.class_token) or (k == "reg_token" and cfg.num_registers):
            yield Entry(prefix + k, p + (k,), "same")
    yield Entry(prefix + "pos_embed", p + ("pos_embed",), "same")
    yield Entry(prefix + "patch_embed.proj.weight", p + ("patch_kernel",), "conv")
    yield Entry(prefix + "patch_embed.proj.bias", p + ("patch_bias",), "same")
    for i in range(cfg.num_used_blocks):
        b, bp = f"{prefix}blocks.{i}.", p + ("blocks", i)
        for n in ("norm1", "norm2"):
            yield Entry(b + n + ".weight", bp + (n, "scale"), "same")
            yield Entry(b + n + ".bias", bp + (n, "bias"), "same")
        yield from _linear(b + "attn.qkv", bp + ("qkv",), True)
        yield from _linear(b + "attn.proj", bp + ("proj",), True)
        yield from _linear(b + "mlp.fc1", bp + ("fc1",), True)
        yield from _linear(b + "mlp.fc2", bp + ("fc2",), True)
        if cfg.layer_scale:
            yield Entry(b + "ls1.scale_factor", bp + ("ls1",), "same")
            yield Entry(b + "ls2.scale_factor", bp + ("ls2",), "same")


def entries(cfg: OFTConfig) -> list[Entry]:
    """Every HF tensor the model uses, with where it lives in vlajax and how it is laid out."""
    out = list(_vit_entries(DINO, "featurizer", cfg.dino)) + list(_vit_entries(SIGLIP, "fused_featurizer", cfg.siglip))
    for i in (1, 2, 3):
        out += _linear(f"projector.fc{i}", ("projector", f"fc{i}"), True)
    if cfg.proprio_dim:
        for i in (1, 2):
            out += _linear(f"proprio_projector.fc{i}", ("proprio_projector", f"fc{i}"), True)
    out.append(Entry(LM + "model.embed_tokens.weight", ("llm", "embed_tokens"), "same"))
    for i in range(cfg.llm.num_layers):
        b, bp = f"{LM}model.layers.{i}.", ("llm", "layers", i)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out += _linear(b + "self_attn." + n, bp + (n,), False)
        for n in ("gate_proj", "up_proj", "down_proj"):
            out += _linear(b + "mlp." + n, bp + (n,), False)
        out.append(Entry(b + "input_layernorm.weight", bp + ("input_layernorm", "weight"), "same"))
        out.append(Entry(b + "post_attention_layernorm.weight", bp + ("post_attention_layernorm", "weight"), "same"))
    out.append(Entry(LM + "model.norm.weight", ("llm", "norm", "weight"), "same"))
    out.append(Entry(LM + "lm_head.weight", ("llm", "lm_head"), "T"))
    return out


def is_unused(key: str, cfg: OFTConfig) -> bool:
    """Tensors of a real checkpoint that OpenVLA never reads (kept aside for export)."""
    for prefix, vit in ((DINO, cfg.dino), (SIGLIP, cfg.siglip)):
        if key.startswith(prefix + "norm.") or key.startswith(prefix + "attn_pool."):
            return True
        m = re.match(re.escape(prefix) + r"blocks\.(\d+)\.", key)
        if m and int(m.group(1)) >= vit.num_used_blocks:
            return True
    return False


def np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def default_unused(cfg: OFTConfig, dtype: str = "bfloat16") -> dict[str, np.ndarray]:
    """The unused tensors of a real checkpoint for a model that never had them (trained from
    scratch), so that an export loads in the original PyTorch code: neutral norms, zero weights."""
    out = {}
    for prefix, v in ((DINO, cfg.dino), (SIGLIP, cfg.siglip)):
        d, m = v.width, v.mlp_dim
        out[prefix + "norm.weight"], out[prefix + "norm.bias"] = np.ones(d), np.zeros(d)
        b = f"{prefix}blocks.{v.depth - 1}."
        shapes = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
                  "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
                  "mlp.fc1.weight": (m, d), "mlp.fc1.bias": (m,), "mlp.fc2.weight": (d, m), "mlp.fc2.bias": (d,)}
        if v.layer_scale:
            shapes.update({"ls1.scale_factor": (d,), "ls2.scale_factor": (d,)})
        for k, s in shapes.items():
            out[b + k] = np.ones(s) if k.startswith("norm") and k.endswith("weight") else np.zeros(s)
        if not v.class_token:  # SigLIP's attention-pool (MAP) head
            a = prefix + "attn_pool."
            for k, s in {"latent": (1, 1, d), "q.weight": (d, d), "q.bias": (d,), "kv.weight": (2 * d, d),
                         "kv.bias": (2 * d,), "proj.weight": (d, d), "proj.bias": (d,), "mlp.fc1.weight": (m, d),
                         "mlp.fc1.bias": (m,), "mlp.fc2.weight": (d, m), "mlp.fc2.bias": (d,)}.items():
                out[a + k] = np.zeros(s)
            out[a + "norm.weight"], out[a + "norm.bias"] = np.ones(d), np.zeros(d)
    return {k: x.astype(np_dtype(dtype)) for k, x in out.items()}


def to_vlajax(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "T":
        return x.T
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)
    return x


def to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "T":
        return x.T
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)
    return x


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def hf_to_params(tensors: dict[str, np.ndarray], cfg: OFTConfig, expected: dict, dtype) -> tuple[dict, dict]:
    """Map HF tensors to a pure-dict param tree shaped like `expected` (a pure dict of
    ShapeDtypeStructs from nnx.eval_shape). Returns (params, unused tensors)."""
    table = entries(cfg)
    known = {e.hf_key for e in table}
    unexpected = [k for k in tensors if k not in known and not is_unused(k, cfg)]
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) for an OpenVLA-OFT policy: {unexpected[:5]}"
                              + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    params: dict = {}
    for e in table:
        if e.hf_key not in tensors:
            raise CheckpointError(f"missing tensor {e.hf_key!r}")
        x = to_vlajax(tensors[e.hf_key], e.kind)
        want = _get(expected, e.path).shape
        if tuple(x.shape) != tuple(want):
            raise CheckpointError(
                f"tensor {e.hf_key!r} has shape {tuple(to_hf(np.empty(x.shape), e.kind).shape)}, "
                f"expected {tuple(to_hf(np.empty(want), e.kind).shape)}"
            )
        _set(params, e.path, np.ascontiguousarray(x).astype(dtype))
    unused = {k: v for k, v in tensors.items() if k not in known}
    return params, unused


def params_to_hf(params: dict, cfg: OFTConfig, dtypes: dict[str, str] | None = None, default_dtype="bfloat16") -> dict:
    """Pure-dict params -> {hf key: numpy array} in torch layout, each in its recorded dtype."""
    out = {}
    for e in entries(cfg):
        x = np.asarray(_get(params, e.path))
        dt = np_dtype((dtypes or {}).get(e.hf_key, default_dtype))
        out[e.hf_key] = np.ascontiguousarray(to_hf(x, e.kind)).astype(dt)
    return out


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str | os.PathLike,
                      weight_map: dict[str, str] | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write tensors as HF does: one file, or shards plus model.safetensors.index.json. A given
    `weight_map` (from the imported checkpoint) is reproduced; keys it lacks go to a new shard."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if weight_map is None:
        total = sum(t.nbytes for t in tensors.values())
        if total <= max_shard_bytes:
            save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
            return
        shards, size, n = [[]], 0, 0
        for k in tensors:
            if size and size + tensors[k].nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(k)
            size += tensors[k].nbytes
        n = len(shards)
        weight_map = {k: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, ks in enumerate(shards) for k in ks}
    else:
        weight_map = dict(weight_map)
        extra = [k for k in tensors if k not in weight_map]
        if extra:
            weight_map.update({k: "model-extra.safetensors" for k in extra})
        weight_map = {k: v for k, v in weight_map.items() if k in tensors}
    by_file: dict[str, dict] = {}
    for k, f in weight_map.items():
        by_file.setdefault(f, {})[k] = tensors[k]
    for f, ts in by_file.items():
        save_file(ts, str(out / f), metadata={"format": "pt"})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
