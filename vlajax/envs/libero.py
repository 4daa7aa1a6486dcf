"""LIBERO (libero 0.1.1 on robosuite 1.4 / MuJoCo 3) behind vlajax's `SingleEnv` interface.

One `LiberoEnv` is one `OffScreenRenderEnv` in one worker process of a `SubprocVectorEnv`
(`make_libero_vector_env`). What it does, and why:

- Reset is the sequence that reproduces LIBERO's evaluation: `seed(seed); reset();
  set_init_state(init_states[state_id])`, then `num_settle_steps` (10) no-op steps
  `[0,0,0,0,0,0,-1]`. The scene is rebuilt only when the task changes; otherwise robosuite's
  `hard_reset=False` path is used (here 0.4-0.6 s per reset including the settle steps and one
  render, vs 1.4-2.7 s for a hard reset or rebuild on one CPU core). What it owes a fresh env: the
  same simulator state and solver warm start bit for bit, so a reused env and a fresh one follow
  LIBERO's own (hard-reset) env exactly. That takes two things beyond robosuite's `sim.reset()`:
  the Panda gripper's command ramp zeroed after `reset()`, and the warm start that a hard reset's
  new MjData gets from the two `mj_forward` its new MjSim and render context run (before MuJoCo
  3.3.6 each forward updates the warm start the next solve starts from; without them libero_object
  states differ by ~5e-15 after reset, 2e-6 a few chunks later). Tested against LIBERO on
  libero_10, libero_object and libero_goal. Not owed, as LIBERO itself does not keep it: where
  LIBERO's sampler places fixtures (e.g. libero_10 tasks 3, 8, 9, libero_spatial task 4) their
  poses -- model data, not state -- differ between two of LIBERO's own hard resets with the same
  seed, so images (and, through contacts, states) there can differ from any one LIBERO run.
- Sampled initial states (for training apart from the 50 evaluation states): a state id from
  `base.SAMPLED_STATE_BASE` on means "the state LIBERO's placement sampler draws after
  `seed(state_id - SAMPLED_STATE_BASE)`", settled like a stored one. The bodies are put back at their
  compiled poses first (LIBERO places objects on fixtures where the last reset left the fixtures), so
  the state depends on the seed alone, in a reused or a fresh env.
- `chunk_step` runs (K, 7) actions open-loop and stops after the sub-step at which LIBERO's own
  success predicate holds (the `done` of `env.step`).
- Cameras are rendered for the last executed sub-step only (rendering is 80-90% of a step on CPU).
  robosuite samples observations at an inner MuJoCo step *before* a control step ends (inner step
  23 of 25), so rendering after `step` returns gives different images. Instead, each camera
  observable keeps its normal robosuite sampling schedule but its sensor is replaced by one that
  copies `MjData` (`mj_copyData`, ~40 us; bindings without it, e.g. the pinned 3.3.2, copy the
  model-sized arrays rendering reads, ~0.15 ms) at its sampling instant; after the chunk, the snapshot
  of the last executed sub-step -- planned or cut short by success -- is rendered with robosuite's
  own camera sensor. The images are bit-identical to rendering every sub-step
  (`render_every_substep=True`, which runs robosuite's sensors unmodified).
- Physics: robosuite's control loop runs a full `mj_forward` (twice: the loop and the OSC
  controller) before every `mj_step`, which repeats it. With `split_physics` (default), while
  `chunk_step` and the settle steps run, work whose result is already there is skipped, and states
  stay bit-identical to unmodified LIBERO (Euler integrator only, as in LIBERO; tested):
  - MuJoCo >= 3.3.6: the loop's `forward`/`step` become `mj_step1`/`mj_step2`, so each stage is
    computed once (~25% less physics time).
  - MuJoCo < 3.3.6 (the pinned 3.3.2): every `mj_forward` overwrites the constraint solver's warm
    start (`qacc_warmstart`; 3.3.6 moved that to the end of `mj_step`), and the next solve starts
    from it, so skipping a forward changes states (by up to 2e-6 within 34 steps). All three
    constraint solves stay; only the position and velocity stages (collisions included) are
    computed once per sub-step (mj_forward, then the acceleration stage alone, then `mj_step2`):
    MuJoCo time per sub-step 328 -> 179 us in libero_10, within 2% of the inexact step1/step2 form
    (benchmarks/RESULTS.md, #25).
- Images are returned exactly as robosuite renders them (`obs["<camera>_image"]`): OpenGL row
  order, i.e. upside-down. The OpenVLA-OFT/SimpleVLA preprocessing rotates them by 180 degrees
  (`img[::-1, ::-1]`, both axes) to match its training data; the policy side must do that exactly
  once, and this env never does.
- Proprio (8,) float32 as OpenVLA-OFT: eef_pos (3) + axis-angle of eef_quat (3) + gripper_qpos (2).
- Task tables and init states come from the installed LIBERO package, read without importing
  torch (see `libero_setup`).
- MuJoCo: LIBERO settles its init states and renders its floors as in its training data only on
  the validated releases (`libero_setup.VALIDATED_MUJOCO`; vlajax pins 3.3.2); on any other the env
  warns (`MujocoVersionWarning` and a log line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vlajax.envs import libero_setup
from vlajax.envs.base import NOOP_ACTION, EnvError, EnvOutput, SingleEnv, TaskSpec, sampled_state_seed
from vlajax.envs.libero_expert import ExpertError, LiberoExpert
from vlajax.envs.subproc import SubprocVectorEnv

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
ACTION_DIM = 7
PROPRIO_DIM = 8
NUM_SETTLE_STEPS = 10  # OpenVLA-OFT / SimpleVLA `num_steps_wait`
DEFAULT_CAMERAS = ("agentview",)
# Every LIBERO scene has these two; others (e.g. "frontview") exist in some scenes only.
KNOWN_CAMERAS = ("agentview", "robot0_eye_in_hand")


@dataclasses.dataclass(frozen=True)
class LiberoTask:
    """One task of a suite, as LIBERO's benchmark defines it."""

    suite: str
    name: str
    instruction: str
    bddl_file: str  # absolute path of the task's BDDL problem file
    init_states_file: str  # absolute path of its `.pruned_init` file


