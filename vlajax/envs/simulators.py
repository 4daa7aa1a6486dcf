"""Every simulator vlajax drives, in one table: all that code outside `envs/` may know about one.

A run names a simulator (`env.train.simulator_type`) and one of its suites; the rest is looked up here:
how its vector env is built, its robot-state size, the statistics a policy trained from scratch on it
gets, and whether its workers render through MuJoCo's GL. How a policy's images, gripper and
statistics meet it depends on the policy too: the family's adapter (`vlajax.model.family.IOAdapter`).

Adding a simulator means one new module in `envs/` (its env, a `SUITES` collection of suite names and
a `vector_env_fn` with the keyword signature of `SimulatorSpec.env_fn`) and one entry in `SIMULATORS`.
This module imports no simulator: suites are listed by name and the module is imported when an env is
built, so a config can be checked without MuJoCo or Isaac (a test keeps the suite names equal to the
modules').
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any, Callable, Sequence

__all__ = ["SimulatorSpec", "SIMULATORS", "simulator", "simulator_of_suite"]


@dataclasses.dataclass(frozen=True)
class SimulatorSpec:
    """One simulator (see module docstring).

    name: the `env.train.simulator_type` value; label: its name in messages ("LIBERO").
    module: the `envs` module whose `vector_env_fn(*, suite, image_size, cameras, max_episode_steps,
        video_dir)` returns a picklable `env_fn(num_envs, *, name) -> VectorEnv` (it may check the
        machine first, e.g. that Isaac Lab is installed, so a run fails before any actor starts).
    suites: suite names (`env.train.task_suite_name`), as the module's `SUITES`.
    init_states_per_task: fixed initial states per task (LIBERO's 50), or None when states are drawn.
    sampled_init_states: can also start from fresh states its own placement sampler draws, seeded
        (`env.train.init_states=sampled`: training off the fixed evaluation states).
    proprio_dim: robot-state size (OpenVLA-OFT's proprio token).
    scratch_statistics: name of a module function `(action_dim, key) -> dataset_statistics.json`
        content for a policy trained from scratch here (stored under the adapter's `stats_key`), or None.
    mujoco_gl: renders through MuJoCo's GL (EGL on a GPU, OSMesa / llvmpipe on CPUs).
    videos: can record episode videos.
    eval_config: the packaged config whose simulator settings `vlajax eval` uses for a bare checkpoint.
    has_expert: its envs have a scripted expert (`SingleEnv.demonstrate`), so `vlajax demos` can
        make demonstrations.
    """

    name: str
    label: str
    module: str
    suites: tuple[str, ...]
    init_states_per_task: int | None
    sampled_init_states: bool
    proprio_dim: int
    scratch_statistics: str | None
    mujoco_gl: bool
    videos: bool
    eval_config: str
    has_expert: bool = False

    def check_suite(self, suite: str) -> None:
        """A clear ValueError unless `suite` is one of this simulator's."""
        if suite not in self.suites:
            article = "an" if self.label[0].lower() in "aeiou" else "a"
            raise ValueError(f"{suite!r} is not {article} {self.label} suite ({', '.join(self.suites)})")

    def env_fn(self, *, suite: str, image_size: tuple[int, int], cameras: Sequence[str], max_episode_steps: int,
               video_dir: str | None = None) -> Callable[..., Any]:
        """The picklable `env_fn(num_envs, *, name)` the simulator workers call."""
        self.check_suite(suite)
        return self.load().vector_env_fn(suite=suite, image_size=tuple(image_size), cameras=tuple(cameras),
                                         max_episode_steps=max_episode_steps, video_dir=video_dir)

    def dataset_statistics(self, action_dim: int, key: str | None) -> dict | None:
        """`dataset_statistics.json` content for a policy trained from scratch on this simulator,
        under `key` (its adapter's `stats_key`; None: no statistics)."""
        if self.scratch_statistics is None or key is None:
            return None
        return getattr(self.load(), self.scratch_statistics)(action_dim, key)

    def load(self) -> ModuleType:
        """The simulator's module (imports the simulator where the module does at import time)."""
        return importlib.import_module(self.module)


SIMULATORS: dict[str, SimulatorSpec] = {
    spec.name: spec
    for spec in (
        SimulatorSpec(name="libero", label="LIBERO", module="vlajax.envs.libero",
                      suites=("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"),
                      init_states_per_task=50, sampled_init_states=True, proprio_dim=8, scratch_statistics=None,
                      mujoco_gl=True, videos=True, eval_config="libero_grpo", has_expert=True),
        SimulatorSpec(name="tabletop", label="tabletop", module="vlajax.envs.tabletop",
                      suites=("tabletop", "tabletop_anchored"),
                      init_states_per_task=None, sampled_init_states=False, proprio_dim=8,
                      scratch_statistics="scratch_statistics", mujoco_gl=True, videos=True, eval_config="demo"),
        SimulatorSpec(name="isaac", label="Isaac", module="vlajax.envs.isaac", suites=("isaac_stack", "isaac_reach"),
                      init_states_per_task=None, sampled_init_states=False, proprio_dim=8, scratch_statistics=None,
                      mujoco_gl=False, videos=False, eval_config="libero_grpo"),
    )
}


def simulator(name: str) -> SimulatorSpec:
    """The spec of simulator `name`; a ValueError listing the known ones otherwise."""
    try:
        return SIMULATORS[name]
    except KeyError:
        raise ValueError(f"unknown simulator {name!r}; vlajax drives {', '.join(SIMULATORS)}") from None


def simulator_of_suite(suite: str) -> SimulatorSpec:
    """The simulator that has `suite` (for `vlajax eval --suite`)."""
    for spec in SIMULATORS.values():
        if suite in spec.suites:
            return spec
    known = ", ".join(s for spec in SIMULATORS.values() for s in spec.suites)
    raise ValueError(f"{suite!r} is not a known suite; choose one of {known}")
