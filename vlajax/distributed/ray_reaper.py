"""Ends an embedded Ray whose driver died without unwinding (SIGKILL, OOM).

Why: a killed driver cannot run `ray.shutdown()`. Ray's raylet and GCS notice within seconds, but its
DashboardAgent and RuntimeEnvAgent linger 40 s to 2 min, and the session folder (`/tmp/vlajax_ray_*`)
stays until the next run removes it. `init_ray` starts this watcher beside an embedded Ray, in its own
process session (so a signal to the driver's process group spares it): it polls the driver, and once
the driver is gone it ends every process whose command line names the session folder (SIGTERM, then
SIGKILL after a grace), removes the folder and exits. It exits quietly as soon as the folder is gone
(`RaySession.shutdown` removed it: a clean end).

    python -m vlajax.distributed.ray_reaper DRIVER_PID DRIVER_START TEMP_DIR
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 5.0


def _start_time(pid: int) -> str | None:
    """/proc/<pid>/stat's start time (pids are reused, start times not); None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def session_processes(temp_dir: str) -> list[int]:
    """Pids of this user's processes whose command line names `temp_dir` (Ray's raylet, GCS, agents)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmd:
            found.append(int(entry.name))
    return found


def reap(temp_dir: str) -> list[int]:
    """End the session's processes (SIGTERM, SIGKILL after `GRACE_S`), remove `temp_dir`; returns the pids."""
    pids = session_processes(temp_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and any(_start_time(p) for p in pids):
            time.sleep(0.1)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return pids


def watch(driver_pid: int, driver_start: str, temp_dir: str) -> None:
    while Path(temp_dir).exists():
        if _start_time(driver_pid) != driver_start:
            pids = reap(temp_dir)
            print(f"vlajax: the run (pid {driver_pid}) ended without closing its Ray session; ended its "
                  f"{len(pids)} Ray process(es) and removed {temp_dir}", file=sys.stderr, flush=True)
            return
        time.sleep(POLL_S)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2], sys.argv[3])
