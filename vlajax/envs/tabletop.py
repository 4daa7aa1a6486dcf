"""The project's own MuJoCo tabletop task: "move the gripper to the <colour> block".

Why it exists: a task small enough that a GRPO policy learns it from image + instruction in
minutes on a laptop CPU, with LIBERO's interface (7-d end-effector-delta actions, 8-d proprio,
an "agentview" camera), so the whole training stack can be exercised without LIBERO.

Scene: a dark floor, a light-grey table, three mocap blocks (red, green, blue) and a mocap-driven
white gripper with two slide-joint fingers, seen by a top-down camera. Blocks never move (there are
no contacts); the gripper moves by `max_step` metres per unit action per env step, clipped to the
workspace. Success: the gripper centre is within `success_radius` of the target block in xy
(height is modelled and visible but not part of the predicate).

Initial states: `(seed, state_id)` deterministically sample the block layout and the gripper start,
independently of the task, so the same state under different instructions shows the same image
and only the language tells the target apart.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any, Sequence

import numpy as np

from vlajax.envs.subproc import SubprocVectorEnv, set_default_gl_backend

set_default_gl_backend()  # must precede `import mujoco`: the GL backend is chosen at import time
import mujoco  # noqa: E402

from vlajax.envs.base import EnvOutput, SingleEnv, TaskSpec  # noqa: E402

COLOURS = ("red", "green", "blue")
CAMERA = "agentview"
INSTRUCTION = "move the gripper to the {colour} block"

TABLE_HALF = 0.30  # table half-extent (m); the camera sees slightly more than the table
WORKSPACE_HALF = 0.26  # the gripper centre stays within +-WORKSPACE_HALF in x and y
BLOCK_RANGE = 0.22  # block centres are sampled within +-BLOCK_RANGE
BLOCK_HALF = 0.03
Z_RANGE = (0.08, 0.20)  # gripper height range (m above the table)
Z_START = 0.14
FINGER_OPEN = 0.02  # finger slide-joint position when open (m)
# Range of each proprio dim (what a policy's normalisation maps to [-1, 1], as OFT's q01 / q99 do
# for a dataset): eef xyz over the workspace, axis-angle constant (pi, 0, 0) at the centre of a
# unit range, fingers closed..open.
PROPRIO_LOW = np.array([-WORKSPACE_HALF, -WORKSPACE_HALF, Z_RANGE[0], np.pi - 1, -1, -1, 0, 0], np.float32)
PROPRIO_HIGH = np.array([WORKSPACE_HALF, WORKSPACE_HALF, Z_RANGE[1], np.pi + 1, 1, 1, FINGER_OPEN, FINGER_OPEN],
                        np.float32)

_MJCF = """
<mujoco model="vlajax_tabletop">
  <option timestep="0.01" gravity="0 0 -9.81"/>
  <visual>
    <headlight ambient="0.55 0.55 0.55" diffuse="0.45 0.45 0.45" specular="0 0 0"/>
    <quality shadowsize="0" offsamples="0"/>
    <global offwidth="{width}" offheight="{height}"/>
  </visual>
  <default>
    <geom contype="0" conaffinity="0"/>
  </default>
  <worldbody>
    <geom name="floor" type="plane" size="2 2 1" rgba="0.08 0.08 0.1 1"/>
    <geom name="table" type="box" pos="0 0 -0.01" size="{table} {table} 0.01" rgba="0.55 0.55 0.52 1"/>
    <body name="block_red" mocap="true" pos="0.1 0 {block}">
      <geom type="box" size="{block} {block} {block}" rgba="0.95 0.05 0.05 1"/>
    </body>
    <body name="block_green" mocap="true" pos="0 0.1 {block}">
      <geom type="box" size="{block} {block} {block}" rgba="0.05 0.85 0.05 1"/>
    </body>
    <body name="block_blue" mocap="true" pos="-0.1 0 {block}">
      <geom type="box" size="{block} {block} {block}" rgba="0.1 0.2 1.0 1"/>
    </body>
    <body name="gripper" mocap="true" pos="0 0 {zstart}" quat="0 1 0 0">
      <geom type="cylinder" size="0.018 0.012" rgba="1 1 1 1"/>
      <geom type="box" pos="0 0 0.012" size="0.035 0.008 0.006" rgba="1 1 1 1"/>
      <body name="finger_left" pos="0 0 0.03">
        <joint name="finger_left" type="slide" axis="0 1 0" range="0 {fopen}" damping="1"/>
        <geom type="box" size="0.006 0.006 0.02" pos="0 0.008 0" rgba="0.9 0.9 0.2 1" mass="0.01"/>
      </body>
      <body name="finger_right" pos="0 0 0.03">
        <joint name="finger_right" type="slide" axis="0 -1 0" range="0 {fopen}" damping="1"/>
        <geom type="box" size="0.006 0.006 0.02" pos="0 -0.008 0" rgba="0.9 0.9 0.2 1" mass="0.01"/>
      </body>
    </body>
    <camera name="{camera}" pos="0 0 0.95" xyaxes="1 0 0 0 1 0" fovy="{fovy}"/>
  </worldbody>
  <actuator>
    <position joint="finger_left" kp="20" ctrlrange="0 {fopen}"/>
    <position joint="finger_right" kp="20" ctrlrange="0 {fopen}"/>
  </actuator>
