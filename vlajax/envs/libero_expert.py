"""A scripted LIBERO expert: reads the task's BDDL goal and the simulator's privileged state, and
emits LIBERO's own actions (OSC delta pose + gripper), so demonstrations need no download.

Why scripted: a user without a hub (or an air-gapped cluster) has no SFT checkpoint and no
demonstrations; this expert makes both possible inside vlajax (`vlajax demos`, then `vlajax sft`).

How it works: the goal (`parsed_problem["goal_state"]`) becomes a list of primitives
(`plan_goal`), each a sequence of waypoints that the expert tracks one control step at a time:
- pick-and-place (`On`, `In`): approach above the object, descend, close, lift, carry above the
  target, lower, open, retreat. The grasp point comes from the object's collision geometry
  (a bowl is taken by its rim, anything else across its narrow side, top-down); the carry keeps
  the object-to-gripper offset measured at the grasp, so the object (not the hand) lands on target.
  A bowl's rim is taken on the side within the arm's reach (`_reach_excess`): at the edge of the
  Panda's workspace the OSC settles 1-2 cm short, so a waypoint is also left once the hand stalls
  close to it (`STALL_TOL`) rather than waiting out its step cap.
  A tall object (a bottle) is carried with its bottom clear of the target and pinched along the
  carry so it cannot swing; a tilted region (the wine rack) is aimed at up its normal.
- slide (`On` a plate onto a region of the surface it stands on): pinch the rim on the side facing
  the target and pull the plate there flat on the table (`slide_by_rim`).
- knob (`TurnOn`, `TurnOff`): pinch the knob's handle on its hinge axis and yaw (`turn_knob`).
Drawers (`Open`, `Close`) have no primitive yet: an ExpertError names the predicate.
Actions: position (3) in [-1, 1] = delta / 0.05 m, orientation (3) = axis-angle delta / 0.5 rad
(robosuite's OSC_POSE scaling), gripper -1 open / +1 close.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from vlajax.envs.base import EnvError

POS_SCALE = 0.05  # metres per unit of OSC position action (osc_pose.json output_max)
ROT_SCALE = 0.5  # radians per unit of OSC orientation action
OPEN, CLOSE = -1.0, 1.0
HOLD = 0.0  # the gripper keeps its opening (robosuite ramps it by the sign of the command)
PINCH_STEPS = 3  # closing steps from fully open that leave ~3 cm between the pads (a bowl's rim in a tight place)
SAFE_Z_CLEARANCE = 0.12  # carry height above the highest point to pass over
CARRY_BOTTOM_CLEARANCE = 0.05  # a carried object's bottom above the target's top while carried over it
GRIPPER_STEPS = 12  # control steps the Panda gripper needs to close or open fully
STALL_STEPS = 6  # a waypoint whose hand moved less than STALL_MOVE over this many steps ...
STALL_MOVE = 0.002
STALL_TOL = 0.03  # ... while this close to it is left as reached (see `LiberoExpert.act`)


class ExpertError(EnvError):
    """The expert cannot plan or follow this task (names the suite, task and what it lacks)."""


# ---- geometry ------------------------------------------------------------------------------------
def _subtree_bodies(model, root: int) -> np.ndarray:
    ids = [root]
    for b in range(root + 1, model.nbody):
        p = model.body_parentid[b]
        if p in ids:
            ids.append(b)
    return np.array(ids)


def _collision_geoms(model, bodies: np.ndarray) -> np.ndarray:
    mask = np.isin(model.geom_bodyid, bodies) & ((model.geom_contype != 0) | (model.geom_conaffinity != 0))
    return np.flatnonzero(mask)


def geoms_box(model, data, geoms: np.ndarray, frame_pos=None, frame_mat=None) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the geoms' bounding boxes' corners, in world axes or in a body frame."""
    corners = []
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    for g in geoms:
        aabb = model.geom_aabb[g]
        local = aabb[:3] + signs * aabb[3:]
        world = data.geom_xpos[g] + local @ data.geom_xmat[g].reshape(3, 3).T
        corners.append(world)
    pts = np.concatenate(corners)
    if frame_mat is not None:
        pts = (pts - frame_pos) @ frame_mat
    return pts.min(0), pts.max(0)


