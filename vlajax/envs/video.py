"""Per-episode mp4 recording of the observation images, for looking at what a policy does.

Off by default (it costs an ffmpeg encode per episode in the caller's process). Frames are the
images the vector env returns (one per chunk, or one per sub-step when those were rendered).
"""

from __future__ import annotations

import os
import re

import numpy as np


def write_mp4(path: str, frames: np.ndarray, fps: int = 10) -> str:
    """Write (T, H, W, 3) uint8 frames to `path` as H.264 mp4 (any H, W: no macro-block resize)."""
    import imageio.v2 as imageio  # ~0.1 s, here: every env worker process imports this module

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"video frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)
    return path


class EpisodeVideoWriter:
    """Collects frames per env index and writes one mp4 per finished episode:
    `[{prefix}_]env{i:03d}_{task}_state{state:04d}_ep{episode:05d}_{success|fail|unfinished}.mp4`.

    camera: which image of the observation to record; default the first camera returned.
    prefix: tells apart the vector envs that share a folder (the simulator actors' stages).
    """

    def __init__(self, directory: str, fps: int = 10, camera: str | None = None, prefix: str | None = None):
        self.directory = directory
        self.prefix = re.sub(r"[^A-Za-z0-9_.-]+", "-", prefix) + "_" if prefix else ""
        self.fps = fps
        self.camera = camera
        self._episodes: dict[int, tuple[str, list[np.ndarray]]] = {}
        self.written: list[str] = []  # paths, in the order they were written
        os.makedirs(directory, exist_ok=True)

    def start(self, env_index: int, task_name: str, state_id: int, episode: int) -> None:
        task = re.sub(r"[^A-Za-z0-9_.-]+", "-", task_name)
        stem = f"{self.prefix}env{env_index:03d}_{task}_state{state_id:04d}_ep{episode:05d}"
        self._episodes[env_index] = (stem, [])

    def add(self, env_index: int, images: dict[str, np.ndarray]) -> None:
        """Append a frame (camera -> (H, W, 3)) or several (camera -> (T, H, W, 3))."""
        if env_index not in self._episodes or not images:
            return
        cam = self.camera if self.camera is not None else next(iter(images))
        if cam not in images:
            raise KeyError(f"video camera {cam!r} not among the observation's cameras {list(images)}")
        img = np.asarray(images[cam])
        frames = self._episodes[env_index][1]
        frames.extend(img if img.ndim == 4 else [img])

    def finish(self, env_index: int, success: bool | None) -> str | None:
        """Write env `env_index`'s episode (success None: abandoned before it ended)."""
        if env_index not in self._episodes:
            return None
        stem, frames = self._episodes.pop(env_index)
        if not frames:
            return None
        tag = "unfinished" if success is None else ("success" if success else "fail")
        path = write_mp4(os.path.join(self.directory, f"{stem}_{tag}.mp4"), np.stack(frames), self.fps)
        self.written.append(path)
        return path
