"""Run a helper script in a fresh interpreter that sees 8 fake CPU devices.

XLA_FLAGS must be set before jax initializes its backend, and the pytest process already
has a 1-device backend, hence a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run_8_devices(script: Path, *args: str, timeout: int = 300) -> str:
    """Run `script` with 8 fake CPU devices; return its stdout (fails with its stderr)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=HERE.parent)
    assert proc.returncode == 0, f"{Path(script).name} failed:\n{proc.stderr[-4000:]}"
    return proc.stdout