@dataclasses.dataclass
class Shape:
    """What a grasp needs of an object: world box, and its horizontal extents in its own frame."""

    lo: np.ndarray  # (3,) world box
    hi: np.ndarray
    center: np.ndarray  # (3,) body position
    axis_x: np.ndarray  # (2,) body x axis projected on the table, unit
    half_x: float  # half extent along axis_x
    half_y: float  # half extent across it


def _shape(inner, name: str) -> Shape:
    model, data = inner.sim.model._model, inner.sim.data._data
    body = inner.obj_body_id[name]
    geoms = _collision_geoms(model, _subtree_bodies(model, body))
    if len(geoms) == 0:
        raise ExpertError(f"object {name!r} has no collision geometry")
    lo, hi = geoms_box(model, data, geoms)
    pos, mat = data.xpos[body].copy(), data.xmat[body].reshape(3, 3)
    # The body axis closest to horizontal-long decides the grasp direction.
    llo, lhi = geoms_box(model, data, geoms, pos, mat)
    ext = (lhi - llo) / 2
    axes = [(mat[:2, i], ext[i]) for i in range(3) if np.linalg.norm(mat[:2, i]) > 0.7]
    if len(axes) < 2:  # lying with no axis flat: fall back to world axes
        axes = [(np.array([1.0, 0.0]), (hi - lo)[0] / 2), (np.array([0.0, 1.0]), (hi - lo)[1] / 2)]
    (ax, hx), (_, hy) = axes[0], axes[1]
    return Shape(lo, hi, pos, ax / np.linalg.norm(ax), float(hx), float(hy))


TILTED_SITE_INSET = 0.035  # how far up a tilted region's normal the object is aimed (past its lower lip)


def _target_point(inner, name: str) -> tuple[np.ndarray, float]:
    """(xy target, top z) of a place target: an object's body, or a region's site.

    A tilted region (the wine rack's slanted board) counts an object as on it when the object's
    origin lies in a thin slab along the region's normal (LIBERO's `SiteObject.under`, which reads
    the site matrix's rows as the region's axes); its site sits on the board's lower lip, so the
    target is moved `TILTED_SITE_INSET` up that normal, where an upright object set down rests on
    the board inside the slab."""
    model, data = inner.sim.model._model, inner.sim.data._data
    if name in inner.obj_body_id:
        s = _shape(inner, name)
        return s.center[:2].copy(), float(s.hi[2])
    if name in inner.object_sites_dict:
        site = model.site(name).id
        pos = data.site_xpos[site].copy()
        half = model.site_size[site]
        normal = data.site_xmat[site].reshape(3, 3)[2]  # `under` uses mat @ d: rows are the axes
        if abs(normal[2]) < 0.9:
            normal = normal if normal[2] > 0 else -normal
            p = pos + TILTED_SITE_INSET * normal
            return p[:2], float(p[2])
        return pos[:2], float(pos[2] + (half[2] if len(half) > 2 else 0.0))
    raise ExpertError(f"place target {name!r} is neither an object nor a region of the scene")


# ---- control -------------------------------------------------------------------------------------
def _axis_angle(rot: np.ndarray) -> np.ndarray:
    """Axis-angle (3,) of a rotation matrix."""
    cos = np.clip((np.trace(rot) - 1) / 2, -1.0, 1.0)
    angle = np.arccos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    norm = np.linalg.norm(axis)
    if norm < 1e-6:  # angle ~ pi: the axis is the dominant column of (R + I)
        m = (rot + np.eye(3)) / 2
        axis = m[:, int(np.argmax(np.diag(m)))]
        norm = np.linalg.norm(axis)
    return axis / norm * angle


def _rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _quat_to_mat(q_xyzw: np.ndarray) -> np.ndarray:
    x, y, z, w = q_xyzw
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


