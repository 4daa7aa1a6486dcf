"""π0 `sample_actions` speed, vlajax against openpi's own JAX code, on the same random weights, in one process.

What it measures
----------------
One call of π0's action sampling (openpi's `Pi0.sample_actions`, pi05=False): SigLIP on the 3 camera images,
the prefix (images + prompt) through PaliGemma's Gemma once into a KV cache, then `--steps` Euler steps of the
flow, each one forward of the suffix (state token + action chunk) through the action expert over the cache. Both
implementations are jitted the way they are served: openpi's with its own `nnx_utils.module_jit(model.sample_actions)`
(what `openpi.policies.policy.Policy` does; `num_steps` and `noise` passed as keyword arguments, as
`Policy.infer` passes `sample_kwargs` and `noise`), vlajax's `Pi0.sample_actions` with graphdef/state split +
`jax.jit`. For each batch size: the first call of each (compile + one run) is timed apart, then `--iters` calls of
each, alternating A,B / B,A so that clock drift favours neither, each with `block_until_ready`; median and min ms,
the ratio vlajax / openpi, the model FLOPs of one call, TFLOP/s and the fraction of the bf16 matmul peak measured in
the same process (`benchmarks/peak.py`). The sampled actions of the two are compared (max abs difference).

Weights: openpi's `config.create(jax.random.key(0))` (float32 parameters whatever `dtype` is; `dtype` is only
the compute dtype), with every identically-zero leaf (norm scales, biases, SigLIP's zero-init head, which would
make the images irrelevant) replaced by 0.05 N(0, 1) (`--no-perturb-zeros` keeps them). The parameters are then cast
to `--param-dtype` (default: the compute dtype) and installed with `config.load(params)` -- openpi's serving path,
where `create_trained_policy` restores them with `restore_params(dtype=bfloat16)` -- and the SAME arrays are
converted into vlajax's `Pi0` (`openpi_convert.load_into`, over an abstract model), so both hold identical values
in the same dtype.

Inputs per batch size B (numpy seed 0): openpi's IMAGE_KEYS (base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb) at
224x224, float32 uniform in [-1, 1]; image masks base and left wrist True, right wrist False (openpi's LIBERO input
transform for π0); a prompt of max_token_len ids, the first 5/12 of them valid (20 of 48), the rest id 0 with mask
False (openpi's tokenizer padding); state (B, action_dim) and noise (B, action_horizon, action_dim) standard normal.

FLOPs of one call (per batch row; multiply-adds x 2; attention over every key slot, masked or not, as both compute
it): SigLIP per image (patch embedding, qkv / out projections, QK^T and AV over 256 tokens, MLP, the head into
Gemma's width), the prefix (3 x 256 + max_token_len tokens) through every Gemma-2B layer, and per step the suffix
(1 + action_horizon tokens, keys = prefix + suffix) through every expert layer plus the state / action / time-MLP /
output projections. (`vlajax.model.pi0.family.Pi0Family.flops_per_row` counts the same minus SigLIP's attention,
patch embedding and head and the small projections.) XLA may drop the last Gemma layer's unused prefix work
(only its K/V feed the cache); the count is the model's, not what each compiled program executes.

openpi's code is imported from `--openpi-src` (openpi at commit 15a9616a00943ada6c20a0f158e3adb39df2ccac: see
tests/reference/openpi_pi0_fixture.py for how /tmp/openpi-work/src is made) with `--openpi-deps` (the pip
`--target` folder of that script) first on sys.path: openpi needs jaxtyping 0.2.x (it patches a private function
that jaxtyping 0.3 lacks) and beartype; nothing else from there is imported. Stubbed modules (empty, injected into
sys.modules before openpi is imported): `augmax` and `openpi.models_pytorch.pi0_pytorch` (as the fixture script),
and `orbax.checkpoint` (openpi's model module uses it only to restore checkpoints; `config.load` is called with
`remove_extra_params=False`, which skips its `intersect_trees`, a no-op here since the trees are equal). torch and
safetensors are imported by openpi's model module for its PyTorch paths; where they are not installed a minimal stub
stands in (`--stub torch` forces that, to test it). `--size tiny` is the fixture's tiny model, made with the same
monkeypatches of `openpi.models.gemma.get_config`, `PALIGEMMA_VOCAB_SIZE` and `openpi.models.siglip.decode_variant`.

GPU (one H100 / H200; the two openpi folders carried into the repository, e.g. as ignored .openpi/src and
.openpi/deps; XLA_PYTHON_CLIENT_PREALLOCATE=false is optional):

    PYTHONPATH=. python3 benchmarks/pi0_vs_openpi.py --openpi-src .openpi/src --openpi-deps .openpi/deps \\
        --size pi0 --batch 1 8 32 --steps 10 --iters 20 --out $OUT/pi0_vs_openpi.json

CPU smoke test (tiny model, float32: the two must agree to ~1e-5; a minute or two on 2 cores):

    /work/main/.venv/bin/python benchmarks/pi0_vs_openpi.py --openpi-src /tmp/openpi-work/src \\
        --openpi-deps /tmp/openpi-work/deps --size tiny --dtype float32 --batch 1 2 --iters 3

`--build-only` builds both full models, converts the weights and traces both samplers abstractly
(`jax.eval_shape`), without compiling or timing (what a CPU can check of `--size pi0`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENPI_COMMIT = "15a9616a00943ada6c20a0f158e3adb39df2ccac"

# tests/reference/openpi_pi0_fixture.py's tiny variant
TINY_GEMMA = {
    "tiny_llm": dict(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
    "tiny_expert": dict(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16),
}
TINY_SIGLIP = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=(14, 14))
TINY_VOCAB = 1024
TINY = dict(action_dim=8, action_horizon=5, max_token_len=12, paligemma_variant="tiny_llm",
            action_expert_variant="tiny_expert")
PI0_VOCAB = 257_152  # openpi.models.gemma.PALIGEMMA_VOCAB_SIZE

PERTURB_SEED = 1234
PERTURB_SCALE = 0.05
INPUT_SEED = 0


# -- importing openpi ----------------------------------------------------------------------------------------------
def _stub_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)

    def __getattr__(attr):  # noqa: N807
        # AttributeError so that hasattr()/inspect treat it as a plain module
        raise AttributeError(f"{name}.{attr}: stubbed by benchmarks/pi0_vs_openpi.py (not needed for sampling)")

    mod.__getattr__ = __getattr__
    for k, v in attrs.items():
        setattr(mod, k, v)
    sys.modules[name] = mod
    return mod


def _stub_torch() -> None:
    """What openpi's JAX model modules touch of torch at import: `torch.Tensor` in type unions and annotations,
    `torch.nn.functional` (image_tools). The dtypes are only compared against in PyTorch-only branches."""

    class Tensor:  # never instantiated: nothing here makes a torch tensor
        pass

    torch = _stub_module("torch", Tensor=Tensor, uint8=object(), float32=object(), __path__=[])
    nn = _stub_module("torch.nn", __path__=[])
    functional = _stub_module("torch.nn.functional")
    nn.functional = functional
    torch.nn = nn


def import_openpi(src: str, deps: str, force_stubs: list[str]) -> tuple[dict, list[str]]:
    """Put openpi's source and its pinned deps first on sys.path, stub what sampling does not need, import the
    modules. Returns ({name: module}, [notes on stubs])."""
    for p in (src, deps):
        if not os.path.isdir(p):
            raise SystemExit(f"{p} is not a directory")
    if not os.path.isfile(os.path.join(src, "openpi", "models", "pi0.py")):
        raise SystemExit(f"{src} has no openpi/models/pi0.py (give the folder that holds the openpi package)")
    if "jaxtyping" in sys.modules:
        raise SystemExit("jaxtyping was imported before openpi's deps were put on sys.path")
    sys.path.insert(0, os.path.abspath(src))
    sys.path.insert(0, os.path.abspath(deps))

    notes = []
    for name in ("augmax", "openpi.models_pytorch.pi0_pytorch"):
        _stub_module(name)
    notes.append("augmax, openpi.models_pytorch.pi0_pytorch: stubbed (as the fixture script)")
    if "orbax" not in sys.modules:
        _stub_module("orbax", __path__=[])
    _stub_module("orbax.checkpoint")
    notes.append("orbax.checkpoint: stubbed (used by openpi only to restore checkpoints)")
    for name in ("torch", "safetensors"):
        if name not in force_stubs:
            try:
                __import__(name)
                continue
            except ImportError:
                pass
        _stub_torch() if name == "torch" else _stub_module("safetensors", __path__=[])
        notes.append(f"{name}: stubbed ({'forced by --stub' if name in force_stubs else 'not installed'})")

    import jaxtyping

    if not os.path.abspath(jaxtyping.__file__).startswith(os.path.abspath(deps)):
        raise SystemExit(f"jaxtyping came from {jaxtyping.__file__}, not from --openpi-deps {deps}")

    import openpi.models.gemma as gemma
    from openpi.models import model as model_mod
    from openpi.models import pi0 as pi0_mod
    from openpi.models import pi0_config
    import openpi.models.siglip as siglip
    import openpi.shared.nnx_utils as nnx_utils

    mods = dict(gemma=gemma, model=model_mod, pi0=pi0_mod, pi0_config=pi0_config, siglip=siglip, nnx_utils=nnx_utils)
    deps_abs = os.path.abspath(deps)
    used = sorted({name.split(".")[0] for name, m in list(sys.modules.items())
                   if os.path.abspath(getattr(m, "__file__", None) or "/").startswith(deps_abs + os.sep)})
    notes.append(f"imported from --openpi-deps: {', '.join(used)}")
    return mods, notes


def patch_tiny(op: dict) -> None:
    """The fixture script's monkeypatches: two tiny Gemma variants, a 1024-token vocabulary, a tiny SigLIP."""
    gemma, siglip = op["gemma"], op["siglip"]
    original_get_config = gemma.get_config

    def get_config(variant):
        if variant in TINY_GEMMA:
            return gemma.Config(**TINY_GEMMA[variant])
        return original_get_config(variant)

    gemma.get_config = get_config
    gemma.PALIGEMMA_VOCAB_SIZE = TINY_VOCAB
    original_decode_variant = siglip.decode_variant

    def decode_variant(variant):
        if variant == "So400m/14":
            return dict(TINY_SIGLIP)
        return original_decode_variant(variant)

    siglip.decode_variant = decode_variant


