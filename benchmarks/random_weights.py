"""Random full-size weights made fast on the device, for timing runs that need no checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlajax.model.policy import OpenVLAOFT
from vlajax.model.pretrained import Policy

_ONES = ("scale", "weight", "ls1", "ls2")


def random_policy(cfg, dtype, seed: int = 0) -> Policy:
    """Random weights made on the device leaf by leaf (one small program per distinct shape; jitting the
    model's own init compiles one threefry program per parameter, minutes for the 7B)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: OpenVLAOFT(cfg, nnx.Rngs(0))))
    normal = jax.jit(lambda k, shape: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype),
                     static_argnums=1)
    key = jax.random.key(seed)
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    values = []
    for i, (path, x) in enumerate(flat):
        name = str(path[-1].key)
        if name.endswith("bias"):
            values.append(jnp.zeros(x.shape, dtype))
        elif name in _ONES:
            values.append(jnp.ones(x.shape, dtype))
        else:
            values.append(normal(jax.random.fold_in(key, i), tuple(x.shape)))
    pure = jax.tree.unflatten(jax.tree.structure(nnx.to_pure_dict(state)), values)
    nnx.replace_by_pure_dict(state, pure)
    return Policy(nnx.merge(graphdef, state), compute_dtype=jnp.bfloat16)
