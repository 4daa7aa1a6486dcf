"""Device mesh, logical-axis sharding rules, batch sharding and multi-host init.

Mesh axes: ("data", "fsdp"). Parameters are sharded over "fsdp" (ZeRO-3 style: gathered
per layer by XLA); the batch is split over both axes.

Logical axis vocabulary
-----------------------
Parameters carry one logical name per dimension in their flax NNX metadata. The policy
(`vlajax.model`) stores it as ``nnx.Param(w, logical_axes=("embed", "mlp"))``; Variables
annotated the flax way (``out_sharding=...``, or the older ``sharding_names=...``) are
read too. Optimizer states built by ``optax`` over such Variables, or by ``nnx.Optimizer``,
inherit it. Kernels are in Flax (in, out) layout. ``None`` = a dim that is never sharded.

Names used by the OpenVLA-OFT policy (vlajax/model):
  ``embed``      LLM residual width (4096): input dim of q/k/v/gate/up, output dim of o/down,
                 embed_tokens (vocab, embed), lm_head (embed, vocab), projector fc2/fc3 and
                 proprio projector rows                                   -> "fsdp"
  ``vit_embed``  ViT width (1024 / 1152) and the fused vision width 2176 (projector fc1
                 input); patch-embed output, pos_embed, cls/reg tokens, LayerScale, ViT
                 LayerNorm scales                                          -> "fsdp"
  ``qkv``        LLM attention width: q/k/v output, o input
  ``mlp``        MLP hidden: LLM gate/up/down (11008), projector hidden (8704)
  ``vocab``      vocabulary (32064)
  ``vit_qkv``    ViT fused qkv output (3*D) and proj input (D)
  ``vit_mlp``    ViT MLP hidden (4096 / 4304)
  ``patch``      patch-embed kernel (kh, kw, in_channels) dims
  ``embed_out``  second residual-width dim of the square projector fc3 / proprio fc2
  ``norm``       1-D RMSNorm scales
  ``lora``       LoRA rank: lora_a (in_name, lora), lora_b (lora, out_name)
Also accepted (generic models, tests): ``heads``, ``kv_heads``, ``head_dim``, ``vit_heads``,
``conv``, ``vit_seq``, ``proj_mlp``, ``proprio``, ``bias``, ``layers``.
Activations (for `with_logical_constraint`): ``batch`` -> ("data", "fsdp"); ``seq``,
``act_embed``, ``act_heads``, ``act_mlp``, ``act_vocab`` -> replicated.

``logical_axes`` is plain metadata that flax never acts on. Variables annotated with
flax's ``out_sharding`` need ``eager_sharding=False`` (or ``nnx.use_eager_sharding(False)``):
flax's default eager sharding would resolve those names against a mesh at construction.
Placement then comes from here::

    with nnx.use_eager_sharding(False):
        abstract = jax.eval_shape(create_state)            # create_state -> nnx.State
        shardings = state_shardings(abstract, mesh)
        state = jax.jit(create_state, out_shardings=shardings)()

Every large matrix has exactly one dim named ``embed`` or ``vit_embed``, so FSDP over
those two names shards the whole model (4096, 1024, 1152, 2176 are divisible by 8, 16,
32, 64). A mesh axis used by an earlier dim is not reused by a later one, and a dim not
divisible by its mesh axes is replicated (logged).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "DATA_AXIS", "FSDP_AXIS", "BATCH_AXES", "LOGICAL_AXIS_RULES", "make_mesh",
    "logical_to_spec", "logical_to_sharding", "state_shardings", "fsdp_fallback_spec",
    "place", "shard_batch", "with_logical_constraint", "maybe_initialize_distributed",
]

log = logging.getLogger(__name__)

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

MeshAxes = str | tuple[str, ...] | None
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", BATCH_AXES),
    ("embed", FSDP_AXIS),
    ("vit_embed", FSDP_AXIS),
    ("vocab", None),
    ("qkv", None),
    ("vit_qkv", None),
    ("patch", None),
    ("embed_out", None),
    ("heads", None),
    ("kv_heads", None),
    ("head_dim", None),
    ("mlp", None),
    ("vit_heads", None),
    ("vit_mlp", None),
    ("conv", None),
    ("vit_seq", None),
    ("proj_mlp", None),
    ("proprio", None),
    ("norm", None),
    ("bias", None),
    ("layers", None),
    ("lora", None),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", None),
    ("act_mlp", None),
    ("act_vocab", None),
)


def make_mesh(data: int = -1, fsdp: int = -1, devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh with axes ("data", "fsdp"); -1 = infer. Both -1: all devices on fsdp.

    Axis types are Auto (GSPMD propagation, as openpi/MaxText), not jax's Explicit default.
    """
    devs = list(jax.devices() if devices is None else devices)
    n = len(devs)
    if data == -1 and fsdp == -1:
        data, fsdp = 1, n
    elif data == -1:
        if fsdp <= 0 or n % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {n} available devices")
        data = n // fsdp
    elif fsdp == -1:
        if data <= 0 or n % data:
            raise ValueError(f"data={data} does not divide the {n} available devices")
        fsdp = n // data
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} != {n} available devices")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, fsdp), BATCH_AXES, auto, devices=devs)


