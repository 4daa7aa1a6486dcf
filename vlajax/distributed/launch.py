"""One trainer process per train node, started from the head node of a Ray cluster.

`vlajax train CONFIG trainer.nnodes=N ray.address=auto` (run on the head node) comes here through
the hook in `vlajax.cli`: a placement group of N bundles, one per node (STRICT_SPREAD), one small
`_ChildRunner` actor per bundle, and each actor runs ``python -m vlajax.cli train <same args>`` as a
subprocess of its node with the JAX multi-process variables set:

    JAX_COORDINATOR_ADDRESS = <node IP of process 0>:<a port free there>
    JAX_NUM_PROCESSES = N, JAX_PROCESS_ID = i, VLAJAX_LAUNCHED = 1 (so the child does not launch again)

Variables of the launching shell whose names start with one of `FORWARD_PREFIXES` (JAX_, XLA_,
VLAJAX_, NCCL_, MUJOCO_, PYOPENGL_, LIBERO_, WANDB_) are passed on to every child, as srun and
torchrun pass theirs: `XLA_FLAGS=... vlajax train ...` applies to every node. Everything else comes
from the node (the environment its `ray start` ran in).

The children then join one JAX job (`vlajax.distributed.multihost.initialize`). The launcher
streams their output, prefixed with ``[i@IP]`` (process 0: everything; the others: stderr only, so
N copies of the same log do not drown each other), and watches them:

- every child exited 0: the launcher returns (exit code 0);
- a child exited non-zero (or its node died): the others are stopped (SIGTERM, SIGKILL after
  `stop_timeout_s`), the placement group is removed and `LaunchError` names the process id, its
  node's IP, the exit code and the child's last stderr lines;
- Ctrl-C / SIGTERM on the launcher: the same clean-up, then the interrupt goes on.

Why a subprocess per actor instead of training inside the actor: the trainer is an ordinary
`vlajax train` run (its own Ray driver for the sim actors, its own signal handling, a clean JAX
process), identical to a SLURM launch (`srun vlajax train ...`, which needs no launcher at all:
`multihost.initialize` reads the SLURM variables).

Placement strategy: STRICT_SPREAD (one process per node) by default. ``VLAJAX_LAUNCH_STRATEGY=PACK``
(or the `strategy` argument) lets every bundle share a node: for tests and single-machine trials on
a one-node cluster; STRICT_SPREAD there fails with a clear error instead of waiting forever.

Nodes: bundles are tiny (a 0.01 CPU share, plus a marker share of `train_rollout` when the cluster
marks train nodes), so the trainer's own placement groups (sim actors, GPUs) still fit; the child
uses its node's GPUs directly, and Ray leaves CUDA_VISIBLE_DEVICES alone for an actor that asks
for no GPU. Every node must see the same checkout / venv path and the working directory (a shared
filesystem), as for any multi-node launch.

No orphans: each child runs in its own process group, which the stop kills as a whole; the child is
also given PR_SET_PDEATHSIG=SIGTERM, so a killed actor (or lost Ray worker) takes its child along.

This module never imports JAX: the actors stay light.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Mapping, Sequence, TextIO

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from vlajax.distributed.placement import MARKER_SHARE, TRAIN_RESOURCE

__all__ = ["LAUNCHED_ENV", "STRATEGY_ENV", "PYTHON", "FORWARD_PREFIXES", "LaunchError", "LaunchResult", "launch",
           "launch_train", "forwarded_env", "train_command", "is_launched_child", "in_multiprocess_job", "placement_strategy"]

LAUNCHED_ENV = "VLAJAX_LAUNCHED"  # set in every child: `vlajax train` there joins instead of launching
STRATEGY_ENV = "VLAJAX_LAUNCH_STRATEGY"  # STRICT_SPREAD (default) | PACK | SPREAD
PYTHON = "{python}"  # in a command: replaced by the node's own interpreter (the actor's sys.executable)
TAIL_LINES = 40  # stderr lines kept per child for the error message
# variables of the launching process passed on to every child (the rest is the node's own environment)
FORWARD_PREFIXES = ("JAX_", "XLA_", "VLAJAX_", "NCCL_", "MUJOCO_", "PYOPENGL_", "LIBERO_", "WANDB_")
_STRATEGIES = ("STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK")


class LaunchError(RuntimeError):
    """A launched trainer process failed (or could not be started); the message names it."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass
