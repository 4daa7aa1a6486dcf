"""Put any Gymnasium env that renders RGB images behind `SingleEnv`, so it runs in a
`SubprocVectorEnv` and through the rollout loop like LIBERO or the tabletop task.

One Gymnasium env id = one task. The 7-d policy action is mapped to the env's action space by
`action_fn` (default: the first n entries, rescaled from [-1, 1] to a Box's bounds); the image is
`env.render()`; proprio is the flattened observation vector (or `proprio_fn(obs)`); success is
`success_fn(obs, reward, terminated, truncated, info)` (default: `info["is_success"]`). An episode
that Gymnasium ends without success is reported as `stopped` (the vector env truncates it).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from vlajax.envs.base import EnvOutput, SingleEnv, TaskSpec
from vlajax.envs.subproc import set_default_gl_backend


def _default_success(obs, reward, terminated, truncated, info) -> bool:
    return bool(info.get("is_success", False))


def _resize_nearest(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    rows = (np.arange(hw[0]) * img.shape[0] // hw[0]).clip(0, img.shape[0] - 1)
    cols = (np.arange(hw[1]) * img.shape[1] // hw[1]).clip(0, img.shape[1] - 1)
    return img[rows][:, cols]


class GymnasiumEnv(SingleEnv):
    """`gymnasium.make(env_id, render_mode="rgb_array", **make_kwargs)` as a one-task SingleEnv.

    instruction: the language instruction of its single task.
    max_episode_steps: the task's limit; also given to `gymnasium.make` (default: the env spec's).
    num_init_states: reset seeds are `seed * num_init_states + state_id` (state_id when seed=0).
    camera: the key of the rendered image in `EnvOutput.images`.
    image_size: resize renders (nearest neighbour) to (H, W); None keeps the env's size.
    action_fn: (A,) float policy action -> env action. proprio_fn: env observation -> (D,) array.
    """

    def __init__(
        self,
        env_id: str,
        instruction: str,
        *,
        task_name: str | None = None,
        max_episode_steps: int | None = None,
        num_init_states: int = 1000,
        camera: str = "agentview",
        image_size: int | tuple[int, int] | None = None,
        action_fn: Callable[[np.ndarray], Any] | None = None,
        proprio_fn: Callable[[Any], np.ndarray] | None = None,
        success_fn: Callable[..., bool] | None = None,
        action_dim: int = 7,
        **make_kwargs,
    ):
        set_default_gl_backend()  # Gymnasium's MuJoCo envs import mujoco lazily, after this
        import gymnasium

        if max_episode_steps is not None:
            make_kwargs["max_episode_steps"] = max_episode_steps
        self.env = gymnasium.make(env_id, render_mode="rgb_array", **make_kwargs)
        limit = max_episode_steps or (self.env.spec.max_episode_steps if self.env.spec else None)
        if not limit:
            raise ValueError(f"GymnasiumEnv({env_id!r}): no max_episode_steps given and the env spec has none")
        self._tasks = (TaskSpec(task_name or env_id, instruction, num_init_states, int(limit)),)
        self.action_dim = int(action_dim)
        self.camera = camera
        self.image_hw = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.proprio_fn = proprio_fn
        self.success_fn = success_fn or _default_success
        space = self.env.action_space
        if action_fn is None:
            if not isinstance(space, gymnasium.spaces.Box):
                raise ValueError(f"GymnasiumEnv({env_id!r}): action space {space} is not a Box; pass action_fn")
            if int(np.prod(space.shape)) > self.action_dim:
                raise ValueError(
                    f"GymnasiumEnv({env_id!r}): action space {space.shape} has more than "
                    f"action_dim={self.action_dim} entries; pass action_fn"
                )
        self.action_fn = action_fn or self._box_action
        self._obs: Any = None
        self._num_init_states = num_init_states

    @property
    def tasks(self) -> Sequence[TaskSpec]:
        return self._tasks

    def _box_action(self, a: np.ndarray) -> np.ndarray:
        """First n entries of the policy action, mapped from [-1, 1] to the Box bounds (where finite)."""
        space = self.env.action_space
        n = int(np.prod(space.shape))
        x = np.clip(np.asarray(a[:n], dtype=np.float64), -1.0, 1.0).reshape(space.shape)
        lo, hi = space.low.astype(np.float64), space.high.astype(np.float64)
        finite = np.isfinite(lo) & np.isfinite(hi)
        x = np.where(finite, lo + (x + 1.0) * 0.5 * (hi - lo), x)
        return x.astype(space.dtype)

    def reset(self, task_id: int, state_id: int, seed: int) -> EnvOutput:
        if task_id != 0:
            raise ValueError(f"GymnasiumEnv({self._tasks[0].name}) has one task (id 0), got {task_id}")
        self._obs, _ = self.env.reset(seed=int(seed) * self._num_init_states + int(state_id))
        return self._output(self._render(), False, 0)

    def chunk_step(self, actions: np.ndarray, render_every_substep: bool = False) -> EnvOutput:
        frames, success, stopped, steps = [], False, False, 0
        for a in np.asarray(actions):
            self._obs, reward, terminated, truncated, info = self.env.step(self.action_fn(a))
            steps += 1
            success = bool(self.success_fn(self._obs, reward, terminated, truncated, info))
            stopped = not success and bool(terminated or truncated)
            if render_every_substep:
                frames.append(self._render())
            if success or stopped:
                break
        images = frames[-1] if frames else self._render()
        substep = {k: np.stack([f[k] for f in frames]) for k in images} if frames else None
        return self._output(images, success, steps, stopped, substep)

    def _render(self) -> dict[str, np.ndarray]:
        img = np.asarray(self.env.render(), dtype=np.uint8)
        if self.image_hw is not None:
            img = _resize_nearest(img, self.image_hw)
        return {self.camera: np.ascontiguousarray(img[..., :3])}

    def _output(self, images, success, steps, stopped=False, substep=None) -> EnvOutput:
        if self.proprio_fn is not None:
            proprio = np.asarray(self.proprio_fn(self._obs), dtype=np.float32)
        elif isinstance(self._obs, np.ndarray):
            proprio = self._obs.astype(np.float32).ravel()
        else:
            raise TypeError(
                f"GymnasiumEnv({self._tasks[0].name}): observation of type {type(self._obs).__name__} "
                "is not an array; pass proprio_fn"
            )
        return EnvOutput(images, proprio, self._tasks[0].instruction, success, steps, stopped, substep)

    def close(self) -> None:
        self.env.close()


def make_gymnasium_env(index: int, env_id: str, instruction: str, **kw) -> GymnasiumEnv:
    """Picklable factory for `SubprocVectorEnv`: `functools.partial(make_gymnasium_env, env_id=...,
    instruction=..., **kw)`."""
    return GymnasiumEnv(env_id, instruction, **kw)