def _axes_tuple(a: MeshAxes) -> tuple[str, ...]:
    return () if a is None else (a,) if isinstance(a, str) else tuple(a)


def logical_to_spec(
    names: Sequence[str | None] | P,
    mesh: Mesh,
    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
    shape: Sequence[int] | None = None,
    where: str = "",
) -> P:
    """Resolve logical names to a PartitionSpec (names already mesh axes pass through)."""
    table = dict(rules)
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"{where}: {len(names)} logical names {tuple(names)} for shape {tuple(shape)}")
    used: set[str] = set()
    out: list[MeshAxes] = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if isinstance(name, str) and name in table:
            axes = _axes_tuple(table[name])
        elif all(a in mesh.axis_names for a in _axes_tuple(name)):
            axes = _axes_tuple(name)
        else:
            raise ValueError(
                f"{where}: unknown logical axis name {name!r} (dim {i} of {tuple(names)}); "
                f"known: {sorted(table)}"
            )
        axes = tuple(a for a in axes if a not in used)
        if shape is not None and axes:
            size = int(np.prod([mesh.shape[a] for a in axes]))
            if shape[i] % size:
                log.info("%s: dim %d (%s, size %d) not divisible by %s=%d; replicated",
                         where, i, name, shape[i], axes, size)
                axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def logical_to_sharding(
    names: Sequence[str | None],
    mesh: Mesh,
    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, mesh, rules, shape))


def fsdp_fallback_spec(shape: Sequence[int], mesh: Mesh, min_size_mbytes: float = 4.0,
                       itemsize: int = 4) -> P:
    """openpi-style: shard the largest fsdp-divisible dim of a big array, else replicate."""
    fsdp = mesh.shape[FSDP_AXIS]
    if fsdp == 1 or np.prod(shape, dtype=np.int64) * itemsize < min_size_mbytes * 2**20:
        return P()
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[i] % fsdp == 0:
            spec = [None] * len(shape)
            spec[i] = FSDP_AXIS
            return P(*spec)
    return P()


_METADATA_KEYS = ("logical_axes", "out_sharding", "sharding_names")


def _logical_names(metadata: dict):
    """The per-dim logical names of a Variable, under any of the keys in use."""
    for key in _METADATA_KEYS:
        names = metadata.get(key)
        if names:
            return names
    return None