@dataclasses.dataclass
class Waypoint:
    """Track `pos` (world) with gripper `grip` until within `tol` (and `min_steps` passed)."""

    pos: Callable[[], np.ndarray] | np.ndarray
    grip: float | Callable[[], float]
    tol: float = 0.01
    max_steps: int = 80
    min_steps: int = 0
    speed: float = 1.0  # cap on the position action's magnitude
    on_exit: Callable[[np.ndarray], None] | None = None  # called with the eef position when left
    yaw: float | Callable[[], float] | None = None  # the hand's yaw while tracking (None: keep it)
    until: Callable[[], bool] | None = None  # also left as soon as this holds
    stall_tol: float = STALL_TOL  # left once the hand stalls this close (0: only at tol or max_steps)
    stall_above: float = np.inf  # ... and no higher than this above it


class LiberoExpert:
    """Scripted policy for one LIBERO env (`vlajax.envs.libero.LiberoEnv`, after `reset`).

    `act(obs)` -> (7,) action for the next control step; `done` once the plan is spent."""

    def __init__(self, libero_env):
        self._libero = libero_env
        self._plan: list[Waypoint] = []
        self._i = 0
        self._steps_here = 0
        self._yaw = 0.0
        self._r0: np.ndarray | None = None
        self._trail: list[np.ndarray] = []  # the hand's positions since the waypoint began

    @property
    def inner(self):  # robosuite's env: privileged state
        return self._libero._env.env

    def reset(self, obs: dict[str, np.ndarray]) -> None:
        """Plan the task of the env's current episode; `obs` is the raw robosuite observation."""
        self._r0 = _quat_to_mat(np.asarray(obs["robot0_eef_quat"], dtype=float))
        self._yaw = 0.0
        self._plan = plan_goal(self, self.inner.parsed_problem["goal_state"])
        self._i = 0
        self._steps_here = 0
        self._trail = []

    @property
    def done(self) -> bool:
        return self._i >= len(self._plan)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
        while not self.done:
            wp = self._plan[self._i]
            target = wp.pos() if callable(wp.pos) else wp.pos
            err = np.linalg.norm(target - eef)
            reached = err < wp.tol and self._steps_here >= wp.min_steps
            reached = reached or (wp.until is not None and wp.until())
            # Near the edge of the Panda's reach (an arm almost straight) the OSC settles short of
            # the target, by 1-2 cm: a hand that has stopped that close is as near as it gets. On the
            # way down to a grasp, not a hand held up above it (`stall_above`: a finger resting on a
            # neighbour slides off it if the hand keeps pushing).
            reached = reached or (err < wp.stall_tol and eef[2] - target[2] < wp.stall_above
                                  and self._steps_here >= max(wp.min_steps, STALL_STEPS)
                                  and np.linalg.norm(eef - self._trail[-STALL_STEPS]) < STALL_MOVE)
            if reached or self._steps_here >= wp.max_steps:
                if wp.on_exit is not None:
                    wp.on_exit(eef)
                self._i += 1
                self._steps_here = 0
                self._trail = []
                continue
            self._steps_here += 1
            self._trail.append(eef)
            if wp.yaw is not None:
                self._yaw = wp.yaw() if callable(wp.yaw) else wp.yaw
            return self._action(obs, target, wp.grip() if callable(wp.grip) else wp.grip, wp.speed)
        return np.array([0, 0, 0, 0, 0, 0, OPEN])

    def _action(self, obs, target: np.ndarray, grip: float, speed: float) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
        delta = (target - eef) / POS_SCALE
        norm = np.linalg.norm(delta)
        if norm > speed:
            delta *= speed / norm
        rot_now = _quat_to_mat(np.asarray(obs["robot0_eef_quat"], dtype=float))
        rot_goal = _rot_z(self._yaw) @ self._r0
        rot = np.clip(_axis_angle(rot_goal @ rot_now.T) / ROT_SCALE, -1, 1)
        return np.concatenate([delta, rot, [grip]])

    # ---- what plans read -------------------------------------------------------------------------
    def closing_axis(self) -> np.ndarray:
        """(2,) the fingers' closing direction on the table at yaw 0."""
        ax = self._r0[:2, 1]
        return ax / np.linalg.norm(ax)


