"""GymnasiumEnv: a real rendering Gymnasium env (MuJoCo InvertedPendulum-v5) behind SingleEnv,
run through SubprocVectorEnv."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from vlajax.envs import SubprocVectorEnv
from vlajax.envs.gym_adapter import GymnasiumEnv, make_gymnasium_env

ENV_ID = "InvertedPendulum-v5"
K = 8


def cart_moved_right(obs, reward, terminated, truncated, info) -> bool:
    """A success predicate for the test: the cart is 5 cm right of the centre."""
    return bool(obs[0] > 0.05)


def pendulum_pool(num_envs=2, **kw) -> SubprocVectorEnv:
    factory = functools.partial(
        make_gymnasium_env, env_id=ENV_ID, instruction="keep the pole upright", width=64, height=64, **kw
    )
    return SubprocVectorEnv(factory, num_envs, timeout_s=60, name="pendulum")


def push(value: float, n=2, k=K) -> np.ndarray:
    a = np.zeros((n, k, 7), dtype=np.float32)
    a[..., 0] = value
    return a


@pytest.mark.timeout(90)
def test_pendulum_runs_in_the_vector_env_with_images_seeds_and_limits():
    with pendulum_pool(max_episode_steps=12) as env:
        (task,) = env.tasks
        assert (task.name, task.instruction, task.max_episode_steps) == (ENV_ID, "keep the pole upright", 12)
        obs = env.reset([0, 0], [1, 2])
        img = obs.images["agentview"]
        assert img.shape == (2, 64, 64, 3) and img.dtype == np.uint8 and img.std() > 5
        assert obs.proprio.shape == (2, 4) and obs.proprio.dtype == np.float32
        assert not np.allclose(obs.proprio[0], obs.proprio[1])  # state id = reset seed
        again = env.reset([0, 0], [2, 1])
        np.testing.assert_array_equal(again.proprio, obs.proprio[::-1])

        res = env.chunk_step(push(0.0), render_every_substep=True)
        assert res.info["steps"].tolist() == [K, K] and not res.done.any()
        assert res.info["substep_images"][0]["agentview"].shape == (K, 64, 64, 3)
        res = env.chunk_step(push(0.0))  # cut at the limit: 12 = 8 + 4
        assert res.info["steps"].tolist() == [4, 4] and res.truncated.all()

        # Pushing hard makes the pole fall: Gymnasium terminates, we truncate before the limit.
        env.reset([0, 0], [1, 2])
        res = env.chunk_step(push(1.0))
        assert res.truncated.all() and not res.terminated.any() and (res.reward == 0).all()
        assert (res.info["elapsed_steps"] < K).all()
        assert (env.chunk_step(push(1.0)).info["steps"] == 0).all()


@pytest.mark.timeout(90)
def test_user_success_predicate_terminates_with_reward():
    with pendulum_pool(success_fn=cart_moved_right) as env:
        env.reset([0, 0], [3, 4])
        res = env.chunk_step(push(1.0))
        assert res.terminated.all() and (res.reward == 1.0).all()
        assert (res.obs.proprio[:, 0] > 0.05).all()
        assert (res.info["elapsed_steps"] < 4).all()


def test_action_mapping_and_errors():
    env = GymnasiumEnv(ENV_ID, "balance", width=32, height=32)
    try:
        assert env.env.action_space.high[0] == pytest.approx(3.0)
        for a, expected in [(-1.0, -3.0), (0.0, 0.0), (0.5, 1.5), (2.0, 3.0)]:
            np.testing.assert_allclose(env._box_action(np.array([a, 9, 9, 9, 9, 9, 9])), [expected], rtol=1e-6)
        out = env.reset(0, 0, 0)
        assert out.images["agentview"].shape == (32, 32, 3) and out.steps == 0
        with pytest.raises(ValueError, match="one task"):
            env.reset(1, 0, 0)
    finally:
        env.close()
    with pytest.raises(ValueError, match="not a Box; pass action_fn"):
        GymnasiumEnv("CartPole-v1", "balance")
    shrunk = GymnasiumEnv(ENV_ID, "balance", width=64, height=64, image_size=(16, 24),
                          action_fn=lambda a: a[:1] * 0, proprio_fn=lambda o: o[:2])
    try:
        out = shrunk.reset(0, 0, 0)
        assert out.images["agentview"].shape == (16, 24, 3) and out.proprio.shape == (2,)
    finally:
        shrunk.close()
