"""Parity fixture for π0 (pi0, not pi05) made by running openpi's OWN JAX code on a tiny configuration.

Nothing here comes from vlajax: the model is built, run and saved by the openpi source tree of
https://github.com/Physical-Intelligence/openpi at commit 15a9616a00943ada6c20a0f158e3adb39df2ccac
(``git -C /work/.mirror/Physical-Intelligence+openpi/repo archive HEAD src | tar -x -C /tmp/openpi-work``),
imported from ``/tmp/openpi-work/src``. openpi's source files are not edited; the script only replaces a few
module-level names before the model is built (listed below).

Run (from the repository root; a few minutes on 2 CPU cores):

    /work/main/.venv/bin/python -m pip install --no-deps --target /tmp/openpi-work/deps \\
        jaxtyping==0.2.36 beartype==0.19.0 ml-collections==1.0.0 numpydantic==2.0.0 \\
        orbax-checkpoint==0.11.17 nest_asyncio==1.6.0
    PYTHONPATH=/tmp/openpi-work/src:/tmp/openpi-work/deps /work/main/.venv/bin/python \\
        tests/reference/openpi_pi0_fixture.py --out tests/data/pi0_openpi

(jaxtyping 0.2.36 and beartype 0.19.0 are openpi's pins: ``openpi.shared.array_typing`` patches a private
function of jaxtyping 0.2.x that jaxtyping 0.3 no longer has. orbax: openpi pins 0.11.13, whose
``PyTreeCheckpointer.metadata`` returns the item tree that ``restore_params`` indexes with ``["params"]``; by
0.11.30 it returns a ``StepMetadata`` (``TypeError: 'StepMetadata' object is not subscriptable`` in
restore_params), and 0.11.13-0.11.16 do not import under jax 0.10.2 (``jax.experimental.layout.DeviceLocalLayout``
is gone), so 0.11.17 is used: the oldest release that imports and still has openpi's metadata semantics. The venv's
jax 0.10.2 / flax 0.12.8 are newer than openpi's pins (jax 0.5.3, flax 0.10.2); openpi's pi0 code runs on them
unchanged.)

Tiny configuration (float32 everywhere)
---------------------------------------
``Pi0Config(dtype="float32", action_dim=8, action_horizon=5, max_token_len=12,
paligemma_variant="tiny_llm", action_expert_variant="tiny_expert")``, pi05=False.

Monkeypatches (module attributes, set before the model is built):

* ``openpi.models.gemma.get_config``: wrapped so that the two extra variant names resolve to
  ``tiny_llm`` = Config(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16) and
  ``tiny_expert`` = Config(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16); every
  other name goes to openpi's own function. (pi0.py reads it as ``_gemma.get_config``; pi0_config.py only uses
  the ``Variant`` type, which is not checked at runtime.)
* ``openpi.models.gemma.PALIGEMMA_VOCAB_SIZE = 1024`` (read by ``gemma.Module.setup`` at build time).
* ``openpi.models.siglip.decode_variant``: pi0.py hard-codes ``variant="So400m/14"``; the wrapper maps that name
  to dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=(14, 14)). The remaining SigLIP settings are
  pi0.py's own: posemb "learn", pool_type "none", num_classes = 64 (LLM width, a ``head`` Dense), scan=True,
  dtype_mm = config.dtype.

Stubs (empty modules injected into ``sys.modules`` before importing openpi):

* ``augmax``: imported by ``openpi.models.model`` but only used by ``preprocess_observation(train=True)``
  (augmentation); not installed here. Any attribute access raises AttributeError.
* ``openpi.models_pytorch.pi0_pytorch``: imported by ``openpi.models.model`` for
  ``BaseModelConfig.load_pytorch`` only; the real module needs openpi's patched transformers==4.53.2.
* ``openpi.training.data_loader`` and ``openpi.training.utils``: imported by ``openpi.training.checkpoints``
  (used here for ``load_norm_stats``) only for type annotations (the module has
  ``from __future__ import annotations``); the real ones pull in lerobot/torch datasets.

Parameters
----------
The model is built with ``config.create(jax.random.key(0))``; then every leaf of
``nnx.state(model, nnx.Param).to_pure_dict()`` (all float32), taken in sorted order of its path tuple
(index i = 0, 1, ...), is replaced by ``old + 0.05 * jax.random.normal(jax.random.fold_in(jax.random.key(1234), i),
old.shape, float32)`` so that the zero-initialised norms, biases and the zero-init SigLIP head are nonzero. The new
params are installed with ``State.replace_by_pure_dict`` + ``nnx.update``; this model is used for everything.

Inputs (``numpy.random.default_rng(0)``, drawn in this order)
------------------------------------------------------------
images: for camera in ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb") (openpi's ``IMAGE_KEYS`` order,
which is also the prefix order): ``rng.integers(0, 256, (2, 224, 224, 3), dtype=uint8)``; state
``rng.standard_normal((2, 8), float32)``; tokenized_prompt ``rng.integers(1, 1024, (2, 12), dtype=int32)``;
x_t ``rng.standard_normal((2, 5, 8), float32)``; noise ``rng.standard_normal((2, 5, 8), float32)``.
time = [0.3, 0.8]. image masks all True except right_wrist_0_rgb of sample 1; tokenized_prompt_mask: sample 0 all
True, sample 1 the last 4 False. The uint8 images become floats through openpi's own ``Observation.from_dict``
on numpy arrays (``u8.astype(float32) / 255.0 * 2.0 - 1.0``, bit-identical to ``u8 / 127.5 - 1`` in float32 numpy,
which the script asserts; see ``make_observation`` for why not on jnp arrays), then every leaf becomes a jnp array.

Outputs (all from openpi's code)
--------------------------------
* prefix_tokens / prefix_mask / prefix_ar_mask = ``model.embed_prefix(preprocess_observation(None, obs,
  train=False))`` (preprocessing is the identity for 224x224 inputs with every mask given; asserted).
* The compute_loss forward, reproduced line by line (compute_loss draws its own noise/time): embed_prefix,
  embed_suffix(obs, x_t, time) -> suffix_tokens/suffix_mask/suffix_ar_mask; ``make_attn_mask`` on the concatenated
  masks; positions = cumsum(input_mask) - 1; ``PaliGemma.llm([prefix, suffix], mask, positions,
  adarms_cond=[None, None])`` -> suffix_out (final-normed expert output); v_t = action_out_proj(suffix_out[:, -5:]).
  Self-check: with compute_loss's own rng splits the reproduction gives compute_loss's value.
* actions = ``model.sample_actions(jax.random.key(0), obs, num_steps=10, noise=noise)`` jitted with openpi's
  ``nnx_utils.module_jit`` exactly as ``openpi.policies.policy.Policy`` does.

Files
-----
* ``<out>/tiny_fixture.npz`` (written with fixed zip timestamps, so it is byte-deterministic):
  ``params/<a/b/c>`` (pure-dict path joined by "/"), ``inputs/...``, ``outputs/...``, ``meta/...``.
* ``<out>/tiny_checkpoint/``: the layout ``openpi.policies.policy_config.create_trained_policy`` reads:
  ``params/`` written by ``ocp.PyTreeCheckpointer().save(dir, {"params": pure_dict})`` (the item layout that
  ``openpi.models.model.restore_params`` reads, as in openpi's released checkpoints) and
  ``assets/tiny_robot/norm_stats.json`` written by ``openpi.shared.normalize.save`` (as
  ``openpi.training.checkpoints.save_state`` does). It is verified by reading it back with ``restore_params``
  (bit equality), ``load_norm_stats``, and ``Pi0Config.load`` + sample_actions (equal actions).
  Orbax metadata holds timestamps, so this directory is not byte-deterministic; its array contents are.
  Norm stats (``numpy.random.default_rng(1)``, float64, dim 8, keys "state" then "actions"): mean = N(0, 1),
  std = |N(0, 1)| + 0.5, q01 = mean - 2 std + 0.1 N(0, 1), q99 = mean + 2 std + 0.1 N(0, 1), drawn in that order.
  (numpydantic: openpi asks >=1.6.6; 2.0.0 is the only local release and writes the same JSON lists.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import sys
import types
import zipfile

import numpy as np

OPENPI_COMMIT = "15a9616a00943ada6c20a0f158e3adb39df2ccac"
PERTURB_SEED = 1234
PERTURB_SCALE = 0.05
INPUT_SEED = 0
NORM_STATS_SEED = 1
ASSET_ID = "tiny_robot"
BATCH = 2
ACTION_DIM = 8
ACTION_HORIZON = 5
MAX_TOKEN_LEN = 12
VOCAB = 1024
NUM_STEPS = 10
TIME = (0.3, 0.8)

TINY_GEMMA = {
    "tiny_llm": dict(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
    "tiny_expert": dict(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16),
}
TINY_SIGLIP = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=(14, 14))


def _install_stubs() -> None:
    def _missing(module_name):
        def __getattr__(name):  # noqa: N807
            # AttributeError (not another type) so that hasattr()/inspect treat the stub as a plain module.
            raise AttributeError(f"{module_name}.{name}: stubbed by openpi_pi0_fixture.py (not needed for inference)")

        return __getattr__

    for name in (
        "augmax",
        "openpi.models_pytorch.pi0_pytorch",
        "openpi.training.data_loader",
        "openpi.training.utils",
    ):
        if name in sys.modules:
            raise RuntimeError(f"{name} was imported before the stubs were installed")
        mod = types.ModuleType(name)
        mod.__getattr__ = _missing(name)
        sys.modules[name] = mod


_install_stubs()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from flax import traverse_util  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

import openpi.models.gemma as _gemma  # noqa: E402
from openpi.models import model as _model  # noqa: E402
from openpi.models import pi0 as _pi0  # noqa: E402
from openpi.models import pi0_config as _pi0_config  # noqa: E402
import openpi.models.siglip as _siglip  # noqa: E402
import openpi.shared.nnx_utils as nnx_utils  # noqa: E402
import openpi.shared.normalize as _normalize  # noqa: E402
from openpi.training import checkpoints as _checkpoints  # noqa: E402


def _patch_openpi() -> None:
    original_get_config = _gemma.get_config

    def get_config(variant):
        if variant in TINY_GEMMA:
            return _gemma.Config(**TINY_GEMMA[variant])
        return original_get_config(variant)

    _gemma.get_config = get_config
    _gemma.PALIGEMMA_VOCAB_SIZE = VOCAB

    original_decode_variant = _siglip.decode_variant

    def decode_variant(variant):
        if variant == "So400m/14":
            return dict(TINY_SIGLIP)
        return original_decode_variant(variant)

    _siglip.decode_variant = decode_variant


def tiny_config() -> _pi0_config.Pi0Config:
    return _pi0_config.Pi0Config(
        dtype="float32",
        action_dim=ACTION_DIM,
        action_horizon=ACTION_HORIZON,
        max_token_len=MAX_TOKEN_LEN,
        paligemma_variant="tiny_llm",
        action_expert_variant="tiny_expert",
    )


def build_model(config: _pi0_config.Pi0Config) -> tuple[_pi0.Pi0, dict[tuple[str, ...], np.ndarray]]:
    model = config.create(jax.random.key(0))
    assert not model.pi05
    params_state = nnx.state(model, nnx.Param)
    full_state = nnx.state(model)
    assert len(jax.tree.leaves(full_state)) == len(jax.tree.leaves(params_state)), "model has non-Param state"
    flat = traverse_util.flatten_dict(params_state.to_pure_dict())
    base = jax.random.key(PERTURB_SEED)
    new_flat = {}
    for i, path in enumerate(sorted(flat)):
        old = flat[path]
        assert all(isinstance(p, str) for p in path), path
        assert old.dtype == jnp.float32, (path, old.dtype)
        noise = jax.random.normal(jax.random.fold_in(base, i), old.shape, jnp.float32)
        new_flat[path] = old + PERTURB_SCALE * noise
    params_state.replace_by_pure_dict(traverse_util.unflatten_dict(new_flat))
    nnx.update(model, params_state)
    installed = traverse_util.flatten_dict(nnx.state(model, nnx.Param).to_pure_dict())
    params = {k: np.asarray(v) for k, v in installed.items()}
    for k, v in new_flat.items():
        assert np.array_equal(params[k], np.asarray(v)), k
    return model, params


def make_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(INPUT_SEED)
    inputs: dict[str, np.ndarray] = {}
    for cam in _model.IMAGE_KEYS:
        inputs[f"image/{cam}"] = rng.integers(0, 256, (BATCH, *_model.IMAGE_RESOLUTION, 3), dtype=np.uint8)
    for cam in _model.IMAGE_KEYS:
        mask = np.ones((BATCH,), dtype=bool)
        if cam == "right_wrist_0_rgb":
            mask[1] = False
        inputs[f"image_mask/{cam}"] = mask
    inputs["state"] = rng.standard_normal((BATCH, ACTION_DIM), dtype=np.float32)
    inputs["tokenized_prompt"] = rng.integers(1, VOCAB, (BATCH, MAX_TOKEN_LEN), dtype=np.int32)
    token_mask = np.ones((BATCH, MAX_TOKEN_LEN), dtype=bool)
    token_mask[1, -4:] = False
    inputs["tokenized_prompt_mask"] = token_mask
    inputs["x_t"] = rng.standard_normal((BATCH, ACTION_HORIZON, ACTION_DIM), dtype=np.float32)
    inputs["time"] = np.asarray(TIME, dtype=np.float32)
    inputs["noise"] = rng.standard_normal((BATCH, ACTION_HORIZON, ACTION_DIM), dtype=np.float32)
    return inputs


def make_observation(inputs: dict[str, np.ndarray]) -> _model.Observation:
    """numpy arrays into openpi's ``Observation.from_dict`` (which converts the uint8 images), then jnp arrays.

    The conversion runs in numpy on purpose: there ``u8.astype(float32) / 255.0 * 2.0 - 1.0`` is bit-identical to
    ``u8 / 127.5 - 1`` (asserted), so the float images are exactly reproducible from the stored uint8 ones. (Run by
    XLA on jnp arrays, as ``Policy.infer`` does, 111 of the 256 byte values come out 1 ulp different, because XLA
    turns the division by a constant into a multiplication by its reciprocal.)
    """
    data = {
        "image": {cam: inputs[f"image/{cam}"] for cam in _model.IMAGE_KEYS},
        "image_mask": {cam: inputs[f"image_mask/{cam}"] for cam in _model.IMAGE_KEYS},
        "state": inputs["state"],
        "tokenized_prompt": inputs["tokenized_prompt"],
        "tokenized_prompt_mask": inputs["tokenized_prompt_mask"],
    }
    obs = _model.Observation.from_dict(data)
    for cam in _model.IMAGE_KEYS:
        img = obs.images[cam]
        assert isinstance(img, np.ndarray) and img.dtype == np.float32
        expected = inputs[f"image/{cam}"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        assert np.array_equal(img, expected), f"image conversion of {cam} differs from u8/127.5-1"
    return jax.tree.map(jnp.asarray, obs)


def _jit_with_model(model: nnx.Module, fn):
    """Same freezing as ``nnx_utils.module_jit`` but for a free function of the model."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def jitted(state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    return lambda *args: jitted(state, *args)


