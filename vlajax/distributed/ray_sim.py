"""Simulators as Ray actors: start or join a cluster, place the actors, check resources, restart.

Layers: `init_ray` (embedded local Ray, or join a cluster by address) -> `SimPool` (placement
groups + one `RaySimWorker` actor per sim slot) -> `RaySimWorker` (a `vlajax.envs.sim_worker.SimWorker`
as an actor: `num_stages` vector envs of `num_envs` envs each, e.g. `SubprocVectorEnv`s, one process
per env). The rollout loop (`vlajax.rl.rollout`) drives the pool through `SimPoolAPI` (issue, wait,
result; Ray's errors become `SimFailure`), so it never sees Ray; this module knows nothing of models
and never imports JAX, so actor processes stay light.

Placement: a `vlajax.distributed.placement.Placement` (fields <-> config keys there) lists its node groups;
this module checks the cluster against them and makes one placement group per group.
As in the reference, a node's sim share is one placement-group bundle carrying a 1e-4 share of the
`sim` (or `train_rollout`) marker resource, so it can only be placed on a marked node; bundles of
one kind are STRICT_SPREAD (one per node). The trainer (this driver process, which runs the JAX
policy) must run on a `train_rollout` node in disaggregated mode. Resources are checked against
`ray.nodes()` before anything is created, and placement groups wait at most `placement_timeout_s`,
so a cluster that lacks something fails at start-up with a message naming the resource and the
kind of node instead of hanging.

Data path: observations come back as uint8 images (never float pixels) through the object store;
actions go out as small (n, K, A) float32 arrays.

Faults: `SimPool.restart(w)` kills worker w's actor and starts a new one in the same bundle; the
rollout loop re-runs the episodes it held. `SimPool.close()` closes the envs, kills only the
actors this pool created and removes its placement groups; `RaySession.shutdown()` stops Ray only
when `init_ray` started it (never `ray stop`, which would kill every Ray process on the machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from vlajax.distributed.placement import SIM_RESOURCE, TRAIN_RESOURCE, Colocated, Placement
from vlajax.envs.base import EnvError
from vlajax.envs.sim_worker import SimFailure, SimResult, SimWorker


__all__ = [
    "PlacementError", "RayConnectError", "RaySession", "RaySimWorker", "SimPool",
    "check_cluster_resources", "init_ray", "SIM_RESOURCE", "TRAIN_RESOURCE",
]


class PlacementError(ValueError):
    """The cluster cannot host the requested placement; the message names resource and node kind."""


class RayConnectError(ConnectionError):
    """The Ray cluster at the given address cannot be reached."""


# ---- Ray session ---------------------------------------------------------------------------------
@dataclasses.dataclass
class RaySession:
    """The Ray connection vlajax made.

    started: this process started the (embedded, local) Ray instance; `shutdown` stops it.
    connected: `init_ray` called `ray.init` (started or joined). Joined clusters are only
        disconnected from by `shutdown`, never stopped. A session found already initialised by
        the caller is left alone.
    """

    address: str | None
    started: bool
    connected: bool
    temp_dir: str | None = None
    owns_temp_dir: bool = False  # created by init_ray: removed at shutdown (logs included)

    def shutdown(self) -> None:
        if self.connected and ray.is_initialized():
            ray.shutdown()
        self.connected = False
        if self.owns_temp_dir and self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.owns_temp_dir = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             resources: Mapping[str, float] | None = None, temp_dir: str | None = None,
             connect_timeout_s: float = 10.0, object_store_memory: int | None = None,
             log_to_driver: bool = True) -> RaySession:
    """Start an embedded local Ray (address None) or join the cluster at `address` ("host:port",
    "ray://host:port" or "auto").

    Embedded: `num_cpus` / `num_gpus` / `resources` declare this node's resources (e.g.
    `{"train_rollout": 1}`), the session files go to `temp_dir` (default: a fresh /tmp/vlajax_ray_*
    directory, short because Ray's unix socket paths must fit 107 bytes, removed by `shutdown`;
    pass `temp_dir` to keep the logs), no dashboard.
    Join: the GCS port is probed first (`connect_timeout_s`), because `ray.init` on an unreachable
    address retries for minutes. If Ray is already initialised in this process, that connection is
    used and left alone (the returned session neither started nor connected anything).
    """
    joining = address not in (None, "local", "auto")
    if joining:
        _probe(address, connect_timeout_s)
    if ray.is_initialized():
        return RaySession(address=None, started=False, connected=False)
    kw: dict[str, Any] = {"log_to_driver": log_to_driver}
    if address is None or address == "local":
        owns = temp_dir is None
        if owns:
            remove_stale_temp_dirs()
            temp_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=TEMP_ROOT)
            _write_owner(temp_dir)
            _start_reaper(temp_dir)
        if object_store_memory is not None:
            kw["object_store_memory"] = int(object_store_memory)
        with _keep_sigterm_handler():
            ctx = ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, resources=dict(resources or {}),
                           include_dashboard=False, _temp_dir=temp_dir, **kw)
        return RaySession(address=ctx.address_info.get("gcs_address"), started=True, connected=True,
                          temp_dir=temp_dir, owns_temp_dir=owns)
    if num_cpus is not None or num_gpus is not None or resources:
        raise ValueError("init_ray: num_cpus / num_gpus / resources describe an embedded Ray; a joined "
                         f"cluster ({address}) declares its resources with `ray start`")
    _check_auth(address)
    with _keep_sigterm_handler():
        ray.init(address=address, **kw)
    return RaySession(address=address, started=False, connected=True)


TEMP_ROOT = "/tmp"
TEMP_PREFIX = "vlajax_ray_"  # short: Ray's unix socket paths must fit 107 bytes
OWNER_FILE = "vlajax_owner"  # "<pid> <process start time>" of the run that made the directory


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22), or None
    if there is no such process. With the pid it names one process: pids are reused, start times not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _write_owner(temp_dir: str) -> None:
    (Path(temp_dir) / OWNER_FILE).write_text(f"{os.getpid()} {_process_start(os.getpid())}\n")


def _start_reaper(temp_dir: str) -> None:
    """Watch this driver from a process of its own (`vlajax.distributed.ray_reaper`): if it dies without
    unwinding, the embedded Ray's processes and `temp_dir` go with it, not minutes later."""
    me = os.getpid()
    subprocess.Popen([sys.executable, "-m", "vlajax.distributed.ray_reaper", str(me), str(_process_start(me)), temp_dir],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def remove_stale_temp_dirs(root: str = TEMP_ROOT) -> list[str]:
    """Remove the embedded-Ray session folders (`/tmp/vlajax_ray_*`) that runs killed without
    unwinding (SIGKILL, OOM) left behind: only those whose owner process is gone. Folders without an
    owner record, or on a system without /proc, are left alone. Returns the removed paths."""
    if _process_start(os.getpid()) is None:
        return []
    removed = []
    for d in Path(root).glob(TEMP_PREFIX + "*"):
        try:
            pid, start = (d / OWNER_FILE).read_text().split()
            alive = _process_start(int(pid)) == start
        except (OSError, ValueError):
            continue
        if not alive:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


@contextlib.contextmanager
def _keep_sigterm_handler():
    """Ray's core installs a C-level SIGTERM handler in the driver that logs a stack trace and aborts,
    so `finally` blocks never run and an embedded Ray's agents outlive the driver. Put back the
    Python handler that was there (the `vlajax` CLI's raises SystemExit, which closes everything)."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and callable(before):
            signal.signal(signal.SIGTERM, before)


def _probe(address: str, timeout_s: float) -> None:
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise RayConnectError(f"Ray address {address!r} is not of the form host:port (or ray://host:port)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise RayConnectError(
            f"cannot reach the Ray cluster at {address} within {timeout_s:g} s ({e}); is `ray start --head` "
            "running there and the port open?") from e


def _check_auth(address: str) -> None:
    """One question to the cluster's GCS before `ray.init`: a head that uses token authentication
    refuses a shell without RAY_AUTH_MODE=token, and `ray.init` then retries for ~20 s and fails with
    a message that does not say why. Anything else this cannot answer is left to `ray.init`."""
    if address.startswith("ray://"):
        return
    try:
        from ray._private.services import canonicalize_bootstrap_address

        gcs = canonicalize_bootstrap_address(address)
        if gcs:
            ray._raylet.GcsClient(address=gcs).internal_kv_get(b"vlajax_auth_probe", namespace=None, timeout=10)
    except ray.exceptions.AuthenticationError:
        raise RayConnectError(
            f"the Ray cluster at {address} uses token authentication and refused this shell: set "
            "RAY_AUTH_MODE=token here (with the cluster's token in ~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or "
            "$RAY_AUTH_TOKEN) and run the command again") from None
    except Exception:  # noqa: BLE001 - an older Ray, an unreachable GCS: ray.init says what is wrong
        pass


# ---- placement -----------------------------------------------------------------------------------
def _node_label(node: Mapping) -> str:
    res = node.get("Resources", {})
    have = ", ".join(f"{k}={res[k]:g}" for k in ("CPU", "GPU", SIM_RESOURCE, TRAIN_RESOURCE) if k in res)
    return f"node {node['NodeID'][:12]} ({node.get('NodeManagerAddress', '?')}: {have or 'no CPU/GPU'})"


def _requirement_problems(nodes: Sequence[Mapping], kind: str, marker: str | None, need: Mapping[str, float],
                          count: int, keys: str) -> list[str]:
    """Problems with placing `count` bundles `need` on distinct nodes carrying `marker`."""
    candidates = [n for n in nodes if marker is None or n["Resources"].get(marker, 0) > 0]
    if marker is not None and len(candidates) < count:
        have = "; ".join(_node_label(n) for n in candidates) or "none"
        return [f"missing resource {marker!r}: {keys} asks for {count} {kind} node(s) carrying the custom "
                f"resource {marker!r} (`ray start --resources='{{\"{marker}\": 1}}'`), the cluster has "
                f"{len(candidates)} ({have})"]
    fits = [n for n in candidates
            if all(n["Resources"].get(r, 0) + 1e-9 >= v for r, v in need.items() if r != marker)]
    if len(fits) >= count:
        return []
    short = []
    for r, v in need.items():
        if r == marker:
            continue
        ok = [n for n in candidates if n["Resources"].get(r, 0) + 1e-9 >= v]
        if len(ok) < count:
            seen = ", ".join(f"{n['NodeID'][:12]} has {n['Resources'].get(r, 0):g}" for n in candidates) or "no nodes"
            short.append(f"missing resource {r!r} on {kind} nodes: {keys} needs {v:g} {r} on each of {count} "
                         f"{kind} node(s), only {len(ok)} qualify ({seen})")
    if not short:
        short.append(f"{kind} nodes: no {count} node(s) have all of {dict(need)} at once; "
                     + "; ".join(_node_label(n) for n in candidates))
    return short


def check_cluster_resources(nodes: Sequence[Mapping], placement: Placement,
                            driver_node_id: str | None = None) -> list[str]:
    """What the cluster (`ray.nodes()`, alive ones) lacks for `placement`'s node groups; empty if it can
    host them. Totals are checked (availability is checked by the placement-group timeout)."""
    placement.validate()
    nodes = [n for n in nodes if n.get("Alive", True)]
    problems: list[str] = []
    groups = placement.node_groups()
    for g in groups:
        problems += _requirement_problems(nodes, g.kind, g.marker, g.bundle, g.count, g.sized_by)
    if driver_node_id is not None and not problems:
        me = [n for n in nodes if n["NodeID"] == driver_node_id]
        for g in groups:
            if g.trainer and g.marker and me and me[0]["Resources"].get(g.marker, 0) <= 0:
                problems.append(f"the trainer runs in this process, on {_node_label(me[0])}, which does not carry "
                                f"{g.marker!r}: start vlajax on a {g.kind} node")
    return problems


def _make_pg(bundles: list[dict], name: str, target_node: str | None, timeout_s: float):
    name = f"{name}_{uuid.uuid4().hex[:8]}"  # PG names are cluster-wide; several pools may coexist
    if len(bundles) == 1:
        pg = placement_group(bundles, strategy="STRICT_PACK", name=name, _soft_target_node_id=target_node)
    else:
        pg = placement_group(bundles, strategy="STRICT_SPREAD", name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        try:
            avail = ray._private.state.available_resources_per_node()  # noqa: SLF001 - diagnostics only
            detail = "; ".join(f"{k[:12]}: {v}" for k, v in avail.items())
        except Exception:  # noqa: BLE001
            detail = str(ray.available_resources())
        raise PlacementError(
            f"placement group {name!r} ({len(bundles)} x {bundles[0]}) was not placed within {timeout_s:g} s: "
            f"the resources exist but are in use. Available now: {detail}") from None
    return pg


# ---- the actor -----------------------------------------------------------------------------------
class RaySimWorker(SimWorker):
    """A `SimWorker` as a Ray actor: renders on the GPU Ray gave it, reports its node.

    A worker whose envs cannot start (GL, a simulator import, bad settings) keeps the error and raises
    it from `info()`, the pool's first call: the pool then reports it in one line (an actor whose
    constructor raises has Ray print the whole traceback into the driver's terminal)."""

    def __init__(self, *args, **kw):
        self._start_error: BaseException | None = None
        try:
            super().__init__(*args, gpu_ids=[str(g) for g in ray.get_gpu_ids()], **kw)
        except Exception as e:
            self._start_error = e

    def info(self) -> dict:
        if self._start_error is not None:
            raise self._start_error
        return {**super().info(), "node_id": ray.get_runtime_context().get_node_id()}


_RemoteSimWorker = ray.remote(RaySimWorker)


@dataclasses.dataclass(eq=False)  # hashed by identity: an opaque handle
class _RayCall:
    worker: int
    stage: int
    kind: str
    ref: Any


# ---- the pool ------------------------------------------------------------------------------------
class SimPool:
    """`placement.num_workers` sim actors, placed per `placement` (see module docstring).

    Worker w lives in bundle w // workers_per_node of the sim placement group, on its own node per
    bundle. Requires Ray to be initialised (`init_ray`). Fails fast with `PlacementError` if the
    cluster lacks resources, and with the actor's error if the envs cannot be built within
    `start_timeout_s`. The sizes are checked where the config is loaded (`env.train.num_envs`,
    `env.rollout.pipeline_stage_num`, the placement keys).
    """

    def __init__(self, env_fn: Callable[..., Any], *, num_envs: int, num_stages: int = 2,
                 placement: Placement | None = None, cameras: Sequence[str] = ("agentview",),
                 render_every_substep: bool = False, concurrent_stages: bool = False,
                 mujoco_gl: str | None = None, start_timeout_s: float = 300.0):
        if not ray.is_initialized():
            raise RuntimeError("SimPool needs Ray: call vlajax.distributed.ray_sim.init_ray() first")
        self.placement = placement or Colocated.standalone()
        self.num_envs, self.num_stages = int(num_envs), int(num_stages)
        self.cameras = tuple(cameras)
        self._actor_args = (env_fn, self.num_envs, self.num_stages)
        self._actor_kw = {"cameras": tuple(cameras), "render_every_substep": render_every_substep,
                          "concurrent_stages": concurrent_stages, "mujoco_gl": mujoco_gl}
        self._max_concurrency = self.num_stages + 2  # stages + control calls (stats, close)
        self.start_timeout_s = float(start_timeout_s)
        self.driver_node_id = ray.get_runtime_context().get_node_id()
        problems = check_cluster_resources(ray.nodes(), self.placement, self.driver_node_id)
        if problems:
            raise PlacementError("the Ray cluster cannot host the rollout:\n  - " + "\n  - ".join(problems))
        self._pgs: list[Any] = []
        self.actors: list[Any] = []
        self.generation: list[int] = []
        self.restarts = 0
        self._closed = False
        self._infos: list[dict] = []
        self._info_refs: dict[int, Any] = {}
        try:
            self._place()
            self.actors = [self._create(w) for w in range(self.num_workers)]
            self.generation = [0] * self.num_workers
            self._infos = self._wait_infos(range(self.num_workers))
        except BaseException:
            self.close()
            raise

    @property
    def num_workers(self) -> int:
        return self.placement.num_workers

    @property
    def capacity(self) -> int:
        """Trajectories per rollout: workers x stages x envs."""
        return self.num_workers * self.num_stages * self.num_envs

    def _place(self) -> None:
        """One placement group per node group (one bundle per node); the sim actors go in theirs."""
        for g in self.placement.node_groups():
            pg = _make_pg([g.bundle] * g.count, "vlajax_" + g.kind.split()[0], self.driver_node_id if g.trainer else None,
                          self.placement.placement_timeout_s)
            self._pgs.append(pg)
            if g.sims:
                self._sim_pg = pg

    def _create(self, w: int):
        p = self.placement
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self._sim_pg, placement_group_bundle_index=w // p.workers_per_node)
        opts: dict[str, Any] = {"num_cpus": p.env_cpus_per_worker, "scheduling_strategy": strategy,
                                "max_restarts": 0, "max_concurrency": self._max_concurrency}
        if p.gpus_per_worker > 0:
            opts["num_gpus"] = p.gpus_per_worker
        return _RemoteSimWorker.options(**opts).remote(*self._actor_args, w, **self._actor_kw)

    def _wait_infos(self, workers) -> list[dict]:
        workers = list(workers)
        refs = [self.actors[w].info.remote() for w in workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout_s)
        if len(ready) < len(refs):
            late = [w for w, r in zip(workers, refs) if r not in ready]
            raise EnvError(f"sim workers {late} did not start within {self.start_timeout_s:g} s")
        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:  # its cause's own line
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            raise EnvError(f"a sim worker could not start: {lines[-1] if lines else e}") from None

    def restart(self, w: int) -> None:
        """Replace worker w's actor by a fresh one in the same bundle (returns at once; calls on
        the new actor queue until its envs are built)."""
        try:
            ray.kill(self.actors[w], no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        self.actors[w] = self._create(w)
        self._info_refs[w] = self.actors[w].info.remote()
        self.generation[w] += 1
        self.restarts += 1

    # ---- SimPoolAPI: the rollout loop's view, free of Ray ---------------------------------------------
    def issue_reset(self, worker: int, stage: int, rows: np.ndarray, task_ids: np.ndarray, state_ids: np.ndarray,
                    group_ids: np.ndarray, seed: int) -> _RayCall:
        ref = self.actors[worker].reset.remote(stage, rows, task_ids, state_ids, group_ids, seed)
        return _RayCall(worker, stage, "reset", ref)

    def issue_step(self, worker: int, stage: int, rows: np.ndarray, actions: np.ndarray) -> _RayCall:
        return _RayCall(worker, stage, "step", self.actors[worker].step.remote(stage, rows, actions))

    def issue_demo(self, worker: int, stage: int, task_ids: np.ndarray, state_ids: np.ndarray, seed: int,
                   max_steps: int | None = None) -> _RayCall:
        ref = self.actors[worker].demonstrate.remote(stage, task_ids, state_ids, seed, max_steps)
        return _RayCall(worker, stage, "demo", ref)

    def wait(self, handles: Sequence[_RayCall], *, timeout_s: float | None, wait_all: bool = False) -> list[_RayCall]:
        """Block until one handle (all, with `wait_all`) is done or `timeout_s` passed; every handle done by then."""
        if not handles:
            return []
        by_ref = {h.ref: h for h in handles}
        refs = list(by_ref)
        done, rest = ray.wait(refs, num_returns=len(refs) if wait_all else 1, timeout=timeout_s)
        if done and rest:  # the others that are done too
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            done += more
        return [by_ref[r] for r in done]

    def result(self, handle: _RayCall) -> SimResult:
        """The call's result. A dead actor or a failed simulator process raises `SimFailure`; the
        worker's other errors are raised as it raised them."""
        where = f"sim worker {handle.worker} stage {handle.stage}"
        try:
            return ray.get(handle.ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, SimFailure):
                raise cause from None
            if isinstance(e, SimFailure):  # a cause Ray could not keep
                raise SimFailure(str(e), worker=handle.worker, stage=handle.stage) from e
            if isinstance(cause, Exception):
                raise cause from e
            raise
        except ray.exceptions.RayError as e:  # actor died, node lost, ...
            raise SimFailure(f"{where}: {type(e).__name__} during {handle.kind}", worker=handle.worker,
                             stage=handle.stage) from e

    def clear_busy(self) -> None:
        """Start the busy clocks afresh; returns at once."""
        for a in self.actors:
            a.take_busy.remote()

    @property
    def infos(self) -> list[dict]:
        """Per worker: node_id, pid, env_pids, tasks (`TaskSpec`s), action_dim, max_episode_steps,
        gpu_ids. Waits for restarted workers."""
        for w, ref in list(self._info_refs.items()):
            try:
                self._infos[w] = ray.get(ref, timeout=self.start_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise EnvError(f"restarted sim worker {w} did not start within {self.start_timeout_s:g} s") from None
            del self._info_refs[w]
        return list(self._infos)

    def node_ids(self) -> list[str]:
        return [info["node_id"] for info in self.infos]

    def take_busy(self, timeout_s: float = 30.0) -> list[float]:
        """Per worker: seconds its envs were busy since the last call (NaN if it does not answer)."""
        refs = [a.take_busy.remote() for a in self.actors]
        out = []
        for r in refs:
            try:
                out.append(float(ray.get(r, timeout=timeout_s)))
            except Exception:  # noqa: BLE001 - a dead or hung worker
                out.append(float("nan"))
        return out

    def close(self, timeout_s: float = 30.0) -> None:
        """Close the envs (graceful, bounded), kill this pool's actors, remove its placement groups.
        Idempotent; touches nothing this pool did not create."""
        if self._closed:
            return
        self._closed = True
        if ray.is_initialized():
            refs = []
            for a in self.actors:
                try:
                    refs.append(a.close.remote())
                except Exception:  # noqa: BLE001
                    pass
            if refs:
                ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            for a in self.actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
            for pg in self._pgs:
                try:
                    remove_placement_group(pg)
                except Exception:  # noqa: BLE001
                    pass
        self.actors = []
        self._pgs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