FINGER_REACH = 0.045  # an open finger's pad from the grip site, along the closing axis
HAND_HALF_LENGTH = 0.1  # the Panda hand's half length along the closing axis
HAND_LIFT = 0.065  # grip site to the middle of the hand's housing


def _obstacle_boxes(inner, skip: str, floor_z: float) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) world boxes (G, 3) of the collision geoms the hand could touch: every geom that is
    not part of the robot or of `skip` and reaches above `floor_z` (so the table is left out)."""
    model, data = inner.sim.model._model, inner.sim.data._data
    own = set(_subtree_bodies(model, inner.obj_body_id[skip]).tolist())
    robot = set()
    for name in ("robot0_base", "mount0_base", "gripper0_right_gripper"):
        bid = model.body(name).id if name in _body_names(model) else -1
        if bid >= 0:
            robot |= set(_subtree_bodies(model, bid).tolist())
    los, his = [], []
    for g in _collision_geoms(model, np.arange(model.nbody)):
        if model.geom_bodyid[g] in own or model.geom_bodyid[g] in robot:
            continue
        lo, hi = geoms_box(model, data, np.array([g]))
        if hi[2] > floor_z:
            los.append(lo)
            his.append(hi)
    return np.array(los).reshape(-1, 3), np.array(his).reshape(-1, 3)


def _body_names(model) -> frozenset:
    import mujoco

    return frozenset(mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, b) for b in range(model.nbody))


def _hand_points(grasp: np.ndarray, close_dir: np.ndarray, reach: float = FINGER_REACH) -> np.ndarray:
    """Points the open hand occupies at a grasp: both finger pads and the housing above them."""
    d = np.array([close_dir[0], close_dir[1], 0.0])
    pts = [grasp + sgn * reach * d + np.array([0, 0, dz]) for sgn in (-1, 1) for dz in (-0.01, 0.015, 0.04)]
    pts += [grasp + t * d + np.array([0, 0, HAND_LIFT]) for t in np.linspace(-HAND_HALF_LENGTH, HAND_HALF_LENGTH, 9)]
    return np.array(pts)


def _clearance(points: np.ndarray, boxes) -> float:
    lo, hi = boxes
    if len(lo) == 0:
        return 1.0
    gap = np.maximum(np.maximum(lo[None] - points[:, None], points[:, None] - hi[None]), 0.0)
    return float(np.linalg.norm(gap, axis=2).min())


SHOULDER_HEIGHT = 0.333  # the Panda's shoulder (joint 2) above its base
WRIST_ABOVE_GRIP = 0.21  # the wrist above the grip site with the hand pointing down
ARM_REACH = 0.79  # shoulder to wrist beyond which the OSC settles short (measured: stalls at 0.80-0.81)
APPROACH_HEIGHT = 0.10  # the hand's height above a grasp before it descends


def _reach_excess(inner, p: np.ndarray) -> float:
    """How far (m) the wrist of a top-down hand with its grip site at `p` lies beyond the arm's
    reach: the OSC stops 1-2 cm short of such a target and tilts the hand (a bowl's rim pinched
    there is held by the pad tips and slips out on the carry)."""
    model, data = inner.sim.model._model, inner.sim.data._data
    if "robot0_base" not in _body_names(model):
        return 0.0
    shoulder = data.xpos[model.body("robot0_base").id] + np.array([0.0, 0.0, SHOULDER_HEIGHT])
    wrist = np.asarray(p, dtype=float) + np.array([0.0, 0.0, WRIST_ABOVE_GRIP])
    return max(0.0, float(np.linalg.norm(wrist - shoulder)) - ARM_REACH)


def _best_grasp(candidates, boxes, reach: float = FINGER_REACH, enough: float = 0.02, inner=None):
    """The (xyz, closing direction) candidate whose hand is clearest of obstacles, less how far its
    approach lies beyond the arm's reach (with `inner`); the first candidates are preferred while
    they clear by `enough`."""
    best = None
    for rank, (xyz, close_dir) in enumerate(candidates):
        score = min(_clearance(_hand_points(xyz, close_dir, reach), boxes), enough) - 1e-4 * rank
        if inner is not None:
            score -= _reach_excess(inner, xyz + np.array([0.0, 0.0, APPROACH_HEIGHT]))
        if best is None or score > best[0]:
            best = (score, xyz, close_dir)
    return best[1], best[2]


def _rotated(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _is_tall_and_round(s: Shape) -> bool:
    """A bottle: much taller than wide, about as deep as wide. Taken by its top (the palm stops
    a deeper grasp), it hangs far below the pads and swings about the line between them when the
    hand accelerates across that line; pinched along the carry direction it cannot, so the
    closing axis is turned onto the way to the target (a round object has no narrow side)."""
    height = s.hi[2] - s.lo[2]
    return height > 2.5 * 2 * max(s.half_x, s.half_y) and abs(s.half_x - s.half_y) < 0.2 * max(s.half_x, s.half_y)


# ---- primitives ----------------------------------------------------------------------------------
def _yaw_to_close_along(expert: LiberoExpert, direction: np.ndarray) -> float:
    """The yaw (|yaw| <= pi/2) that turns the fingers' closing axis onto `direction` (mod pi)."""
    c = expert.closing_axis()
    yaw = np.arctan2(direction[1], direction[0]) - np.arctan2(c[1], c[0])
    return float((yaw + np.pi / 2) % np.pi - np.pi / 2)