def suite_tasks(suite: str) -> list[LiberoTask]:
    """The tasks of `suite` in LIBERO's benchmark order (`benchmark.get_benchmark_dict()[suite]`)."""
    if suite not in SUITES:
        raise EnvError(f"unknown LIBERO suite {suite!r}; valid suites: {', '.join(SUITES)}")
    libero_setup.ensure_config()
    from libero.libero import get_libero_path

    bddl_root = Path(get_libero_path("bddl_files")) / suite
    init_root = Path(get_libero_path("init_states")) / suite
    return [
        LiberoTask(
            suite=suite,
            name=name,
            instruction=libero_setup.language_from_task_name(name),
            bddl_file=str(bddl_root / f"{name}.bddl"),
            init_states_file=str(init_root / f"{name}.pruned_init"),
        )
        for name in libero_setup.load_suite_task_names()[suite]
    ]


def proprio_from_obs(obs: Mapping[str, np.ndarray]) -> np.ndarray:
    """(8,) float32: eef_pos, axis-angle(eef_quat), gripper_qpos (the OpenVLA-OFT LIBERO state)."""
    from robosuite.utils.transform_utils import quat2axisangle

    quat = np.array(obs["robot0_eef_quat"], dtype=np.float64)  # copy: quat2axisangle clips in place
    return np.concatenate(
        [obs["robot0_eef_pos"], quat2axisangle(quat), obs["robot0_gripper_qpos"]]
    ).astype(np.float32)


# MuJoCo 3.3.6 moved the solver's warm-start update (qacc_warmstart <- qacc) from every mj_forward
# to the end of mj_step (changelog, "Breaking API changes"); `LiberoEnv._physics` depends on which.
WARMSTART_IN_STEP_SINCE = "3.3.6"


@functools.lru_cache(maxsize=None)
def _forward_sets_warmstart() -> bool:
    """True where every mj_forward overwrites the warm start (the installed MuJoCo < 3.3.6)."""
    return libero_setup._release(libero_setup.installed_mujoco_version()) < libero_setup._release(
        WARMSTART_IN_STEP_SINCE)


