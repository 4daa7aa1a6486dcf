"""The GRPO/PPO learner: train state, one jitted, sharded update per mini-batch, checkpoints.

One `Learner.update(batch)` = one optimizer step over a mini-batch of M samples (one sample = one
policy call with its 56 action tokens, `vlajax.rl.samples`):

* the mini-batch is cut into K = M / (micro_batch_size * devices) micro-batches inside the jit
  (a `lax.scan`; sample i goes to micro-batch i % K, so every micro-batch is spread evenly over
  the devices without moving data); gradients are summed in fp32;
* loss (objective "ppo") = PPO-clip (`vlajax.rl.loss.ppo_clip_loss`) on the log-probs of the samples at the
  rollout temperature (OFT: tokens over the 256 action bins), token-mean over the valid tokens of the whole
  mini-batch (each micro-batch divides by the mini-batch's token count, so the sum of the
  micro-batch losses is the mini-batch mean); entropy bonus and KL are off by default;
  objective "nll" (SFT, `vlajax sft`): token-mean NLL of the target tokens at temperature 1, same
  normalisation, token accuracy as a metric;
* clip by global norm (1.0), AdamW (lr 5e-6 constant, betas 0.9/0.999, eps 1e-8, weight decay
  0.01 on every parameter, as torch AdamW in the reference); the learning rate lives in the
  train state (`set_lr`: schedules without recompiling);
* a step whose loss or gradient norm is not finite leaves parameters and optimizer state exactly
  as they were (`jnp.where` on every leaf), and is counted (`skipped`, `skipped_total`);
* fp32 master weights, bf16 compute (every layer casts its parameters at use), rematerialised
  transformer blocks (LLM and both ViT towers), the train state donated to the step.

Sharding: parameters, gradients and optimizer state follow the logical-axis rules of
`vlajax.distributed.sharding` (FSDP over the "fsdp" mesh axis); the batch is split over
("data", "fsdp"). The same code runs on 1 CPU, N fake CPU devices, one GPU or several; for
several hosts call `vlajax.distributed.sharding.maybe_initialize_distributed()` before anything
touches jax, and pass each process's slice of the batch, or the global arrays
`vlajax.distributed.multihost.global_batch` assembled from those slices.

Batch (a dict; numpy or jax arrays, M = mini-batch size, a multiple of `batch_multiple`):
  images         uint8 (M, H, W, 3) or (M, n_img, H, W, 3): raw frames, preprocessed inside the
                 step (the model's `preprocess_images`; 150 KB per frame to move
                 instead of 1.2 MB of float pixels), or
  pixel_values   float32 (M, 6*n_img, S, S) already preprocessed;
  input_ids      int32 (M, P) right-padded prompts; attention_mask (M, P)
  proprio        float32 (M, D), only for policies with a proprio projector
  tokens         (M, 56) what the rollout sampled, in the family's `sample_dtype` (OFT: int32 action
                 bins 0..255); scored by the family's `ActionModel.log_prob`
  old_logp       float32 (M, 56) their log-probs under the rollout policy, same temperature
  advantages     float32 (M,) or (M, 56)
  mask           float32 (M, 56) 1 = valid token. Padding samples (`samples.pad_samples`) have
                 mask 0: they add nothing (their pixels are zeroed, NaN there cannot leak).
  crop_offsets   float32 (M, 2), optional: the training crop's position per sample
                 (`preprocess.random_crop_resize`, SFT augmentation) instead of the centre crop
  (objective "nll" reads tokens = the target bins and mask; no old_logp / advantages)
  ref_logp       float32 (M, 56), optional with kl_coef > 0: the reference policy's log-probs; when
                 absent the learner computes them with its own reference (below)

KL to a reference policy (kl_coef > 0, verl's `use_kl_loss`): the reference is the policy as the
learner got it. With LoRA it is the base model with the adapters off (the adapters zeroed: no extra
memory, one more forward per mini-batch); with full parameters it is a frozen copy of the initial
weights in the compute dtype: 2 B/param, 15.0 GB for the 7B in bf16 (so 120 + 15 GB + activations
on one H200), plus one more forward per mini-batch (~1/3 of an update's compute).

Memory plan (OpenVLA-OFT 7B: 7.50e9 parameters in the model, 6.74e9 of them in the LLM)
------------------------------------------------------------------------------------------
Full-parameter training, per parameter:
  fp32 master weights 4 B + fp32 gradients 4 B (the accumulator carried over micro-batches; with
  one micro-batch the gradient itself) + AdamW mu and nu 4 + 4 B = 16 B/param
  -> 7.50e9 x 16 B = 120.0 GB (111.7 GiB).
  bf16 compute copies: each layer casts its weights to bf16 where they are used (2 B/param of
  that layer, transient, recomputed in the backward pass under remat). If XLA hoists the casts
  out of the micro-batch loop, a whole bf16 copy stays live: +2 B/param = 15.0 GB.
  Activations with remat (per sample of ~350 LLM tokens: 1 BOS + 256 patches + ~34 prompt + 56
  + 1): the input of each of the 32 LLM blocks, 350 x 4096 x 2 B = 2.9 MB per block -> 92 MB,
  plus the inputs of the 23 + 26 ViT blocks (~261 tokens x ~1100 x 2 B -> 28 MB), plus one
  block's recomputed working set (~50 MB): ~0.17 GB/sample, i.e. ~1.4 GB for a micro-batch of 8.
  remat="dots" also keeps the Linear outputs: +2.7 MB/token in the LLM (~0.95 GB/sample).
  => one H200 (141 GB; 143,771 MiB = 150.8 GB on the lent machines) holds it: 120.0 GB + 15.0 GB
  if the bf16 copy is hoisted + ~2-5 GB activations and workspace. One 80 GB H100 does not; on N
  GPUs FSDP divides the 16 B/param by N.
LoRA (rank 32 on q/k/v/o/gate/up/down of the 32 LLM layers: 80M adapter params):
  adapters 16 B/param -> 1.3 GB; the frozen base is cast once to bf16 (`frozen_dtype`) and held
  only as that: 2 B/param -> 15.0 GB; no gradient or optimizer state for it; nothing before the
  LLM is trainable, so the vision towers and projector get no backward pass at all.
  Activations as above (the LLM part) -> ~17 GB + activations: fits one 80 GB H100 with
  micro-batches of 16+.
`benchmarks/bench_update.py` reports the measured peak (`peak_bytes_in_use`) next to this plan.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlajax.distributed.sharding import BATCH_AXES, make_mesh, place, shard_batch, state_shardings
from vlajax.rl.checkpoint import CheckpointManager, Restored
from vlajax.rl.compile_ahead import CompileAhead, abstract
from vlajax.rl.lora import has_lora, trainable_filter
from vlajax.rl.loss import masked_mean, ppo_clip_loss

__all__ = ["LearnerConfig", "TrainState", "Learner", "make_optimizer", "set_remat", "BATCH_KEYS"]

BATCH_KEYS = ("images", "pixel_values", "input_ids", "attention_mask", "proprio", "tokens", "old_logp",
              "advantages", "mask", "ref_logp", "crop_offsets")
OBJECTIVES = ("ppo", "nll")
_REQUIRED = {"ppo": ("input_ids", "attention_mask", "tokens", "old_logp", "advantages", "mask"),
             "nll": ("input_ids", "attention_mask", "tokens", "mask")}
# ppo_clip_loss metrics divided by the mini-batch token count (summed over micro-batches); the
# others are micro-batch token means (weighted by the micro-batch's share of valid tokens).
_SUMMED = ("loss", "pg_loss", "kl_loss", "valid_tokens")
# the nll objective's metrics (`Learner.evaluate` returns them for any objective's batch)
NLL_METRICS = ("loss", "nll", "token_accuracy", "entropy", "valid_tokens")
# Checkpoints of earlier versions hold an RNG key that nothing used; restoring reads past it.
LEGACY_RNG = "rng"


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Hyper-parameters of the update (defaults: SimpleVLA-RL / verl LIBERO recipe). A run builds
    it from its config (`ActorRolloutRefConfig.learner_config`), which checks the ranges and names
    the keys; direct callers (tests, benchmarks) get no second check here.

    lr: the initial learning rate (a runtime value afterwards: `Learner.set_lr`).
    b1, b2, eps, weight_decay, grad_clip: the optimizer (`optimizer()`); grad_clip None = no clip.
    micro_batch_size: samples per device per micro-batch (verl's ppo_micro_batch_size_per_gpu).
    remat: False, True (= "full") or "dots" (`vlajax.model.layers.REMAT_POLICIES`).
    frozen_dtype: what the parameters LoRA leaves frozen are held in (a policy with adapters,
      `vlajax.rl.lora.with_lora`, trains only them).
    image_flip / image_center_crop: `preprocess_images` options for uint8 `images` batches (must
      match what the rollout fed the policy).
    objective: "ppo" (PPO-clip on rollout samples, the RL update) or "nll" (supervised fine-tuning:
      token-mean negative log-likelihood of the target `tokens` at temperature 1, with token
      accuracy as a metric; batches need no old_logp / advantages). One learner serves both, so SFT
      gets the same sharded step, micro-batching, remat, LoRA, clipping, AdamW and checkpoints.
    """

    lr: float = 5e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    micro_batch_size: int = 2
    temperature: float = 1.6
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip_c: float | None = 3.0
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"
    remat: bool | str = True
    compute_dtype: str = "bfloat16"
    frozen_dtype: str = "bfloat16"
    image_flip: bool = True
    image_center_crop: bool = True
    objective: str = "ppo"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"LearnerConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")

    def optimizer(self) -> optax.GradientTransformation:
        """The update rule without the learning rate (see `make_optimizer`); equal fields give the
        same object, so the compiled step is shared."""
        return make_optimizer(b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay,
                              grad_clip=self.grad_clip)

    def static(self) -> "LearnerConfig":
        """The fields the compiled step depends on (lr is a traced value)."""
        return dataclasses.replace(self, lr=0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """What the jitted step reads and donates. params: the trained parameters (pure dict, fp32);
    lr: f32 scalar; step: int32 number of updates run (skipped ones included); skipped: int32."""

    params: Any
    opt_state: Any
    lr: jax.Array
    step: jax.Array
    skipped: jax.Array


@functools.lru_cache(maxsize=None)
def make_optimizer(*, b1: float, b2: float, eps: float, weight_decay: float,
                   grad_clip: float | None) -> optax.GradientTransformation:
    """clip(global norm) -> Adam moments -> + weight_decay * param; the step applies -lr (as
    optax.adamw's last stage does) so that lr stays a runtime value. Cached: a jitted step takes the
    optimizer as a static argument, and a new chain object per call would recompile it."""
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
    if weight_decay:
        parts += [optax.add_decayed_weights(weight_decay)]
    return optax.chain(*parts)


def set_remat(model: nnx.Module, remat: bool | str) -> None:
    """Set the `remat` attribute of every submodule that has one (the policy: LLM blocks; the ViTs)."""
    for _, m in nnx.iter_modules(model):
        if hasattr(m, "remat"):
            m.remat = remat


# -- pure-dict helpers --------------------------------------------------------------------------
def _flat(d) -> dict:
    return traverse_util.flatten_dict(d) if d else {}


def _merge_dicts(a, b) -> dict:
    return traverse_util.unflatten_dict({**_flat(a), **_flat(b)})


def _split_like(full, like) -> tuple[dict, dict]:
    """Split `full` into (the keys of `like`, the rest)."""
    f, keys = _flat(full), set(_flat(like))
    a = {k: v for k, v in f.items() if k in keys}
    b = {k: v for k, v in f.items() if k not in keys}
    return (traverse_util.unflatten_dict(a) if a else {}), (traverse_util.unflatten_dict(b) if b else {})


def _param_shardings(graphdef, params, frozen, mesh) -> tuple[dict, dict]:
    """NamedSharding pure dicts for (params, frozen) from the model's logical_axes metadata."""
    model = nnx.merge(graphdef, params, frozen)
    lora = has_lora(model)
    _, t, f = nnx.split(model, trainable_filter(lora), ...)
    return (nnx.to_pure_dict(state_shardings(t, mesh)), nnx.to_pure_dict(state_shardings(f, mesh)))


def _opt_shardings(tx, opt_state, param_sh, mesh):
    repl = NamedSharding(mesh, P())
    return optax.tree_map_params(tx, lambda _, s: s, opt_state, param_sh, transform_non_params=lambda _: repl)


def _constrain(tree, shardings):
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)