def pick_and_place(expert: LiberoExpert, obj: str, target: str, *, drop: bool) -> list[Waypoint]:
    """Waypoints that move object `obj` onto (or, with `drop`, into) `target`."""
    inner = expert.inner
    state: dict[str, Any] = {}

    def shape() -> Shape:
        return _shape(inner, obj)

    def plan_grasp():
        s = shape()
        if "bowl" in obj:  # rim grasp: the fingers pinch the wall, closing radially
            z = s.hi[2] - 0.012
            rim = max(s.half_x, s.half_y) - 0.01
            state["pinch"], reach = True, 0.025
            base = expert.closing_axis()
            cands = []
            for deg in (0, 180, 30, -30, 150, -150, 45, -45, 135, -135, 60, -60, 120, -120, 90, -90):
                radial = _rotated(base, np.deg2rad(deg))
                xy = s.center[:2] + rim * radial
                cands.append((np.array([xy[0], xy[1], z]), radial))
        else:  # top-down across the narrow side, turned and shifted to keep the hand off neighbours
            narrow = s.axis_x if s.half_x <= s.half_y else np.array([-s.axis_x[1], s.axis_x[0]])
            height = s.hi[2] - s.lo[2]
            if _is_tall_and_round(s):  # pinch across the way it will be carried (see _is_tall_and_round)
                to_target = _target_point(inner, target)[0] - s.center[:2]
                if np.linalg.norm(to_target) > 1e-3:
                    narrow = to_target / np.linalg.norm(to_target)
            long_axis = np.array([-narrow[1], narrow[0]])
            z = s.hi[2] - min(0.035, max(0.01, height * 0.5))
            z = max(z, s.lo[2] + 0.012)
            slack = max(0.0, max(s.half_x, s.half_y) - 0.025)
            state["pinch"], reach = False, FINGER_REACH
            cands = []
            for dev in (0, 15, -15, 30, -30, 40, -40):
                for shift in (0.0, slack / 2, -slack / 2, slack, -slack):
                    xy = s.center[:2] + shift * long_axis
                    cands.append((np.array([xy[0], xy[1], z]), _rotated(narrow, np.deg2rad(dev))))
        grasp_xyz, close_dir = _best_grasp(cands, _obstacle_boxes(inner, obj, s.lo[2] + 0.005), reach,
                                          inner=inner)
        xy, z = grasp_xyz[:2], grasp_xyz[2]
        state["hang"] = z - s.lo[2]  # how far the object reaches below the grip site
        yaw = _yaw_to_close_along(expert, close_dir)
        state["grasp"] = np.array([xy[0], xy[1], z])
        state["yaw"] = yaw
        expert._yaw = yaw
        return state["grasp"]

    def above_grasp():
        g = state.get("grasp")
        if g is None:
            g = plan_grasp()
        return g + np.array([0, 0, 0.10])

    def grasp():
        return state["grasp"]

    def preshape() -> float:
        return CLOSE if state.get("pinch") else OPEN

    def opening() -> float:
        return HOLD if state.get("pinch") else OPEN

    def lift():
        tz, top = _target_point(inner, target)
        # a tall object hangs far below the hand: its bottom, not the hand, must clear the target
        z = max(state["grasp"][2] + 0.15, top + SAFE_Z_CLEARANCE, top + state["hang"] + CARRY_BOTTOM_CLEARANCE)
        state["carry_z"] = z
        return np.array([state["grasp"][0], state["grasp"][1], z])

    def held(eef: np.ndarray) -> None:  # gripper minus object, measured once the object is held
        state["offset"] = eef - shape().center

    def offset() -> np.ndarray:
        return state["offset"]

    def above_target():
        xy, _ = _target_point(inner, target)
        goal = np.array([xy[0], xy[1], 0.0]) + offset()
        return np.array([goal[0], goal[1], state["carry_z"]])

    def lower():
        xy, top = _target_point(inner, target)
        s = shape()
        bottom_to_center = s.center[2] - s.lo[2]
        clearance = 0.04 if drop else 0.012
        z_obj = top + bottom_to_center + clearance
        return np.array([xy[0], xy[1], z_obj]) + offset()

    wps = [
        Waypoint(above_grasp, OPEN, tol=0.01, max_steps=100),
        Waypoint(above_grasp, preshape, tol=1.0, min_steps=PINCH_STEPS, max_steps=PINCH_STEPS),
        Waypoint(grasp, opening, tol=0.006, max_steps=60, speed=0.6, stall_above=0.015),
        Waypoint(grasp, CLOSE, tol=1.0, min_steps=GRIPPER_STEPS, max_steps=GRIPPER_STEPS, on_exit=held),
        Waypoint(lift, CLOSE, tol=0.015, max_steps=100),
        Waypoint(above_target, CLOSE, tol=0.01, max_steps=120),
        Waypoint(lambda: lower() + np.array([0, 0, 0.05]), CLOSE, tol=0.015, max_steps=60),  # full speed down
        Waypoint(lower, CLOSE, tol=0.008, max_steps=80, speed=0.6),
        Waypoint(lower, OPEN, tol=1.0, min_steps=GRIPPER_STEPS, max_steps=GRIPPER_STEPS),
        Waypoint(lambda: lower() + np.array([0, 0, 0.08]), OPEN, tol=0.02, max_steps=40),
    ]
    return wps