class LaunchResult:
    """What the children did: exit codes, node IPs and the last lines of each one's output."""

    exit_codes: list[int]
    node_ips: list[str]
    coordinator: str
    stdout_tail: list[list[str]]
    stderr_tail: list[list[str]]


# ---- who launches ---------------------------------------------------------------------------------
def is_launched_child() -> bool:
    """True in a process this launcher started (it must join, never launch again)."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def in_multiprocess_job() -> bool:
    """True when something already started one process per node: this launcher, the JAX_* / torchrun
    variables, or a SLURM job step of several tasks (`srun`). Then `vlajax train` joins the job
    (`multihost.initialize`) instead of launching."""
    if is_launched_child():
        return True
    if any(os.environ.get(k) for k in ("JAX_NUM_PROCESSES", "NUM_PROCESSES", "WORLD_SIZE")):
        return True
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_ID") is not None:
        return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 1) > 1
    return False


def placement_strategy(strategy: str | None = None) -> str:
    """The placement group strategy: the argument, else $VLAJAX_LAUNCH_STRATEGY, else STRICT_SPREAD."""
    s = (strategy or os.environ.get(STRATEGY_ENV) or "STRICT_SPREAD").upper()
    if s not in _STRATEGIES:
        raise ValueError(f"launch strategy {s!r} (${STRATEGY_ENV}) is not one of {', '.join(_STRATEGIES)}")
    return s


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The launching environment's variables every child gets (`FORWARD_PREFIXES`)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(FORWARD_PREFIXES)}


def train_command(argv: Sequence[str]) -> list[str]:
    """The command every node runs: the same `vlajax train` arguments, through the node's python."""
    return [PYTHON, "-m", "vlajax.cli", "train", *argv]


# ---- the actor that owns one child ----------------------------------------------------------------
def _set_parent_death_signal() -> None:
    """Runs in the child before exec: SIGTERM it when the actor (its parent) dies, so a killed
    actor leaves no trainer behind. Linux only; elsewhere the explicit stop is all there is."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class _ChildRunner:
    """One trainer subprocess on this actor's node: start, report new output, stop."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.new: list[tuple[str, str]] = []  # (stream, line) not yet reported
        self.tails = {"stdout": collections.deque(maxlen=TAIL_LINES), "stderr": collections.deque(maxlen=TAIL_LINES)}
        self.readers: list[threading.Thread] = []

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        """A TCP port free on this node now (the coordinator binds it moments later)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def start(self, command: list[str], env: dict[str, str], cwd: str | None) -> int:
        cmd = [sys.executable if c == PYTHON else c for c in command]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     errors="replace", start_new_session=True,
                                     preexec_fn=_set_parent_death_signal)
        for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            t = threading.Thread(target=self._read, args=(name, stream), daemon=True)
            t.start()
            self.readers.append(t)
        return self.proc.pid

    def _read(self, name: str, stream: TextIO) -> None:
        for line in stream:
            line = line.rstrip("\n")
            with self.lock:
                self.new.append((name, line))
                self.tails[name].append(line)

    def poll(self) -> tuple[int | None, list[tuple[str, str]]]:
        """(exit code or None while running, output lines since the last call). After the exit the
        readers are drained first, so the last lines are never lost."""
        rc = self.proc.poll() if self.proc else None
        if rc is not None:
            for t in self.readers:
                t.join(timeout=5)
        with self.lock:
            out, self.new = self.new, []
        return rc, out

    def tails_(self) -> dict[str, list[str]]:
        with self.lock:
            return {k: list(v) for k, v in self.tails.items()}

    def stop(self, timeout_s: float) -> int | None:
        """SIGTERM the child's whole process group, SIGKILL it after `timeout_s`; its exit code."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            _signal_group(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(p.pid, signal.SIGKILL)  # stragglers of the group, even after the leader exited
        p.wait()
        return p.returncode


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---- the launcher ---------------------------------------------------------------------------------
def _bundle() -> dict[str, float]:
    """A token share of a CPU, plus the train marker when the cluster marks its train nodes (so
    trainers land only there); the trainer's own placement groups must still fit next to it."""
    b = {"CPU": 0.01}
    if any(n.get("Alive") and n.get("Resources", {}).get(TRAIN_RESOURCE) for n in ray.nodes()):
        b[TRAIN_RESOURCE] = MARKER_SHARE
    return b


