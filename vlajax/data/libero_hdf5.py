"""LIBERO demonstrations in LIBERO's own HDF5 layout, so one loader reads the official (downloaded) files
and the ones vlajax writes from successful rollouts.

One file per task, ``<root>/<suite>/<task>_demo.hdf5``::

    data                      attrs: problem_info, env_args (JSON), bddl_file_name, num_demos, total,
                                     macros_image_convention, vlajax_suite, vlajax_task
    data/demo_<i>             attrs: num_samples, init_state, vlajax_state_id
        actions (T, 7) f64, dones (T,) u8, rewards (T,) u8, robot_states (T, 9) f64, states (T, S) f64
        obs/agentview_rgb, obs/eye_in_hand_rgb (T, H, W, 3) u8, as rendered (OpenGL rows: upside down)
        obs/ee_pos (T, 3), ee_ori (T, 3) axis-angle, ee_states (T, 6), gripper_states (T, 2), joint_states (T, 7)

Images are kept exactly as the simulator renders them, as LIBERO's files do: the flip belongs to the
policy's preprocessing, which must be the same for demonstrations and rollouts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np

# vlajax / robosuite camera name <-> LIBERO obs key
CAMERA_KEYS = {"agentview": "agentview_rgb", "robot0_eye_in_hand": "eye_in_hand_rgb"}
_SUFFIX = "_demo.hdf5"


class DatasetError(ValueError):
    """A demonstration file or episode is malformed. The message names the file and the field."""


@dataclasses.dataclass
class Episode:
    """One demonstration, in the arrays the trainer consumes (proprio and actions as the policy sees them)."""

    images: dict[str, np.ndarray]  # vlajax camera name -> (T, H, W, 3) uint8, as rendered
    proprio: np.ndarray  # (T, 8) float32: eef pos (3), axis-angle (3), gripper qpos (2): OpenVLA-OFT's state
    actions: np.ndarray  # (T, 7) float32, LIBERO's action space in [-1, 1]
    instruction: str
    task: str  # task name
    state_id: int | None = None  # init-state id it started from (None for official files)
    states: np.ndarray | None = None  # (T, S) float64 flattened MuJoCo states (replay, init_state)
    joint_states: np.ndarray | None = None  # (T, 7)
    eef_quat: np.ndarray | None = None  # (T, 4) xyzw (robosuite order), for robot_states

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])


def demo_path(root: str | os.PathLike, suite: str, task: str) -> Path:
    """Where a task's demonstrations live: ``<root>/<suite>/<task>_demo.hdf5`` (LIBERO's naming)."""
    return Path(root) / suite / f"{task}{_SUFFIX}"


def _camera_key(camera: str) -> str:
    return CAMERA_KEYS.get(camera, f"{camera}_rgb")


def _text(value) -> str:
    return value.decode() if isinstance(value, (bytes, np.bytes_)) else str(value)


def _axisangle_to_quat(aa: np.ndarray) -> np.ndarray:
    """(T, 3) axis-angle -> (T, 4) xyzw, for robot_states when the episode has no quaternion."""
    aa = np.asarray(aa, np.float64)
    angle = np.linalg.norm(aa, axis=-1, keepdims=True)
    axis = np.divide(aa, angle, out=np.zeros_like(aa), where=angle > 1e-12)
    return np.concatenate([axis * np.sin(angle / 2), np.cos(angle / 2)], axis=-1)


def _check_episode(ep: Episode, where: str) -> None:
    """Shapes and dtypes the file layout relies on, so a bad episode fails here and not at training time."""
    t = ep.actions.shape[0] if np.ndim(ep.actions) == 2 else -1

    def bad(field, msg):
        raise DatasetError(f"{where}: {field} {msg}")

    if t < 1 or not np.issubdtype(ep.actions.dtype, np.floating):
        bad("actions", f"must be a non-empty (T, A) float array, got {ep.actions.dtype} {np.shape(ep.actions)}")
    if not np.isfinite(ep.actions).all():
        bad("actions", "contain NaN or inf")
    if not ep.images:
        bad("images", "is empty")
    for cam, img in ep.images.items():
        if img.dtype != np.uint8 or img.ndim != 4 or img.shape[-1] != 3 or img.shape[0] != t:
            bad(f"images[{cam!r}]", f"must be ({t}, H, W, 3) uint8 (T from actions), got {img.dtype} {img.shape}")
    expect = {"proprio": (ep.proprio, 8), "states": (ep.states, None), "joint_states": (ep.joint_states, 7),
              "eef_quat": (ep.eef_quat, 4)}
    for name, (arr, width) in expect.items():
        if arr is None and name != "proprio":
            continue
        if (arr is None or arr.ndim != 2 or arr.shape[0] != t or not np.issubdtype(arr.dtype, np.floating)
                or (width is not None and arr.shape[1] != width)):
            got = None if arr is None else f"{arr.dtype} {arr.shape}"
            bad(name, f"must be ({t}, {width or 'S'}) float (T from actions), got {got}")


class DemoWriter:
    """Appends successful episodes of one task to its file; each append is flushed, so an interrupted run
    keeps every finished episode. Reopening a file appends (existing demos kept, numbering continues)."""

    def __init__(self, root, suite: str, task: str, instruction: str, *, bddl_file: str = "",
                 env_args: dict | None = None):
        self.path = demo_path(root, suite, task)
        self.task = task
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._f = h5py.File(self.path, "a")
        except OSError as e:
            raise DatasetError(f"{self.path}: cannot open as HDF5 for appending ({e})") from e
        data = self._f.require_group("data")
        for key, want in (("vlajax_suite", suite), ("vlajax_task", task)):
            if key in data.attrs and _text(data.attrs[key]) != want:
                self._f.close()
                raise DatasetError(f"{self.path}: data.attrs[{key!r}] is {_text(data.attrs[key])!r}, not {want!r}")
        for name in [k for k in data if k.startswith("_partial_")]:  # an append cut off mid-write
            del data[name]
        if "problem_info" not in data.attrs:
            problem = "unknown"
            if bddl_file and os.path.isfile(bddl_file):
                m = re.search(r"\(problem\s+([^\s()]+)\)", Path(bddl_file).read_text())
                problem = m.group(1) if m else problem
            data.attrs["problem_info"] = json.dumps(
                {"problem_name": problem, "domain_name": "robosuite", "language_instruction": instruction})
            data.attrs["bddl_file_name"] = bddl_file
            data.attrs["macros_image_convention"] = "opengl"
            data.attrs["vlajax_suite"], data.attrs["vlajax_task"] = suite, task
        # env_args: the caller's, else what is known, with the cameras filled in at the first append
        self._fill_cameras = env_args is None and "env_args" not in data.attrs
        if env_args is not None or "env_args" not in data.attrs:
            problem = json.loads(_text(data.attrs["problem_info"]))["problem_name"]
            data.attrs["env_args"] = json.dumps(env_args or {"type": 1, "env_name": problem, "env_kwargs": {
                "bddl_file_name": bddl_file, "control_freq": 20, "has_renderer": False,
                "has_offscreen_renderer": True, "use_camera_obs": True}})
        self._data = data
        self._f.flush()

    def _demo_names(self) -> list[str]:
        return [k for k in self._data if k.startswith("demo_")]

    @property
    def num_demos(self) -> int:
        return len(self._demo_names())

    def state_ids(self) -> set[int]:
        """The init-state ids already recorded, so a resumed collection can skip them."""
        return {int(self._data[k].attrs["vlajax_state_id"]) for k in self._demo_names()
                if "vlajax_state_id" in self._data[k].attrs}

    def append(self, ep: Episode) -> None:
        """Writes ``ep`` as the next ``demo_<i>`` (under a temporary name, renamed once complete)."""
        _check_episode(ep, f"{self.path}: episode")
        if ep.task != self.task:
            raise DatasetError(f"{self.path}: episode task {ep.task!r} is not this file's {self.task!r}")
        idx = max((int(k[5:]) for k in self._demo_names()), default=-1) + 1
        t = ep.length
        g = self._data.create_group(f"_partial_{idx}")
        g.attrs["num_samples"] = t
        if ep.state_id is not None:
            g.attrs["vlajax_state_id"] = int(ep.state_id)
        done = np.zeros(t, np.uint8)
        done[-1] = 1
        g["actions"] = ep.actions.astype(np.float64)
        g["dones"], g["rewards"] = done, done
        proprio = ep.proprio.astype(np.float64)
        pos, ori, grip = proprio[:, :3], proprio[:, 3:6], proprio[:, 6:8]
        quat = ep.eef_quat.astype(np.float64) if ep.eef_quat is not None else _axisangle_to_quat(ori)
        g["robot_states"] = np.concatenate([grip, pos, quat], axis=1)
        if ep.states is not None:
            g["states"] = ep.states.astype(np.float64)
            g.attrs["init_state"] = g["states"][0]
        obs = g.create_group("obs")
        for cam, img in ep.images.items():
            obs.create_dataset(_camera_key(cam), data=img, chunks=(1, *img.shape[1:]), compression="gzip",
                               compression_opts=4)
        obs["ee_pos"], obs["ee_ori"], obs["ee_states"], obs["gripper_states"] = pos, ori, proprio[:, :6], grip
        if ep.joint_states is not None:
            obs["joint_states"] = ep.joint_states.astype(np.float64)
        self._data.move(f"_partial_{idx}", f"demo_{idx}")
        self._data.attrs["num_demos"] = self.num_demos
        self._data.attrs["total"] = int(self._data.attrs.get("total", 0)) + t
        if self._fill_cameras:
            args = json.loads(_text(self._data.attrs["env_args"]))
            args["env_kwargs"].update(camera_names=list(ep.images),
                                      camera_heights=next(iter(ep.images.values())).shape[1],
                                      camera_widths=next(iter(ep.images.values())).shape[2])
            self._data.attrs["env_args"] = json.dumps(args)
            self._fill_cameras = False
        self._f.flush()

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> DemoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_episodes(path, *, suite: str | None = None, action_dim: int = 7,
                  cameras: Sequence[str] = ("agentview", "robot0_eye_in_hand")) -> list[Episode]:
    """Every demo of one file (official LIBERO or vlajax-written), in demo-index order. Only the training
    fields are required: actions, the asked ``cameras`` and the proprio fields."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path}: not an HDF5 file ({e})") from e
    with f:
        if not isinstance(f.get("data"), h5py.Group):
            raise DatasetError(f"{path}: missing group 'data'")
        data = f["data"]
        if "problem_info" not in data.attrs:
            raise DatasetError(f"{path}: missing attribute data.attrs['problem_info']")
        try:
            info = json.loads(_text(data.attrs["problem_info"]))
            lang = info["language_instruction"]
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{path}: data.attrs['problem_info'] lacks a language_instruction ({e})") from e
        instruction = ("".join(lang) if isinstance(lang, list) else str(lang)).strip().strip('"')
        file_suite = _text(data.attrs["vlajax_suite"]) if "vlajax_suite" in data.attrs else None
        if suite is not None and file_suite is not None and file_suite != suite:
            raise DatasetError(f"{path}: data.attrs['vlajax_suite'] is {file_suite!r}, "
                               f"but suite {suite!r} was asked for")
        task = _text(data.attrs["vlajax_task"]) if "vlajax_task" in data.attrs else path.name.removesuffix(_SUFFIX)

        def field(g: h5py.Group, name: str) -> np.ndarray:
            if not isinstance(g.get(name), h5py.Dataset):
                raise DatasetError(f"{path}: missing {g.name.lstrip('/')}/{name}")
            return g[name][()]

        names = sorted((k for k in data if k.startswith("demo_")), key=lambda k: int(k[5:]))
        episodes = []
        for name in names:
            g, where = data[name], f"{path}: data/{name}"
            actions = field(g, "actions")
            if actions.ndim != 2 or actions.shape[1] != action_dim:
                raise DatasetError(f"{where}/actions has shape {actions.shape}, expected (T, {action_dim})")
            if not np.isfinite(actions).all():
                raise DatasetError(f"{where}/actions contain NaN or inf")
            obs = g.get("obs")
            if not isinstance(obs, h5py.Group):
                raise DatasetError(f"{where}/obs is missing")
            images = {cam: field(obs, _camera_key(cam)) for cam in cameras}
            for cam, im in images.items():
                if im.dtype != np.uint8 or im.ndim != 4 or im.shape[-1] != 3:
                    raise DatasetError(f"{where}/obs/{_camera_key(cam)} is {im.dtype} {im.shape}, "
                                       "expected (T, H, W, 3) uint8")
            keys = ["ee_states"] if "ee_states" in obs else ["ee_pos", "ee_ori"]
            parts = {f"obs/{k}": field(obs, k) for k in [*keys, "gripper_states"]}
            parts.update({f"obs/{_camera_key(c)}": im for c, im in images.items()})
            for key, arr in parts.items():
                if arr.shape[0] != actions.shape[0]:
                    raise DatasetError(f"{where}/{key} has {arr.shape[0]} steps, "
                                       f"but actions has {actions.shape[0]}")
            proprio = np.concatenate([parts[f"obs/{k}"] for k in [*keys, "gripper_states"]], axis=-1)
            robot = g["robot_states"][()] if "robot_states" in g else None
            episodes.append(Episode(
                images=images, proprio=proprio.astype(np.float32),
                actions=actions.astype(np.float32), instruction=instruction, task=task,
                state_id=int(g.attrs["vlajax_state_id"]) if "vlajax_state_id" in g.attrs else None,
                states=g["states"][()] if "states" in g else None,
                joint_states=obs["joint_states"][()] if "joint_states" in obs else None,
                eef_quat=robot[:, 5:9] if robot is not None and robot.shape[-1] == 9 else None))
        return episodes