def state_shardings(
    tree: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
    *,
    min_size_mbytes: float = 4.0,
) -> Any:
    """NamedSharding tree matching `tree` (an nnx.State / pytree of Variables or arrays).

    A Variable with ``logical_axes`` (the policy's key) or ``out_sharding`` /
    ``sharding_names`` (flax's keys) metadata is resolved through `rules`; any other leaf
    (unannotated Variable, raw array, ShapeDtypeStruct) falls back to `fsdp_fallback_spec`.
    Variables are kept as Variables holding the NamedSharding (like
    ``nnx.get_named_sharding``), so the result has the input's pytree structure and can
    be passed to ``jax.jit(in_shardings/out_shardings=...)`` or ``jax.device_put``.
    """

    def one(path, x):
        where = jax.tree_util.keystr(path)
        is_var = isinstance(x, nnx.Variable)
        value = x.get_value() if is_var else x
        shape = tuple(getattr(value, "shape", ()))
        names = _logical_names(x.get_metadata()) if is_var else None
        if names:
            if isinstance(names, NamedSharding):
                names = names.spec
            spec = logical_to_spec(tuple(names), mesh, rules, shape, where)
        else:
            dtype = getattr(value, "dtype", np.dtype(np.float32))
            spec = fsdp_fallback_spec(shape, mesh, min_size_mbytes, np.dtype(dtype).itemsize)
        sharding = NamedSharding(mesh, spec)
        return x.replace(sharding) if is_var else sharding

    return jax.tree_util.tree_map_with_path(
        one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """`jax.device_put(x, sharding)`, also when `sharding` spans several processes and `x` is this
    process's own copy of the value (a jax array on its local devices; every process passes the
    same value). That case goes through `jax.make_array_from_callback`, each local shard sliced on
    the device: jax 0.10's device_put of a process-local array onto devices of several processes
    returns an array whose shards cannot be read when a process has one device (and refuses a
    committed one as a cross-host transfer)."""
    if sharding.is_fully_addressable or not isinstance(x, jax.Array) or not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Put every leaf's leading (batch) dim over ("data", "fsdp"); other dims replicated.

    Single process: `batch` is the global batch. Multi-host: each process passes its own
    slice and the global array is assembled with `make_array_from_process_local_data`, or
    passes arrays that are already global (`multihost.global_batch`): those are kept as they
    are when already laid out this way, else resharded (never pulled to the host, which a
    process cannot do for rows it does not hold).
    """
    n = mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]
    multi = jax.process_count() > 1

    def one(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} is a scalar; need a batch dim")
        sharding = NamedSharding(mesh, P(BATCH_AXES))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already a global array
            return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(x, sharding)
        if multi:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        if x.shape[0] % n:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has leading dim {x.shape[0]}, "
                f"not divisible by data*fsdp = {n} (pad, e.g. vlajax.rl.samples.pad_samples)"
            )
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map_with_path(one, batch)


def with_logical_constraint(x: jax.Array, names: Sequence[str | None], mesh: Mesh,
                            rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES) -> jax.Array:
    """`with_sharding_constraint` by logical names, for activations inside jit."""
    return jax.lax.with_sharding_constraint(x, logical_to_sharding(names, mesh, rules, x.shape))


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize` when the environment describes >1 process.

    Reads JAX_COORDINATOR_ADDRESS (or COORDINATOR_ADDRESS / MASTER_ADDR:MASTER_PORT),
    JAX_NUM_PROCESSES (or NUM_PROCESSES / WORLD_SIZE), JAX_PROCESS_ID (or PROCESS_ID /
    RANK). No-op (returns False) for a single process or if already initialized. Must run
    before anything touches the jax backend.
    """
    env = os.environ

    def first(*keys):
        return next((env[k] for k in keys if env.get(k)), None)

    nproc = first("JAX_NUM_PROCESSES", "NUM_PROCESSES", "WORLD_SIZE")
    if nproc is None or int(nproc) <= 1:
        return False
    if jax.distributed.is_initialized():
        return False
    addr = first("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
    if addr is None and env.get("MASTER_ADDR"):
        addr = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '1234')}"
    pid = first("JAX_PROCESS_ID", "PROCESS_ID", "RANK")
    if addr is None or pid is None:
        raise RuntimeError(
            f"{nproc} processes requested but the coordinator address "
            f"(JAX_COORDINATOR_ADDRESS) or process id (JAX_PROCESS_ID) is not set"
        )
    jax.distributed.initialize(coordinator_address=addr, num_processes=int(nproc),
                               process_id=int(pid))
    return True
