"""`Policy`: the OpenVLA-OFT model with its tokenizer, action statistics and provenance, loadable
from a Hugging Face directory or a vlajax (orbax) checkpoint and exportable back to HF.

A vlajax policy checkpoint is a directory:
    vlajax_policy.json         format marker, OFTConfig, original HF config.json, per-tensor dtypes
    params/                    orbax checkpoint of the parameter tree (fp32 or bf16)
    assets/                    dataset_statistics.json, tokenizer files, unused_tensors.safetensors
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors.numpy import load_file, save_file

from vlajax.model.oft import hf_convert
from vlajax.model.oft.actions import ActionStats, load_action_stats, tokens_to_actions
from vlajax.model.oft.config import LlamaConfig, OFTConfig, ViTConfig
from vlajax.model.oft.policy import OpenVLAOFT
from vlajax.model.tokenizer import load_tokenizer

MARKER = "vlajax_policy.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
HF_SIDE_FILES = ("preprocessor_config.json", "processor_config.json", "generation_config.json")


def config_to_dict(cfg: OFTConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> OFTConfig:
    d = dict(d)
    return OFTConfig(dino=ViTConfig(**d.pop("dino")), siglip=ViTConfig(**d.pop("siglip")),
                     llm=LlamaConfig(**d.pop("llm")), **d)


def abstract_params(cfg: OFTConfig) -> tuple[nnx.GraphDef, dict]:
    """Graph and pure-dict ShapeDtypeStructs of the params, without allocating them."""
    model = nnx.eval_shape(lambda: OpenVLAOFT(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def build_model(cfg: OFTConfig, params: dict | None = None, seed: int = 0, dtype=jnp.float32) -> OpenVLAOFT:
    """A model with random init (params None) or with the given pure-dict params."""
    if params is None:
        model = OpenVLAOFT(cfg, nnx.Rngs(seed))
        if dtype != jnp.float32:
            state = nnx.state(model)
            nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), state))
        return model
    model = nnx.eval_shape(lambda: OpenVLAOFT(cfg, nnx.Rngs(0)))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


class Policy:
    """The policy a user or the training loop holds. `model` is the nnx module (mutable: the learner
    updates its params in place); `action_logits` is jitted for the compute dtype."""

    proprio_norm = "bounds"  # OFT's BOUNDS_Q99 robot-state normalisation (`vlajax.model.preprocess.PROPRIO_NORMS`)

    def __init__(self, model: OpenVLAOFT, *, tokenizer=None, dataset_statistics: dict | None = None,
                 hf_config: dict | None = None, hf_dtypes: dict | None = None, hf_weight_map: dict | None = None,
                 unused: dict | None = None, compute_dtype=jnp.bfloat16, asset_dir: str | None = None):
        # The split (graphdef, state) is the source of truth: collecting nnx.state of the 7B model
        # costs ~50 ms of Python per call, which would dominate small-batch rollout decoding.
        self.graphdef, self.state = nnx.split(model)
        self._cfg = model.cfg
        self.tokenizer = tokenizer
        self.dataset_statistics = dataset_statistics or {}
        self.hf_config = hf_config
        self.hf_dtypes = hf_dtypes or {}
        self.hf_weight_map = hf_weight_map
        self.unused = unused
        self.compute_dtype = compute_dtype
        self.asset_dir = asset_dir
        self._jitted = {}

    @property
    def model(self) -> OpenVLAOFT:
        """A module view of the current state (shares its arrays). After mutating it (e.g. adding
        LoRA), hand it back with `set_model`."""
        return nnx.merge(self.graphdef, self.state)

    def set_model(self, model: OpenVLAOFT) -> None:
        self.graphdef, self.state = nnx.split(model)
        self._cfg = model.cfg
        self._jitted = {}

    def set_state(self, state: nnx.State) -> None:
        """Install new parameters of the same structure (e.g. after a learner update)."""
        self.state = state

    @property
    def cfg(self) -> OFTConfig:
        return self._cfg

    # -- inference -------------------------------------------------------------------------
    def _fn(self, name):
        if name not in self._jitted:
            graphdef = self.graphdef
            dtype = self.compute_dtype

            def logits(state, pixel_values, input_ids, attention_mask, proprio):
                m = nnx.merge(graphdef, state)
                return m.action_logits(pixel_values, input_ids, attention_mask, proprio, dtype=dtype)

            self._jitted["logits"] = jax.jit(logits)
        return self._jitted[name]

    def action_logits(self, pixel_values, input_ids, attention_mask, proprio=None) -> jax.Array:
        """(B, 56, 256) float32; column j is token 31744 + j. See OpenVLAOFT.action_logits."""
        return self._fn("logits")(self.state, pixel_values, input_ids, attention_mask, proprio)

    def action_stats(self, key: str) -> ActionStats:
        if not self.dataset_statistics:
            raise KeyError("this policy has no dataset_statistics.json; cannot un-normalise actions")
        return load_action_stats(self.dataset_statistics, key)

    def proprio_stats(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(q01, q99) of the robot state under statistics `key`, None if they have none."""
        if not self.dataset_statistics:
            return None
        stats = self.dataset_statistics.get(self.action_stats(key).key, {}).get("proprio")
        return (np.asarray(stats["q01"], np.float32), np.asarray(stats["q99"], np.float32)) if stats else None

    def tokens_to_actions(self, tokens, unnorm_key: str | None, gripper: str | None = "libero") -> np.ndarray:
        stats = self.action_stats(unnorm_key) if unnorm_key else ActionStats.identity(self.cfg.action_dim)
        return tokens_to_actions(np.asarray(tokens), stats, self.cfg.chunk, self.cfg.action_dim, gripper)

    # -- persistence -----------------------------------------------------------------------
    def params(self) -> dict:
        return nnx.to_pure_dict(nnx.filter_state(self.state, nnx.Param))

    def save(self, path: str | os.PathLike) -> None:
        """Write a vlajax policy checkpoint (orbax params + assets)."""
        path = Path(path).absolute()
        if self.model_has_lora():
            raise ValueError("merge LoRA (vlajax.rl.lora.merge) before saving a policy checkpoint")
        path.mkdir(parents=True, exist_ok=True)
        assets = path / "assets"
        assets.mkdir(exist_ok=True)
        with ocp.StandardCheckpointer() as ckptr:
            if (path / "params").exists():
                shutil.rmtree(path / "params")
            ckptr.save(path / "params", self.params())
        if self.dataset_statistics:
            (assets / "dataset_statistics.json").write_text(json.dumps(self.dataset_statistics, indent=2))
        if self.asset_dir:
            for f in TOKENIZER_FILES + HF_SIDE_FILES:
                src = Path(self.asset_dir) / f
                if src.exists() and src.resolve() != (assets / f).resolve():
                    shutil.copy(src, assets / f)
        self._copy_tokenizer(assets)
        if self.unused:
            save_file(self.unused, str(assets / "unused_tensors.safetensors"))
        meta = {"format": "vlajax-policy", "version": 1, "config": config_to_dict(self.cfg),
                "hf_config": self.hf_config, "hf_dtypes": self.hf_dtypes, "hf_weight_map": self.hf_weight_map,
                "tokenizer": getattr(self.tokenizer, "source", None)}
        (path / MARKER).write_text(json.dumps(meta, indent=2))

    def _copy_tokenizer(self, folder: Path) -> None:
        """The tokenizer file itself where `asset_dir` did not bring one (e.g. the shipped tiny
        tokenizer of a preset model), so the written checkpoint loads with its tokenizer."""
        tok = getattr(self.tokenizer, "path", None)
        if tok is not None and Path(tok).name in TOKENIZER_FILES and not (folder / Path(tok).name).exists():
            shutil.copy(tok, folder / Path(tok).name)

    def model_has_lora(self) -> bool:
        return any(True for _ in jax.tree.leaves(nnx.filter_state(self.state, nnx.LoRAParam)))

    def export_hf(self, path: str | os.PathLike, dtype: str | None = None) -> None:
        """Write a Hugging Face OpenVLA-OFT directory loadable by the original PyTorch code: the same
        key names and shapes, each tensor in its original dtype (or `dtype` for all)."""
        if self.cfg.action_queries:
            raise ValueError("export_hf: this policy has learned action-query embeddings (OFTConfig.action_queries), "
                             "which the OpenVLA-OFT format has no tensor for; keep it as a vlajax checkpoint")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        default = dtype or "bfloat16"
        dtypes = {} if dtype else self.hf_dtypes
        tensors = hf_convert.params_to_hf(jax.device_get(self.params()), self.cfg, dtypes, default)
        unused = self.unused if self.unused is not None else hf_convert.default_unused(self.cfg, default)
        for k, v in unused.items():
            tensors[k] = v.astype(hf_convert.np_dtype(dtype)) if dtype else v
        hf_convert.write_safetensors(tensors, path, self.hf_weight_map)
        cfg = self.hf_config or hf_config_for(self.cfg)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        if self.dataset_statistics:
            (path / "dataset_statistics.json").write_text(json.dumps(self.dataset_statistics, indent=2))
        if self.asset_dir:
            for f in TOKENIZER_FILES + HF_SIDE_FILES:
                if (Path(self.asset_dir) / f).exists():
                    shutil.copy(Path(self.asset_dir) / f, path / f)
        self._copy_tokenizer(path)