# -- the jitted step ------------------------------------------------------------------------------
def _n_devices(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def _micro_split(batch: dict, k: int, mesh: Mesh) -> dict:
    """(M, ...) -> (K, M/K, ...), micro-batch j = samples j, j+K, j+2K, ...: the (M/K) dim keeps the
    input's contiguous split over the devices, so no data moves."""
    sh = NamedSharding(mesh, P(None, BATCH_AXES))

    def one(x):
        x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, sh)

    return jax.tree.map(one, batch)


def _micro_merge(x: jax.Array) -> jax.Array:
    """Inverse of `_micro_split` for one (K, M/K, ...) array."""
    x = x.swapaxes(0, 1)
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _observation(mb, *, model, cfg: LearnerConfig) -> tuple:
    """(pixel_values, input_ids, attention_mask, proprio) of a micro-batch, as the rollout fed the
    policy (frames preprocessed as the rollout did; with `crop_offsets`, the training crop at those
    positions instead of the centre crop)."""
    if "images" in mb:
        pv = model.preprocess_images(mb["images"], flip=cfg.image_flip, center_crop=cfg.image_center_crop,
                                     crop_offsets=mb.get("crop_offsets"))
    else:
        pv = mb["pixel_values"].astype(jnp.float32)
    # Samples without a valid token (padding) get zero pixels: NaN/inf there would reach the
    # parameter gradients through 0 * NaN even though their loss weight is 0.
    row_valid = jnp.any(mb["mask"] > 0, axis=-1)
    pv = jnp.where(row_valid.reshape((-1,) + (1,) * (pv.ndim - 1)), pv, 0.0)
    proprio = mb.get("proprio")
    if proprio is not None:
        proprio = jnp.where(row_valid[:, None], proprio, 0.0)
    return pv, mb["input_ids"], mb["attention_mask"], proprio