SLIDE_TOL = 0.01  # a slid object this close to its target is let go
SLIDE_LIFT = 0.004  # how far the pinched rim is raised off its seat while sliding


def _is_slidable(s: Shape, target_top: float) -> bool:
    """A plate: too wide for the open hand, flat, and its target is on the surface it stands on:
    it is slid there by its rim (`slide_by_rim`), not carried."""
    flat = s.hi[2] - s.lo[2] < 0.03
    wide = 2 * min(s.half_x, s.half_y) > 2 * FINGER_REACH
    return flat and wide and abs(target_top - s.lo[2]) < 0.02


def slide_by_rim(expert: LiberoExpert, obj: str, target: str) -> list[Waypoint]:
    """Waypoints that slide a plate along the table onto a region ("push the plate ...").

    Why not carry it: a plate pinched by its low rim hangs on edge once lifted. Why not push it:
    its rim is a gentle slope (a finger pushing it from inside wedges it onto the table) and the
    plates stand at the far edge of the Panda's reach, where the hand cannot get down to the table
    behind them. So the fingers pinch the rim on the side facing the target, closing radially,
    and pull the plate there, the rim raised only `SLIDE_LIFT` so the plate stays flat on the
    table; the pull aims the plate's centre (the grasp offset is measured once held)."""
    inner = expert.inner
    state: dict[str, Any] = {}

    def centre_to_goal():
        s = _shape(inner, obj)
        goal, _ = _target_point(inner, target)
        return s, goal, goal - s.center[:2]

    def plan():
        s, goal, to_goal = centre_to_goal()
        d = to_goal / max(np.linalg.norm(to_goal), 1e-6)
        rim = max(s.half_x, s.half_y) - 0.01
        xy = s.center[:2] + rim * d
        state["grasp"] = np.array([xy[0], xy[1], s.hi[2] - 0.012])
        state["yaw"] = _yaw_to_close_along(expert, d)
        return state["grasp"]

    def above():
        g = state.get("grasp")
        if g is None:
            g = plan()
        return g + np.array([0, 0, 0.10])

    def held(eef: np.ndarray) -> None:
        state["offset"] = eef[:2] - _shape(inner, obj).center[:2]
        state["z"] = eef[2] + SLIDE_LIFT

    def pull():
        _, goal, _ = centre_to_goal()
        xy = goal + state["offset"]
        return np.array([xy[0], xy[1], state["z"]])

    def arrived() -> bool:
        return bool(np.linalg.norm(centre_to_goal()[2]) < SLIDE_TOL)

    def released(eef: np.ndarray) -> None:
        state["end"] = eef.copy()

    grasp = lambda: state["grasp"]  # noqa: E731
    return [
        Waypoint(above, OPEN, tol=0.01, max_steps=100, yaw=lambda: state["yaw"]),
        Waypoint(above, CLOSE, tol=1.0, min_steps=PINCH_STEPS, max_steps=PINCH_STEPS),
        Waypoint(grasp, HOLD, tol=0.006, max_steps=60, speed=0.6),
        Waypoint(grasp, CLOSE, tol=1.0, min_steps=GRIPPER_STEPS, max_steps=GRIPPER_STEPS, on_exit=held),
        Waypoint(pull, CLOSE, tol=0.005, max_steps=120, speed=0.4, until=arrived, on_exit=released,
                 stall_tol=0.0),
        Waypoint(lambda: state["end"], OPEN, tol=1.0, min_steps=GRIPPER_STEPS // 2, max_steps=GRIPPER_STEPS // 2),
        Waypoint(lambda: state["end"] + np.array([0, 0, 0.08]), OPEN, tol=0.02, max_steps=40),
    ]


KNOB_TURN_STEP = 0.15  # radians of hand yaw per waypoint while turning a knob
KNOB_ON_ANGLE = 1.2  # knob angle aimed at to turn it on (the flat stove is on from 0.5 rad, up to 2.1)
KNOB_OFF_ANGLE = -0.3  # aimed at to turn it off (off below 0; the joint stops at -0.005)


def _knob(inner, fixture: str) -> tuple[int, np.ndarray, np.ndarray, float]:
    """(hinge joint id, its world axis (z up), the knob's collision geoms, the joint angle) of the
    fixture's turnable knob."""
    model, data = inner.sim.model._model, inner.sim.data._data
    obj = inner.get_object(fixture)
    hinges = [model.joint(j).id for j in getattr(obj, "joints", [])
              if model.jnt_type[model.joint(j).id] == 3]  # mjJNT_HINGE
    if fixture not in inner.obj_body_id or not hinges:
        raise ExpertError(f"{fixture!r} has no knob (hinge joint) to turn")
    j = hinges[0]
    axis = data.xaxis[j].copy()
    if abs(axis[2]) < 0.9:
        raise ExpertError(f"{fixture!r}: its knob turns about {np.round(axis, 2)}, not a vertical axis")
    geoms = _collision_geoms(model, _subtree_bodies(model, model.jnt_bodyid[j]))
    return j, axis, geoms, float(data.qpos[model.jnt_qposadr[j]])


def turn_knob(expert: LiberoExpert, fixture: str, *, on: bool) -> list[Waypoint]:
    """Waypoints that turn the fixture's knob (the flat stove's) on or off.

    The knob is a hinge about a vertical axis under a handle bar; LIBERO counts the stove on from
    0.5 rad (`FlatStove.turn_on`) and off below 0. The hand pinches the bar across its narrow side
    with the grip site on the hinge axis, then yaws in small steps (the OSC turns the hand about the
    grip site, so the pinch stays on the axis and turns the bar with it), releases and rises."""
    inner = expert.inner
    model, data = inner.sim.model._model, inner.sim.data._data
    state: dict[str, Any] = {}

    def plan():
        j, axis, geoms, angle = _knob(inner, fixture)
        lo, hi = geoms_box(model, data, geoms)
        handle = [g for g in geoms if geoms_box(model, data, np.array([g]))[1][2] > hi[2] - 0.012]
        hlo, hhi = geoms_box(model, data, np.array(handle))
        narrow = np.array([1.0, 0.0]) if hhi[0] - hlo[0] < hhi[1] - hlo[1] else np.array([0.0, 1.0])
        centre = data.xanchor[j].copy()
        state["grasp"] = np.array([centre[0], centre[1], hhi[2] - 0.02])
        turn = ((KNOB_ON_ANGLE if on else KNOB_OFF_ANGLE) - angle) * np.sign(axis[2])
        yaw0 = _yaw_to_close_along(expert, narrow)
        alt = yaw0 - np.pi if yaw0 > 0 else yaw0 + np.pi  # the same pinch, the other way round
        if max(abs(alt), abs(alt + turn)) < max(abs(yaw0), abs(yaw0 + turn)):
            yaw0 = alt
        state["yaws"] = yaw0 + np.linspace(0, turn, max(2, int(np.ceil(abs(turn) / KNOB_TURN_STEP)) + 1))[1:]
        state["yaw0"] = yaw0
        return state["grasp"]

    grasp = plan()  # a fixture's knob does not move before its turn: planned now
    yaw0 = state["yaw0"]
    wps = [
        Waypoint(grasp + np.array([0, 0, 0.10]), OPEN, tol=0.01, max_steps=100, yaw=yaw0),
        Waypoint(grasp, OPEN, tol=0.006, max_steps=60, speed=0.6, yaw=yaw0),
        Waypoint(grasp, CLOSE, tol=1.0, min_steps=GRIPPER_STEPS, max_steps=GRIPPER_STEPS, yaw=yaw0),
    ]
    wps += [Waypoint(grasp, CLOSE, tol=1.0, min_steps=3, max_steps=3, yaw=float(y)) for y in state["yaws"]]
    wps += [
        Waypoint(grasp, OPEN, tol=1.0, min_steps=GRIPPER_STEPS // 2, max_steps=GRIPPER_STEPS // 2),
        Waypoint(grasp + np.array([0, 0, 0.08]), OPEN, tol=0.02, max_steps=40),
    ]
    return wps


def _check_reachable_inside(inner, pred: Sequence[str]) -> None:
    """A drawer's region can be filled only with the drawer open; there is no primitive that
    opens one yet, so a closed drawer is a named error rather than a bowl dropped on its front."""
    site = inner.object_sites_dict.get(pred[2])
    if site is not None and getattr(site, "joints", None):
        state = inner.object_states_dict.get(pred[2])
        if state is not None and not state.is_open():
            raise ExpertError(f"no primitive for goal predicate {list(pred)}: {pred[2]!r} is closed "
                              "and no primitive opens drawers")


def plan_goal(expert: LiberoExpert, goal: Sequence[Sequence[str]]) -> list[Waypoint]:
    """The waypoints for a conjunction of BDDL goal predicates, in order."""
    plan: list[Waypoint] = []
    for pred in goal:
        kind = pred[0].lower()
        if kind == "on":
            if _is_slidable(_shape(expert.inner, pred[1]), _target_point(expert.inner, pred[2])[1]):
                plan += slide_by_rim(expert, pred[1], pred[2])
            else:
                plan += pick_and_place(expert, pred[1], pred[2], drop=False)
        elif kind == "in":
            _check_reachable_inside(expert.inner, pred)
            plan += pick_and_place(expert, pred[1], pred[2], drop=True)
        elif kind in ("turnon", "turnoff"):
            plan += turn_knob(expert, pred[1], on=kind == "turnon")
        else:
            raise ExpertError(f"no primitive for goal predicate {pred}")
    return plan