def _libero_reset(env):
    """`env.reset()` retrying only on RandomizationError (a failed object placement), as LIBERO
    means to. LIBERO's own loop ends in `finally: continue`, which retries on every exception, so
    an error inside reset (e.g. a MuJoCo API a release lacks) would hang the worker forever."""
    from robosuite.utils.errors import RandomizationError

    while True:
        try:
            return env.env.reset()
        except RandomizationError:
            continue


def _data_copier(model):
    """`copy(dst, model, src)`: what rendering reads from MjData `src`, into `dst` (same model).

    `mj_copyData` where the bindings have it (not up to 3.4.0). Otherwise every array whose size the
    model fixes (poses, cameras, lights, ...; 0.5 MB and ~0.15 ms for a LIBERO scene): copy.copy
    would allocate a whole MjData (~6 ms). Contacts and constraint rows live in MjData's arena and
    are left out (robosuite's renderer does not draw them); so is `plugin_data`, which holds the
    source's plugin instances."""
    import mujoco

    if hasattr(mujoco, "mj_copyData"):
        return mujoco.mj_copyData
    fresh = mujoco.MjData(model)  # arena arrays are empty here, model-sized ones are not
    names = tuple(
        n for n in dir(fresh)
        if not n.startswith("_") and n != "plugin_data"
        and isinstance(getattr(fresh, n), np.ndarray) and getattr(fresh, n).size
    )

    def copy(dst, model, src):
        for n in names:
            np.copyto(getattr(dst, n), getattr(src, n))

    return copy


class _DataView:
    """Stands in for robosuite's MjData wrapper inside its render context (it reads only `._data`)."""

    def __init__(self, data):
        self._data = data


