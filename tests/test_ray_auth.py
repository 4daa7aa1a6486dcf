"""Joining a Ray cluster whose head uses token authentication from a shell without RAY_AUTH_MODE=token
(Ray 2.60 turns it on at `ray start --head` when ~/.ray/auth_token exists): one line saying so, at once,
instead of ~20 s of retries ending in a message that does not mention the token. A real head, started
with `ray start --head --block` in its own session and temp dir; the driver is a fresh process (Ray
caches its auth mode per process)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port, kill_sessions


def test_joining_a_token_cluster_without_the_token_says_so(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="vja_", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    head_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0123456789abcdef" * 4,
                "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
           "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}"]
    with open(tmp_path / "head.log", "w") as log:
        head = subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:  # the GCS port open
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
                time.sleep(0.5)
        shell = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        shell.update(HOME=str(tmp_path), RAY_TMPDIR=ray_tmp)  # no ~/.ray/auth_token either
        code = (f"from vlajax.distributed.ray_sim import init_ray\ntry:\n    init_ray('127.0.0.1:{port}')\n"
                "except ConnectionError as e:\n    print('ERROR', e)")
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-c", code], env=shell, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        assert out.stdout.startswith(f"ERROR the Ray cluster at 127.0.0.1:{port} uses token authentication"), out
        assert "set RAY_AUTH_MODE=token" in out.stdout and took < 15, (took, out)
    finally:
        head.terminate()  # `ray start --block` stops what it started; SIGKILL what is left after 30 s
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            pass
        kill_sessions([head.pid])
        shutil.rmtree(ray_tmp, ignore_errors=True)
