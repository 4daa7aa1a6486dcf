"""The built-in MuJoCo tabletop task: layouts, rendering, action semantics, difficulty."""

from __future__ import annotations

import numpy as np
import pytest

from vlajax.envs import set_default_gl_backend
from vlajax.envs.tabletop import (
    BLOCK_HALF,
    BLOCK_RANGE,
    COLOURS,
    WORKSPACE_HALF,
    TabletopEnv,
    directed_actions,
    make_tabletop_vector_env,
    sample_layout,
    target_xy,
)

K = 8


def test_layout_is_deterministic_spaced_and_starts_away_from_blocks():
    layouts = [sample_layout(0, s) for s in range(300)]
    again = sample_layout(0, 17)
    assert (again[0] == layouts[17][0]).all() and (again[1] == layouts[17][1]).all()
    assert not np.allclose(sample_layout(1, 17)[0], layouts[17][0])
    for blocks, start in layouts:
        assert np.abs(blocks).max() <= BLOCK_RANGE and np.abs(start).max() <= BLOCK_RANGE
        gaps = np.linalg.norm(blocks[:, None] - blocks[None], axis=-1)[np.triu_indices(3, 1)]
        assert gaps.min() >= 0.12
        assert np.linalg.norm(blocks - start, axis=-1).min() >= 0.15
    assert len({tuple(np.round(b.ravel(), 6)) for b, _ in layouts}) == 300


def test_blocks_render_in_their_colour_where_the_camera_projects_them():
    env = TabletopEnv()
    try:
        out = env.reset(task_id=1, state_id=3, seed=0)
        img = out.images["agentview"]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert out.instruction == "move the gripper to the green block"
        blocks, _ = sample_layout(0, 3)
        fovy = np.radians(env.model.cam_fovy[0])
        f = 32 / np.tan(fovy / 2)  # pixels per unit at unit distance
        depth = env.model.cam_pos[0, 2] - 2 * BLOCK_HALF  # camera to block tops
        for c, rgb, (x, y) in zip(COLOURS, np.eye(3, dtype=bool), blocks):
            mask = np.all(np.where(rgb, img > 150, img < 80), axis=-1)
            rows, cols = np.nonzero(mask)
            assert mask.sum() >= 20, f"{c} block not visible"
            assert abs(cols.mean() - (32 + x * f / depth - 0.5)) < 1.5, c
            assert abs(rows.mean() - (32 - y * f / depth - 0.5)) < 1.5, c
        assert (np.all(img > 230, axis=-1)).sum() >= 5  # the white gripper
    finally:
        env.close()


def test_actions_move_the_gripper_clip_to_the_workspace_and_close_the_fingers():
    env = TabletopEnv(render=False)
    try:
        p0 = env.reset(0, 5, 0).proprio
        assert p0.shape == (8,) and p0.dtype == np.float32
        np.testing.assert_allclose(p0[3:6], [np.pi, 0, 0], atol=1e-6)
        a = np.zeros((1, 7))
        a[0, :3] = [1.0, -0.5, 0.25]
        p1 = env.chunk_step(a).proprio
        np.testing.assert_allclose(p1[:3] - p0[:3], [0.05, -0.025, 0.0125], atol=1e-6)
        # Rotation is accepted and ignored; out-of-range actions are clipped to [-1, 1].
        env.reset(0, 5, 0)
        b = a.copy()
        b[0, 0], b[0, 3:6] = 3.0, [1, -1, 1]
        np.testing.assert_array_equal(env.chunk_step(b).proprio, p1)

        env.reset(0, 5, 0)
        close = np.zeros((20, 7))
        close[:, 0], close[:, 6] = 1.0, 1.0
        out = env.chunk_step(close)
        assert out.proprio[0] == pytest.approx(WORKSPACE_HALF)
        assert (out.proprio[6:] < p0[6:] - 0.01).all()  # fingers closed from open
    finally:
        env.close()


def test_render_every_substep_and_image_size():
    env = TabletopEnv(image_size=(32, 48))
    try:
        env.reset(2, 9, 0)
        out = env.chunk_step(np.random.default_rng(0).uniform(-1, 1, (5, 7)), render_every_substep=True)
        sub = out.substep_images["agentview"]
        assert sub.shape == (out.steps, 32, 48, 3) and out.images["agentview"].shape == (32, 48, 3)
        assert (sub[-1] == out.images["agentview"]).all()
        assert env.chunk_step(np.zeros((2, 7))).substep_images is None
    finally:
        env.close()
    blind = TabletopEnv(render=False)
    assert blind.reset(0, 0, 0).images == {}
    blind.close()


def test_gl_backend_default_respects_the_user_choice(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    assert set_default_gl_backend() == "osmesa"
    monkeypatch.delenv("MUJOCO_GL")
    assert set_default_gl_backend() in ("egl", "osmesa", None)


@pytest.mark.timeout(120)
def test_random_policy_succeeds_sometimes_directed_policy_always():
    rng = np.random.default_rng(2024)
    episodes, successes = 300, 0
    with make_tabletop_vector_env(2, env_kwargs={"render": False}, timeout_s=60) as env:
        assert all(t.max_episode_steps == 64 for t in env.tasks)
        for e in range(0, episodes, 2):
            env.reset([e % 3, (e + 1) % 3], [e, e + 1], seed=0)
            total = np.zeros(2)
            while True:
                res = env.chunk_step(rng.uniform(-1, 1, (2, K, 7)))
                total += res.reward
                if res.done.all():
                    break
            steps = res.info["elapsed_steps"]
            assert (steps[res.truncated] == 64).all() and (steps[res.terminated] <= 64).all()
            assert (total == res.terminated).all()
            successes += int(res.terminated.sum())
    rate = successes / episodes  # measured 0.20 over 3000 episodes
    assert 0.10 <= rate <= 0.32, rate

    with make_tabletop_vector_env(2, timeout_s=60) as env:
        for e in range(0, 30, 2):
            tasks, states = [e % 3, (e + 2) % 3], [500 + e, 501 + e]
            obs = env.reset(tasks, states, seed=1)
            for chunk in range(2):  # any target is reachable within 2 chunks at full speed
                acts = np.stack([
                    directed_actions(obs.proprio[i, :2], target_xy(t, s, seed=1), K)
                    for i, (t, s) in enumerate(zip(tasks, states))
                ])
                res = env.chunk_step(acts)
                obs = res.obs
            assert res.terminated.all() and (res.info["elapsed_steps"] <= 2 * K).all()


@pytest.mark.timeout(60)
def test_vector_env_constructor_sets_image_size_and_limit():
    with make_tabletop_vector_env(1, image_size=32, max_episode_steps=24, timeout_s=60) as env:
        assert env.tasks[0].max_episode_steps == 24 and env.name == "tabletop"
        assert env.reset([0], [0]).images["agentview"].shape == (1, 32, 32, 3)
        a = np.zeros((1, K, 7))
        a[..., 6] = -1
        ends = [env.chunk_step(a).truncated[0] for _ in range(3)]
        assert ends == [False, False, True]