class LiberoEnv(SingleEnv):
    """One LIBERO scene that can be reset to any task of `suite` (see module docstring).

    cameras: robosuite camera names, e.g. ("agentview", "robot0_eye_in_hand").
    image_size: int or (height, width) of every camera image.
    max_episode_steps: reported in `tasks` (the vector env enforces it).
    init_states_override: task id -> (S, state_dim) flattened MuJoCo states that replace LIBERO's
        init states of that task (e.g. states recorded from demonstrations or constructed ones).
    hard_reset: True rebuilds robosuite's model and sim on every reset (slow; for comparison: the
        fast reset gives the same states).
    split_physics: skip the parts of MuJoCo's forward passes robosuite repeats, keeping states
        bit-identical (see module docstring).
    mujoco_gl: MuJoCo GL backend; default: $MUJOCO_GL if set, else egl (osmesa without libEGL).
    """

    action_dim = ACTION_DIM

    def __init__(
        self,
        suite: str,
        *,
        assets_dir: str | os.PathLike | None = None,
        cameras: Sequence[str] = DEFAULT_CAMERAS,
        image_size: int | tuple[int, int] = 256,
        max_episode_steps: int = 512,
        num_settle_steps: int = NUM_SETTLE_STEPS,
        init_states_override: Mapping[int, np.ndarray] | None = None,
        hard_reset: bool = False,
        split_physics: bool = True,
        mujoco_gl: str | None = None,
    ):
        if suite not in SUITES:
            raise EnvError(f"unknown LIBERO suite {suite!r}; valid suites: {', '.join(SUITES)}")
        cameras = tuple(cameras)
        if not cameras or len(set(cameras)) != len(cameras):
            raise EnvError(f"LIBERO {suite}: cameras must be distinct and non-empty, got {cameras}")
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if h < 1 or w < 1:
            raise EnvError(f"LIBERO {suite}: image_size must be positive, got {image_size}")
        if max_episode_steps < 1 or num_settle_steps < 0:
            raise EnvError(
                f"LIBERO {suite}: need max_episode_steps >= 1 and num_settle_steps >= 0, "
                f"got {max_episode_steps} and {num_settle_steps}"
            )
        self.suite = suite
        self.cameras = cameras
        self.image_hw = (int(h), int(w))
        self.num_settle_steps = int(num_settle_steps)
        self.hard_reset = bool(hard_reset)
        self.split_physics = bool(split_physics)
        self.assets_dir = libero_setup.setup_libero(assets_dir, mujoco_gl)
        libero_setup.warn_mujoco_version_once()

        self._libero_tasks = suite_tasks(suite)
        n = len(self._libero_tasks)
        self._init_states: dict[int, np.ndarray] = {}
        for t, states in (init_states_override or {}).items():
            if not 0 <= int(t) < n:
                raise EnvError(f"LIBERO {suite}: init_states_override has task id {t}, valid 0..{n - 1}")
            states = np.array(states, dtype=np.float64)  # a private copy
            if states.ndim != 2 or len(states) == 0:
                raise EnvError(
                    f"LIBERO {suite} task {t}: init_states_override must be (num_states, state_dim), "
                    f"got {states.shape}"
                )
            self._init_states[int(t)] = states
        for t, task in enumerate(self._libero_tasks):
            if t not in self._init_states:
                self._init_states[t] = libero_setup.load_init_states(task.init_states_file)
        self._tasks = tuple(
            TaskSpec(task.name, task.instruction, len(self._init_states[t]), int(max_episode_steps),
                     sampled_states=True)
            for t, task in enumerate(self._libero_tasks)
        )

        self._env = None  # libero OffScreenRenderEnv of task self._task_id
        self._task_id: int | None = None
        self._ready = False  # reset since the last build
        self._raw_obs: dict[str, np.ndarray] = {}  # robosuite's observation after the last reset or step
        self._real_sensors: dict[str, Any] = {}  # camera observable -> robosuite's render sensor
        self._snapshot = None  # MjData copied at the cameras' last sampling instant
        self._snapshot_model = None  # the MjModel it was allocated for
        self._copy_data = None  # copies what rendering reads from one MjData into another
        self._built_body_poses = None  # (body_pos, body_quat) of the scene as compiled (sampled resets)
        self.num_builds = 0  # scenes built so far (a task switch builds one; a fast reset does not)

    # ---- SingleEnv API --------------------------------------------------------------------------
    @property
    def tasks(self) -> Sequence[TaskSpec]:
        return self._tasks

    def init_states(self, task_id: int) -> np.ndarray:
        """(num_init_states, state_dim) flattened MuJoCo states of task `task_id` (read-only view)."""
        task_id, _ = self._check_ids(task_id, 0)
        view = self._init_states[task_id].view()
        view.flags.writeable = False
        return view

    def reset(self, task_id: int, state_id: int, seed: int = 0) -> EnvOutput:
        """Reset task `task_id` to its init state `state_id` and settle; images of the last settle step.

        A sampled state id (`vlajax.envs.base.sampled_state_id(s)`) starts instead from the state
        LIBERO's placement sampler draws after `seed(s)` (then `seed` is unused: the id fixes the
        state), settled the same way; it is the same in any env and process."""
        task_id, state_id = self._check_ids(task_id, state_id)
        if self._env is None or task_id != self._task_id:
            self._build(task_id)
        self._ready = False
        env = self._env
        sample_seed = sampled_state_seed(state_id)
        if sample_seed is not None:
            self._restore_body_poses()
        env.seed(int(seed if sample_seed is None else sample_seed))
        with self._fresh_data_on_reset():
            _libero_reset(env)
        # With hard_reset=False robosuite keeps the gripper's command ramp from the last episode;
        # a fresh env starts it at zero (GripperModel.__init__), so zero it for identical dynamics.
        gripper = env.robots[0].gripper
        gripper.current_action = np.zeros_like(gripper.current_action)
        if self.hard_reset:  # robosuite's hard reset reinstalled its own camera sensors
            self._install_snapshot_sensors()
        # A sampled state goes through set_init_state too, so both kinds are observed and settled alike.
        state = env.get_sim_state() if sample_seed is not None else self._init_states[task_id][state_id]
        obs = env.set_init_state(state)
        with self._physics():
            for _ in range(self.num_settle_steps):
                obs, _, _, _ = env.step(NOOP_ACTION)
        self._ready = True
        self._raw_obs = obs
        return EnvOutput(self._render_snapshot(), proprio_from_obs(obs), self._tasks[task_id].instruction)

    def chunk_step(self, actions: np.ndarray, render_every_substep: bool = False) -> EnvOutput:
        """Execute (K, 7) actions; stop after the sub-step where the task succeeds."""
        actions = self._check_actions(actions)
        env = self._env
        frames: dict[str, list[np.ndarray]] = {c: [] for c in self.cameras}
        success, steps, obs = False, 0, None
        with self._physics(), self._rendering_every_substep(render_every_substep):
            for action in actions:
                obs, _, done, _ = env.step(action)
                steps += 1
                if render_every_substep:
                    for cam in self.cameras:
                        frames[cam].append(np.array(obs[f"{cam}_image"]))
                if done:
                    success = True
                    break
        self._raw_obs = obs
        if render_every_substep:
            images = {cam: f[-1] for cam, f in frames.items()}
            substep_images = {cam: np.stack(f) for cam, f in frames.items()}
        else:
            images, substep_images = self._render_snapshot(), None
        return EnvOutput(
            images, proprio_from_obs(obs), self._tasks[self._task_id].instruction, success, steps,
            substep_images=substep_images,
        )

    def demonstrate(self, task_id: int, state_id: int, seed: int = 0, max_steps: int | None = None) -> dict:
        """One episode of the scripted expert (`run_expert_episode`) from (task, state)."""
        limit = self._tasks[self._check_ids(task_id, state_id)[0]].max_episode_steps
        return run_expert_episode(self, task_id, state_id, seed, max_steps or limit)

    def step_raw(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
        """One control step of (7,) `action`: robosuite's raw observation dict and LIBERO's success.
        For the scripted expert, which reads more of the robot than `EnvOutput` carries; the cameras
        are rendered by `render()`, not here."""
        with self._physics():
            obs, _, done, _ = self._env.step(np.asarray(action, dtype=np.float64))
        self._raw_obs = obs
        return obs, bool(done)

    @property
    def raw_obs(self) -> dict[str, np.ndarray]:
        """robosuite's observation dict after the last reset or step."""
        if not self._ready:
            raise EnvError(f"{self._describe()}: no observation before reset")
        return self._raw_obs

    def render(self) -> dict[str, np.ndarray]:
        """Camera images (OpenGL row order) at the last step's sampling instant."""
        return self._render_snapshot()

    def object_poses(self) -> dict[str, np.ndarray]:
        """Object name -> (7,) world position and quaternion (w, x, y, z) of the task's objects, now.

        For checking where reset left them: LIBERO's init states keep some objects above or inside
        their support, and the settle steps decide where they end up (see tests/test_libero_simulator.py)."""
        if self._env is None:
            raise EnvError(f"LIBERO {self.suite}: object_poses before reset")
        inner = self._env.env
        data = inner.sim.data
        return {
            name: np.concatenate([data.body_xpos[body], data.body_xquat[body]])
            for name, body in inner.obj_body_id.items()
        }

    def close(self) -> None:
        if self._env is not None:
            self._real_sensors.clear()
            self._snapshot = self._snapshot_model = None
            self._env.close()
            self._env = None
            self._task_id = None
            self._ready = False

    # ---- internals ------------------------------------------------------------------------------
    def _describe(self, task_id: int | None = None) -> str:
        t = self._task_id if task_id is None else task_id
        return f"LIBERO {self.suite}" + ("" if t is None else f" task {t} ({self._tasks[t].name})")

    def _check_ids(self, task_id, state_id) -> tuple[int, int]:
        n = len(self._tasks)
        if not isinstance(task_id, (int, np.integer)) or not 0 <= task_id < n:
            raise EnvError(f"LIBERO {self.suite}: task id {task_id!r} out of range (0..{n - 1})")
        spec = self._tasks[task_id]
        if not spec.has_state(state_id):
            raise EnvError(f"{self._describe(int(task_id))}: state id {state_id!r} out of range {spec.state_range()}")
        return int(task_id), int(state_id)

    def _check_actions(self, actions) -> np.ndarray:
        if not self._ready:
            raise EnvError(f"{self._describe()}: chunk_step before reset")
        actions = np.asarray(actions)
        if actions.ndim != 2 or actions.shape[1] != ACTION_DIM or actions.shape[0] < 1:
            raise EnvError(
                f"{self._describe()}: actions must have shape (K>=1, {ACTION_DIM}), got {actions.shape}"
            )
        if not np.issubdtype(actions.dtype, np.number) or not np.isfinite(actions).all():
            raise EnvError(f"{self._describe()}: actions must be finite numbers (got NaN/inf or non-numbers)")
        return actions.astype(np.float64, copy=False)

    def _build(self, task_id: int) -> None:
        """Create the OffScreenRenderEnv of `task_id` (closing the previous scene)."""
        from libero.libero.envs import OffScreenRenderEnv

        self.close()
        task = self._libero_tasks[task_id]
        env = OffScreenRenderEnv(
            bddl_file_name=task.bddl_file,
            camera_names=list(self.cameras),
            camera_heights=self.image_hw[0],
            camera_widths=self.image_hw[1],
            hard_reset=self.hard_reset,
            ignore_done=True,  # episode limits are the vector env's; never robosuite's horizon
        )
        state_dim = env.get_sim_state().shape[0]
        given = self._init_states[task_id].shape[1]
        if given != state_dim:
            env.close()
            raise EnvError(
                f"{self._describe(task_id)}: init states have dimension {given}, "
                f"the scene's state {state_dim}"
            )
        self._env, self._task_id = env, task_id
        self._built_body_poses = None  # the scene's body poses as compiled, read when first needed
        self._real_sensors = {}
        self._install_snapshot_sensors()
        self.num_builds += 1

    def _restore_body_poses(self) -> None:
        """Put every body (the fixtures: cabinet, stove, ...) back at its compiled pose before a sampled
        reset. LIBERO's reset places objects on fixtures at the fixtures' poses left in the model by the
        previous reset (and by the one robosuite's constructor runs unseeded), before it moves the
        fixtures; restored, a sampled state depends on its seed only, as in LIBERO's own hard reset."""
        import mujoco

        inner = self._env.env
        model = inner.sim.model._model
        if self._built_body_poses is None:
            xml = inner.model.get_xml()
            if getattr(inner, "_xml_processor", None) is not None:
                xml = inner._xml_processor(xml)
            compiled = mujoco.MjModel.from_xml_string(xml)  # ~0.1-0.2 s, once per scene
            if compiled.body_pos.shape != model.body_pos.shape:
                raise EnvError(f"{self._describe()}: the recompiled scene has {compiled.nbody} bodies, "
                               f"the live one {model.nbody}")
            self._built_body_poses = (compiled.body_pos.copy(), compiled.body_quat.copy())
        np.copyto(model.body_pos, self._built_body_poses[0])
        np.copyto(model.body_quat, self._built_body_poses[1])

    @contextlib.contextmanager
    def _fresh_data_on_reset(self):
        """While resetting: robosuite's sim.reset() (fast reset) leaves MjData as its hard reset does.

        A hard reset makes a new MjData, and the constructors of MjSim and of its offscreen render
        context each run mj_forward on it before the robot and objects are placed. Before MuJoCo
        3.3.6 those forwards set the solver's warm start that the placement's forwards, and so
        set_init_state's, start from: without them libero_object states differ by ~5e-15 after
        reset, 2e-6 a few chunks later. So: mj_resetData (what a new MjData holds), two mj_forward."""
        import mujoco

        if self.hard_reset:
            yield
            return
        sim = self._env.sim
        model, data = sim.model._model, sim.data._data

        def reset():
            mujoco.mj_resetData(model, data)
            mujoco.mj_forward(model, data)  # MjSim.__init__ (robosuite's _initialize_sim)
            mujoco.mj_forward(model, data)  # MjRenderContext.__init__

        sim.reset = reset
        try:
            yield
        finally:
            del sim.reset

    @contextlib.contextmanager
    def _physics(self):
        """While stepping: robosuite's sim.forward()/sim.step() -> each stage computed once (split_physics).

        robosuite calls forward() twice (its loop, then the controller) and step() once per sub-step.
        Where mj_forward leaves the solver's warm start alone (MuJoCo >= 3.3.6) the forwards become
        mj_step1 (positions and velocities) and step() mj_step2 (the rest). Before 3.3.6 every
        mj_forward's constraint solve overwrites `qacc_warmstart`, and the next solve starts from it,
        so all three solves must stay: the first forward of a sub-step is a full mj_forward, the
        second only its acceleration stage (mj_forwardSkip past the velocity stage), step() mj_step2."""
        import mujoco

        sim = self._env.sim
        model, data = sim.model._model, sim.data._data
        if not self.split_physics or model.opt.integrator != mujoco.mjtIntegrator.mjINT_EULER:
            yield  # mj_step2 is not equivalent to mj_step for RK4; keep robosuite's loop as is
            return
        # Instance attributes shadow MjSim's methods. Only robosuite's step loop and its
        # controllers call these during env.step, always as forward(), [controls], step().
        if _forward_sets_warmstart():
            stale = [True]  # positions/velocities changed since the last forward (or unknown)

            def forward():
                if stale[0]:
                    mujoco.mj_forward(model, data)
                    stale[0] = False
                else:
                    mujoco.mj_forwardSkip(model, data, mujoco.mjtStage.mjSTAGE_VEL, 0)

            def step(with_udd=True):
                mujoco.mj_step2(model, data)
                stale[0] = True

            sim.forward, sim.step = forward, step
        else:
            sim.forward = functools.partial(mujoco.mj_step1, model, data)
            sim.step = lambda with_udd=True: mujoco.mj_step2(model, data)
        try:
            yield
        finally:
            del sim.forward, sim.step

    @contextlib.contextmanager
    def _rendering_every_substep(self, every: bool):
        """Let robosuite's own camera sensors render at every sub-step, then restore the snapshots."""
        if not every:
            yield
            return
        self._use_sensors(self._real_sensors)
        try:
            yield
        finally:
            self._install_snapshot_sensors()

    def _install_snapshot_sensors(self) -> None:
        """Make each camera observable record an MjData snapshot instead of rendering."""
        import mujoco

        inner = self._env.env
        missing = [c for c in self.cameras if f"{c}_image" not in inner._observables]
        if missing:
            raise EnvError(f"{self._describe()}: the scene has no camera {missing} (known: {KNOWN_CAMERAS})")
        model = inner.sim.model._model
        if self._snapshot is None or self._snapshot_model is not model:  # new scene or hard reset
            self._snapshot, self._snapshot_model = mujoco.MjData(model), model
            self._copy_data = _data_copier(model)
        h, w = self.image_hw

        def snapshot(obs_cache, _env=inner, _snap=self._snapshot, _copy=self._copy_data):
            _copy(_snap, _env.sim.model._model, _env.sim.data._data)
            return np.zeros((h, w, 3), dtype=np.uint8)

        for cam in self.cameras:
            name = f"{cam}_image"
            sensor = inner._observables[name]._sensor
            if not getattr(sensor, "_vlajax_snapshot", False):
                self._real_sensors[name] = sensor
        snapshot._vlajax_snapshot = True
        snapshot.__modality__ = "image"
        self._use_sensors({name: snapshot for name in self._real_sensors})

    def _use_sensors(self, sensors: Mapping[str, Any]) -> None:
        # Assign the attribute directly: robosuite's set_sensor would call the sensor to check it
        # (a render, or a snapshot at the wrong instant); the sampling schedule is left untouched.
        for name, sensor in sensors.items():
            self._env.env._observables[name]._sensor = sensor

    def _render_snapshot(self) -> dict[str, np.ndarray]:
        """Render every camera from the MjData snapshot taken at its last sampling instant."""
        ctx = self._env.sim._render_context_offscreen
        live = ctx.data
        ctx.data = _DataView(self._snapshot)
        try:
            return {cam: np.array(self._real_sensors[f"{cam}_image"]({})) for cam in self.cameras}
        finally:
            ctx.data = live


def run_expert_episode(env, task_id: int, state_id: int, seed: int, max_steps: int) -> dict:
    """Reset `env` (a `LiberoEnv`) to (task, state) and let the expert act until LIBERO's success,
    the end of its plan, or `max_steps`. Returns what a policy would have seen before each executed
    action: images {camera: (T, H, W, 3) uint8, OpenGL rows}, proprio (T, 8) float32, actions (T, 7)
    float32, states (T, S) float64, joint_states (T, 7), eef_quat (T, 4), success, steps, and
    `error` (a reason when the expert has no plan for the task, else None)."""
    out = env.reset(task_id, state_id, seed)
    images, obs = out.images, env.raw_obs
    rec: dict[str, list] = {"proprio": [], "actions": [], "states": [], "joint_states": [], "eef_quat": []}
    frames: dict[str, list] = {cam: [] for cam in images}
    expert = LiberoExpert(env)
    error, success = None, False
    try:
        expert.reset(obs)
    except ExpertError as e:
        error = f"{env.suite} task {task_id} ({env.tasks[task_id].name}): {e}"
    while error is None and not expert.done and len(rec["actions"]) < max_steps:
        action = expert.act(obs).astype(np.float32)
        for cam, img in images.items():
            frames[cam].append(img)
        rec["proprio"].append(proprio_from_obs(obs))
        rec["actions"].append(action)
        rec["states"].append(env._env.get_sim_state().copy())
        rec["joint_states"].append(np.asarray(obs["robot0_joint_pos"], dtype=np.float64))
        rec["eef_quat"].append(np.asarray(obs["robot0_eef_quat"], dtype=np.float64))
        obs, success = env.step_raw(action)
        images = env.render()
        if success:
            break
    T = len(rec["actions"])
    state_dim = env._env.get_sim_state().shape[0]
    return {
        "images": {cam: np.stack(f) if f else np.zeros((0,) + images[cam].shape, np.uint8) for cam, f in frames.items()},
        "proprio": np.array(rec["proprio"], np.float32).reshape(T, 8),
        "actions": np.array(rec["actions"], np.float32).reshape(T, 7),
        "states": np.array(rec["states"], np.float64).reshape(T, state_dim),
        "joint_states": np.array(rec["joint_states"], np.float64).reshape(T, 7),
        "eef_quat": np.array(rec["eef_quat"], np.float64).reshape(T, 4),
        "success": bool(success), "steps": T, "error": error,
        "task": env.tasks[task_id].name, "instruction": env.tasks[task_id].instruction,
        "task_id": int(task_id), "state_id": int(state_id),
    }


def _check_suite(suite: str) -> None:
    if suite not in SUITES:
        raise EnvError(f"unknown LIBERO suite {suite!r}; valid suites: {', '.join(SUITES)}")


def _make_env(index: int, **kwargs) -> LiberoEnv:
    del index  # every worker builds the same kind of env; tasks are chosen at reset
    return LiberoEnv(**kwargs)


def make_libero_vector_env(
    suite: str,
    num_envs: int,
    *,
    assets_dir: str | os.PathLike | None = None,
    cameras: Sequence[str] = DEFAULT_CAMERAS,
    image_size: int | tuple[int, int] = 256,
    max_episode_steps: int = 512,
    timeout_s: float = 120.0,
    video_dir: str | None = None,
    name: str | None = None,
    **env_kwargs,
):
    """`num_envs` LiberoEnvs of `suite`, one worker process each (`SubprocVectorEnv`).

    The assets folder is resolved (and a pack extracted) here, once, before workers start.
    env_kwargs: further `LiberoEnv` arguments (num_settle_steps, init_states_override, hard_reset,
    mujoco_gl)."""
    _check_suite(suite)
    assets = libero_setup.resolve_assets_dir(assets_dir)
    libero_setup.warn_mujoco_version_once()  # here too: the workers' warnings may go unseen
    factory = functools.partial(
        _make_env,
        suite=suite,
        assets_dir=str(assets),
        cameras=tuple(cameras),
        image_size=image_size,
        max_episode_steps=max_episode_steps,
        **env_kwargs,
    )
    return SubprocVectorEnv(
        factory, num_envs, timeout_s=timeout_s, video_dir=video_dir, name=name or suite
    )


def vector_env_fn(*, suite: str, image_size: tuple[int, int], cameras: Sequence[str], max_episode_steps: int,
                  video_dir: str | None = None) -> functools.partial:
    """The run's picklable `env_fn(num_envs, *, name)` (`vlajax.envs.simulators`); the assets are
    resolved where it is called (`make_libero_vector_env`, in each simulator worker)."""
    _check_suite(suite)
    video = {"video_dir": video_dir} if video_dir else {}
    return functools.partial(make_libero_vector_env, suite, cameras=tuple(cameras), image_size=tuple(image_size),
                             max_episode_steps=max_episode_steps, **video)