def _prefix_fn(model: _pi0.Pi0, observation: _model.Observation):
    observation = _model.preprocess_observation(None, observation, train=False)
    return model.embed_prefix(observation)


def _velocity_fn(model: _pi0.Pi0, observation: _model.Observation, x_t, time):
    """The forward of ``Pi0.compute_loss`` after its noise/time draws, line by line."""
    observation = _model.preprocess_observation(None, observation, train=False)
    prefix_tokens, prefix_mask, prefix_ar_mask = model.embed_prefix(observation)
    suffix_tokens, suffix_mask, suffix_ar_mask, adarms_cond = model.embed_suffix(observation, x_t, time)
    input_mask = jnp.concatenate([prefix_mask, suffix_mask], axis=1)
    ar_mask = jnp.concatenate([prefix_ar_mask, suffix_ar_mask], axis=0)
    attn_mask = _pi0.make_attn_mask(input_mask, ar_mask)
    positions = jnp.cumsum(input_mask, axis=1) - 1
    (prefix_out, suffix_out), _ = model.PaliGemma.llm(
        [prefix_tokens, suffix_tokens], mask=attn_mask, positions=positions, adarms_cond=[None, adarms_cond]
    )
    v_t = model.action_out_proj(suffix_out[:, -model.action_horizon :])
    return {
        "suffix_tokens": suffix_tokens,
        "suffix_mask": suffix_mask,
        "suffix_ar_mask": suffix_ar_mask,
        "positions": positions,
        "suffix_out": suffix_out,
        "v_t": v_t,
    }