# -- models ----------------------------------------------------------------------------------------------------------
def build_openpi(op: dict, size: str, dtype: str, param_dtype: str, perturb_zeros: bool):
    """openpi's random init, zero leaves perturbed, cast to param_dtype, installed by `config.load` (the serving
    path). Returns (model, config, flat params {path tuple: jax.Array}, info)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx, traverse_util

    kw = dict(TINY) if size == "tiny" else {}
    config = op["pi0_config"].Pi0Config(dtype=dtype, **kw)
    assert not config.pi05
    t0 = time.perf_counter()
    # eager, as the fixture script does (under jax.jit, XLA on CPU held ~45 GB for the full model)
    model = config.create(jax.random.key(0))
    n_all, n_param = len(jax.tree.leaves(nnx.state(model))), len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_all == n_param, f"openpi's model has non-Param state ({n_all} leaves vs {n_param} params)"
    flat = traverse_util.flatten_dict(nnx.state(model, nnx.Param).to_pure_dict())
    create_dtypes = sorted({str(v.dtype) for v in flat.values()})
    del model
    gc.collect()
    base = jax.random.key(PERTURB_SEED)
    zero_paths = []
    for i, path in enumerate(sorted(flat)):  # leaf by leaf, so the float32 copy is freed as it goes
        x = flat.pop(path)
        if not bool(jnp.any(x)):
            zero_paths.append("/".join(path))
            if perturb_zeros:
                x = x + PERTURB_SCALE * jax.random.normal(jax.random.fold_in(base, i), x.shape, x.dtype)
        flat[path] = x.astype(param_dtype)
        del x
    jax.block_until_ready(list(flat.values()))
    build_s = time.perf_counter() - t0
    model = config.load(traverse_util.unflatten_dict(flat), remove_extra_params=False)
    got = {str(v.dtype) for v in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert got == {param_dtype}, got
    n = sum(int(np.prod(v.shape)) for v in flat.values())
    info = dict(create_param_dtypes=create_dtypes, param_dtype=param_dtype, num_params=n,
                zero_leaves=zero_paths, zero_leaves_perturbed=perturb_zeros, build_s=round(build_s, 2))
    return model, config, flat, info


def build_vlajax(flat: dict, size: str, action_horizon: int, max_token_len: int, param_dtype: str):
    """vlajax's Pi0 over an abstract model, with openpi's arrays converted in (same values, same dtype)."""
    import jax
    from flax import nnx, traverse_util

    from vlajax.model.pi0 import Pi0, preset
    from vlajax.model.pi0.openpi_convert import config_from_params, load_into

    params = traverse_util.unflatten_dict(flat)
    cfg = config_from_params(params, action_horizon=action_horizon, max_token_len=max_token_len)
    want = preset(size)
    if cfg != want:
        raise SystemExit(f"openpi's parameters read as {cfg}, not vlajax's preset {size!r} {want}")
    t0 = time.perf_counter()
    model = load_into(nnx.eval_shape(lambda: Pi0(cfg, nnx.Rngs(0))), params)
    leaves = jax.tree.leaves(nnx.state(model))
    assert all(isinstance(x, jax.Array) for x in leaves), "some vlajax state was not filled from openpi's params"
    got = {str(x.dtype) for x in leaves}
    assert got == {param_dtype}, got
    jax.block_until_ready(leaves)
    n = sum(int(np.prod(x.shape)) for x in leaves)
    return model, cfg, dict(num_params=n, convert_s=round(time.perf_counter() - t0, 2))


def flops_per_call(cfg, steps: int, batch: int) -> float:
    """Matmul FLOPs of one sample_actions call (module docstring)."""
    v, llm, ex = cfg.vision, cfg.llm, cfg.expert
    n, w, p = v.num_patches, v.width, v.patch_size
    per_image = (2 * n * p * p * 3 * w
                 + v.depth * (2 * n * w * 3 * w + 2 * n * w * w + 2 * 2 * n * n * w + 2 * 2 * n * w * v.mlp_dim)
                 + 2 * n * w * llm.width)

    def gemma(g, tokens: int, keys: int) -> float:
        proj = 2 * g.width * (g.num_heads + 2 * g.num_kv_heads) * g.head_dim + 2 * g.num_heads * g.head_dim * g.width
        mlp = 3 * 2 * g.width * g.mlp_dim
        attn = 2 * 2 * g.num_heads * g.head_dim * keys
        return g.depth * tokens * (proj + mlp + attn)

    prefix = cfg.num_images * n + cfg.max_token_len
    h, a, e = cfg.action_horizon, cfg.action_dim, ex.width
    suffix = 1 + h
    heads = 2 * a * e + 2 * h * a * e + 2 * h * 2 * e * e + 2 * h * e * e + 2 * h * e * a
    row = cfg.num_images * per_image + gemma(llm, prefix, prefix) + steps * (gemma(ex, suffix, prefix + suffix) + heads)
    return float(batch * row)


# -- inputs and the two samplers ------------------------------------------------------------------------------------
def make_inputs(op: dict, batch: int, action_dim: int, action_horizon: int, max_token_len: int, vocab: int,
                seed: int):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    keys = list(op["model"].IMAGE_KEYS)
    res = tuple(op["model"].IMAGE_RESOLUTION)
    images = {k: rng.uniform(-1.0, 1.0, (batch, *res, 3)).astype(np.float32) for k in keys}
    masks = {k: np.full((batch,), k != "right_wrist_0_rgb") for k in keys}
    n_valid = max(1, (max_token_len * 5) // 12)
    tokens = rng.integers(1, vocab, (batch, max_token_len), dtype=np.int32)
    token_mask = np.zeros((batch, max_token_len), bool)
    token_mask[:, :n_valid] = True
    tokens[~token_mask] = 0
    state = rng.standard_normal((batch, action_dim), dtype=np.float32)
    noise = rng.standard_normal((batch, action_horizon, action_dim), dtype=np.float32)
    obs = op["model"].Observation(
        images={k: jnp.asarray(v) for k, v in images.items()},
        image_masks={k: jnp.asarray(v) for k, v in masks.items()},
        state=jnp.asarray(state), tokenized_prompt=jnp.asarray(tokens), tokenized_prompt_mask=jnp.asarray(token_mask))
    ours = (jnp.asarray(np.stack([images[k] for k in keys], axis=1)),
            jnp.asarray(np.stack([masks[k] for k in keys], axis=1)), jnp.asarray(tokens), jnp.asarray(token_mask),
            jnp.asarray(state), jnp.asarray(noise))
    return obs, ours, jnp.asarray(noise), dict(n_valid_tokens=n_valid)


def make_samplers(op: dict, openpi_model, vlajax_model, steps: int, dtype: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    # openpi: exactly what openpi.policies.policy.Policy does
    openpi_jit = op["nnx_utils"].module_jit(openpi_model.sample_actions)

    def run_openpi(obs, noise):
        return openpi_jit(jax.random.key(0), obs, num_steps=steps, noise=noise)

    graphdef, state = nnx.split(vlajax_model)
    compute = jnp.dtype(dtype)

    @jax.jit
    def vlajax_jit(state, images, image_masks, tokens, token_mask, robot_state, noise):
        model = nnx.merge(graphdef, state)
        return model.sample_actions(images, image_masks, tokens, token_mask, robot_state, noise, num_steps=steps,
                                    dtype=compute)

    def run_vlajax(inputs):
        return vlajax_jit(state, *inputs)

    return run_vlajax, run_openpi


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    out.block_until_ready()
    return time.perf_counter() - t0, out


def bench_batch(run_vlajax, run_openpi, obs, ours, noise, iters: int, warmup: int) -> dict:
    fns = {"vlajax": lambda: run_vlajax(ours), "openpi": lambda: run_openpi(obs, noise)}
    first, outs = {}, {}
    for name, fn in fns.items():
        first[name], outs[name] = _timed(fn)
    a, b = np.asarray(outs["vlajax"], np.float32), np.asarray(outs["openpi"], np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    for _ in range(warmup):
        for fn in fns.values():
            fn().block_until_ready()
    times = {name: [] for name in fns}
    order = list(fns)
    for i in range(iters):
        for name in (order if i % 2 == 0 else order[::-1]):
            times[name].append(_timed(fns[name])[0])
    return dict(
        first_call_s={k: round(v, 3) for k, v in first.items()},
        times_ms={k: [round(t * 1e3, 4) for t in v] for k, v in times.items()},
        median_ms={k: float(np.median(v)) * 1e3 for k, v in times.items()},
        min_ms={k: float(np.min(v)) * 1e3 for k, v in times.items()},
        max_abs_diff=float(np.max(np.abs(a - b))),
        max_abs_actions=float(np.max(np.abs(b))),
        finite=bool(np.isfinite(a).all() and np.isfinite(b).all()),
    )


# -- main -----------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--openpi-src", required=True, help="folder holding the openpi package (openpi's src/)")
    ap.add_argument("--openpi-deps", required=True, help="pip --target folder with jaxtyping 0.2.36 and beartype")
    ap.add_argument("--size", choices=("pi0", "tiny"), default="pi0")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=10, help="denoising (Euler) steps")
    ap.add_argument("--iters", type=int, default=20, help="timed calls of each implementation per batch size")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each after the first")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype (both)")
    ap.add_argument("--param-dtype", choices=("same", "bfloat16", "float32"), default="same",
                    help="parameter dtype of both (same: the compute dtype, as openpi serves bf16 checkpoints)")
    ap.add_argument("--no-perturb-zeros", action="store_true", help="keep openpi's zero-initialised leaves at zero")
    ap.add_argument("--check-tol", type=float, default=None,
                    help="fail if the actions differ by more (default: 1e-4 for tiny in float32, else no check)")
    ap.add_argument("--peak-n", type=int, default=None, help="matmul size of the peak (default 8192; 1024 on CPU)")
    ap.add_argument("--build-only", action="store_true", help="build, convert and trace abstractly; no compile/timing")
    ap.add_argument("--stub", action="append", default=[], choices=("torch", "safetensors"),
                    help="stub this module even if installed (tests the stub path)")
    ap.add_argument("--out", default=None, help="JSON result file")
    args = ap.parse_args()
    param_dtype = args.dtype if args.param_dtype == "same" else args.param_dtype
    check_tol = args.check_tol
    if check_tol is None and args.size == "tiny" and args.dtype == "float32" and param_dtype == "float32":
        check_tol = 1e-4

    op, stub_notes = import_openpi(args.openpi_src, args.openpi_deps, args.stub)
    if args.size == "tiny":
        patch_tiny(op)
    sys.path.insert(0, REPO)

    import flax
    import jax
    import jaxlib

    from benchmarks.peak import jax_matmul_tflops

    dev = jax.devices()[0]
    print(f"device {dev.platform} {dev.device_kind}; jax {jax.__version__}, flax {flax.__version__}; "
          f"size {args.size}, dtype {args.dtype}, params {param_dtype}", flush=True)
    for note in stub_notes:
        print("  " + note)

    openpi_model, config, flat, openpi_info = build_openpi(op, args.size, args.dtype, param_dtype,
                                                           not args.no_perturb_zeros)
    print(f"openpi: {openpi_info['num_params']:,} params (create() made {openpi_info['create_param_dtypes']}, "
          f"cast to {param_dtype}; {len(openpi_info['zero_leaves'])} all-zero leaves"
          f"{' perturbed' if openpi_info['zero_leaves_perturbed'] else ''}) in "
          f"{openpi_info['build_s']} s", flush=True)
    vlajax_model, cfg, vlajax_info = build_vlajax(flat, args.size, config.action_horizon, config.max_token_len,
                                                  param_dtype)
    del flat
    assert vlajax_info["num_params"] == openpi_info["num_params"], (vlajax_info, openpi_info)
    print(f"vlajax: same {vlajax_info['num_params']:,} params converted in {vlajax_info['convert_s']} s", flush=True)
    vocab = TINY_VOCAB if args.size == "tiny" else PI0_VOCAB
    run_vlajax, run_openpi = make_samplers(op, openpi_model, vlajax_model, args.steps, args.dtype)

    result = dict(
        what="pi0 sample_actions: vlajax vs openpi (JAX), same random weights, one process",
        openpi_commit=OPENPI_COMMIT, openpi_src=os.path.abspath(args.openpi_src),
        versions=dict(jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__, numpy=np.__version__,
                      python=platform.python_version(),
                      jaxtyping=__import__("importlib.metadata").metadata.version("jaxtyping")),
        device=dict(platform=dev.platform, kind=dev.device_kind, count=jax.device_count()),
        xla_flags=os.environ.get("XLA_FLAGS"),
        size=args.size, dtype=args.dtype, param_dtype=param_dtype, steps=args.steps, iters=args.iters,
        warmup=args.warmup,
        model=dict(prefix_tokens=cfg.num_images * cfg.num_image_tokens + cfg.max_token_len,
                   suffix_tokens=1 + cfg.action_horizon, action_horizon=cfg.action_horizon,
                   action_dim=cfg.action_dim, max_token_len=cfg.max_token_len, vocab=vocab),
        weights=dict(init="openpi Pi0Config.create(jax.random.key(0))",
                     zero_leaves=len(openpi_info["zero_leaves"]),
                     zero_leaves_perturbed=openpi_info["zero_leaves_perturbed"], perturb_scale=PERTURB_SCALE,
                     create_param_dtypes=openpi_info["create_param_dtypes"],
                     note=f"both hold the same {param_dtype} arrays; openpi's installed with config.load (serving)"),
        jit=dict(openpi="openpi.shared.nnx_utils.module_jit(model.sample_actions)(rng, obs, num_steps=, noise=)",
                 vlajax="jax.jit over nnx.split state; Pi0.sample_actions(..., num_steps=static, dtype=)"),
        inputs="3 images U[-1,1] 224px; image masks base/left True, right wrist False; prompt first 5/12 valid",
        stubs=stub_notes, openpi_build=openpi_info, vlajax_build=vlajax_info, batches={},
    )

    if args.build_only:
        for b in args.batch:
            obs, ours, noise, _ = make_inputs(op, b, cfg.action_dim, cfg.action_horizon, cfg.max_token_len, vocab,
                                              INPUT_SEED)
            t0 = time.perf_counter()
            sv = jax.eval_shape(lambda: run_vlajax(ours))
            so = jax.eval_shape(lambda: run_openpi(obs, noise))
            assert sv.shape == so.shape == (b, cfg.action_horizon, cfg.action_dim), (sv, so)
            fl = flops_per_call(cfg, args.steps, b)
            print(f"batch {b}: both trace to {sv.shape} {sv.dtype}/{so.dtype} ({time.perf_counter() - t0:.1f} s); "
                  f"{fl / 1e9:,.1f} GFLOP per call", flush=True)
            result["batches"][str(b)] = dict(traced_shape=list(sv.shape), gflop_per_call=fl / 1e9)
        _write(args.out, result)
        return

    if args.peak_n is None:
        args.peak_n = 1024 if dev.platform == "cpu" else 8192
    reps, rounds = (2, 2) if dev.platform == "cpu" else (10, 5)
    peak = jax_matmul_tflops(args.peak_n, reps, rounds)
    result["peak"] = dict(bf16_matmul_tflops=peak, n=args.peak_n, reps=reps, rounds=rounds,
                          note="benchmarks/peak.py jax_matmul_tflops, median round" +
                               ("; CPU: not a meaningful peak" if dev.platform == "cpu" else ""))
    print(f"bf16 matmul peak ({args.peak_n}^3): {peak:.3g} TFLOP/s", flush=True)

    failed = []
    for b in args.batch:
        obs, ours, noise, extra = make_inputs(op, b, cfg.action_dim, cfg.action_horizon, cfg.max_token_len, vocab,
                                              INPUT_SEED)
        r = bench_batch(run_vlajax, run_openpi, obs, ours, noise, args.iters, args.warmup)
        fl = flops_per_call(cfg, args.steps, b)
        r.update(extra, gflop_per_call=fl / 1e9, ratio_median=r["median_ms"]["vlajax"] / r["median_ms"]["openpi"],
                 ratio_min=r["min_ms"]["vlajax"] / r["min_ms"]["openpi"])
        r["tflops"] = {k: fl / (v * 1e-3) / 1e12 for k, v in r["median_ms"].items()}
        r["frac_peak"] = {k: v / peak for k, v in r["tflops"].items()}
        result["batches"][str(b)] = r
        print(f"batch {b}: vlajax {r['median_ms']['vlajax']:.2f} ms, openpi {r['median_ms']['openpi']:.2f} ms "
              f"(ratio {r['ratio_median']:.3f}); first calls {r['first_call_s']}; max |diff| {r['max_abs_diff']:.2e} "
              f"(max |actions| {r['max_abs_actions']:.2f})", flush=True)
        if not r["finite"]:
            failed.append(f"batch {b}: non-finite actions")
        if check_tol is not None and r["max_abs_diff"] > check_tol:
            failed.append(f"batch {b}: actions differ by {r['max_abs_diff']:.3e} > {check_tol}")

    print()
    print(f"π0 sample_actions, {args.steps} steps, {args.dtype} compute / {param_dtype} params, {dev.device_kind}; "
          f"peak {peak:.3g} TFLOP/s (bf16 {args.peak_n}^3 matmul); medians of {args.iters} calls")
    print()
    print("| batch | vlajax ms (median / min) | openpi ms (median / min) | vlajax / openpi | GFLOP / call "
          "| vlajax TFLOP/s (% peak) | openpi TFLOP/s (% peak) | first call s (vlajax / openpi) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b, r in result["batches"].items():
        md, mn, tf, fp = r["median_ms"], r["min_ms"], r["tflops"], r["frac_peak"]
        print(f"| {b} | {md['vlajax']:.2f} / {mn['vlajax']:.2f} | {md['openpi']:.2f} / {mn['openpi']:.2f} "
              f"| {r['ratio_median']:.3f} | {r['gflop_per_call']:,.1f} "
              f"| {tf['vlajax']:.3g} ({100 * fp['vlajax']:.1f}%) | {tf['openpi']:.3g} ({100 * fp['openpi']:.1f}%) "
              f"| {r['first_call_s']['vlajax']:.1f} / {r['first_call_s']['openpi']:.1f} | {r['max_abs_diff']:.2e} |")
    result["check"] = dict(tol=check_tol, failures=failed)
    _write(args.out, result)
    if failed:
        raise SystemExit("FAILED: " + "; ".join(failed))


def _write(path: str | None, result: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