def _log_prob(params, frozen, mb, temperature: float, *, graphdef, cfg: LearnerConfig):
    """(logp, entropy, mode), each (B, T), of `mb["tokens"]` (what the policy sampled) at
    `temperature`: the family's `ActionModel.log_prob`."""
    model = nnx.merge(graphdef, params, frozen)
    return model.log_prob(*_observation(mb, model=model, cfg=cfg), mb["tokens"], temperature=temperature,
                          dtype=jnp.dtype(cfg.compute_dtype))


def _forward_logp(params, frozen, mb, *, graphdef, cfg: LearnerConfig):
    """(logp, entropy), each (B, T) f32, of `mb["tokens"]` at the rollout temperature."""
    logp, ent, _ = _log_prob(params, frozen, mb, cfg.temperature, graphdef=graphdef, cfg=cfg)
    return logp, ent


def _nll_loss(params, frozen, mb, num_tokens, *, graphdef, cfg: LearnerConfig):
    """Token-mean NLL of the target tokens at temperature 1 (divided by the mini-batch's token count
    `num_tokens`, so micro-batch losses sum to the mini-batch mean) and its metrics (`NLL_METRICS`:
    nll, token_accuracy = the mode equals the target, entropy, as micro-batch token means)."""
    logp, ent, mode = _log_prob(params, frozen, mb, 1.0, graphdef=graphdef, cfg=cfg)
    maskf = (mb["mask"] > 0).astype(jnp.float32)
    nll = jnp.where(maskf > 0, -logp, 0.0)
    loss = masked_mean(nll, maskf, num_tokens)
    hit = (mode == mb["tokens"]).astype(jnp.float32)
    sg = jax.lax.stop_gradient
    return loss, {"loss": sg(loss), "nll": sg(masked_mean(nll, maskf)), "token_accuracy": masked_mean(hit, maskf),
                  "entropy": sg(masked_mean(jnp.where(maskf > 0, ent, 0.0), maskf)), "valid_tokens": jnp.sum(maskf)}