def _place(nnodes: int, strategy: str, timeout_s: float):
    bundle = _bundle()
    pg = placement_group([dict(bundle) for _ in range(nnodes)], strategy=strategy, name=f"vlajax-launch-{os.getpid()}")
    if pg.wait(timeout_seconds=timeout_s):
        return pg
    remove_placement_group(pg)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    marked = [n for n in alive if n.get("Resources", {}).get(TRAIN_RESOURCE)]
    where = (f"{len(marked)} node(s) carry the '{TRAIN_RESOURCE}' resource" if TRAIN_RESOURCE in bundle
             else f"the cluster has {len(alive)} alive node(s)")
    hint = (f" (one process per node; on a one-node cluster set {STRATEGY_ENV}=PACK for a trial run)"
            if strategy == "STRICT_SPREAD" else "")
    raise LaunchError(f"trainer.nnodes={nnodes}: a placement group of {nnodes} bundles {bundle} with strategy "
                      f"{strategy} was not placed within {timeout_s:g} s; {where}{hint}")


class _Children:
    """The actors (one per bundle) and what the launcher knows of their children."""

    def __init__(self, pg, nnodes: int):
        remote = ray.remote(num_cpus=0.01, max_restarts=0)(_ChildRunner)
        self.actors = []
        for i in range(nnodes):
            opts = dict(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
            if TRAIN_RESOURCE in pg.bundle_specs[i]:
                opts["resources"] = {TRAIN_RESOURCE: MARKER_SHARE}
            self.actors.append(remote.options(**opts).remote())
        self.ips: list[str] = ray.get([a.node_ip.remote() for a in self.actors])
        self.pids: list[int | None] = [None] * nnodes
        self.codes: list[int | None] = [None] * nnodes

    def stop(self, timeout_s: float) -> None:
        """Stop every child still running (in parallel), then the actors. Never raises: this runs
        on the way out of failures and interrupts."""
        refs = [a.stop.remote(timeout_s) for i, a in enumerate(self.actors) if self.pids[i] is not None]
        try:
            ray.get(refs, timeout=timeout_s + 15)
        except Exception:
            pass
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass


def launch(argv: Sequence[str], nnodes: int, *, command: Sequence[str] | None = None,
           env: Mapping[str, str] | None = None, strategy: str | None = None, cwd: str | None = None,
           stream: str = "first", out: TextIO | None = None, poll_s: float = 0.5, stop_timeout_s: float = 30.0,
           placement_timeout_s: float = 120.0) -> LaunchResult:
    """Run one trainer process per node of the connected Ray cluster and wait for them all.

    argv: the `vlajax train` arguments (ignored when `command` is given).
    command: what each node runs (default `train_command(argv)`); the token `PYTHON` is replaced by
      the node's interpreter. Tests pass a small python -c here.
    env: extra variables for every child, on top of the node's environment and this process's
      `forwarded_env()`; the JAX_* launch variables are set last.
    strategy: placement group strategy (default `placement_strategy()`: STRICT_SPREAD).
    cwd: the children's working directory (default: this process's; the same path on every node).
    stream: "first" = process 0's output and the others' stderr, "all", or "none".
    stop_timeout_s: how long a child gets between SIGTERM and SIGKILL when the others must stop.
    Raises LaunchError (naming process id and node IP) when a child fails; stops everything on
    any exception, KeyboardInterrupt and SystemExit included. Ray must be initialised (`init_ray`).
    """
    if nnodes < 1:
        raise ValueError(f"trainer.nnodes must be >= 1, got {nnodes}")
    if stream not in ("first", "all", "none"):
        raise ValueError(f"stream must be first, all or none, got {stream!r}")
    cmd = list(command) if command is not None else train_command(argv)
    out = out or sys.stdout
    pg = _place(nnodes, placement_strategy(strategy), placement_timeout_s)
    children = None
    try:
        children = _Children(pg, nnodes)
        coordinator = f"{children.ips[0]}:{ray.get(children.actors[0].free_port.remote())}"
        for i, a in enumerate(children.actors):
            child_env = {**forwarded_env(), **(env or {}), LAUNCHED_ENV: "1", "PYTHONUNBUFFERED": "1",
                         "JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": str(nnodes),
                         "JAX_PROCESS_ID": str(i)}
            children.pids[i] = ray.get(a.start.remote(cmd, child_env, cwd or os.getcwd()))
        _watch(children, stream, out, poll_s, stop_timeout_s)
        tails = ray.get([a.tails_.remote() for a in children.actors])
        return LaunchResult([int(c) for c in children.codes], list(children.ips), coordinator,
                            [t["stdout"] for t in tails], [t["stderr"] for t in tails])
    finally:
        if children is not None:
            children.stop(stop_timeout_s)
        remove_placement_group(pg)


def _watch(children: _Children, stream: str, out: TextIO, poll_s: float, stop_timeout_s: float) -> None:
    """Forward output until every child has exited; on the first failure, stop the rest and raise."""
    while any(c is None for c in children.codes):
        for i, a in enumerate(children.actors):
            if children.codes[i] is not None:
                continue
            try:
                rc, lines = ray.get(a.poll.remote())
            except ray.exceptions.RayError as e:  # the actor (its node) is gone
                children.codes[i] = -1
                raise _failure(children, i, f"its actor died ({type(e).__name__}: the node was lost?)",
                               [], stop_timeout_s) from e
            _forward(i, children.ips[i], lines, stream, out)
            if rc is not None:
                children.codes[i] = rc
                if rc != 0:
                    tail = _safe_tail(a)
                    raise _failure(children, i, _exit_text(rc), tail, stop_timeout_s,
                                   exit_code=rc if rc > 0 else 128 - rc)
        if any(c is None for c in children.codes):
            time.sleep(poll_s)


def _exit_text(rc: int) -> str:
    """'exited with code 3' / 'was killed by SIGKILL' (Popen's negative return codes)."""
    if rc >= 0:
        return f"exited with code {rc}"
    try:
        return f"was killed by {signal.Signals(-rc).name}"
    except ValueError:
        return f"was killed by signal {-rc}"


def _forward(i: int, ip: str, lines: list[tuple[str, str]], stream: str, out: TextIO) -> None:
    for name, line in lines:
        if stream == "all" or (stream == "first" and (i == 0 or name == "stderr")):
            print(f"[{i}@{ip}] {line}", file=out, flush=True)


def _safe_tail(actor) -> list[str]:
    try:
        return ray.get(actor.tails_.remote(), timeout=10)["stderr"]
    except Exception:
        return []


def _failure(children: _Children, i: int, what: str, tail: list[str], stop_timeout_s: float,
             exit_code: int = 1) -> LaunchError:
    """Stop the others, then the error naming process i, its node and its last stderr lines."""
    n = len(children.actors)
    children.stop(stop_timeout_s)
    last = "\n".join(f"    {line}" for line in tail[-20:]) or "    (no stderr output)"
    return LaunchError(f"trainer process {i} of {n} on node {children.ips[i]} {what}; the other {n - 1} "
                       f"process(es) were stopped. Last stderr lines of process {i}:\n{last}",
                       exit_code=exit_code if exit_code > 0 else 1)


def launch_train(argv: Sequence[str], nnodes: int, address: str | None,
                 connect: Callable | None = None) -> LaunchResult:
    """The `vlajax train` hook: join the Ray cluster at `address` (the config's ray.address), run
    the N trainers, disconnect. An embedded Ray (address None) is one node: it only works with
    PACK, so STRICT_SPREAD says to start a cluster instead."""
    from vlajax.distributed.ray_sim import init_ray

    if address in (None, "local") and placement_strategy() == "STRICT_SPREAD":
        raise LaunchError(f"trainer.nnodes={nnodes} needs a Ray cluster of {nnodes} train nodes: start one "
                          f"(`ray start --head` here, `ray start --address=HEAD:6379` on the others) and run "
                          f"`vlajax train ... ray.address=auto` on the head node; or use SLURM "
                          f"(`srun --ntasks-per-node=1 vlajax train ...`)")
    session = (connect or init_ray)(address)
    try:
        return launch(argv, nnodes)
    finally:
        session.shutdown()
