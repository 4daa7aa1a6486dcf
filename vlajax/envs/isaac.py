"""Isaac Lab (3.0, Newton physics, Warp ray-traced camera) behind vlajax's `VectorEnv` interface.

How it differs from LIBERO, and why it is built this way:
- One simulator process holds many parallel envs of ONE task (Isaac Lab builds one scene per
  task and steps all its envs together). A multi-task batch is therefore split by task: envs of
  task t run on task t's process (started on first use, kept until `close`); results are put
  back in the caller's env order.
- Isaac Lab 3.0 pins mujoco 3.12 and Python 3.12, LIBERO's robosuite needs mujoco < 3.10: Isaac runs
  in its own interpreter. Each simulator process is `<isaac python> vlajax/envs/_isaac_worker.py`
  (numpy + Isaac Lab only, no vlajax or jax), talking over a socket pair with numpy arrays framed
  outside pickle (`_isaac_worker.send_msg`). Its output goes to a log file; errors quote its tail.
- Tasks start from random initial states: the state id (with the reset seed) seeds Isaac Lab's
  reset events for that env, so (task, state id, seed) fixes the initial state in any env slot.
- Finished envs are not stepped: Isaac steps all envs of a process together, so an env that has
  succeeded, failed or hit its limit gets the no-op action (hold pose, keep the gripper command)
  while the others run, and reports its frozen last observation, taken at its last executed
  sub-step. A process whose envs have all finished is not stepped at all.
- Actions are vlajax's 7-d (dx, dy, dz, droll, dpitch, dyaw, gripper): see
  `_isaac_worker.policy_to_task_actions`. Images are upright (row 0 = top): the policy's
  preprocessing must use flip=False (LIBERO's frames need flip=True).
- Importing this module imports no Isaac package; the Isaac interpreter is looked up when an
  `IsaacVectorEnv` is made (`python=` or $VLAJAX_ISAAC_PYTHON), with a clear error if missing.

Machines without NVIDIA's asset server: set ISAACSIM_ASSET_ROOT to a local copy of it, or pass
`local_robot_usd=build_local_franka_usd()` (a Franka built from robosuite's Panda MJCF), which also
swaps each task's other remote assets (table, blocks, ground) for primitive shapes. The trainer's
entry point is `vector_env_fn(...)`; there $VLAJAX_ISAAC_ROBOT_USD gives the local robot USD.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vlajax.envs import _isaac_worker as wire
from vlajax.envs.base import EnvError, Observation, StepResult, TaskSpec, VectorEnv, check_actions
from vlajax.envs.subproc import EnvWorkerError

ISAAC_PYTHON_ENV = "VLAJAX_ISAAC_PYTHON"
ISAAC_ROBOT_USD_ENV = "VLAJAX_ISAAC_ROBOT_USD"
INSTALL_HINT = (
    "Isaac Lab runs in its own Python 3.12 interpreter: create a venv with Python 3.12 "
    "(e.g. `python3.12 -m venv ~/isaac-venv`), run `~/isaac-venv/bin/pip install isaaclab==3.0.0` in it, "
    f"and set {ISAAC_PYTHON_ENV}=~/isaac-venv/bin/python (or pass python=...)"
)
WORKER_SCRIPT = Path(wire.__file__)
ASSETS_SCRIPT = WORKER_SCRIPT.with_name("_isaac_assets.py")
LIBERO_ARM_SCALE = wire.LIBERO_ARM_SCALE

# Gains for the robosuite-built Franka (its USD has no joint drives); the arm uses Isaac Lab's
# high-PD values for differential IK, both fingers are driven (the USD has no mimic joint).
LOCAL_FRANKA_GAINS = {"panda_arm": (400.0, 80.0), "panda_hand": (2000.0, 100.0),
                      "panda_finger2_passive": (2000.0, 100.0)}


@dataclasses.dataclass(frozen=True)
class IsaacTask:
    """One Isaac Lab task as vlajax runs it.

    gym_id: the registered Isaac Lab task; overrides: Hydra-style config selectors for
        `parse_env_cfg` (e.g. "physics=newton_mjwarp", "presets=diffik").
    success_terms: termination terms that mean success; the task's other non-time-out
        terminations end an episode without success.
    camera_eye / camera_target: env-local camera position and look-at point [m].
    offline_scene: scene entity -> None (remove) or a primitive stand-in (see
        `_isaac_worker.IsaacTaskRunner`), used with `local_robot_usd`.
    scene_settings: attributes set on the task's scene config (e.g. replicate_physics).
    robot_gravity_compensation: compensate the robot's gravity in MuJoCo-Warp (the Newton
        counterpart of the PhysX-only `disable_gravity` that IK tasks set on the arm).
    """

    name: str
    gym_id: str
    instruction: str
    max_episode_steps: int
    overrides: tuple[str, ...] = ()
    success_terms: tuple[str, ...] = ("success",)
    num_init_states: int = 1000
    camera_eye: tuple[float, float, float] = (1.7, 0.0, 1.1)
    camera_target: tuple[float, float, float] = (0.3, 0.0, 0.2)
    gripper_joints: str | None = "panda_finger_joint.*"
    offline_scene: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    scene_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    robot_gravity_compensation: bool = False

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(self.name, self.instruction, self.num_init_states, self.max_episode_steps)


_CUBE = {"cuboid": (0.0406, 0.0406, 0.0406), "body": "dynamic", "mass": 0.1, "friction": 1.0}
_STACK_OFFLINE = {
    "table": {"cuboid": (1.0, 1.4, 0.05), "color": (0.55, 0.4, 0.25), "pos": (0.5, 0.0, -0.025),
              "rot": (0.0, 0.0, 0.0, 1.0)},
    "plane": None,  # a global prim: a finite stand-in would look different from each env's camera
    "cube_1": {**_CUBE, "color": (0.1, 0.2, 0.9)},
    "cube_2": {**_CUBE, "color": (0.9, 0.1, 0.1)},
    "cube_3": {**_CUBE, "color": (0.1, 0.8, 0.1)},
}
# Newton builds the stack scene's frame-transformer sites only from a replicated source env
# (replicate_physics=False fails with "Site 'ft_1' ... matched no builder bodies").
# Its IK arm relies on PhysX's disable_gravity, which MuJoCo-Warp ignores: without gravity
# compensation the arm sags (measured: 6 mm/step of x drift for a pure dz command).
_STACK = dict(max_episode_steps=600, overrides=("physics=newton_mjwarp",), offline_scene=_STACK_OFFLINE,
              camera_eye=(1.1, 0.0, 0.65), camera_target=(0.45, 0.0, 0.1),
              scene_settings={"replicate_physics": True}, robot_gravity_compensation=True)

# The Franka cube-stacking family (cube_1 blue, cube_2 red, cube_3 green; success = the cubes
# stacked in the named order, released and at rest) and Franka reach (differential-IK preset; the
# goal pose is not visible to the camera, so it is a plumbing/throughput task, not a visual one).
ISAAC_TASKS: dict[str, IsaacTask] = {t.name: t for t in (
    IsaacTask("stack_blue_red_green", "IsaacContrib-Stack-Cube-Franka-IK-Rel",
              "stack the red cube on the blue cube, then the green cube on the red cube", **_STACK),
    IsaacTask("stack_red_green", "IsaacContrib-Stack-Cube-RedGreen-Franka-IK-Rel",
              "put the green cube on the red cube", **_STACK),
    IsaacTask("stack_blue_green", "IsaacContrib-Stack-Cube-BlueGreen-Franka-IK-Rel",
              "put the green cube on the blue cube", **_STACK),
    IsaacTask("stack_red_green_blue", "IsaacContrib-Stack-Cube-RedGreenBlue-Franka-IK-Rel",
              "stack the green cube on the red cube, then the blue cube on the green cube", **_STACK),
    IsaacTask("stack_blue_green_red", "IsaacContrib-Stack-Cube-BlueGreenRed-Franka-IK-Rel",
              "stack the green cube on the blue cube, then the red cube on the green cube", **_STACK),
    IsaacTask("reach", "Isaac-Reach-Franka", "move the gripper to the goal pose", max_episode_steps=360,
              overrides=("presets=diffik",), offline_scene={"ground": None}),
)}
ISAAC_SUITES: dict[str, tuple[str, ...]] = {
    "isaac_stack": tuple(n for n in ISAAC_TASKS if n.startswith("stack_")),
    "isaac_reach": ("reach",),
}
SUITES = ISAAC_SUITES  # the name every simulator module gives its suites (vlajax.envs.simulators)


def suite_tasks(suite: str) -> list[IsaacTask]:
    if suite not in ISAAC_SUITES:
        raise EnvError(f"unknown Isaac suite {suite!r}; valid suites: {', '.join(ISAAC_SUITES)}")
    return [ISAAC_TASKS[n] for n in ISAAC_SUITES[suite]]


def resolve_isaac_python(python: str | None = None) -> str:
    """The Isaac Lab interpreter: `python`, else $VLAJAX_ISAAC_PYTHON; a clear EnvError otherwise."""
    path = python or os.environ.get(ISAAC_PYTHON_ENV)
    if not path:
        raise EnvError(f"no Isaac Lab interpreter configured. {INSTALL_HINT}")
    found = shutil.which(os.path.expanduser(path))
    if found is None:
        raise EnvError(f"Isaac Lab interpreter {path!r} (from {'python=' if python else ISAAC_PYTHON_ENV}) "
                       f"is not an executable file. {INSTALL_HINT}")
    return found


def group_envs_by_task(task_ids: Sequence[int], capacity: int) -> dict[int, list[int]]:
    """task id -> the env indices running it, in the caller's order (slot j of the task's process
    runs env `groups[t][j]`). Raises if a task has more envs than its process has slots."""
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(task_ids):
        groups.setdefault(int(t), []).append(i)
    over = {t: len(v) for t, v in groups.items() if len(v) > capacity}
    if over:
        raise EnvError(f"more envs per task than envs_per_task={capacity}: "
                       + ", ".join(f"task {t}: {n} envs" for t, n in sorted(over.items()))
                       + " (raise envs_per_task)")
    return groups


def reset_seed(seed: int, state_id: int, num_init_states: int) -> int:
    """The Isaac Lab seed of one env's reset: a function of (seed, state id) only."""
    return (int(seed) * int(num_init_states) + int(state_id)) % (2**31 - 1)