</mujoco>
"""


def tabletop_mjcf(image_size: int | tuple[int, int] = 64) -> str:
    """The scene as an MJCF string; `image_size` sets the offscreen buffer (H, W)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    fovy = float(np.degrees(2 * np.arctan((TABLE_HALF + 0.02) / 0.95)))
    return _MJCF.format(
        width=max(w, 64), height=max(h, 64), table=TABLE_HALF, block=BLOCK_HALF,
        zstart=Z_START, fopen=FINGER_OPEN, camera=CAMERA, fovy=f"{fovy:.3f}",
    )


# Block home spots (red, green, blue) of the "tabletop_anchored" suite.
ANCHORS = np.array([[-0.15, 0.12], [0.15, 0.12], [0.0, -0.16]])
# Suites: env kwargs. "tabletop": blocks anywhere (the policy must find the named block in the
# image); "tabletop_anchored": each block within +-3 cm of its home spot, so the instruction alone
# says roughly where to go and the image refines it (what a from-scratch policy learns in minutes).
SUITES = {"tabletop": {}, "tabletop_anchored": {"block_jitter": 0.03}}


def sample_layout(seed: int, state_id: int, min_sep: float = 0.12, min_start_dist: float = 0.15,
                  block_jitter: float | None = None):
    """Deterministic layout for (seed, state_id): blocks (3, 2) xy and gripper start (2,) xy.

    Blocks are uniform over the table at least `min_sep` apart, or with `block_jitter` within that
    distance of their `ANCHORS`; the gripper starts at least `min_start_dist` from every block, so no
    episode succeeds at reset."""
    rng = np.random.default_rng([int(seed), int(state_id), 0x7AB1E])
    while True:
        if block_jitter is None:
            blocks = rng.uniform(-BLOCK_RANGE, BLOCK_RANGE, size=(3, 2))
        else:
            blocks = ANCHORS + rng.uniform(-block_jitter, block_jitter, size=(3, 2))
        d = np.linalg.norm(blocks[:, None] - blocks[None], axis=-1)
        if d[np.triu_indices(3, 1)].min() >= min_sep:
            break
    while True:
        start = rng.uniform(-BLOCK_RANGE, BLOCK_RANGE, size=2)
        if np.linalg.norm(blocks - start, axis=-1).min() >= min_start_dist:
            return blocks, start


