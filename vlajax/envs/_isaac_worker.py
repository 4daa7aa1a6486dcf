"""One Isaac Lab simulator process of `vlajax.envs.isaac.IsaacVectorEnv`: one task, N parallel envs.

Runs in the Isaac Lab interpreter (Python 3.12, `pip install isaaclab==3.0.0`), started by the host as
`<isaac python> _isaac_worker.py --fd FD [--runner FILE:CLASS]`, where FD is one end of a socket
pair. The episode loop (`BatchedRunner`) is simulator-independent; `IsaacTaskRunner` is its Isaac
Lab implementation, and `--runner` serves another batched simulator through the same loop. It must not import
vlajax or jax: at module level it imports only the standard library and numpy (the host imports this
file too, for the message codec and the pure functions below); Isaac Lab and torch are imported
inside `IsaacTaskRunner`.

Protocol (request -> answer, strictly alternating; see `send_msg` for the framing):
    ("init",  spec dict)                 -> ("ok", info dict, seconds) | ("error", traceback, seconds)
    ("reset", {env_ids, seeds, settle_steps}) -> ("ok", {images, proprio}, s)   rows of env_ids
    ("step",  {actions, active, limits, render_every_substep})
                                         -> ("ok", {steps, success, stopped, images, proprio,
                                                    substep_images}, s)          rows of all N envs
    ("close", None)                      -> the process exits

How the task is adapted (what `IsaacTaskRunner` changes in the registered task config, and why):
- Terminations: every termination term is removed from the termination manager, so Isaac Lab never
  auto-resets an env (the host owns episodes: limits, early stop, frozen observations). The terms
  named in spec["success_terms"] and the other non-time-out terms are re-added as observation terms
  of a group "vlajax_done", computed by Isaac Lab after every step with their own parameters:
  success terms end the episode with success, the others ("failure", e.g. a cube fell off the table)
  end it without. Rewards and curricula are dropped (rewards may read the removed terms; vlajax
  rewards success only). Command terms stop resampling so a goal stays fixed for an episode.
- Actions: the task must use a relative end-effector pose arm action (differential IK with
  `use_relative_mode=True`, `command_type="pose"`), optionally followed by a binary gripper action.
  `policy_to_task_actions` maps vlajax's 7-d action onto them; the arm term's scale is set to
  spec["arm_scale"] (default: LIBERO's OSC units, 1.0 = 5 cm and 0.5 rad per step).
- Camera: a `CameraCfg` with Newton's Warp ray tracer is added to the scene at an env-local pose
  looking at spec["camera"]["target"]; images are (N, H, W, 3) uint8, row 0 = top (upright).
- Proprio (D = 6 + gripper joints): end-effector position and axis-angle orientation in the robot's
  root frame (the arm action's body and body offset, i.e. the frame the IK moves), then the gripper
  joint positions.
- Assets: spec["robot_usd"] replaces the robot's USD (its variants are dropped) and
  spec["scene_overrides"] replaces or removes scene entities, for machines without NVIDIA's asset
  server (`ISAACSIM_ASSET_ROOT` points Isaac Lab at a local copy of it instead).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import pickle
import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

_ND = "__vlajax_ndarray__"
# vlajax's arm units (LIBERO's OSC controller: output_max 0.05 m and 0.5 rad per unit action).
LIBERO_ARM_SCALE = (0.05, 0.05, 0.05, 0.5, 0.5, 0.5)
DONE_GROUP = "vlajax_done"


# ---- message codec (both sides) ---------------------------------------------------------------
def send_msg(conn: Connection, obj: Any) -> None:
    """Send `obj` (nested dict/list/tuple of builtins and numpy arrays).

    Framing: one pickled header (protocol 5) holding only builtins, in which every array is a
    placeholder (marker, index, dtype string, shape), then one raw message per array. Arrays never
    pass through pickle, so the two interpreters' numpy versions need not agree."""
    arrays: list[np.ndarray] = []

    def enc(x):
        if isinstance(x, np.ndarray):
            a = np.ascontiguousarray(x)
            arrays.append(a)
            return (_ND, len(arrays) - 1, a.dtype.str, a.shape)
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, dict):
            return {k: enc(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(enc(v) for v in x)
        return x

    header = pickle.dumps((enc(obj), len(arrays)), protocol=5)
    conn.send_bytes(header)
    for a in arrays:
        conn.send_bytes(a.reshape(-1).view(np.uint8).data if a.size else b"")


def recv_msg(conn: Connection) -> Any:
    """Inverse of `send_msg`. Arrays come back read-only (they view the received bytes)."""
    header, n = pickle.loads(conn.recv_bytes())
    bufs = [conn.recv_bytes() for _ in range(n)]

    def dec(x):
        if isinstance(x, tuple) and len(x) == 4 and x[0] == _ND:
            _, i, dtype, shape = x
            return np.frombuffer(bufs[i], dtype=np.dtype(dtype)).reshape(shape)
        if isinstance(x, dict):
            return {k: dec(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(dec(v) for v in x)
        return x

    return dec(header)


# ---- pure functions (tested on the host) ------------------------------------------------------
def policy_to_task_actions(
    actions: np.ndarray, arm_dim: int, gripper_dim: int, stepping: np.ndarray, last_gripper: np.ndarray
) -> np.ndarray:
    """Map vlajax's (N, 7) actions to an Isaac task's (N, arm_dim + gripper_dim) action vector.

    vlajax / LIBERO: (dx, dy, dz, droll, dpitch, dyaw, gripper), translation and axis-angle deltas
    in the robot base frame, each in [-1, 1] (scaled by the arm term's scale in the task),
    gripper -1 = open, +1 = close.
    Isaac (differential IK, relative pose): the same 6 numbers (the IK term multiplies by its
    scale and applies the rotation delta on the left, in the root frame, like robosuite's OSC);
    binary gripper: a value < 0 closes, >= 0 opens, so the gripper entry is negated.
    arm_dim must be 6. gripper_dim 0 (no gripper term: entry 6 is ignored) or 1.
    Rows where `stepping` is False get the no-op: arm delta 0 (hold the pose) and the env's
    `last_gripper` command (N,) in the task's convention (so a held object is not dropped).
    """
    actions = np.asarray(actions, dtype=np.float32)
    if actions.ndim != 2 or actions.shape[1] != 7:
        raise ValueError(f"expected (N, 7) policy actions, got {actions.shape}")
    if arm_dim != 6:
        raise ValueError(f"the arm action must be a 6-d relative pose, got {arm_dim} dims")
    if gripper_dim not in (0, 1):
        raise ValueError(f"the gripper action must be 1-d (binary) or absent, got {gripper_dim} dims")
    n = actions.shape[0]
    out = np.zeros((n, arm_dim + gripper_dim), dtype=np.float32)
    out[:, :6] = np.clip(actions[:, :6], -1.0, 1.0)
    if gripper_dim:
        out[:, 6] = -actions[:, 6]
        out[~stepping, 6] = last_gripper[~stepping]
    out[~stepping, :6] = 0.0
    return out


def look_at_quat_xyzw(eye, target, up=(0.0, 0.0, 1.0)) -> tuple[float, float, float, float]:
    """Orientation (x, y, z, w) of a camera at `eye` looking at `target` in Isaac Lab's "world"
    camera convention (forward +X, up +Z)."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    f = target - eye
    if np.linalg.norm(f) < 1e-9:
        raise ValueError(f"camera eye {eye.tolist()} and target {target.tolist()} coincide")
    f /= np.linalg.norm(f)
    left = np.cross(up, f)
    if np.linalg.norm(left) < 1e-9:
        raise ValueError("camera looks straight along the up axis; give another target")
    left /= np.linalg.norm(left)
    u = np.cross(f, left)
    m = np.stack([f, left, u], axis=1)  # columns: the camera's x, y, z axes in the world
    # Shepperd's method on the rotation matrix
    tr = np.trace(m)
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
        q = [0.0, 0.0, 0.0, (m[k, j] - m[j, k]) / s]
        q[i] = 0.25 * s
        q[j] = (m[j, i] + m[i, j]) / s
        q[k] = (m[k, i] + m[i, k]) / s
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return tuple(float(v) for v in q)


# ---- the chunk loop shared by every simulator this process can serve ----------------------------
class BatchedRunner:
    """N envs of one task stepped together; `reset` and `step` implement the protocol's semantics.

    A simulator implements: `n`, `image_hw`, `reset_env(i, seed)`, `advance(actions, stepping)`
    (one step of all N envs: (N, 7) policy actions, no-op where `stepping` is False),
    `done_flags() -> (success (N,), failure (N,))`, `render() -> (N, H, W, 3) uint8`,
    `proprio() -> (N, D) float32`, `info() -> dict`, `close()`."""

    n: int
    image_hw: tuple[int, int]

    def reset(self, env_ids, seeds, settle_steps: int = 0) -> dict:
        """Reset each listed env on its own with its own seed, so its initial state depends on
        (task, seed) only, not on which other envs are reset with it; then `settle_steps` no-op
        steps of all envs."""
        env_ids = np.asarray(env_ids, dtype=np.int64)
        for i, s in zip(env_ids.tolist(), np.asarray(seeds).tolist()):
            self.reset_env(int(i), int(s))
        for _ in range(int(settle_steps)):
            self.advance(np.zeros((self.n, 7), np.float32), np.zeros(self.n, bool))
        return {"images": self.render()[env_ids], "proprio": self.proprio()[env_ids]}

    def step(self, actions, active, limits, render_every_substep: bool = False) -> dict:
        """Run (N, K, 7) chunks. Envs with active=False, and each env after `limits[i]` sub-steps or
        after its success/failure, get the no-op; each env's observation is taken at its last
        executed sub-step (rendered then), so finished envs report a frozen observation."""
        actions = np.asarray(actions, dtype=np.float32)
        n, k_max, _ = actions.shape
        if n != self.n:
            raise ValueError(f"step got actions for {n} envs, this process has {self.n}")
        limits = np.asarray(limits, dtype=np.int64)
        running = np.asarray(active, dtype=bool) & (limits > 0)
        steps = np.zeros(n, np.int32)
        success = np.zeros(n, bool)
        stopped = np.zeros(n, bool)
        h, w = self.image_hw
        images = np.zeros((n, h, w, 3), np.uint8)
        proprio: np.ndarray | None = None
        frames: list[list[np.ndarray]] = [[] for _ in range(n)]
        for k in range(k_max):
            if not running.any():
                break
            self.advance(actions[:, k], running)
            steps[running] += 1
            ok, fail = self.done_flags()
            new_ok = running & ok
            new_stop = running & ~ok & fail
            success |= new_ok
            stopped |= new_stop
            ended = running & (new_ok | new_stop | (steps >= limits) | (k == k_max - 1))
            frame = None
            if render_every_substep:
                frame = self.render()
                for i in np.flatnonzero(running):
                    frames[i].append(frame[i])
            if ended.any():
                img = frame if frame is not None else self.render()
                images[ended] = img[ended]
                prop = self.proprio()
                if proprio is None:
                    proprio = np.zeros_like(prop)
                proprio[ended] = prop[ended]
            running &= ~ended
        if proprio is None:
            proprio = np.zeros_like(self.proprio())
        out = {"steps": steps, "success": success, "stopped": stopped, "images": images, "proprio": proprio}
        if render_every_substep:
            out["substep_images"] = [np.stack(f) if f else np.zeros((0, h, w, 3), np.uint8) for f in frames]
        return out


# ---- the simulator (Isaac side) ---------------------------------------------------------------
class IsaacTaskRunner(BatchedRunner):
    """One Isaac Lab task with N envs, created through gymnasium (see module docstring).

    spec keys: gym_id, num_envs, device, overrides (Hydra-style, e.g. "physics=newton_mjwarp"),
    success_terms, camera {name, width, height, eye, target, clipping}, arm_scale, robot (scene
    entity name), gripper_joints (regex or None), robot_usd, actuator_gains {actuator: [kp, kd]},
    scene_settings {scene config attribute: value}, robot_gravity_compensation (bool),
    scene_overrides {entity: None | {cuboid, color, body, mass, friction, pos, rot}}.
    """

    def __init__(self, spec: dict):
        import isaaclab  # noqa: F401  (first: fails fast where Isaac Lab is missing)
        import torch
        import gymnasium as gym

        import isaaclab_tasks  # noqa: F401  (registers the tasks)
        from isaaclab.app.sim_launcher import launch_simulation
        from isaaclab_tasks.utils.parse_cfg import parse_env_cfg

        self.torch = torch
        self.spec = spec
        gym_id = spec["gym_id"]
        cfg = parse_env_cfg(gym_id, device=spec["device"], num_envs=int(spec["num_envs"]),
                            overrides=list(spec.get("overrides", ())))
        self._apply_assets(cfg)
        self._add_camera(cfg)
        self._move_terminations(cfg)
        self.arm_name, self.gripper_name, arm_cfg = self._check_actions(cfg)
        if spec.get("arm_scale") is not None:
            arm_cfg.scale = tuple(float(s) for s in spec["arm_scale"])
        cfg.rewards = None
        cfg.curriculum = None
        for term in (vars(cfg.commands).values() if cfg.commands is not None else ()):
            if hasattr(term, "resampling_time_range"):
                term.resampling_time_range = (1.0e9, 1.0e9)  # finite: torch.uniform_ rejects inf

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(launch_simulation(cfg, {"headless": True}))
        self.env = gym.make(gym_id, cfg=cfg)
        u = self.u = self.env.unwrapped
        self.device = u.device
        self.n = u.num_envs
        self.robot = u.scene[spec.get("robot", "robot")]
        self.camera = u.scene[self.cam["name"]]

        names = list(u.action_manager.active_terms)
        dims = [int(d) for d in u.action_manager.action_term_dim]
        offsets = dict(zip(names, np.cumsum([0] + dims[:-1]).tolist()))
        self.arm_dim = dims[names.index(self.arm_name)]
        self.gripper_dim = dims[names.index(self.gripper_name)] if self.gripper_name else 0
        if [self.arm_name] + ([self.gripper_name] if self.gripper_name else []) != names or offsets[self.arm_name]:
            raise ValueError(f"{gym_id}: action terms {names} must be the arm action followed by the gripper")

        ids, _ = self.robot.find_bodies(arm_cfg.body_name)
        self.ee_body = int(ids[0])
        off = arm_cfg.body_offset
        self.ee_off_pos = torch.tensor(off.pos if off else (0.0, 0.0, 0.0), device=self.device).repeat(self.n, 1)
        self.ee_off_rot = torch.tensor(off.rot if off else (0.0, 0.0, 0.0, 1.0), device=self.device).repeat(self.n, 1)
        grip = spec.get("gripper_joints")
        self.grip_ids = list(self.robot.find_joints(grip)[0]) if grip else []
        self.last_gripper = np.ones(self.n, dtype=np.float32)  # task convention: >= 0 open
        self.image_hw = (int(self.cam["height"]), int(self.cam["width"]))

        u.reset(seed=int(spec.get("seed", 0)))

    # -- config surgery --------------------------------------------------------------------------
    @property
    def cam(self) -> dict:
        return self.spec["camera"]

    def _apply_assets(self, cfg) -> None:
        import isaaclab.sim as sim_utils

        spec = self.spec
        robot = getattr(cfg.scene, spec.get("robot", "robot"))
        if spec.get("robot_usd"):
            if not os.path.exists(spec["robot_usd"]):
                raise FileNotFoundError(f"robot_usd {spec['robot_usd']} does not exist")
            robot.spawn.usd_path = spec["robot_usd"]
            robot.spawn.variants = None
        if spec.get("robot_gravity_compensation"):
            # Newton/MuJoCo's counterpart of PhysX's disable_gravity on the arm (which MuJoCo ignores)
            from isaaclab_newton.sim.schemas import MujocoRigidBodyCfg

            props = robot.spawn.rigid_props
            props = list(props) if isinstance(props, (list, tuple)) else ([props] if props is not None else [])
            robot.spawn.rigid_props = [p for p in props if not isinstance(p, MujocoRigidBodyCfg)] + [
                MujocoRigidBodyCfg(gravcomp=1.0)]
        for key, value in (spec.get("scene_settings") or {}).items():
            if not hasattr(cfg.scene, key):
                raise KeyError(f"scene_settings: the scene config has no setting {key!r}")
            setattr(cfg.scene, key, value)
        for name, (kp, kd) in (spec.get("actuator_gains") or {}).items():
            if name not in robot.actuators:
                raise KeyError(f"actuator_gains: the robot has no actuator group {name!r} ({list(robot.actuators)})")
            robot.actuators[name].stiffness = float(kp)
            robot.actuators[name].damping = float(kd)
        for name, o in (spec.get("scene_overrides") or {}).items():
            if not hasattr(cfg.scene, name):
                raise KeyError(f"scene_overrides: the scene has no entity {name!r}")
            if o is None:
                setattr(cfg.scene, name, None)
                continue
            ent = getattr(cfg.scene, name)
            kw: dict[str, Any] = {
                "size": tuple(float(v) for v in o["cuboid"]),
                "visual_material": sim_utils.PreviewSurfaceCfg(diffuse_color=tuple(o.get("color", (0.6, 0.6, 0.6)))),
                "collision_props": sim_utils.UsdPhysicsCollisionCfg(),
            }
            body = o.get("body", "static")
            if body in ("dynamic", "kinematic"):
                kw["rigid_props"] = sim_utils.UsdPhysicsRigidBodyCfg(kinematic_enabled=body == "kinematic")
                kw["mass_props"] = sim_utils.MassCfg(mass=float(o.get("mass", 0.1)))
            if "friction" in o:
                kw["physics_material"] = sim_utils.RigidBodyMaterialCfg(
                    static_friction=float(o["friction"]), dynamic_friction=float(o["friction"]))
            ent.spawn = sim_utils.CuboidCfg(**kw)
            if "pos" in o:
                ent.init_state.pos = tuple(float(v) for v in o["pos"])
            if "rot" in o:
                ent.init_state.rot = tuple(float(v) for v in o["rot"])

    def _add_camera(self, cfg) -> None:
        import isaaclab.sim as sim_utils
        from isaaclab.sensors import CameraCfg
        from isaaclab_newton.renderers import NewtonWarpRendererCfg

        c = self.cam
        setattr(cfg.scene, c["name"], CameraCfg(
            prim_path="{ENV_REGEX_NS}/" + c["name"],
            offset=CameraCfg.OffsetCfg(pos=tuple(c["eye"]), rot=look_at_quat_xyzw(c["eye"], c["target"]),
                                       convention="world"),
            data_types=["rgb"],
            spawn=sim_utils.PinholeCameraCfg(clipping_range=tuple(c.get("clipping", (0.01, 10.0)))),
            width=int(c["width"]),
            height=int(c["height"]),
            renderer_cfg=NewtonWarpRendererCfg(),
        ))

    def _move_terminations(self, cfg) -> None:
        from isaaclab.managers import ObservationGroupCfg, ObservationTermCfg, TerminationTermCfg

        terms = {k: v for k, v in vars(cfg.terminations).items() if isinstance(v, TerminationTermCfg)}
        wanted = list(self.spec.get("success_terms", ("success",)))
        missing = [t for t in wanted if t not in terms or terms[t].time_out]
        if missing:
            raise ValueError(f"{self.spec['gym_id']}: no termination term(s) {missing} to use as success; "
                             f"its terms are {list(terms)}")
        group = ObservationGroupCfg()
        group.concatenate_terms = False
        group.enable_corruption = False
        self.success_keys, self.failure_keys = [], []
        for name, t in terms.items():
            setattr(cfg.terminations, name, None)
            if t.time_out:  # vlajax enforces episode limits itself
                continue
            key = ("success__" if name in wanted else "failure__") + name
            (self.success_keys if name in wanted else self.failure_keys).append(key)
            setattr(group, key, ObservationTermCfg(func=t.func, params=dict(t.params)))
        setattr(cfg.observations, DONE_GROUP, group)

    def _check_actions(self, cfg):
        from isaaclab.envs.mdp.actions.actions_cfg import (
            BinaryJointActionCfg,
            DifferentialInverseKinematicsActionCfg,
        )
        from isaaclab.managers import ActionTermCfg

        terms = [(k, v) for k, v in vars(cfg.actions).items() if isinstance(v, ActionTermCfg)]
        arm = [(k, v) for k, v in terms if isinstance(v, DifferentialInverseKinematicsActionCfg)
               and v.controller.use_relative_mode and v.controller.command_type == "pose"]
        grip = [k for k, v in terms if isinstance(v, BinaryJointActionCfg)]
        if len(arm) != 1 or len(terms) != 1 + len(grip) or len(grip) > 1:
            kinds = {k: type(v).__name__ for k, v in terms}
            raise ValueError(
                f"{self.spec['gym_id']}: actions {kinds} are not one relative end-effector pose action "
                "(DifferentialInverseKinematicsActionCfg, use_relative_mode=True, command_type='pose') plus at "
                "most one binary gripper action; pick the task's IK-Rel variant (e.g. overrides presets=diffik)")
        return arm[0][0], (grip[0] if grip else None), arm[0][1]

    # -- commands -----------------------------------------------------------------------------
    def info(self) -> dict:
        import isaaclab

        return {
            "num_envs": self.n,
            "device": str(self.device),
            "arm_dim": self.arm_dim,
            "gripper_dim": self.gripper_dim,
            "proprio_dim": 6 + len(self.grip_ids),
            "image_shape": (int(self.cam["height"]), int(self.cam["width"]), 3),
            "success_terms": self.success_keys,
            "failure_terms": self.failure_keys,
            "isaaclab_version": getattr(isaaclab, "__version__", "?"),
            "python": sys.version.split()[0],
        }

    def reset_env(self, i: int, seed: int) -> None:
        """Isaac Lab's reset events for env i alone, with the global RNGs seeded by `seed`."""
        torch = self.torch
        self.u.reset(env_ids=torch.tensor([i], dtype=torch.int64, device=self.device), seed=seed)
        self.last_gripper[i] = 1.0

    def advance(self, actions: np.ndarray, stepping: np.ndarray) -> None:
        task_a = policy_to_task_actions(actions, self.arm_dim, self.gripper_dim, stepping, self.last_gripper)
        if self.gripper_dim:
            self.last_gripper[stepping] = task_a[stepping, -1]
        self.u.step(self.torch.from_numpy(task_a).to(self.device))

    # -- reading state ---------------------------------------------------------------------------
    def done_flags(self) -> tuple[np.ndarray, np.ndarray]:
        group = self.u.obs_buf[DONE_GROUP]

        def any_of(keys):
            out = np.zeros(self.n, bool)
            for key in keys:
                out |= _np(group[key]).reshape(self.n, -1).astype(bool).any(axis=1)
            return out

        return any_of(self.success_keys), any_of(self.failure_keys)

    def render(self) -> np.ndarray:
        rgb = _np(self.camera.data.output["rgb"])
        return np.ascontiguousarray(rgb[..., :3].astype(np.uint8, copy=False))

    def proprio(self) -> np.ndarray:
        from isaaclab.utils import math as math_utils

        torch = self.torch
        d = self.robot.data
        pos_b, quat_b = math_utils.subtract_frame_transforms(
            _t(d.root_pos_w), _t(d.root_quat_w), _t(d.body_pos_w)[:, self.ee_body], _t(d.body_quat_w)[:, self.ee_body])
        pos_b, quat_b = math_utils.combine_frame_transforms(pos_b, quat_b, self.ee_off_pos, self.ee_off_rot)
        parts = [pos_b, math_utils.axis_angle_from_quat(quat_b)]
        if self.grip_ids:
            parts.append(_t(d.joint_pos)[:, self.grip_ids])
        return torch.cat(parts, dim=1).detach().cpu().numpy().astype(np.float32)

    def close(self) -> None:
        try:
            self.env.close()
        finally:
            self._stack.close()


def _t(x):
    """Isaac Lab 3.0 data are ProxyArrays (`.torch` is the tensor view); plain tensors pass through."""
    return getattr(x, "torch", x)


def _np(x) -> np.ndarray:
    return _t(x).detach().cpu().numpy()


# ---- process entry point ------------------------------------------------------------------------
def load_runner(ref: str | None) -> type:
    """`IsaacTaskRunner`, or the `BatchedRunner` subclass named by "path/to/file.py:Class" (another
    batched simulator behind the same protocol; the file can `from _isaac_worker import ...`)."""
    if not ref:
        return IsaacTaskRunner
    path, _, name = ref.rpartition(":")
    if not path or not name:
        raise ValueError(f"runner must be 'path/to/file.py:Class', got {ref!r}")
    sys.modules.setdefault("_isaac_worker", sys.modules[__name__])
    spec = importlib.util.spec_from_file_location(f"_vlajax_runner_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"runner file {path} cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="socket file descriptor shared with the host")
    parser.add_argument("--runner", default=None, help="path/to/file.py:Class instead of Isaac Lab")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the host's to handle
    conn = Connection(args.fd)
    runner: IsaacTaskRunner | None = None
    code = 0
    try:
        t0 = time.perf_counter()
        try:
            cmd, spec = recv_msg(conn)
            if cmd != "init":
                raise ValueError(f"first command must be 'init', got {cmd!r}")
            runner = load_runner(args.runner)(spec)
            send_msg(conn, ("ok", runner.info(), time.perf_counter() - t0))
        except BaseException:  # noqa: BLE001 - reported to the host, which raises
            send_msg(conn, ("error", traceback.format_exc(), time.perf_counter() - t0))
            return 1
        while True:
            try:
                cmd, payload = recv_msg(conn)
            except (EOFError, OSError):  # host went away
                break
            if cmd == "close":
                break
            t0 = time.perf_counter()
            try:
                if cmd not in ("reset", "step"):
                    raise ValueError(f"unknown command {cmd!r}")
                msg = ("ok", getattr(runner, cmd)(**payload), time.perf_counter() - t0)
            except Exception:  # noqa: BLE001
                msg = ("error", traceback.format_exc(), time.perf_counter() - t0)
            send_msg(conn, msg)
    except (BrokenPipeError, EOFError, OSError):
        code = 1
    finally:
        if runner is not None:
            try:
                runner.close()
            except Exception:  # noqa: BLE001 - exiting anyway
                traceback.print_exc()
    return code


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # skip interpreter teardown: simulator threads can hang it