def hf_config_for(cfg: OFTConfig) -> dict:
    """A config.json for a model that was not imported from HF (e.g. trained from scratch)."""
    text = {"model_type": "llama", "pad_token_id": cfg.pad_id, "torch_dtype": "bfloat16",
            "vocab_size": cfg.llm.vocab_size, "hidden_size": cfg.llm.hidden,
            "intermediate_size": cfg.llm.intermediate, "num_hidden_layers": cfg.llm.num_layers,
            "num_attention_heads": cfg.llm.num_heads, "num_key_value_heads": cfg.llm.num_kv_heads,
            "rms_norm_eps": cfg.llm.rms_eps}
    return {
        "model_type": "openvla", "architectures": ["OpenVLAForActionPrediction"],
        "vision_backbone_id": "dinosiglip-vit-so-224px", "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": "no-align+fused-gelu-mlp", "use_fused_vision_backbone": True,
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None], "image_sizes": [cfg.image_size, cfg.image_size],
        "image_resize_strategy": "resize-naive", "hf_llm_id": "meta-llama/Llama-2-7b-hf", "llm_max_length": 2048,
        "pad_token_id": cfg.pad_id, "pad_to_multiple_of": cfg.llm.pad_to_multiple_of, "n_action_bins": cfg.n_bins,
        "output_projector_states": False, "torch_dtype": "bfloat16", "text_config": text,
        "use_proprio": bool(cfg.proprio_dim), "proprio_dim": cfg.proprio_dim or 0,
        "num_images_in_input": cfg.num_images,
    }