def _micro_loss(params, frozen, mb, num_tokens, *, graphdef, cfg: LearnerConfig):
    if cfg.objective == "nll":
        return _nll_loss(params, frozen, mb, num_tokens, graphdef=graphdef, cfg=cfg)
    logp, ent = _forward_logp(params, frozen, mb, graphdef=graphdef, cfg=cfg)
    return ppo_clip_loss(
        logp, mb["old_logp"], mb["advantages"], mb["mask"], clip_low=cfg.clip_low, clip_high=cfg.clip_high,
        dual_clip_c=cfg.dual_clip_c, entropy=ent, entropy_coef=cfg.entropy_coef, ref_logp=mb.get("ref_logp"),
        kl_coef=cfg.kl_coef, kl_type=cfg.kl_type, num_tokens=num_tokens)


def _combine(stacked: dict) -> dict:
    """Per-micro-batch metrics (K, ...) -> the mini-batch's: `_SUMMED` ones summed, the others
    weighted by each micro-batch's share of the valid tokens."""
    ntok = stacked["valid_tokens"]
    w = ntok / jnp.maximum(jnp.sum(ntok), 1.0)
    return {name: (jnp.sum(v) if name in _SUMMED else jnp.sum(w * v)) for name, v in stacked.items()}


def _grads_and_metrics(params, frozen, batch, *, graphdef, cfg: LearnerConfig, mesh: Mesh):
    """Sum of micro-batch gradients (= gradient of the mini-batch token-mean loss) and metrics."""
    m = batch["mask"].shape[0]
    k = m // (cfg.micro_batch_size * _n_devices(mesh))
    num_tokens = jnp.sum(batch["mask"] > 0).astype(jnp.float32)
    param_sh, _ = _param_shardings(graphdef, params, frozen, mesh)
    grad_fn = jax.value_and_grad(functools.partial(_micro_loss, graphdef=graphdef, cfg=cfg), has_aux=True)
    if k == 1:
        (_, metrics), grads = grad_fn(params, frozen, batch, num_tokens)
        grads = _constrain(grads, param_sh)
        stacked = jax.tree.map(lambda x: x[None], metrics)
    else:
        def body(acc, mb):
            (_, met), g = grad_fn(params, frozen, mb, num_tokens)
            return _constrain(jax.tree.map(jnp.add, acc, g), param_sh), met

        acc0 = _constrain(jax.tree.map(jnp.zeros_like, params), param_sh)
        grads, stacked = jax.lax.scan(body, acc0, _micro_split(batch, k, mesh))
    metrics = _combine(stacked)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["num_micro_batches"] = jnp.asarray(k, jnp.int32)
    if cfg.objective != "ppo":
        return grads, metrics
    # advantage statistics over valid tokens
    valid = batch["mask"] > 0
    adv = batch["advantages"].astype(jnp.float32)
    adv = jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, valid.shape)
    mean = masked_mean(adv, valid)
    any_valid = jnp.any(valid)
    metrics.update(
        adv_mean=mean,
        adv_std=jnp.sqrt(masked_mean(jnp.square(adv - mean), valid)),
        adv_max=jnp.where(any_valid, jnp.max(jnp.where(valid, adv, -jnp.inf)), 0.0),
        adv_min=jnp.where(any_valid, jnp.min(jnp.where(valid, adv, jnp.inf)), 0.0),
        valid_samples=jnp.sum(jnp.any(valid, -1)).astype(jnp.float32),
    )
    return grads, metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "mesh"), donate_argnums=(0,))
