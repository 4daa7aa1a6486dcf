"""HF <-> vlajax conversion: bit-exact round trips, the vlajax checkpoint, and clear errors."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.reference.hf_layout import random_inputs, write_hf_checkpoint
from tests.reference.torch_oft import OFTSizes, build_torch_oft
from vlajax.cli import main as cli_main
from vlajax.model.oft import CheckpointError, load_pretrained
from vlajax.model.oft.hf_convert import read_tensors


@pytest.fixture(scope="module")
def tiny():
    sizes = OFTSizes.tiny()
    return sizes, build_torch_oft(sizes, seed=11)


def _same_checkpoint(a, b):
    ta, ma = read_tensors(a)
    tb, mb = read_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert ta[k].shape == tb[k].shape, k
        assert ta[k].tobytes() == tb[k].tobytes(), k
    assert ma == mb


@pytest.mark.parametrize("dtype,shards", [(torch.bfloat16, 2), (torch.float32, 1)])
def test_round_trip_hf_vlajax_hf_is_bit_exact(tmp_path, tiny, dtype, shards):
    sizes, ref = tiny
    src = write_hf_checkpoint(ref, sizes, tmp_path / "hf", dtype=dtype, num_shards=shards)
    assert cli_main(["convert", str(src), str(tmp_path / "vlajax")]) == 0
    assert cli_main(["convert", str(tmp_path / "vlajax"), str(tmp_path / "hf2")]) == 0
    _same_checkpoint(src, tmp_path / "hf2")
    assert json.loads((tmp_path / "hf2" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert (json.loads((tmp_path / "hf2" / "dataset_statistics.json").read_text())
            == json.loads((src / "dataset_statistics.json").read_text()))


def test_vlajax_checkpoint_gives_same_logits(tmp_path, tiny):
    sizes, ref = tiny
    src = write_hf_checkpoint(ref, sizes, tmp_path / "hf", dtype=torch.float32, num_shards=1)
    a = load_pretrained(src)
    a.save(tmp_path / "v")
    b = load_pretrained(tmp_path / "v")
    pv, ids, mask = random_inputs(sizes, 2, [6, 9], seed=0)
    args = (jnp.asarray(pv.numpy()), jnp.asarray(ids.numpy(), jnp.int32), jnp.asarray(mask.numpy(), jnp.int32))
    np.testing.assert_array_equal(np.asarray(a.action_logits(*args)), np.asarray(b.action_logits(*args)))
    assert b.action_stats("libero_10").key == "libero_10_no_noops"


def test_export_of_a_model_without_hf_origin_loads_in_torch(tmp_path):
    """A policy built from the preset (never imported) exports a checkpoint the reference loads strictly."""
    from vlajax.model.oft import Policy, build_model, preset

    policy = Policy(build_model(preset("small"), seed=1), compute_dtype=jnp.float32)
    policy.export_hf(tmp_path / "hf", dtype="float32")
    sizes = OFTSizes.tiny()
    ref = build_torch_oft(sizes, seed=0)
    state = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        state.update(load_file(str(f)))
    ref.load_state_dict(state, strict=True)
    pv, ids, mask = random_inputs(sizes, 2, [6, 9], seed=0)
    with torch.no_grad():
        want = ref.action_logits(pv, ids, mask).numpy()
    got = policy.action_logits(jnp.asarray(pv.numpy()), jnp.asarray(ids.numpy(), jnp.int32),
                               jnp.asarray(mask.numpy(), jnp.int32))
    assert np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)) < 1e-4


# ----------------------------------------------------------------------------- bad input


def _single(tmp_path, tiny, dtype=torch.bfloat16):
    sizes, ref = tiny
    return write_hf_checkpoint(ref, sizes, tmp_path / "hf", dtype=dtype, num_shards=1)


def _edit(path, fn):
    f = path / "model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f), metadata={"format": "pt"})


def test_missing_tensor(tmp_path, tiny):
    src = _single(tmp_path, tiny)
    _edit(src, lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'language_model.model.layers.1.mlp.up_proj.weight'"):
        load_pretrained(src)


def test_unexpected_tensor(tmp_path, tiny):
    src = _single(tmp_path, tiny)
    _edit(src, lambda t: t.__setitem__("action_head.fc.weight", torch.zeros(3, 3, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match="unexpected tensor.*action_head.fc.weight"):
        load_pretrained(src)


def test_wrong_shape(tmp_path, tiny):
    src = _single(tmp_path, tiny)
    _edit(src, lambda t: t.__setitem__("projector.fc2.weight", torch.zeros(64, 100, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"'projector.fc\d.weight' has shape"):
        load_pretrained(src)


def test_unsupported_dtype(tmp_path, tiny):
    src = _single(tmp_path, tiny)
    _edit(src, lambda t: t.__setitem__("projector.fc3.bias", t["projector.fc3.bias"].to(torch.int8)))
    with pytest.raises(CheckpointError, match="'projector.fc3.bias'.*unsupported dtype I8"):
        load_pretrained(src)


def test_truncated_shard(tmp_path, tiny):
    sizes, ref = tiny
    src = write_hf_checkpoint(ref, sizes, tmp_path / "hf", dtype=torch.bfloat16, num_shards=2)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read shard .*{shard.name}"):
        load_pretrained(src)


def test_index_entry_missing_and_dangling(tmp_path, tiny):
    sizes, ref = tiny
    src = write_hf_checkpoint(ref, sizes, tmp_path / "hf", dtype=torch.bfloat16, num_shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    k = "language_model.model.norm.weight"
    del index["weight_map"][k]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"'{k}'.*missing from model.safetensors.index.json"):
        load_pretrained(src)
    index["weight_map"]["language_model.extra.weight"] = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"][k] = sorted(set(index["weight_map"].values()))[0]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index lists tensor 'language_model.extra.weight'"):
        load_pretrained(src)


def test_config_of_another_model(tmp_path, tiny):
    src = _single(tmp_path, tiny)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llava"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type is 'llava', expected 'openvla'"):
        load_pretrained(src)


def test_text_config_disagrees_with_tensors(tmp_path, tiny):
    src = _single(tmp_path, tiny)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensor 'language_model.model.layers.2"):
        load_pretrained(src)


def test_missing_path_and_cli_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert cli_main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "neither a Hugging Face" in capsys.readouterr().err


def test_unused_tensors_are_read_lazily_sized(tmp_path, tiny):
    """The last ViT block, final norms and SigLIP attn_pool are kept aside, not in the model."""
    src = _single(tmp_path, tiny)
    p = load_pretrained(src)
    assert "vision_backbone.fused_featurizer.attn_pool.latent" in p.unused
    assert "vision_backbone.featurizer.blocks.2.mlp.fc1.weight" in p.unused
    assert len(p.model.featurizer.blocks) == 2
    with safe_open(str(src / "model.safetensors"), "np") as f:
        n_total = len(list(f.keys()))
    from vlajax.model.oft.hf_convert import entries

    assert len(entries(p.cfg)) + len(p.unused) == n_total
    shutil.rmtree(src)
