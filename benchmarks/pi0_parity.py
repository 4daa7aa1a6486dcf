"""Print how far vlajax's π0 is from openpi's own outputs on the tiny fixture (tests/data/pi0_openpi,
made by tests/reference/openpi_pi0_fixture.py at openpi 15a9616): max abs error of the prefix
embeddings, the velocity field and the 10-step sampled actions, fp32, CPU.

    python benchmarks/pi0_parity.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from tests.test_pi0 import CAMERAS, _fixture  # noqa: E402
from vlajax.model.pi0 import Pi0  # noqa: E402
from vlajax.model.pi0.openpi_convert import config_from_params, load_into  # noqa: E402


def main() -> None:
    params, x, want = _fixture()
    cfg = config_from_params(params, action_horizon=5, max_token_len=12)
    model = load_into(Pi0(cfg, nnx.Rngs(0)), params)
    images = jnp.asarray(np.stack([x[f"image/{c}"] for c in CAMERAS], axis=1).astype(np.float32) / 127.5 - 1.0)
    masks = jnp.stack([x[f"image_mask/{c}"] for c in CAMERAS], axis=1)
    obs = (images, masks, jnp.asarray(x["tokenized_prompt"]), jnp.asarray(x["tokenized_prompt_mask"]))
    prefix = jax.jit(model.embed_prefix)(*obs)
    v_t = jax.jit(model.velocity)(prefix, jnp.asarray(x["state"]), jnp.asarray(x["x_t"]), jnp.asarray(x["time"]))
    actions = jax.jit(lambda *a: model.sample_actions(*a, num_steps=10))(*obs, jnp.asarray(x["state"]),
                                                                        jnp.asarray(x["noise"]))
    for name, got, ref in (("prefix embeddings", prefix[0], want["prefix_tokens"]), ("velocity", v_t, want["v_t"]),
                           ("actions (10 steps)", actions, want["actions"])):
        print(f"{name:20s} max abs error {np.abs(np.asarray(got) - ref).max():.2e} (max |value| {np.abs(ref).max():.2f})")


if __name__ == "__main__":
    main()
