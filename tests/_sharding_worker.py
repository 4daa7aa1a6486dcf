"""Helper for tests/test_sharding.py: trains a toy annotated MLP on a given mesh.

Run as a script (in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8)
it prints one JSON line with mesh shapes, resolved parameter specs and, per mesh, the
losses and final parameters of a few jitted AdamW steps. `train(mesh)` is also imported
by the test to run the same thing on the single device of the main pytest process.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vlajax.distributed.sharding import make_mesh, shard_batch, state_shardings

IN, HID, OUT, BATCH, STEPS = 16, 64, 8, 32, 3


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        k1, k2 = rngs.params(), rngs.params()
        self.w1 = nnx.Param(init(k1, (IN, HID)), out_sharding=("embed", "mlp"), eager_sharding=False)
        self.b1 = nnx.Param(jnp.zeros((HID,)), out_sharding=("bias",), eager_sharding=False)
        self.w2 = nnx.Param(init(k2, (HID, OUT)), out_sharding=("mlp", "embed"), eager_sharding=False)
        # unannotated: exercises the largest-divisible-dim fallback
        self.table = nnx.Param(jnp.linspace(-0.1, 0.1, 8 * HID).reshape(8, HID))

    def __call__(self, x):
        h = jax.nn.gelu(x @ self.w1 + self.b1 + self.table.mean(0))
        return h @ self.w2


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, IN)).astype(np.float32)
    y = rng.standard_normal((BATCH, OUT)).astype(np.float32)
    return {"x": x, "y": y}


def train(mesh) -> dict:
    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=1e-2), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    shardings = state_shardings(state, mesh, min_size_mbytes=0)
    state = jax.device_put(state, shardings)
    batch = shard_batch(_data(), mesh)
    batch_sharding = jax.tree.map(lambda a: a.sharding, batch)
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step(state, batch):
        model, opt = nnx.merge(graphdef, state)
        loss_fn = lambda m: jnp.mean((m(batch["x"]) - batch["y"]) ** 2)  # noqa: E731
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    step = jax.jit(step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, repl), donate_argnums=0)
    losses = []
    for _ in range(STEPS):
        state, loss = step(state, batch)
        losses.append(float(loss))
    model_state = state[0]
    specs = {k: str(model_state[k].get_value().sharding.spec) for k in ("w1", "b1", "w2", "table")}
    mu_spec = str(state[1]["opt_state"][0]["mu"]["w1"].get_value().sharding.spec)
    params = {k: np.asarray(model_state[k].get_value()).tolist() for k in ("w1", "b1", "w2", "table")}
    return dict(losses=losses, specs=specs, mu_spec=mu_spec, params=params,
                batch_spec=str(batch["x"].sharding.spec))


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    out = {"mesh_shapes": {}}
    for data, fsdp in [(8, 1), (2, 4), (1, 8), (-1, 4), (2, -1)]:
        out["mesh_shapes"][f"{data}x{fsdp}"] = dict(make_mesh(data, fsdp).shape)
    out["one_device"] = train(make_mesh(1, 1, devices=jax.devices()[:1]))
    out["2x4"] = train(make_mesh(2, 4))
    out["8x1"] = train(make_mesh(8, 1))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