class TabletopEnv(SingleEnv):
    """One tabletop simulator (see module docstring). Lives inside a `SubprocVectorEnv` worker.

    Actions: (K, 7) `[dx, dy, dz, droll, dpitch, dyaw, gripper]` in [-1, 1] (clipped); translation
    is scaled by `max_step` m per env step, rotation is accepted and ignored, gripper < 0 opens and
    >= 0 closes the fingers (LIBERO convention: -1 = open).
    Observation: images {"agentview": (H, W, 3) uint8}, proprio (8,) float32 =
    [eef xyz (3), eef axis-angle (3, constant: pointing down), finger qpos (2)].
    """

    action_dim = 7

    def __init__(
        self,
        image_size: int | tuple[int, int] = 64,
        *,
        max_episode_steps: int = 64,
        num_init_states: int = 1000,
        max_step: float = 0.05,
        success_radius: float = 0.05,
        physics_substeps: int = 2,
        render: bool = True,
        block_jitter: float | None = None,
    ):
        self.image_hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.max_step = float(max_step)
        self.success_radius = float(success_radius)
        self.physics_substeps = int(physics_substeps)
        self.block_jitter = block_jitter
        self._tasks = tuple(
            TaskSpec(f"reach_{c}", INSTRUCTION.format(colour=c), num_init_states, max_episode_steps)
            for c in COLOURS
        )
        self.model = mujoco.MjModel.from_xml_string(tabletop_mjcf(self.image_hw))
        self.data = mujoco.MjData(self.model)
        mid = lambda name: self.model.body_mocapid[self.model.body(name).id]  # noqa: E731
        self._block_mocap = [mid(f"block_{c}") for c in COLOURS]
        self._grip_mocap = mid("gripper")
        self._finger_qadr = [self.model.joint(f"finger_{s}").qposadr[0] for s in ("left", "right")]
        # Gripper points down (quat 0 1 0 0 = 180 deg about x): axis-angle (pi, 0, 0).
        self._axis_angle = np.array([np.pi, 0.0, 0.0], dtype=np.float32)
        self._renderer = _make_renderer(self.model, self.image_hw) if render else None
        # Free the GL context before interpreter teardown even if close() is never called
        # (MuJoCo's own __del__ then fails noisily with EGL).
        self._finalizer = weakref.finalize(self, _close_renderer, self._renderer)
        self._task_id: int | None = None
        self._target = np.zeros(2)
        self._pos = np.zeros(3)

    @property
    def tasks(self) -> Sequence[TaskSpec]:
        return self._tasks

    # ---- simulation ---------------------------------------------------------------------------
    def reset(self, task_id: int, state_id: int, seed: int) -> EnvOutput:
        blocks, start = sample_layout(seed, state_id, block_jitter=self.block_jitter)
        mujoco.mj_resetData(self.model, self.data)
        for mocap, xy in zip(self._block_mocap, blocks):
            self.data.mocap_pos[mocap] = (xy[0], xy[1], BLOCK_HALF)
        self._pos = np.array([start[0], start[1], Z_START])
        self.data.mocap_pos[self._grip_mocap] = self._pos
        for adr in self._finger_qadr:
            self.data.qpos[adr] = FINGER_OPEN
        self.data.ctrl[:] = FINGER_OPEN
        mujoco.mj_forward(self.model, self.data)
        self._task_id = task_id
        self._target = blocks[task_id]
        return self._output(success=self._success(), steps=0, images=self._render())

    def chunk_step(self, actions: np.ndarray, render_every_substep: bool = False) -> EnvOutput:
        if self._task_id is None:
            raise RuntimeError("TabletopEnv.chunk_step called before reset")
        actions = np.clip(np.asarray(actions, dtype=np.float64), -1.0, 1.0)
        lo = np.array([-WORKSPACE_HALF, -WORKSPACE_HALF, Z_RANGE[0]])
        hi = np.array([WORKSPACE_HALF, WORKSPACE_HALF, Z_RANGE[1]])
        frames: list[dict[str, np.ndarray]] = []
        success, steps = False, 0
        for a in actions:
            self._pos = np.clip(self._pos + self.max_step * a[:3], lo, hi)
            self.data.mocap_pos[self._grip_mocap] = self._pos
            self.data.ctrl[:] = FINGER_OPEN if a[6] < 0 else 0.0
            for _ in range(self.physics_substeps):
                mujoco.mj_step(self.model, self.data)
            steps += 1
            success = self._success()
            if render_every_substep:
                frames.append(self._render())
            if success:
                break
        images = frames[-1] if frames else self._render()
        substep = {k: np.stack([f[k] for f in frames]) for k in images} if frames else None
        return self._output(success, steps, images, substep)

    def _success(self) -> bool:
        return bool(np.linalg.norm(self._pos[:2] - self._target) < self.success_radius)

    def _render(self) -> dict[str, np.ndarray]:
        if self._renderer is None:
            return {}
        self._renderer.update_scene(self.data, camera=CAMERA)
        return {CAMERA: self._renderer.render().copy()}

    def _output(self, success, steps, images, substep_images=None) -> EnvOutput:
        fingers = self.data.qpos[self._finger_qadr].astype(np.float32)
        proprio = np.concatenate([self._pos.astype(np.float32), self._axis_angle, fingers])
        instruction = self._tasks[self._task_id].instruction
        return EnvOutput(images, proprio, instruction, success, steps, substep_images=substep_images)

    # ---- helpers for scripted policies and tests ------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Gripper position (3,) and target xy (2,), for scripted (directed) policies."""
        return {"gripper": self._pos.copy(), "target": np.asarray(self._target).copy()}

    def close(self) -> None:
        self._finalizer()
        self._renderer = None