def read_dataset(root_or_files, *, suite: str | None = None, action_dim: int = 7,
                 cameras: Sequence[str] = ("agentview", "robot0_eye_in_hand")) -> list[Episode]:
    """All episodes of a folder (every ``*_demo.hdf5`` under ``root/suite`` if it exists, else ``root``)
    or of a list of files. Loads everything into memory."""
    if isinstance(root_or_files, (str, os.PathLike)):
        root = Path(root_or_files)
        if root.is_file():
            files = [root]
        else:
            folder = root / suite if suite is not None and (root / suite).is_dir() else root
            files = sorted(folder.rglob(f"*{_SUFFIX}"))
            if not files:
                raise DatasetError(f"{folder}: no *{_SUFFIX} files")
    else:
        files = [Path(p) for p in root_or_files]
    return [ep for p in files for ep in read_episodes(p, suite=suite, action_dim=action_dim, cameras=cameras)]


def _statistics(arrays: Iterable[np.ndarray], what: str) -> dict:
    arrays = [np.asarray(a, np.float64) for a in arrays]
    if not arrays:
        raise DatasetError(f"no episodes to compute {what} statistics over")
    x = np.concatenate(arrays, axis=0)
    stats = {"mean": x.mean(0), "std": x.std(0), "max": x.max(0), "min": x.min(0),
             "q01": np.quantile(x, 0.01, axis=0), "q99": np.quantile(x, 0.99, axis=0)}
    return {k: [float(v) for v in a] for k, a in stats.items()}


def action_statistics(episodes: Sequence[Episode]) -> dict:
    """Per-dimension stats over all steps, OpenVLA's norm_stats "action" entry: q01, q99, mean, std, min,
    max and mask (True: normalised to [-1, 1] by q01/q99; the gripper (last dim) is left as is)."""
    stats = _statistics((ep.actions for ep in episodes), "action")
    stats["mask"] = [i < len(stats["mean"]) - 1 for i in range(len(stats["mean"]))]
    return stats


def proprio_statistics(episodes: Sequence[Episode]) -> dict:
    """Same layout as action_statistics, for proprio (OpenVLA-OFT normalises every proprio dim: mask all True)."""
    stats = _statistics((ep.proprio for ep in episodes), "proprio")
    stats["mask"] = [True] * len(stats["mean"])
    return stats
