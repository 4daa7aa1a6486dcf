"""Simulators behind one `VectorEnv` interface.

Modules that import a simulator (MuJoCo for the tabletop task, Gymnasium) load lazily on first
attribute access, so `import vlajax.envs` stays cheap in every worker process and the MuJoCo GL
backend can still be chosen before MuJoCo is imported. LIBERO lives in `vlajax.envs.libero`,
imported explicitly by whoever needs it.
"""

import importlib

from vlajax.envs.base import (
    NOOP_ACTION,
    EnvError,
    EnvOutput,
    Observation,
    SingleEnv,
    StepResult,
    TaskSpec,
    VectorEnv,
    check_actions,
)
from vlajax.envs.subproc import EnvWorkerError, SubprocVectorEnv, set_default_gl_backend
from vlajax.envs.video import EpisodeVideoWriter, write_mp4

_LAZY = {
    "TabletopEnv": "vlajax.envs.tabletop",
    "make_tabletop_env": "vlajax.envs.tabletop",
    "make_tabletop_vector_env": "vlajax.envs.tabletop",
    "GymnasiumEnv": "vlajax.envs.gym_adapter",
    "make_gymnasium_env": "vlajax.envs.gym_adapter",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlajax.envs' has no attribute {name!r}")


__all__ = [
    "NOOP_ACTION",
    "EnvError",
    "EnvOutput",
    "EnvWorkerError",
    "EpisodeVideoWriter",
    "Observation",
    "SingleEnv",
    "StepResult",
    "SubprocVectorEnv",
    "TaskSpec",
    "VectorEnv",
    "check_actions",
    "set_default_gl_backend",
    "write_mp4",
    *_LAZY,
]