def _load_tokenizer(asset_dir: Path, fallback: str | None):
    if not ((asset_dir / "tokenizer.json").exists() or (asset_dir / "tokenizer.model").exists() or fallback):
        return None
    if (asset_dir / "tokenizer.json").exists() or (asset_dir / "tokenizer.model").exists():
        return load_tokenizer(str(asset_dir))
    if fallback:
        return load_tokenizer(fallback)
    return None


def load_pretrained(path: str | os.PathLike, dtype: str = "float32", compute_dtype: str | None = None,
                    num_images: int | None = None) -> Policy:
    """Load a policy from a Hugging Face OpenVLA-OFT directory or a vlajax policy checkpoint.

    dtype: parameter dtype ("float32" master weights, or "bfloat16"); compute_dtype defaults to dtype."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    pdt = jnp.dtype(dtype)
    cdt = jnp.dtype(compute_dtype or dtype)
    if (path / MARKER).exists():
        return _load_vlajax(path, pdt, cdt)
    if (path / "config.json").exists():
        return _load_hf(path, pdt, cdt, num_images)
    raise FileNotFoundError(f"{path} is neither a Hugging Face OpenVLA-OFT directory (config.json) nor a "
                            f"vlajax policy checkpoint ({MARKER})")


def _load_hf(path: Path, pdt, cdt, num_images) -> Policy:
    hf_cfg = hf_convert.read_config(path)
    tensors, weight_map = hf_convert.read_tensors(path)
    cfg = hf_convert.config_from_hf(hf_cfg, tensors, num_images)
    _, expected = abstract_params(cfg)
    params, unused = hf_convert.hf_to_params(tensors, cfg, expected, pdt)
    dtypes = {k: str(v.dtype) for k, v in tensors.items()}
    del tensors
    stats = None
    if (path / "dataset_statistics.json").exists():
        stats = json.loads((path / "dataset_statistics.json").read_text())
    elif hf_cfg.get("norm_stats"):
        stats = hf_cfg["norm_stats"]
    model = build_model(cfg, params)
    return Policy(model, tokenizer=_load_tokenizer(path, None), dataset_statistics=stats, hf_config=hf_cfg,
                  hf_dtypes=dtypes, hf_weight_map=weight_map, unused=unused, compute_dtype=cdt, asset_dir=str(path))


def _load_vlajax(path: Path, pdt, cdt) -> Policy:
    meta = json.loads((path / MARKER).read_text())
    if meta.get("format") != "vlajax-policy":
        raise hf_convert.CheckpointError(f"{path / MARKER}: not a vlajax policy checkpoint")
    cfg = config_from_dict(meta["config"])
    _, expected = abstract_params(cfg)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, pdt), expected)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(path.absolute() / "params", target)
        except Exception as e:
            raise hf_convert.CheckpointError(f"{path}/params does not match the policy config: {e}") from e
    assets = path / "assets"
    stats = None
    if (assets / "dataset_statistics.json").exists():
        stats = json.loads((assets / "dataset_statistics.json").read_text())
    unused = load_file(str(assets / "unused_tensors.safetensors")) if (assets / "unused_tensors.safetensors").exists() else None
    return Policy(build_model(cfg, params), tokenizer=_load_tokenizer(assets, meta.get("tokenizer")),
                  dataset_statistics=stats, hf_config=meta.get("hf_config"), hf_dtypes=meta.get("hf_dtypes"),
                  hf_weight_map=meta.get("hf_weight_map"), unused=unused, compute_dtype=cdt, asset_dir=str(assets))
