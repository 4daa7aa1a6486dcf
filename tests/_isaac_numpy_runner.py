"""A small batched simulator in plain numpy, served by the Isaac worker's episode loop.

Loaded inside `vlajax/envs/_isaac_worker.py` through `--runner` (see `IsaacVectorEnv(runner=...)`), so
the tests run the real host <-> process plumbing (process start, socket framing, grouping by task,
early stop, frozen observations, timeouts, crashes) without Isaac Lab. It is not a model of Isaac:
N points move in a box; the spec's overrides configure it ("goal=x,y,z", "fault_<phase>=<kind>").

Point i starts at a position drawn from its reset seed; action entries 0..2 move it by 0.05 * clip(a)
per step. Success: within 0.06 of the goal. Failure: a coordinate leaves [-1, 1]. Image: every pixel
of env i's image is (pos_i + 1) * 100 as uint8. Proprio: position (3), seed-drawn offset (3),
gripper command twice (2).
"""

from __future__ import annotations

import os
import time

import numpy as np
from _isaac_worker import BatchedRunner  # the worker registers itself under this name


class PointRunner(BatchedRunner):
    def __init__(self, spec: dict):
        self.spec = spec
        opts = dict(o.split("=", 1) for o in spec.get("overrides", ()))
        self.faults = {k[len("fault_"):]: v for k, v in opts.items() if k.startswith("fault_")}
        self._fault("init")
        self.goal = np.array([float(v) for v in opts.get("goal", "0,0,0").split(",")])
        self.n = int(spec["num_envs"])
        self.image_hw = (int(spec["camera"]["height"]), int(spec["camera"]["width"]))
        self.pos = np.zeros((self.n, 3))
        self.offset = np.zeros((self.n, 3))
        self.grip = np.zeros(self.n)
        self.chunks = 0

    def _fault(self, phase: str) -> None:
        kind = self.faults.get(phase)
        if kind == "raise":
            raise RuntimeError(f"fault injected at {phase}")
        if kind == "crash":
            os._exit(3)
        if kind == "hang":
            time.sleep(3600)

    def info(self) -> dict:
        return {"num_envs": self.n, "image_shape": (*self.image_hw, 3), "proprio_dim": 8}

    def reset_env(self, i: int, seed: int) -> None:
        self._fault("reset")
        rng = np.random.default_rng(seed)
        self.pos[i] = rng.uniform(-0.5, 0.5, 3)
        self.offset[i] = rng.uniform(-1.0, 1.0, 3)
        self.grip[i] = -1.0

    def step(self, *args, **kwargs) -> dict:
        self.chunks += 1
        if self.chunks > 1:  # the first chunk always works, so a fault hits a later one
            self._fault("step")
        return super().step(*args, **kwargs)

    def advance(self, actions: np.ndarray, stepping: np.ndarray) -> None:
        self.pos[stepping] += 0.05 * np.clip(actions[stepping, :3], -1.0, 1.0)
        self.grip[stepping] = actions[stepping, 6]

    def done_flags(self):
        return np.linalg.norm(self.pos - self.goal, axis=1) < 0.06, (np.abs(self.pos) > 1.0).any(axis=1)

    def render(self) -> np.ndarray:
        value = np.clip((self.pos + 1.0) * 100.0, 0, 255).astype(np.uint8)
        return np.broadcast_to(value[:, None, None, :], (self.n, *self.image_hw, 3)).copy()

    def proprio(self) -> np.ndarray:
        return np.concatenate([self.pos, self.offset, self.grip[:, None], self.grip[:, None]], 1).astype(np.float32)

    def close(self) -> None:
        pass