def _update(state: TrainState, frozen, batch, *, graphdef, cfg: LearnerConfig, mesh: Mesh):
    tx = cfg.optimizer()
    grads, metrics = _grads_and_metrics(state.params, frozen, batch, graphdef=graphdef, cfg=cfg, mesh=mesh)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, jax.tree.map(lambda u: -state.lr * u, updates))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    param_sh, _ = _param_shardings(graphdef, state.params, frozen, mesh)
    params = _constrain(keep(params, state.params), param_sh)
    opt_state = _constrain(keep(opt_state, state.opt_state), _opt_shardings(tx, opt_state, param_sh, mesh))
    skipped = state.skipped + (~ok).astype(jnp.int32)
    metrics.update(skipped=(~ok).astype(jnp.int32), skipped_total=skipped, step=state.step + 1, lr=state.lr)
    return TrainState(params, opt_state, state.lr, state.step + 1, skipped), metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "mesh"))
def _grads(params, frozen, batch, *, graphdef, cfg, mesh):
    return _grads_and_metrics(params, frozen, batch, graphdef=graphdef, cfg=cfg, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "mesh"))
def _evaluate(params, frozen, batch, *, graphdef, cfg, mesh):
    """The nll objective's metrics of a batch, micro-batched like the update, without gradients."""
    k = batch["tokens"].shape[0] // (cfg.micro_batch_size * _n_devices(mesh))
    num_tokens = jnp.sum(batch["mask"] > 0).astype(jnp.float32)
    fn = lambda mb: _nll_loss(params, frozen, mb, num_tokens, graphdef=graphdef, cfg=cfg)[1]  # noqa: E731
    stacked = jax.tree.map(lambda x: x[None], fn(batch)) if k == 1 else jax.lax.map(fn, _micro_split(batch, k, mesh))
    return _combine(stacked)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "mesh"))
def _logprobs(params, frozen, batch, *, graphdef, cfg, mesh):
    k = batch["tokens"].shape[0] // (cfg.micro_batch_size * _n_devices(mesh))
    fwd = functools.partial(_forward_logp, params, frozen, graphdef=graphdef, cfg=cfg)
    if k == 1:
        return fwd(batch)
    logp, ent = jax.lax.map(fwd, _micro_split(batch, k, mesh))
    return _micro_merge(logp), _micro_merge(ent)


# -- the learner ----------------------------------------------------------------------------------
_DTYPES = {"input_ids": np.int32, "attention_mask": np.int32, "tokens": np.int32, "old_logp": np.float32,
           "advantages": np.float32, "mask": np.float32, "ref_logp": np.float32, "proprio": np.float32,
           "pixel_values": np.float32, "crop_offsets": np.float32}


def _cast(batch: Mapping[str, Any], sample_dtype=np.int32) -> dict:
    """The batch keys a step reads, in the dtypes it compiles for (`tokens`: the family's
    `sample_dtype`)."""
    dtypes = {**_DTYPES, "tokens": np.dtype(sample_dtype)}
    out = {}
    for k in BATCH_KEYS:
        if k in batch and batch[k] is not None:
            x = batch[k]
            if not isinstance(x, jax.Array):
                x = np.asarray(x)
            if k in dtypes and x.dtype != dtypes[k]:
                x = x.astype(dtypes[k])
            out[k] = x
    return out


def _signature(batch: Mapping[str, Any]) -> tuple:
    """What a compiled update is specific to: each key's shape and dtype."""
    return tuple(sorted((k, tuple(np.shape(x)), np.dtype(x.dtype).name) for k, x in batch.items()))


def _place(tree: dict, shardings: dict, dtype) -> dict:
    """Shard, then cast floats to `dtype`. Arrays already right are taken over, not copied: a 7B
    policy's fp32 weights must not exist twice on one GPU."""
    def one(x, s):
        x = place(x, s)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x
    return jax.tree.map(one, tree, shardings)


