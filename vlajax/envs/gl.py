"""MuJoCo's GL for a simulator worker: which backend, which EGL device, and a bounded check that it works.

Why this exists (failures the peers' users hit):
- EGL and CUDA number GPUs differently. MUJOCO_EGL_DEVICE_ID is an index into EGL's device list, and
  robosuite 1.4 also asserts that it appears in CUDA_VISIBLE_DEVICES: with Ray's "3" (GPU 3) it fails,
  with Ray's "" (no GPU) NVIDIA's EGL lists no device. Here the render processes run without
  CUDA_VISIBLE_DEVICES (they use no CUDA), and the EGL device is the one whose CUDA device
  (EGL_NV_device_cuda) is the GPU this worker was given.
- An EGL device that cannot be opened can hang the first reset. `setup` opens a context in a child
  process with a timeout, so a worker fails at start-up with an error naming itself and the device.

Backends (`env.train.mujoco_gl`): "egl" renders on the GPU this worker was given (Ray's GPU, else the
first of CUDA_VISIBLE_DEVICES, else GPU 0; Mesa's llvmpipe where there is no GPU); "osmesa" renders on
the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from vlajax.envs.base import EnvError

__all__ = ["GLSetupError", "BACKENDS", "target_gpu", "setup", "apply"]

BACKENDS = ("egl", "osmesa")


class GLSetupError(EnvError):
    """MuJoCo's GL cannot be set up for a simulator worker; the message names the worker and device."""


def target_gpu(gpu_ids: list[str] | None = None) -> tuple[int, bool]:
    """(physical GPU to render on, whether it was given explicitly). Ray's ids win; then the first of
    CUDA_VISIBLE_DEVICES; else GPU 0, which may be absent (then Mesa, on a machine without GPUs)."""
    if gpu_ids:
        return int(float(gpu_ids[0])), True
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible.strip():
        first = visible.split(",")[0].strip()
        if first.isdigit():
            return int(first), True
    return 0, False


# Runs in a child: finds the EGL device of CUDA device `gpu` (all GPUs visible), opens a context there.
_PROBE = r"""
import ctypes, json, os, sys
gpu, required = int(sys.argv[1]), sys.argv[2] == "1"
index, cuda_of = 0, []
if os.environ["MUJOCO_GL"] == "egl":
    from mujoco.egl import egl_ext as EGL
    devices = EGL.eglQueryDevicesEXT()
    query = ctypes.CFUNCTYPE(EGL.EGLBoolean, EGL.EGLDeviceEXT, EGL.EGLint, ctypes.POINTER(ctypes.c_ssize_t))(  # EGLAttrib = intptr_t
        EGL.eglGetProcAddress("eglQueryDeviceAttribEXT"))
    for device in devices:
        value = ctypes.c_ssize_t(-1)
        cuda_of.append(value.value if query(device, 0x323A, ctypes.byref(value)) else None)  # EGL_CUDA_DEVICE_NV
    if gpu in cuda_of:
        index = cuda_of.index(gpu)
    elif required or any(c is not None for c in cuda_of):
        print(json.dumps({"error": f"no EGL device is CUDA device {gpu}; the {len(devices)} EGL devices are "
                                   f"CUDA devices {cuda_of}"}), flush=True)
        sys.exit(3)
    os.environ["MUJOCO_EGL_DEVICE_ID"] = str(index)
import mujoco
ctx = mujoco.GLContext(64, 64)
ctx.make_current()
from OpenGL import GL
print(json.dumps({"renderer": GL.glGetString(GL.GL_RENDERER).decode(), "egl_index": index}), flush=True)
ctx.free()
"""


def setup(backend: str, gpu_ids: list[str] | None = None, what: str = "simulator worker",
          timeout_s: float = 60.0) -> tuple[dict[str, str | None], str]:
    """The environment a worker's render processes need (None = remove the variable) and the GL
    renderer's name, after opening a context with it in a child process (a hung driver cannot hang
    the caller). Raises GLSetupError naming `what`, the backend and the device."""
    if backend not in BACKENDS:
        raise GLSetupError(f"{what}: unknown MuJoCo GL backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    env: dict[str, str | None] = {"MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend}
    gpu, required = target_gpu(gpu_ids)
    device = f"MUJOCO_GL={backend}"
    if backend == "egl":
        env["CUDA_VISIBLE_DEVICES"] = None
        env.pop("MUJOCO_EGL_DEVICE_ID", None)
        device += f", GPU {gpu}"
    child_env = apply(env, dict(os.environ))
    child_env.pop("MUJOCO_EGL_DEVICE_ID", None)
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, str(gpu), "1" if required else "0"], env=child_env,
                             capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise GLSetupError(f"{what}: opening a GL context ({device}) hung for {timeout_s:g} s") from None
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if out.returncode != 0 or "renderer" not in result:
        reason = result.get("error") or (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        hint = " (OSMesa needs libOSMesa.so on the library path)" if backend == "osmesa" else ""
        raise GLSetupError(f"{what}: cannot open a GL context ({device}): {reason}{hint}")
    if backend == "egl":
        env["MUJOCO_EGL_DEVICE_ID"] = str(result["egl_index"])
    return env, result["renderer"]


def apply(env: dict[str, str | None], target: dict | None = None):
    """Set (or, for None, remove) `env`'s variables in `target` (default: os.environ); returns it."""
    target = os.environ if target is None else target
    for key, value in env.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    return target
