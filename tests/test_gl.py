"""MuJoCo GL set-up for simulator workers: the EGL device follows the given GPU, failures name the worker."""

import os

import pytest

from vlajax.envs import gl

pytest.importorskip("mujoco")
pytest.importorskip("OpenGL")


def test_egl_renders_without_cuda_visible_devices():
    env, renderer = gl.setup("egl", what="sim worker 0")
    assert renderer  # the GL_RENDERER string of the context that opened
    assert env["MUJOCO_GL"] == "egl" and env["PYOPENGL_PLATFORM"] == "egl"
    assert env["CUDA_VISIBLE_DEVICES"] is None  # robosuite 1.4 would assert on Ray's value
    assert env["MUJOCO_EGL_DEVICE_ID"].isdigit()


def test_a_gpu_egl_cannot_find_is_an_error_naming_worker_and_gpu():
    # On a machine whose EGL has no CUDA devices (Mesa), a GPU Ray gave the worker cannot be matched.
    if "NVIDIA" in gl.setup("egl")[1]:
        pytest.skip("this machine's EGL has NVIDIA devices")
    with pytest.raises(gl.GLSetupError, match=r"sim worker 3: .*GPU 7.*no EGL device is CUDA device 7"):
        gl.setup("egl", ["7"], what="sim worker 3")


def test_a_hung_context_is_a_timeout_not_a_hang():
    with pytest.raises(gl.GLSetupError, match=r"sim worker 1: opening a GL context \(MUJOCO_GL=egl, GPU 0\) hung"):
        gl.setup("egl", what="sim worker 1", timeout_s=0.01)


def test_unknown_backend_is_named():
    with pytest.raises(gl.GLSetupError, match="unknown MuJoCo GL backend 'glx'"):
        gl.setup("glx")


def test_target_gpu_order(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    assert gl.target_gpu(["2"]) == (2, True)  # Ray's id wins
    assert gl.target_gpu([]) == (5, True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gl.target_gpu(None) == (0, False)


def test_apply_sets_and_removes():
    target = {"CUDA_VISIBLE_DEVICES": "3", "KEEP": "1"}
    gl.apply({"CUDA_VISIBLE_DEVICES": None, "MUJOCO_GL": "egl"}, target)
    assert target == {"KEEP": "1", "MUJOCO_GL": "egl"}
    assert os.environ is gl.apply({}, None)