def _make_renderer(model, hw: tuple[int, int]):
    try:
        return mujoco.Renderer(model, *hw)
    except Exception as e:
        raise RuntimeError(
            f"TabletopEnv: cannot create a MuJoCo renderer with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}"
            f" ({e}). Set MUJOCO_GL=egl (or osmesa, which needs libosmesa6) before mujoco is first "
            "imported in this process, or pass render=False."
        ) from e


def _close_renderer(renderer) -> None:
    if renderer is not None:
        renderer.close()


def target_xy(task_id: int, state_id: int, seed: int = 0, block_jitter: float | None = None) -> np.ndarray:
    """(2,) xy of the target block of (task, state, seed): what a scripted policy aims for."""
    return sample_layout(seed, state_id, block_jitter=block_jitter)[0][task_id]


def directed_actions(gripper_xy: np.ndarray, target_xy: np.ndarray, k: int, max_step: float = 0.05):
    """(K, 7) actions that move straight toward the target at full speed (a reference policy)."""
    delta = np.asarray(target_xy, dtype=np.float64) - np.asarray(gripper_xy, dtype=np.float64)
    out = np.zeros((k, 7), dtype=np.float32)
    out[:, 6] = -1.0
    for j in range(k):
        step = np.clip(delta / max_step, -1.0, 1.0)
        out[j, :2] = step
        delta = delta - step * max_step
    return out


def _check_suite(suite: str) -> None:
    if suite not in SUITES:
        raise ValueError(f"unknown tabletop suite {suite!r}; choose one of {sorted(SUITES)}")


def make_tabletop_env(index: int = 0, **kw) -> TabletopEnv:
    """Picklable factory for `SubprocVectorEnv` (use functools.partial to bind keyword args)."""
    return TabletopEnv(**kw)


def make_tabletop_vector_env(
    num_envs: int,
    image_size: int | tuple[int, int] = 64,
    max_episode_steps: int = 64,
    *,
    suite: str = "tabletop",
    env_kwargs: dict[str, Any] | None = None,
    **kw,
):
    """A `SubprocVectorEnv` of `num_envs` tabletop envs of `suite` (`SUITES`); `kw` go to
    `SubprocVectorEnv`, `env_kwargs` to `TabletopEnv` (e.g. max_step, success_radius, render)."""
    _check_suite(suite)
    factory = functools.partial(
        make_tabletop_env, image_size=image_size, max_episode_steps=max_episode_steps,
        **{**SUITES[suite], **(env_kwargs or {})},
    )
    kw.setdefault("name", suite)
    return SubprocVectorEnv(factory, num_envs, max_episode_steps=max_episode_steps, **kw)


def vector_env_fn(*, suite: str, image_size: tuple[int, int], cameras: Sequence[str], max_episode_steps: int,
                  video_dir: str | None = None) -> functools.partial:
    """The run's picklable `env_fn(num_envs, *, name)` (`vlajax.envs.simulators`). The task has one
    camera (`CAMERA`), so `cameras` is not used: the Ray pool checks the policy's are there."""
    del cameras
    _check_suite(suite)
    video = {"video_dir": video_dir} if video_dir else {}
    return functools.partial(make_tabletop_vector_env, image_size=tuple(image_size),
                             max_episode_steps=max_episode_steps, suite=suite, **video)


def scratch_statistics(action_dim: int, key: str) -> dict:
    """`dataset_statistics.json` content (under `key`) for a policy trained from scratch here: identity
    actions ([-1, 1] kept, the gripper not un-normalised: `vlajax.model.oft.actions.ActionStats.identity`)
    and this env's proprio ranges, which the policy normalises to [-1, 1] as OFT does with a dataset's
    q01 / q99 (raw, the gripper xy would be a +-0.26 ripple beside a constant pi)."""
    action = {"q01": [-1.0] * action_dim, "q99": [1.0] * action_dim, "mask": [True] * (action_dim - 1) + [False]}
    proprio = {"q01": PROPRIO_LOW.tolist(), "q99": PROPRIO_HIGH.tolist()}
    return {key: {"action": action, "proprio": proprio}}
