"""The rollout tests' shared kit (test_rollout: Ray pool, test_local_pool: in-process pool, test_ray_sim:
a multi-node cluster): a scripted directed policy and an in-process replay to check trajectories
against, simulators that fail on purpose, and one pool layout for both pool types. A module of its own,
not conftest: its classes subclass JAX- and MuJoCo-backed ones, which conftest (imported by every test
run and by worker processes) does not import."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from vlajax.envs import SubprocVectorEnv
from vlajax.envs.tabletop import TabletopEnv, directed_actions, make_tabletop_vector_env, target_xy
from vlajax.model.preprocess import preprocess_images
from vlajax.rl.policy_step import DecodeInputs, DecodeOutputs, Decoder

K = 8  # actions per policy call
LIMIT = 32  # episode limit (env steps): 4 policy calls
IMAGE = 64
CAM = "agentview"
SPEED = 0.2  # directed policy speed: no episode can succeed within the first chunk
HANG_STATE, CRASH_STATE, SLOW_STATE = 901, 902, 903


# ---- a scripted policy and an in-process replay ------------------------------------------------
class DirectedDecoder(Decoder):
    """`Decoder` that moves each gripper straight to its target block at SPEED x full speed.
    Its tokens record (row, call) of every policy call, so tests can see where each call landed."""

    chunk_len, action_dim, num_tokens, num_images = K, 7, K * 7, 1

    def __init__(self, task_ids, state_ids, seed: int = 0, speed: float = SPEED):
        self.task, self.state = np.asarray(task_ids), np.asarray(state_ids)
        self.seed, self.speed = seed, speed

    def encode_prompts(self, instructions):
        ids = np.array([[sum(map(ord, s)) % 30000, len(s)] for s in instructions], np.int32)
        return ids, np.ones_like(ids)

    def dispatch(self, x: DecodeInputs, *, temperature, key):
        acts = np.stack([directed_actions(p[:2], target_xy(self.task[r], self.state[r], self.seed), K)
                         for p, r in zip(x.proprio, x.rows)])
        acts[..., :6] *= self.speed
        tok = np.zeros((len(x), self.num_tokens), np.int32)
        tok[:, 0], tok[:, 1] = x.rows, x.calls
        return DecodeOutputs(tok, np.zeros(tok.shape, np.float32), acts.astype(np.float32))

    def fetch(self, handle):
        return handle


def replay(task: int, state: int, seed: int = 0, limit: int = LIMIT, speed: float = SPEED):
    """The directed episode of (task, state) in one in-process env: the frame fed to each policy
    call, env steps executed, success."""
    env = TabletopEnv(IMAGE, max_episode_steps=limit)
    out = env.reset(task, state, seed)
    frames, steps, success = [], 0, False
    while steps < limit:
        frames.append(out.images[CAM])
        a = directed_actions(out.proprio[:2], target_xy(task, state, seed), K)
        a[:, :6] *= speed
        out = env.chunk_step(a[: limit - steps])
        steps += out.steps
        if out.success:
            success = True
            break
    env.close()
    return frames, steps, success


def check_against_replay(batch, task_ids, state_ids, group_ids, seed=0, limit=LIMIT):
    """Every trajectory row holds exactly its own (task, state, group) episode."""
    tr = batch.trajectories
    np.testing.assert_array_equal(tr.group_id, group_ids)
    np.testing.assert_array_equal(tr.task_id, task_ids)
    np.testing.assert_array_equal(batch.state_id, state_ids)
    for n, (t, s) in enumerate(zip(task_ids, state_ids)):
        frames, steps, success = replay(int(t), int(s), seed, limit)
        assert tr.finish_step[n] == steps and tr.success[n] == success, f"row {n}"
        assert tr.chunk_valid[n].sum() == len(frames) and tr.chunk_valid[n, : len(frames)].all()
        for c, f in enumerate(frames):
            np.testing.assert_array_equal(batch.images[n, c, 0], f, err_msg=f"row {n} call {c}")
            assert tuple(tr.actions_tokens[n, c, :2]) == (n, c)


def logits_of(policy, images, ids, mask, preprocess):
    """Policy logits for stored policy inputs, in batches of 4 (one compiled shape)."""
    out = []
    for i in range(0, len(images), 4):
        sl = slice(i, i + 4)
        im, pi, pm = images[sl], ids[sl], mask[sl]
        n = len(im)
        pad = lambda x: np.concatenate([x, np.repeat(x[:1], 4 - n, 0)])  # noqa: E731
        px = preprocess_images(jnp.asarray(pad(im)), **preprocess)
        out.append(np.asarray(policy.action_logits(px, pad(pi), pad(pm)))[:n])
    return np.concatenate(out)


# ---- simulators that fail on purpose -------------------------------------------------------------
class FaultOnceTabletop(TabletopEnv):
    """The tabletop task whose first chunk at HANG_STATE hangs and at CRASH_STATE kills the env
    process, once per marker directory (a restarted simulator then runs normally); every chunk at
    SLOW_STATE takes 0.4 s longer."""

    def __init__(self, marker_dir: str, **kw):
        super().__init__(**kw)
        self.marker_dir = Path(marker_dir)
        self._state = -1

    def reset(self, task_id, state_id, seed):
        self._state = state_id
        return super().reset(task_id, state_id, seed)

    def chunk_step(self, actions, render_every_substep=False):
        if self._state == SLOW_STATE:
            time.sleep(0.4)
        marker = self.marker_dir / str(self._state)
        if self._state in (HANG_STATE, CRASH_STATE) and not marker.exists():
            marker.touch()
            if self._state == HANG_STATE:
                time.sleep(600)
            os._exit(3)
        return super().chunk_step(actions, render_every_substep)


def make_fault_once(index: int, marker_dir: str) -> FaultOnceTabletop:
    return FaultOnceTabletop(marker_dir, image_size=IMAGE, max_episode_steps=LIMIT)


def fault_once_vector_env(num_envs: int, *, name: str, marker_dir: str) -> SubprocVectorEnv:
    return SubprocVectorEnv(functools.partial(make_fault_once, marker_dir=marker_dir), num_envs, name=name,
                            max_episode_steps=LIMIT)


# ---- pools ---------------------------------------------------------------------------------------
def tabletop_pool(kind: str, env_fn=None, *, num_envs: int = 1, placement=None):
    """A simulator pool of 2 stages x `num_envs` envs per worker: the tabletop task at IMAGE px with
    LIMIT-step episodes, or `env_fn`'s. kind "ray": a `SimPool` of Ray actors (its workers as `placement`
    places them; default 2, colocated on the local node); "local": a `LocalSimPool` of 2 workers in this
    process. The same layout for both, so their tests compare like with like."""
    env_fn = env_fn or functools.partial(make_tabletop_vector_env, image_size=IMAGE, max_episode_steps=LIMIT)
    if kind == "local":
        from vlajax.envs.local_pool import LocalSimPool

        return LocalSimPool(env_fn, num_envs=num_envs, num_stages=2, num_workers=2)
    from vlajax.distributed.placement import Colocated
    from vlajax.distributed.ray_sim import SimPool

    placement = placement or Colocated.standalone(env_workers_per_node=2, env_cpus_per_worker=0.5)
    return SimPool(env_fn, num_envs=num_envs, num_stages=2, placement=placement)
