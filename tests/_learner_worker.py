"""Shared pieces of tests/test_learner.py and its 8-device subprocess.

As a script (XLA_FLAGS=--xla_force_host_platform_device_count=8):
  train OUT   2 update steps of the small policy on a data=2 x fsdp=4 mesh, then a Learner
              checkpoint (step 2) in OUT/ck and the parameters in OUT/params2.npz; prints one
              JSON line with the losses, grad norms and observed shardings.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlajax.model.oft.config import preset  # noqa: E402
from vlajax.model.oft.policy import OpenVLAOFT  # noqa: E402
from vlajax.model.oft.pretrained import Policy, build_model  # noqa: E402

CFG = preset("small", image_size=56)  # 16 patches per tower: fast on CPU
M = 8  # samples per mini-batch
PROMPT = 12


_ONES = ("scale", "weight", "ls1", "ls2")  # norm scales, LayerScale (layers.param init="ones")


def init_params(seed: int = 0) -> dict:
    """A random small policy as a pure dict, drawn with numpy in the model's init scheme (N(0, 0.02),
    norm scales 1, biases 0). Same values in every process; 20x faster on CPU than compiling
    the jax init (one threefry program per parameter)."""
    rng = np.random.default_rng(seed)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: OpenVLAOFT(CFG, nnx.Rngs(0)))))

    def one(path, x):
        name = str(path[-1].key)
        if name.endswith("bias"):
            return np.zeros(x.shape, np.float32)
        if name in _ONES:
            return np.ones(x.shape, np.float32)
        return (0.02 * rng.standard_normal(x.shape, dtype=np.float32)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, abstract)


def make_policy(params: dict, compute_dtype=jnp.float32) -> Policy:
    return Policy(build_model(CFG, params), compute_dtype=compute_dtype)


def make_batch(seed: int, m: int = M, images: bool = False, adv_sign: float | None = None) -> dict:
    """A mini-batch as the rollout would produce it: prompts of varied length, sampled tokens with
    plausible old log-probs, ~10% of tokens masked, one advantage per sample."""
    r = np.random.default_rng(seed)
    ids = np.full((m, PROMPT), CFG.pad_id, np.int32)
    am = np.zeros((m, PROMPT), np.int32)
    for i in range(m):
        n = int(r.integers(6, PROMPT + 1))
        ids[i, :n] = r.integers(3, 31000, n)
        ids[i, 0], ids[i, n - 1] = CFG.bos_id, CFG.prompt_end_id
        am[i, :n] = 1
    adv = r.normal(size=(m,)).astype(np.float32)
    if adv_sign is not None:
        adv = adv_sign * (np.abs(adv) + 0.5)
    batch = dict(
        input_ids=ids, attention_mask=am,
        tokens=r.integers(0, CFG.n_bins, (m, CFG.num_action_tokens)).astype(np.int32),
        old_logp=(-np.log(CFG.n_bins) + r.normal(0, 0.05, (m, CFG.num_action_tokens))).astype(np.float32),
        advantages=adv,
        mask=(r.random((m, CFG.num_action_tokens)) < 0.9).astype(np.float32),
    )
    s = CFG.image_size
    if images:
        batch["images"] = r.integers(0, 256, (m, s + 8, s + 8, 3), dtype=np.uint8)
    else:
        batch["pixel_values"] = r.normal(size=(m, 6, s, s)).astype(np.float32)
    return batch


def flat_params(tree: dict) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def spec(x: jax.Array) -> list:
    """The array's PartitionSpec as JSON: one entry per dim (None, an axis, or a list of axes)."""
    s = list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
    return [list(a) if isinstance(a, tuple) else a for a in s]


def train(out: str) -> None:
    from vlajax.distributed.sharding import make_mesh
    from vlajax.rl.checkpoint import CheckpointManager
    from vlajax.rl.learner import Learner, LearnerConfig

    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh(2, 4)
    learner = Learner(make_policy(init_params()), LearnerConfig(compute_dtype="float32", micro_batch_size=1),
                      mesh=mesh)
    res = {"loss": [], "grad_norm": [], "num_micro_batches": []}
    for seed in (1, 2):
        m = jax.device_get(learner.update(make_batch(seed)))
        for k in res:
            res[k].append(float(m[k]))
    q = learner.state.params["llm"]["layers"][0]["q_proj"]["kernel"]
    mu = learner.state.opt_state[1].mu["llm"]["layers"][0]["down_proj"]["kernel"]
    res["q_spec"] = spec(q)
    res["q_devices"] = len(q.sharding.device_set)
    res["mu_down_spec"] = spec(mu)
    res["batch_spec"] = spec(learner.prepare_batch(make_batch(1))["tokens"])
    with CheckpointManager(os.path.join(out, "ck")) as ck:
        learner.save(ck, data_state={"sampler": 2})
        ck.wait_until_finished()
    np.savez(os.path.join(out, "params2.npz"), **flat_params(learner.params()))
    print(json.dumps(res))


if __name__ == "__main__":
    {"train": train}[sys.argv[1]](*sys.argv[2:])
