"""`vlajax demo`: the small-preset OpenVLA-OFT policy (random weights, untrained) acting on the
built-in MuJoCo tabletop task, end to end: render -> preprocess -> one forward pass per chunk ->
sample 56 action tokens at T=1.6 -> de-tokenise -> execute the 8x7 chunk open-loop.

It shows the plumbing and its speed, not learning: success is at the random-policy level (~20%).
Training (`vlajax train`) is what makes it rise.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from vlajax.envs.tabletop import make_tabletop_vector_env
from vlajax.model.oft import Policy, build_model, preset
from vlajax.model.tokenizer import load_tokenizer
from vlajax.rl.policy_step import DecodeInputs, PolicyDecoder

TEMPERATURE = 1.6  # the GRPO recipe's rollout temperature


def run_demo(episodes: int = 2, num_envs: int = 2, seed: int = 0, image_size: int = 112) -> int:
    cfg = preset("small", image_size=image_size)
    policy = Policy(build_model(cfg, seed=seed), tokenizer=load_tokenizer("tiny"), compute_dtype=jnp.float32)
    n_params = sum(x.size for x in jax.tree.leaves(policy.params()))
    print(f"policy: small OpenVLA-OFT preset, {n_params:,} parameters (random init), {image_size}px images")

    # the rollout's own policy call: the tabletop renders upright, and the untrained policy's actions
    # are used as decoded
    decoder = PolicyDecoder(policy, flip=False, center_crop=True, unnorm_key=None, gripper=None, capacity=num_envs)
    env = make_tabletop_vector_env(num_envs)
    key = jax.random.key(seed)
    rows = np.arange(num_envs, dtype=np.int32)
    successes, t_sim, t_dec, steps = [], 0.0, 0.0, 0
    try:
        for ep in range(episodes):
            task_ids = [(ep * num_envs + i) % len(env.tasks) for i in range(num_envs)]
            obs = env.reset(task_ids, [ep * num_envs + i for i in range(num_envs)], seed=seed)
            ids, mask = decoder.encode_prompts(obs.instructions)
            done = np.zeros(num_envs, bool)
            call = 0
            while not done.all():
                t0 = time.perf_counter()
                inputs = DecodeInputs(images=obs.images["agentview"][:, None], input_ids=ids, attention_mask=mask,
                                      proprio=obs.proprio, rows=rows, calls=np.full(num_envs, call, np.int32))
                actions = decoder.fetch(decoder.dispatch(inputs, temperature=TEMPERATURE,
                                                         key=jax.random.fold_in(key, ep))).actions
                call += 1
                t1 = time.perf_counter()
                res = env.chunk_step(actions)
                t_sim += time.perf_counter() - t1
                t_dec += t1 - t0
                steps += int(np.sum(~done)) * cfg.chunk
                obs, done = res.obs, res.done
            successes += list(res.info["success"])
            print(f"episode batch {ep}: instructions {obs.instructions}; success {[bool(s) for s in res.info['success']]}")
    finally:
        env.close()
    print(f"success rate {np.mean(successes):.2f} over {len(successes)} episodes (untrained policy); "
          f"{steps} env steps, sim {t_sim:.1f}s, decode {t_dec:.1f}s (incl. first-call compile)")
    return 0