def _check_compute_loss(model: _pi0.Pi0, observation: _model.Observation, velocity) -> float:
    """compute_loss with its own rng must equal the loss rebuilt from the reproduced forward."""
    rng = jax.random.key(7)
    actions = jnp.asarray(np.random.default_rng(7).standard_normal((BATCH, ACTION_HORIZON, ACTION_DIM), np.float32))
    loss = _jit_with_model(model, lambda m, r, o, a: m.compute_loss(r, o, a, train=False))(rng, observation, actions)
    _, noise_rng, time_rng = jax.random.split(rng, 3)
    noise = jax.random.normal(noise_rng, actions.shape)
    time = jax.random.beta(time_rng, 1.5, 1, actions.shape[:-2]) * 0.999 + 0.001
    x_t = time[..., None, None] * noise + (1 - time[..., None, None]) * actions
    v_t = velocity(observation, x_t, time)["v_t"]
    rebuilt = jnp.mean(jnp.square(v_t - (noise - actions)), axis=-1)
    err = float(jnp.max(jnp.abs(rebuilt - loss)))
    assert err <= 1e-5 * float(jnp.max(jnp.abs(loss))), f"compute_loss reproduction differs by {err}"
    return err


def write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` layout with fixed zip timestamps (numpy stamps the current time otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arrays[key]), allow_pickle=False)
    tmp.replace(path)


def make_norm_stats() -> dict[str, _normalize.NormStats]:
    rng = np.random.default_rng(NORM_STATS_SEED)
    stats = {}
    for key in ("state", "actions"):
        mean = rng.standard_normal(ACTION_DIM)
        std = np.abs(rng.standard_normal(ACTION_DIM)) + 0.5
        q01 = mean - 2.0 * std + 0.1 * rng.standard_normal(ACTION_DIM)
        q99 = mean + 2.0 * std + 0.1 * rng.standard_normal(ACTION_DIM)
        stats[key] = _normalize.NormStats(mean=mean, std=std, q01=q01, q99=q99)
    return stats


def write_checkpoint(ckpt_dir: pathlib.Path, params: dict[tuple[str, ...], np.ndarray], norm_stats) -> None:
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True)
    # jax.Arrays, as openpi's training save does (orbax then records value_type "jax.Array" and writes _sharding).
    pure = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in params.items()})
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save((ckpt_dir / "params").resolve(), {"params": pure})
    # openpi.training.checkpoints.save_state: `_normalize.save(directory / data_config.asset_id, norm_stats)` with
    # `directory` = the checkpoint's "assets" item.
    _normalize.save(ckpt_dir / "assets" / ASSET_ID, norm_stats)


def verify_checkpoint(
    ckpt_dir: pathlib.Path,
    params: dict[tuple[str, ...], np.ndarray],
    norm_stats,
    config: _pi0_config.Pi0Config,
    observation: _model.Observation,
    noise: np.ndarray,
    actions: np.ndarray,
) -> None:
    for restore_type in (np.ndarray, jax.Array):
        restored = traverse_util.flatten_dict(_model.restore_params(ckpt_dir / "params", restore_type=restore_type))
        assert set(restored) == set(params), set(restored) ^ set(params)
        for k, v in params.items():
            got = np.asarray(restored[k])
            assert got.dtype == v.dtype == np.float32 and got.shape == v.shape, k
            assert np.array_equal(got, v), f"restored param {'/'.join(k)} differs"
    loaded_stats = _checkpoints.load_norm_stats(ckpt_dir / "assets", ASSET_ID)
    assert set(loaded_stats) == set(norm_stats)
    for key, st in norm_stats.items():
        for field in ("mean", "std", "q01", "q99"):
            assert np.array_equal(np.asarray(getattr(loaded_stats[key], field)), getattr(st, field)), (key, field)
    # The policy path: config.load(restore_params(...)) then module_jit(sample_actions). create_trained_policy passes
    # dtype=bfloat16 to restore_params; float32 is kept here so the comparison can be exact.
    model = config.load(_model.restore_params(ckpt_dir / "params", restore_type=np.ndarray))
    again = nnx_utils.module_jit(model.sample_actions)(
        jax.random.key(0), observation, num_steps=NUM_STEPS, noise=jnp.asarray(noise)
    )
    assert np.array_equal(np.asarray(again), actions), "actions from the restored checkpoint differ"


def main() -> None:
    import orbax.checkpoint.version as _ocp_version

    if _ocp_version.__version__ != "0.11.17":
        raise RuntimeError(f"expected orbax-checkpoint 0.11.17 first on PYTHONPATH, got {_ocp_version.__version__}")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tests/data/pi0_openpi"))
    parser.add_argument("--no-checkpoint", action="store_true", help="only write tiny_fixture.npz")
    args = parser.parse_args()

    _patch_openpi()
    config = tiny_config()
    model, params = build_model(config)

    inputs = make_inputs()
    observation = make_observation(inputs)
    pre = _model.preprocess_observation(None, observation, train=False)
    for cam in _model.IMAGE_KEYS:
        assert np.array_equal(np.asarray(pre.images[cam]), np.asarray(observation.images[cam]))
        assert np.array_equal(np.asarray(pre.image_masks[cam]), np.asarray(observation.image_masks[cam]))

    prefix_tokens, prefix_mask, prefix_ar_mask = _jit_with_model(model, _prefix_fn)(observation)
    velocity = _jit_with_model(model, _velocity_fn)
    vel = velocity(observation, jnp.asarray(inputs["x_t"]), jnp.asarray(inputs["time"]))
    loss_err = _check_compute_loss(model, observation, velocity)

    sample = nnx_utils.module_jit(model.sample_actions)
    actions = sample(jax.random.key(0), observation, num_steps=NUM_STEPS, noise=jnp.asarray(inputs["noise"]))
    actions = np.asarray(actions)

    # Consistency of the KV-cache path with the full forward: one Euler step from t=1 is noise - v(noise, 1).
    one = np.asarray(sample(jax.random.key(0), observation, num_steps=1, noise=jnp.asarray(inputs["noise"])))
    v1 = np.asarray(velocity(observation, jnp.asarray(inputs["noise"]), jnp.ones((BATCH,), jnp.float32))["v_t"])
    kv_err = float(np.max(np.abs(one - (inputs["noise"] - v1))))
    assert kv_err < 1e-4, f"KV-cache sample_actions step differs from the full forward by {kv_err}"

    outputs = {
        "prefix_tokens": prefix_tokens,
        "prefix_mask": prefix_mask,
        "prefix_ar_mask": prefix_ar_mask,
        **vel,
        "actions": actions,
    }
    arrays: dict[str, np.ndarray] = {}
    for k, v in params.items():
        arrays["params/" + "/".join(k)] = v
    for k, v in inputs.items():
        arrays["inputs/" + k] = v
    for k, v in outputs.items():
        v = np.asarray(v)
        assert v.dtype in (np.float32, np.bool_, np.int32), (k, v.dtype)
        arrays["outputs/" + k] = v
    meta = {
        "openpi_commit": OPENPI_COMMIT,
        "config": dict(
            pi05=False,
            dtype="float32",
            action_dim=ACTION_DIM,
            action_horizon=ACTION_HORIZON,
            max_token_len=MAX_TOKEN_LEN,
            vocab_size=VOCAB,
            paligemma=TINY_GEMMA["tiny_llm"],
            action_expert=TINY_GEMMA["tiny_expert"],
            siglip={**TINY_SIGLIP, "patch_size": list(TINY_SIGLIP["patch_size"]), "posemb": "learn",
                    "pool_type": "none", "num_classes": TINY_GEMMA["tiny_llm"]["width"], "scan": True},
            image_keys=list(_model.IMAGE_KEYS),
            image_resolution=list(_model.IMAGE_RESOLUTION),
            num_steps=NUM_STEPS,
            perturb_seed=PERTURB_SEED,
            perturb_scale=PERTURB_SCALE,
            input_seed=INPUT_SEED,
        ),
    }
    arrays["meta/json"] = np.asarray(json.dumps(meta, sort_keys=True))

    out: pathlib.Path = args.out
    npz = out / "tiny_fixture.npz"
    write_npz(npz, arrays)
    digest = hashlib.sha256(npz.read_bytes()).hexdigest()
    print(f"wrote {npz} ({npz.stat().st_size} bytes, sha256 {digest})")
    print(f"compute_loss reproduction max abs err {loss_err:.3e}; kv-cache vs full forward {kv_err:.3e}")

    if not args.no_checkpoint:
        norm_stats = make_norm_stats()
        ckpt = out / "tiny_checkpoint"
        write_checkpoint(ckpt, params, norm_stats)
        verify_checkpoint(ckpt, params, norm_stats, config, observation, inputs["noise"], actions)
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        print(f"wrote {ckpt} ({size} bytes) and verified it with restore_params / load_norm_stats / Pi0Config.load")


if __name__ == "__main__":
    main()