class Learner:
    """Owns the train state: the trained parameters, the frozen rest, the optimizer state.

    Args:
      policy: a family's `Policy` (e.g. `vlajax.model.oft.Policy`), trained as it is: with LoRA when it has adapters (add them
        with `vlajax.rl.lora.with_lora` first), full-parameter otherwise. The Policy object is not
        changed, but its parameter arrays are taken over where they already have the learner's
        sharding and dtype (no copy), and the first `update` donates them: use `decode_params()` or
        `policy` (here) for the current parameters from then on.
      cfg: LearnerConfig.
      mesh: a ("data", "fsdp") mesh (`sharding.make_mesh`); default: all devices on "fsdp".

    Weight hand-off: a decoder decodes with what it is given (`PolicyDecoder.set_params`); after
    every `update` / `restore` the caller hands it `decode_params()` again (the same arrays, no copy).
    """

    def __init__(self, policy, cfg: LearnerConfig = LearnerConfig(), mesh: Mesh | None = None):
        self.cfg = cfg
        self.mesh = mesh if mesh is not None else make_mesh()
        self.sample_dtype = np.dtype(policy.cfg.sample_dtype)  # what `tokens` holds (the family's)
        model = policy.model  # a view: setting remat on it leaves `policy` as it is
        set_remat(model, cfg.remat)
        self.lora = has_lora(model)
        graphdef, trainable, frozen = nnx.split(model, trainable_filter(self.lora), ...)
        del model
        self.graphdef = graphdef
        trainable, frozen = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
        t_sh, f_sh = _param_shardings(graphdef, trainable, frozen, self.mesh)
        # fp32 master weights for what is trained; the frozen rest (LoRA only) in frozen_dtype.
        params = _place(trainable, t_sh, jnp.dtype(jnp.float32))
        self.frozen = _place(frozen, f_sh, jnp.dtype(cfg.frozen_dtype))
        self.tx = cfg.optimizer()
        opt_sh = _opt_shardings(self.tx, jax.eval_shape(self.tx.init, params), t_sh, self.mesh)
        opt_state = jax.jit(self.tx.init, out_shardings=opt_sh)(params)
        repl = NamedSharding(self.mesh, P())
        scalar = lambda v, dt: jax.device_put(np.asarray(v, dt), repl)  # noqa: E731 (host value: any process count)
        self.state = TrainState(params, opt_state, scalar(cfg.lr, jnp.float32), scalar(0, jnp.int32),
                                scalar(0, jnp.int32))
        self.ref_params = self._reference(params) if cfg.kl_coef else None
        # The learner's own Policy over its arrays (`policy` property), for inference and export.
        self._policy = copy.copy(policy)
        self._policy.set_model(nnx.merge(graphdef, self.state.params, self.frozen))
        self._static = dict(graphdef=graphdef, cfg=cfg.static(), mesh=self.mesh)
        self._ahead = CompileAhead("vlajax-precompile")  # batch signature -> the update compiled ahead
        self.precompiled_hits = 0  # updates that ran an executable compiled ahead of time
        self._frozen_placed = None  # the frozen parameters where `decode_params(place=...)` put them

    def _reference(self, params: dict) -> dict:
        """Trained-parameter tree of the KL reference (see module docstring): zeroed adapters with
        LoRA; else a copy of the initial weights in the compute dtype (a new buffer: the step donates
        the live ones)."""
        if self.lora:
            return jax.tree.map(jnp.zeros_like, params)
        dtype = jnp.dtype(self.cfg.compute_dtype)
        return jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), params)

    # -- info ------------------------------------------------------------------------------------
    @property
    def batch_multiple(self) -> int:
        """The mini-batch size must be a multiple of this (micro_batch_size x batch devices)."""
        return self.cfg.micro_batch_size * _n_devices(self.mesh)

    @property
    def step(self) -> int:
        return int(self.state.step)

    @property
    def skipped(self) -> int:
        return int(self.state.skipped)

    def num_params(self) -> dict[str, int]:
        count = lambda t: int(sum(x.size for x in jax.tree.leaves(t)))  # noqa: E731
        return {"trainable": count(self.state.params), "frozen": count(self.frozen)}

    def params(self) -> dict:
        """All policy parameters (trained + frozen) as one pure dict (shares the arrays)."""
        return _merge_dicts(self.state.params, self.frozen)

    def decode_params(self, copy: bool = False, place=None) -> dict:
        """What a decoder decodes with (`PolicyDecoder.set_params`): `params()`, the learner's own
        arrays, no copy. Valid until the next `update` / `restore`, which donate or free them: hand
        them over again after each. `copy`: the trained parameters copied (the frozen rest is never
        donated, so it is shared), for a decoder that keeps decoding while the learner updates
        (the async rollout): +1x the trained parameters' memory. `place`: a function that copies a
        parameter tree to where the decoder runs (a device of its own): the trained parameters go
        each time, the frozen rest once (kept until a restore)."""
        if place is not None:
            if self._frozen_placed is None:
                self._frozen_placed = place(self.frozen)
            return _merge_dicts(place(self.state.params), self._frozen_placed)
        if not copy:
            return self.params()
        return _merge_dicts(jax.tree.map(jnp.copy, self.state.params), self.frozen)

    @property
    def policy(self):
        """A `Policy` over the current parameters (the same arrays, refreshed at each access): for
        inference, comparison and export (`vlajax.rl.lora.merged_policy`). Like `decode_params`, it
        is stale after the next update."""
        nnx.replace_by_pure_dict(self._policy.state, self.params())
        return self._policy

    # -- batches ---------------------------------------------------------------------------------
    def prepare_batch(self, batch: dict, objective: str | None = None) -> dict:
        """Check names and shapes (those `objective`, default the learner's, needs), keep the keys
        the step reads, cast, shard over the mesh."""
        missing = [k for k in _REQUIRED[objective or self.cfg.objective] if k not in batch]
        if missing:
            raise KeyError(f"batch is missing {missing}; it has {sorted(batch)}")
        if ("images" in batch) == ("pixel_values" in batch):
            raise KeyError("batch needs exactly one of 'images' (uint8) and 'pixel_values' (float32)")
        out = _cast(batch, self.sample_dtype)
        m, t = np.shape(out["tokens"])[0], np.shape(out["mask"])[-1]  # tokens: (M, T) or (M, ...): the family's
        local_m = m
        for k, x in out.items():
            if np.shape(x)[0] != m:
                raise ValueError(f"batch[{k!r}] has {np.shape(x)[0]} rows, batch['tokens'] has {m}")
        if np.ndim(out["tokens"]) == 2 and np.shape(out["tokens"]) != (m, t):
            raise ValueError(f"batch['mask'] has shape {np.shape(out['mask'])}, expected {np.shape(out['tokens'])} "
                             f"like 'tokens'")
        for k in ("old_logp", "mask", "ref_logp"):
            if k in out and np.shape(out[k]) != (m, t):
                raise ValueError(f"batch[{k!r}] has shape {np.shape(out[k])}, expected {(m, t)} like 'tokens'")
        if "crop_offsets" in out and np.shape(out["crop_offsets"]) != (m, 2):
            raise ValueError(f"batch['crop_offsets'] has shape {np.shape(out['crop_offsets'])}, expected {(m, 2)}")
        if "advantages" in out and np.shape(out["advantages"]) not in ((m,), (m, t)):
            raise ValueError(f"batch['advantages'] has shape {np.shape(out['advantages'])}, expected ({m},) or {(m, t)}")
        if "images" in out and np.dtype(out["images"].dtype) != np.uint8:
            raise TypeError(f"batch['images'] must be uint8 raw frames, got {out['images'].dtype}")
        spans = any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in out.values())
        global_m = local_m if spans else local_m * jax.process_count()  # global arrays: rows already global
        if global_m % self.batch_multiple:
            raise ValueError(
                f"mini-batch of {global_m} samples is not a multiple of micro_batch_size x devices = "
                f"{self.cfg.micro_batch_size} x {_n_devices(self.mesh)}; pad it (vlajax.rl.samples.pad_samples)")
        return shard_batch(out, self.mesh)

    # -- steps -----------------------------------------------------------------------------------
    def update(self, batch: dict) -> dict[str, jax.Array]:
        """One optimizer step on a mini-batch; returns its metrics (0-d device arrays).

        Metrics: loss, pg_loss, clipfrac, clipfrac_low, clipfrac_high, dual_clipfrac, approx_kl_k1,
        approx_kl_k3, ratio_mean, entropy, [kl_loss], grad_norm (before clipping), valid_tokens,
        valid_samples, adv_mean/std/min/max, num_micro_batches, skipped (this step), skipped_total,
        step, lr. With objective "nll": `NLL_METRICS`, grad_norm, num_micro_batches, skipped,
        skipped_total, step, lr."""
        batch = self.prepare_batch(batch)
        if self.cfg.kl_coef and "ref_logp" not in batch:
            batch["ref_logp"] = self._ref_logp(batch)
        ahead = self._ahead.get(_signature(batch))  # waits if that compile is still running
        if ahead is not None:
            self.state, metrics = ahead(self.state, self.frozen, batch)
            self.precompiled_hits += 1
        else:
            self.state, metrics = _update(self.state, self.frozen, batch, **self._static)
        return metrics

    def precompile(self, sample: Mapping[str, np.ndarray], rows: int) -> None:
        """Compile the update for mini-batches of `rows` samples (global, over all processes) shaped
        like `sample` (the batch keys with a leading dim of any size: only the rest of each shape and
        the dtype count), on a background thread. `update` then runs a batch of
        that signature with it instead of compiling (waiting for it if it is still compiling), so a
        run compiles its update while it rolls out, not after. With JAX's persistent compilation cache
        on, the compile also lands there: a resumed or relaunched process loads it. Idempotent."""
        one = _cast(sample, self.sample_dtype)
        if self.cfg.kl_coef and "ref_logp" not in one:
            one["ref_logp"] = np.zeros(np.shape(one["mask"]), np.float32)
        if rows % self.batch_multiple:
            raise ValueError(f"precompile: {rows} rows is not a multiple of micro_batch_size x devices = "
                             f"{self.batch_multiple}")
        batch_sh = NamedSharding(self.mesh, P(BATCH_AXES))
        batch = {k: jax.ShapeDtypeStruct((rows,) + tuple(np.shape(x)[1:]), x.dtype, sharding=batch_sh)
                 for k, x in one.items()}
        key = _signature(batch)
        if key not in self._ahead:  # checked first: the trainer asks after every update
            state, frozen = abstract(self.state), abstract(self.frozen)
            self._ahead.submit(key, lambda: _update.lower(state, frozen, batch, **self._static))

    def close(self) -> None:
        """Stop compiling ahead: queued compiles are dropped (one under way finishes on its own)."""
        self._ahead.close()

    def evaluate(self, batch: dict) -> dict[str, jax.Array]:
        """The nll objective's metrics (`NLL_METRICS`: token-mean nll, token_accuracy, entropy of the
        target `tokens`, temperature 1) under the current parameters, without updating: held-out
        accuracy in SFT. Takes the nll objective's batch keys (`crop_offsets` applies if given)."""
        missing = [k for k in _REQUIRED["nll"] if k not in batch]
        if missing:
            raise KeyError(f"batch is missing {missing}; it has {sorted(batch)}")
        batch = {k: v for k, v in batch.items() if k not in ("old_logp", "advantages", "ref_logp")}
        return _evaluate(self.state.params, self.frozen, self.prepare_batch(batch, objective="nll"), **self._static)

    def loss_and_grads(self, batch: dict) -> tuple[dict, dict]:
        """Gradient of the mini-batch loss w.r.t. the trained parameters (pure dict, fp32), and the
        metrics, without updating anything."""
        return _grads(self.state.params, self.frozen, self.prepare_batch(batch), **self._static)

    def logprobs(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        """(logp, entropy), each (M, 56) f32, of batch['tokens'] under the current parameters at the
        rollout temperature (verl's compute_log_prob). Needs the same keys as `update`."""
        return _logprobs(self.state.params, self.frozen, self.prepare_batch(batch), **self._static)

    def ref_logprobs(self, batch: dict) -> jax.Array:
        """(M, 56) f32 log-probs of batch['tokens'] under the KL reference policy (kl_coef > 0 only)."""
        return self._ref_logp(self.prepare_batch(batch))

    def _ref_logp(self, prepared: dict) -> jax.Array:
        if self.ref_params is None:
            raise ValueError("this learner has no reference policy: it is built only with kl_coef > 0")
        logp, _ = _logprobs(self.ref_params, self.frozen, prepared, **self._static)
        return logp

    def set_lr(self, lr: float) -> None:
        """Change the learning rate (no recompilation)."""
        # from the host (the same value on every process): a device array could not be put onto a
        # sharding that spans processes
        self.state = dataclasses.replace(self.state, lr=jax.device_put(np.asarray(lr, np.float32),
                                                                       self.state.lr.sharding))

    # -- checkpoints -----------------------------------------------------------------------------
    def _train_state_tree(self) -> dict:
        s = self.state
        return {"opt_state": s.opt_state, "lr": s.lr, "step": s.step, "skipped": s.skipped}

    def save(self, manager: CheckpointManager, *, step: int | None = None, data_state: dict | None = None,
             config: dict | None = None, force: bool = False) -> bool:
        """Save as checkpoint `step` (default: the update count `self.step`; a trainer passes its
        RL step) (async; see CheckpointManager): params (trained + frozen, the policy
        weights), opt_state, lr, step, skipped; `data_state` (sampler position...) and `config`
        as JSON. The learner config is added to `config` under "learner". Returns False if the
        manager's save interval skipped this step.

        The arrays are copied to host memory before this returns, so the next update may donate them."""
        cfg = dict(config or {})
        cfg["learner"] = _jsonable(dataclasses.asdict(self.cfg))
        saved = manager.save(self.step if step is None else step, self.params(), self._train_state_tree(),
                             data_state=data_state, config=cfg, force=force)
        return saved

    def restore(self, manager: CheckpointManager, step: int | None = None, *, free_memory: bool = True) -> Restored:
        """Restore `step` (default latest) onto this learner's mesh, shardings and dtypes; returns the
        `Restored` record (data_state, config) for the caller's sampler. Works across meshes (saved
        on 8 devices, restored on 1, ...).

        free_memory: release the current parameters and optimizer state before reading, so that the
        state never exists twice on the devices (the 7B full-parameter state fills most of an H200).
        A missing step raises FileNotFoundError first, with the learner intact; if the checkpoint does
        not fit this learner (another model or LoRA config), the error comes after the release and
        the learner must be rebuilt."""
        if step is None and manager.latest_step() is None:
            raise FileNotFoundError(f"no finished checkpoint in {manager.directory}")
        if step is not None and step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {manager.directory}; have {manager.all_steps()}")
        sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)  # noqa: E731
        params_t = jax.tree.map(sds, self.params())
        state_t = jax.tree.map(sds, self._train_state_tree())
        if LEGACY_RNG in manager.saved_paths(manager.latest_step() if step is None else step, "train_state"):
            state_t[LEGACY_RNG] = NamedSharding(self.mesh, P())  # read and dropped
        if free_memory:
            for x in jax.tree.leaves((self.state, self.frozen)):
                if isinstance(x, jax.Array) and not x.is_deleted():
                    x.delete()
        r = manager.restore(step, params=params_t, train_state=state_t)
        params, frozen = _split_like(r.params, self.state.params)
        ts = r.train_state
        self.state = TrainState(params, ts["opt_state"], ts["lr"], ts["step"], ts["skipped"])
        self.frozen = frozen
        self._frozen_placed = None
        return r


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
