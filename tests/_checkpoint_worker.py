"""Helper for tests/test_checkpoint.py, run in subprocesses (8 fake CPU devices).

  reshard IN OUT  restore IN (saved on 1 device) onto a 2x4 mesh, check values, save the
                  sharded state to OUT; prints a JSON line with the observed shardings.
  crash DIR       save step 1, start a large async save of step 2, print SAVING and wait
                  to be killed.
  full DIR        save step 1, then step 2 with files limited to 1 MiB (RLIMIT_FSIZE: a full
                  disk's failure, EFBIG for ENOSPC); prints the error raised as one line.
`make_state(scale)` builds the deterministic state both sides compare against.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vlajax.distributed.sharding import make_mesh, state_shardings
from vlajax.rl.checkpoint import CheckpointManager


class Toy(nnx.Module):
    def __init__(self, scale: float = 1.0, big: int = 0):
        self.w = nnx.Param(scale * jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8),
                           out_sharding=("embed", "mlp"), eager_sharding=False)
        self.b = nnx.Param(scale * jnp.ones((8,)), out_sharding=("bias",), eager_sharding=False)
        if big:
            data = np.frombuffer(os.urandom(big * 4), np.float32).reshape(-1, 1024)
            self.big = nnx.Param(jnp.asarray(np.nan_to_num(data)), out_sharding=("embed", None),
                                 eager_sharding=False)


def make_state(scale: float = 1.0, big: int = 0):
    """(params nnx.State, train_state dict) with values determined by `scale`."""
    model = Toy(scale, big)
    params = nnx.state(model, nnx.Param)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(nnx.to_pure_dict(params))
    opt_state = jax.tree.map(lambda x: x + scale if x.dtype == jnp.float32 else x, opt_state)
    train_state = {"opt_state": opt_state, "step": jnp.asarray(int(10 * scale)),
                   "rng": jax.random.key(int(scale))}
    return params, train_state


def reshard(src: str, dst: str) -> None:
    assert jax.device_count() == 8
    mesh = make_mesh(2, 4)
    params, train_state = make_state(2.0)
    p_sh = state_shardings(params, mesh, min_size_mbytes=0)
    with CheckpointManager(src) as ck:
        r = ck.restore(params=p_sh)
    w = r.params["w"].get_value()
    np.testing.assert_allclose(np.asarray(w), np.asarray(params["w"].get_value()))
    out = {"restored_spec": str(w.sharding.spec), "restored_devices": len(w.sharding.device_set),
           "data_state": r.data_state}
    sharded = jax.device_put(params, p_sh)
    with CheckpointManager(dst) as ck:
        ck.save(7, sharded, train_state, data_state={"sampler": 3}, config={"devices": 8})
        ck.wait_until_finished()
    out["saved_spec"] = str(sharded["w"].get_value().sharding.spec)
    print(json.dumps(out))


def crash(directory: str) -> None:
    ck = CheckpointManager(directory, max_to_keep=5)
    params, ts = make_state(1.0)
    ck.save(1, params, ts)
    ck.wait_until_finished()
    params, ts = make_state(3.0, big=16 * 2**20)  # 64 MiB of incompressible data
    ck.save(2, params, ts)
    print("SAVING", flush=True)
    time.sleep(120)


def full(directory: str) -> None:
    import resource
    import signal

    from vlajax.rl.checkpoint import CheckpointWriteError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
    with CheckpointManager(directory) as ck:
        ck.save(1, *make_state(1.0))
        ck.wait_until_finished()
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
        try:
            ck.save(2, *make_state(3.0, big=2**20))  # 4 MiB of incompressible data
            ck.wait_until_finished()
        except CheckpointWriteError as e:
            print(f"ERROR {e}", flush=True)


if __name__ == "__main__":
    {"reshard": reshard, "crash": crash, "full": full}[sys.argv[1]](*sys.argv[2:])
