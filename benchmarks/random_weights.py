"""Random weights made fast, for runs that need no checkpoint: full-size ones on the device
(`random_policy`), the small preset's on the host (`small_random_policy`; the rollout tests use it too)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlajax.model.oft.config import preset
from vlajax.model.oft.policy import OpenVLAOFT
from vlajax.model.oft.pretrained import Policy, abstract_params, build_model
from vlajax.model.tokenizer import load_tokenizer

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


def small_random_policy(image_size: int = 56, seed: int = 0) -> Policy:
    """The small preset with random weights drawn on the host (N(0, 0.05), norms 1, biases 0), the tiny
    tokenizer, float32 compute: building it with JAX's own initialisers compiles every init op (~35 s
    on 2 cores)."""
    cfg = preset("small", image_size=image_size)
    _, shapes = abstract_params(cfg)
    rng = np.random.default_rng(seed)

    def init(path, s):
        name = jax.tree_util.keystr(path)
        if "norm" in name and name.endswith(("['scale']", "['weight']")):
            return np.ones(s.shape, s.dtype)
        if name.endswith("bias']"):
            return np.zeros(s.shape, s.dtype)
        return rng.normal(0.0, 0.05, s.shape).astype(s.dtype)

    params = jax.tree_util.tree_map_with_path(init, shapes)
    return Policy(build_model(cfg, params), tokenizer=load_tokenizer("tiny"), compute_dtype=jnp.float32)