def robosuite_assets_dir() -> Path:
    spec = importlib.util.find_spec("robosuite")  # locates without importing it
    if spec is None or not spec.submodule_search_locations:
        raise EnvError("robosuite is not installed here (pip install 'vlajax[libero]'); pass robosuite_assets=")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "assets"


def build_local_franka_usd(out_dir: str | os.PathLike | None = None, *, python: str | None = None,
                           robosuite_assets: str | os.PathLike | None = None, timeout_s: float = 300.0) -> str:
    """Convert robosuite's Panda to a Franka USD with Isaac Lab's names (see `_isaac_assets`);
    returns `<out_dir>/panda.usda` (default ~/.cache/vlajax/isaac-assets/franka), reused if present.
    Needs `pip install mujoco-usd-converter==0.6.1` in the Isaac interpreter."""
    out = Path(out_dir or Path.home() / ".cache" / "vlajax" / "isaac-assets" / "franka")
    usd = out / "panda.usda"
    if usd.exists():
        return str(usd)
    py = resolve_isaac_python(python)
    src = Path(robosuite_assets) if robosuite_assets else robosuite_assets_dir()
    r = subprocess.run([py, str(ASSETS_SCRIPT), "--robosuite-assets", str(src), "--out", str(out)],
                       capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0 or not usd.exists():
        hint = (" (in the Isaac interpreter: pip install mujoco-usd-converter==0.6.1)"
                if "mujoco_usd_converter" in r.stderr else "")
        raise EnvError(f"building the local Franka USD failed{hint}:\n{r.stderr[-3000:]}")
    return str(usd)


@dataclasses.dataclass
class _SimProcess:
    """One simulator process: one task, `capacity` envs (slot j <-> caller env `envs[j]`)."""

    task_id: int
    proc: subprocess.Popen
    conn: Connection
    log_path: str
    info: dict | None = None
    envs: list[int] = dataclasses.field(default_factory=list)
    last_used: int = 0


class IsaacVectorEnv(VectorEnv):
    """`num_envs` Isaac Lab envs over one simulator process per task (see module docstring).

    Finished envs are not simulated for the caller: since Isaac steps all envs of a process
    together, they get the no-op action and keep reporting the observation of their last executed
    sub-step (done=True, reward 0, steps 0).

    tasks: `IsaacTask`s or names in `ISAAC_TASKS`; task id i = tasks[i].
    envs_per_task: envs in each simulator process (default num_envs): the most envs of one task
        in a reset. Every process simulates all its envs, used or not, so keep it at what a batch
        needs (e.g. the GRPO group size when each batch has one group per task).
    python: the Isaac Lab interpreter (default $VLAJAX_ISAAC_PYTHON).
    device: simulation device of the processes ("cpu", "cuda:0").
    image_size: int or (height, width) of the camera image; camera: its key in `Observation.images`.
    arm_scale: metres / radians per unit action of the 6 arm entries (default LIBERO's OSC units).
    local_robot_usd: a local robot USD with the task's joint/body names (`build_local_franka_usd`);
        also replaces the tasks' remote assets by their `offline_scene` primitives.
    actuator_gains: actuator group -> (stiffness, damping); default LOCAL_FRANKA_GAINS with
        `local_robot_usd`, else the task's own.
    settle_steps: no-op steps after a reset (all envs of the process), 0 by default.
    max_processes: the most simulator processes alive; idle ones (no env in the current reset)
        are closed, least recently used first. None: no limit.
    timeout_s: limit for one reset or chunk_step; start_timeout_s: for starting a process (Warp
        compiles kernels on first use: minutes on a CPU without a warm WARP_CACHE_PATH).
    worker_env: extra environment variables of the processes; log_dir: where their logs go
        (default: a temporary folder, removed by `close`).
    runner: "path/to/file.py:Class", a `_isaac_worker.BatchedRunner` the processes serve instead
        of Isaac Lab (another batched simulator; the tests' plain-numpy one). It receives the same
        per-task spec dict.
    """

    action_dim = 7

    def __init__(
        self,
        tasks: Sequence[IsaacTask | str],
        num_envs: int,
        *,
        envs_per_task: int | None = None,
        python: str | None = None,
        device: str = "cpu",
        image_size: int | tuple[int, int] = 256,
        camera: str = "agentview",
        arm_scale: Sequence[float] | None = LIBERO_ARM_SCALE,
        local_robot_usd: str | None = None,
        actuator_gains: Mapping[str, Sequence[float]] | None = None,
        settle_steps: int = 0,
        max_episode_steps: int | None = None,
        max_processes: int | None = None,
        timeout_s: float = 300.0,
        start_timeout_s: float = 1800.0,
        worker_env: Mapping[str, str] | None = None,
        log_dir: str | None = None,
        runner: str | None = None,
        name: str = "isaac",
    ):
        self.name = name
        if num_envs < 1:
            raise EnvError(f"{name}: num_envs must be >= 1, got {num_envs}")
        self._task_list = [ISAAC_TASKS[t] if isinstance(t, str) and t in ISAAC_TASKS else t for t in tasks]
        bad = [t for t in self._task_list if not isinstance(t, IsaacTask)]
        if bad or not self._task_list:
            raise EnvError(f"{name}: tasks must be IsaacTask or names in ISAAC_TASKS ({', '.join(ISAAC_TASKS)}), "
                           f"got {bad or 'none'}")
        if max_episode_steps is not None and max_episode_steps < 1:
            raise EnvError(f"{name}: max_episode_steps must be >= 1, got {max_episode_steps}")
        if max_processes is not None and max_processes < 1:
            raise EnvError(f"{name}: max_processes must be >= 1, got {max_processes}")
        self.python = resolve_isaac_python(python)
        if local_robot_usd is not None and not os.path.exists(local_robot_usd):
            raise EnvError(f"{name}: local_robot_usd {local_robot_usd!r} does not exist (build_local_franka_usd())")
        self.num_envs = int(num_envs)
        self.capacity = int(envs_per_task or num_envs)
        self.device = device
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_hw = (int(h), int(w))
        self.camera = camera
        self.arm_scale = None if arm_scale is None else tuple(float(s) for s in arm_scale)
        self.local_robot_usd = local_robot_usd
        gains = actuator_gains if actuator_gains is not None else (LOCAL_FRANKA_GAINS if local_robot_usd else {})
        self.actuator_gains = {k: [float(v) for v in kv] for k, kv in gains.items()}
        self.settle_steps = int(settle_steps)
        self.max_episode_steps = max_episode_steps
        self.max_processes = max_processes
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.worker_env = dict(worker_env or {})
        self.runner = runner
        self._own_log_dir = log_dir is None
        self.log_dir = log_dir or tempfile.mkdtemp(prefix=f"vlajax-{name}-")
        os.makedirs(self.log_dir, exist_ok=True)
        self._tasks = tuple(t.spec for t in self._task_list)

        n = self.num_envs
        self._procs: dict[int, _SimProcess] = {}
        self._clock = 0
        self._task_ids = np.full(n, -1, np.int64)
        self._state_ids = np.full(n, -1, np.int64)
        self._needs_reset = np.ones(n, bool)
        self._elapsed = np.zeros(n, np.int32)
        self._limit = np.zeros(n, np.int32)
        self._terminated = np.zeros(n, bool)
        self._truncated = np.zeros(n, bool)
        self._images: np.ndarray | None = None  # (N, H, W, 3) last observation
        self._proprio: np.ndarray | None = None  # (N, D)
        self._closed = False

    # ---- public API -----------------------------------------------------------------------------
    @property
    def tasks(self) -> Sequence[TaskSpec]:
        return self._tasks

    @property
    def pids(self) -> list[int]:
        """Process ids of the live simulator processes."""
        return [p.proc.pid for p in self._procs.values()]

    def start(self, task_ids: Sequence[int]) -> None:
        """Start the simulator processes of `task_ids` now (reset starts missing ones anyway)."""
        self._check_open()
        self._ensure_processes(sorted({int(t) for t in task_ids}))

    def reset(self, task_ids: Sequence[int], state_ids: Sequence[int], seed: int | None = None) -> Observation:
        """Reset env i to task `task_ids[i]`, random initial state seeded by (`state_ids[i]`, seed)."""
        self._check_open()
        task_ids, state_ids = list(task_ids), list(state_ids)
        if len(task_ids) != self.num_envs or len(state_ids) != self.num_envs:
            raise EnvError(f"{self.name}: reset got {len(task_ids)} task ids and {len(state_ids)} state ids "
                           f"for {self.num_envs} envs")
        for i, (t, s) in enumerate(zip(task_ids, state_ids)):
            if not isinstance(t, (int, np.integer)) or not 0 <= t < len(self._tasks):
                raise EnvError(f"{self.name}: env {i}: task id {t!r} out of range (0..{len(self._tasks) - 1})")
            spec = self._tasks[t]
            if not isinstance(s, (int, np.integer)) or not 0 <= s < spec.num_init_states:
                raise EnvError(f"{self.name}: env {i} (task {spec.name}): state id {s!r} out of range "
                               f"(0..{spec.num_init_states - 1})")
        seed = 0 if seed is None else int(seed)
        groups = group_envs_by_task(task_ids, self.capacity)
        self._task_ids[:] = task_ids
        self._state_ids[:] = state_ids
        self._needs_reset[:] = True
        self._ensure_processes(sorted(groups))
        for p in self._procs.values():
            p.envs = groups.get(p.task_id, [])
        commands = {}
        for t, envs in groups.items():
            n_init = self._tasks[t].num_init_states
            commands[t] = ("reset", {
                "env_ids": np.arange(len(envs), dtype=np.int64),
                "seeds": np.array([reset_seed(seed, self._state_ids[i], n_init) for i in envs], np.int64),
                "settle_steps": self.settle_steps,
            })
        results, failures = self._run(commands, "reset")
        for t, (out, _) in results.items():
            envs = groups[t]
            self._store(envs, out["images"], out["proprio"], t)
            self._needs_reset[envs] = False
            self._elapsed[envs] = 0
            self._limit[envs] = self.max_episode_steps or self._tasks[t].max_episode_steps
            self._terminated[envs] = False
            self._truncated[envs] = False
        if failures:
            raise EnvWorkerError(self._failure_message("reset", failures), self._failed_envs(failures))
        return self._observation()

    def chunk_step(self, action_chunks: np.ndarray, render_every_substep: bool = False) -> StepResult:
        """Step every unfinished env by its (K, 7) chunk, cut at its episode limit (see VectorEnv).

        info: success (N,) bool, elapsed_steps (N,) int32, steps (N,) int32 executed by this call,
        sim_time_s (N,) float64 (its process's wall time), worker_failed (N,) bool, and with
        `render_every_substep` substep_images: per env a dict camera -> (steps, H, W, 3) or None.
        """
        self._check_open()
        actions = check_actions(action_chunks, self.num_envs, self.action_dim, self._names())
        if actions.shape[1] == 0:
            raise EnvError(f"{self.name}: empty action chunk (K=0)")
        unready = np.flatnonzero(self._needs_reset)
        if unready.size:
            raise EnvError(f"{self.name}: chunk_step before reset for "
                           + ", ".join(f"env {i}" for i in unready) + " (never reset, or failed since)")
        n, k = self.num_envs, actions.shape[1]
        running = ~(self._terminated | self._truncated)
        commands = {}
        for t, p in self._procs.items():
            envs = np.asarray(p.envs, np.int64)
            if envs.size == 0 or not running[envs].any():
                continue  # every env of this process has finished: it is not stepped
            a = np.zeros((p.info["num_envs"], k, 7), np.float32)
            a[: envs.size] = actions[envs]
            active = np.zeros(p.info["num_envs"], bool)
            active[: envs.size] = running[envs]
            limits = np.zeros(p.info["num_envs"], np.int64)
            limits[: envs.size] = np.minimum(k, self._limit[envs] - self._elapsed[envs])
            commands[t] = ("step", {"actions": a, "active": active, "limits": limits,
                                    "render_every_substep": bool(render_every_substep)})
        results, failures = self._run(commands, "chunk_step")

        reward = np.zeros(n, np.float32)
        steps = np.zeros(n, np.int32)
        sim_time = np.zeros(n, np.float64)
        substep_images: list[dict[str, np.ndarray] | None] = [None] * n
        for t, (out, dt) in results.items():
            envs = np.asarray(self._procs[t].envs, np.int64)
            m = envs.size
            stepped = out["steps"][:m] > 0
            idx = envs[stepped]
            self._store(idx, out["images"][:m][stepped], out["proprio"][:m][stepped], t)
            steps[envs] = out["steps"][:m]
            sim_time[envs] = dt
            self._elapsed[envs] += out["steps"][:m]
            ok = out["success"][:m].astype(bool) & stepped
            reward[envs[ok]] = 1.0
            self._terminated[envs] |= ok
            over = out["stopped"][:m].astype(bool) | (self._elapsed[envs] >= self._limit[envs])
            self._truncated[envs] |= stepped & ~ok & over
            if render_every_substep:
                for j, i in enumerate(envs):
                    if stepped[j]:
                        substep_images[i] = {self.camera: out["substep_images"][j]}
        failed = np.zeros(n, bool)
        failed[self._failed_envs(failures)] = True
        self._needs_reset |= failed
        info: dict[str, Any] = {"success": self._terminated.copy(), "elapsed_steps": self._elapsed.copy(),
                                "steps": steps, "sim_time_s": sim_time, "worker_failed": failed}
        if render_every_substep:
            info["substep_images"] = substep_images
        result = StepResult(self._observation(), reward, self._terminated.copy(), self._truncated.copy(), info)
        if failures:
            raise EnvWorkerError(self._failure_message("chunk_step", failures), self._failed_envs(failures), result)
        return result

    def close(self) -> None:
        """Stop every simulator process (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for t in list(self._procs):
            self._stop(t)
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()

    # ---- processes ------------------------------------------------------------------------------
    def _spec(self, t: int) -> dict:
        task = self._task_list[t]
        h, w = self.image_hw
        spec = {
            "gym_id": task.gym_id, "num_envs": self.capacity, "device": self.device,
            "overrides": list(task.overrides), "success_terms": list(task.success_terms),
            "camera": {"name": self.camera, "width": w, "height": h, "eye": list(task.camera_eye),
                       "target": list(task.camera_target)},
            "arm_scale": list(self.arm_scale) if self.arm_scale else None,
            "gripper_joints": task.gripper_joints, "actuator_gains": self.actuator_gains,
            "scene_settings": dict(task.scene_settings),
            "robot_gravity_compensation": task.robot_gravity_compensation,
        }
        if self.local_robot_usd:
            spec["robot_usd"] = os.path.abspath(self.local_robot_usd)
            spec["scene_overrides"] = {k: (dict(v) if v is not None else None) for k, v in task.offline_scene.items()}
        return spec

    def _ensure_processes(self, needed: Sequence[int]) -> None:
        missing = [t for t in needed if t not in self._procs]
        if self.max_processes is not None:
            if len(needed) > self.max_processes:
                raise EnvError(f"{self.name}: a reset needs {len(needed)} tasks' processes, "
                               f"max_processes={self.max_processes}")
            idle = sorted((p.last_used, t) for t, p in self._procs.items() if t not in needed)
            while len(self._procs) + len(missing) > self.max_processes:
                self._stop(idle.pop(0)[1])
        for t in missing:
            self._launch(t)
        results, failures = self._gather({t: "start" for t in missing}, self.start_timeout_s)
        for t, (info, _) in results.items():
            self._procs[t].info = info
            h, w = self.image_hw
            if tuple(info["image_shape"]) != (h, w, 3):
                failures[t] = f"camera image {info['image_shape']}, expected {(h, w, 3)}"
        if failures:
            message = self._failure_message("start", failures)
            for t in failures:
                self._stop(t)
            raise EnvError(message)

    def _launch(self, t: int) -> None:
        ours, theirs = socket.socketpair()
        log_path = os.path.join(self.log_dir, f"{self.name}-task{t}-{self._tasks[t].name}.log")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.worker_env}
        env.pop("PYTHONPATH", None)  # the host's packages must not shadow the Isaac interpreter's
        with open(log_path, "ab") as log:
            cmd = [self.python, str(WORKER_SCRIPT), "--fd", str(theirs.fileno())]
            if self.runner:
                cmd += ["--runner", self.runner]
            proc = subprocess.Popen(cmd,
                                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        theirs.close()
        conn = Connection(ours.detach())
        self._procs[t] = _SimProcess(t, proc, conn, log_path)
        try:
            wire.send_msg(conn, ("init", self._spec(t)))
        except OSError:
            pass  # it died at once: the gather reports it with its log

    def _stop(self, t: int, grace_s: float = 10.0) -> None:
        p = self._procs.pop(t, None)
        if p is None:
            return
        try:
            wire.send_msg(p.conn, ("close", None))
        except OSError:
            pass
        try:
            p.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._kill(p)
        p.conn.close()

    @staticmethod
    def _kill(p: _SimProcess) -> None:
        try:
            os.killpg(p.proc.pid, signal.SIGKILL)  # its own session: the worker and its children only
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass

    def _run(self, commands: dict[int, tuple[str, dict]], what: str):
        """Send every command, then gather the answers (the processes simulate in parallel)."""
        failures: dict[int, str] = {}
        self._clock += 1
        for t, msg in commands.items():
            self._procs[t].last_used = self._clock
            try:
                wire.send_msg(self._procs[t].conn, msg)
            except OSError as e:
                failures[t] = f"could not send ({type(e).__name__}); {self._exit_text(t)}"
        results, more = self._gather({t: what for t in commands if t not in failures}, self.timeout_s)
        failures.update(more)
        for t in failures:  # a failed process is replaced at the next reset
            p = self._procs[t]
            self._kill(p)
            p.conn.close()
            del self._procs[t]
        return results, failures

    def _gather(self, pending: dict[int, str], timeout_s: float):
        results: dict[int, tuple[Any, float]] = {}
        failures: dict[int, str] = {}
        waiting = set(pending)
        deadline = time.monotonic() + timeout_s
        while waiting:
            conns = {self._procs[t].conn: t for t in waiting}
            ready = wait(list(conns), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for c in ready:
                t = conns[c]
                try:
                    status, payload, dt = wire.recv_msg(c)
                except (EOFError, OSError):
                    failures[t] = f"process died; {self._exit_text(t)}"
                else:
                    if status == "ok":
                        results[t] = (payload, dt)
                    else:
                        failures[t] = f"process raised:\n{payload}"
                        if "No module named 'isaaclab" in payload:
                            failures[t] += f"\n{INSTALL_HINT}"
                waiting.discard(t)
        for t in waiting:
            self._kill(self._procs[t])
            failures[t] = f"no answer within {timeout_s:g} s (process killed); {self._exit_text(t)}"
        return results, failures

    def _exit_text(self, t: int) -> str:
        p = self._procs[t]
        try:
            code = p.proc.wait(2.0)
        except subprocess.TimeoutExpired:
            code = None
        try:
            with open(p.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 3000))
                tail = f.read().decode(errors="replace")
        except OSError:
            tail = ""
        return f"exit code {code}; last lines of {p.log_path}:\n{tail}"

    # ---- bookkeeping ----------------------------------------------------------------------------
    def _store(self, envs, images: np.ndarray, proprio: np.ndarray, t: int) -> None:
        if self._images is None:
            self._images = np.zeros((self.num_envs,) + tuple(images.shape[1:]), np.uint8)
            self._proprio = np.zeros((self.num_envs, proprio.shape[1]), np.float32)
        if proprio.shape[1:] != self._proprio.shape[1:]:
            raise EnvError(f"{self.name}: task {self._tasks[t].name} gives proprio of dim {proprio.shape[1]}, "
                           f"other tasks {self._proprio.shape[1]}")
        self._images[envs] = images
        self._proprio[envs] = proprio

    def _observation(self) -> Observation:
        return Observation(images={self.camera: self._images.copy()}, proprio=self._proprio.copy(),
                           instructions=[self._task_list[t].instruction for t in self._task_ids])

    def _failed_envs(self, failures: dict[int, str]) -> list[int]:
        return sorted(i for i, t in enumerate(self._task_ids) if t in failures)

    def _failure_message(self, what: str, failures: dict[int, str]) -> str:
        lines = [f"{self.name}: {what} failed for {len(failures)} simulator process(es):"]
        for t in sorted(failures):
            envs = [i for i, tt in enumerate(self._task_ids) if tt == t]
            lines.append(f"task {t} ({self._tasks[t].name}, envs {envs}): {failures[t]}")
        return "\n".join(lines)

    def _names(self) -> list[str]:
        return [f"env {i} (task {self._tasks[t].name}, state {s})" if t >= 0 else f"env {i}"
                for i, (t, s) in enumerate(zip(self._task_ids, self._state_ids))]

    def _check_open(self) -> None:
        if self._closed:
            raise EnvError(f"{self.name}: the vector env is closed")


def make_isaac_vector_env(num_envs: int, *, suite: str = "isaac_stack", name: str = "isaac",
                          **kw) -> IsaacVectorEnv:
    """`env_fn` for the Ray sim workers: `functools.partial(make_isaac_vector_env, suite=...)`."""
    return IsaacVectorEnv(suite_tasks(suite), num_envs, name=name, **kw)


def vector_env_fn(*, suite: str, image_size: tuple[int, int], cameras: Sequence[str], max_episode_steps: int,
                  video_dir: str | None = None) -> functools.partial:
    """The run's picklable `env_fn(num_envs, *, name)` (`vlajax.envs.simulators`): `suite` (one of
    ISAAC_SUITES), the first of `cameras` at `image_size` (height, width), `max_episode_steps` per
    episode; no videos yet. The interpreter is resolved here, on the driver, so a missing Isaac Lab
    fails before any actor starts; a local robot USD for machines without NVIDIA's asset server comes
    from $VLAJAX_ISAAC_ROBOT_USD."""
    if video_dir:
        raise EnvError("the Isaac simulator cannot record videos yet")
    suite_tasks(suite)  # validates the suite name
    usd = os.environ.get(ISAAC_ROBOT_USD_ENV) or None
    if usd is not None and not os.path.exists(usd):
        raise EnvError(f"{ISAAC_ROBOT_USD_ENV}={usd} does not exist (build it with build_local_franka_usd())")
    return functools.partial(
        make_isaac_vector_env, suite=suite, python=resolve_isaac_python(), image_size=tuple(image_size),
        camera=cameras[0], max_episode_steps=max_episode_steps, local_robot_usd=usd)
