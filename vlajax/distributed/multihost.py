"""Multi-host (multi-node) training: join the job, assemble the global batch, split the work.

A multi-host JAX job is N processes, one per node (or per GPU group), that together own every
device of one global mesh. Each process runs the same program; jitted steps over global arrays
run their collectives (FSDP all-gathers, gradient reductions) across processes. What differs per
process is only (1) which rollouts it produces (its GRPO groups, `assign_groups`), (2) which rows of
the global batch it holds (`local_rows`, `global_batch`) and (3) its local metrics, which are
combined by `aggregate_metrics`.

Layout contract. The batch is split over ("data", "fsdp") by the "batch" rule of
`vlajax.distributed.sharding` (`LOGICAL_AXIS_RULES`); with the mesh's devices in process order,
process p holds rows block p of the global batch, and `assign_groups` gives process p groups
block p of the step's groups, so the global batch lists the samples in the order a single process
would (the same update, up to float reduction order). `local_rows` computes the block from the
sharding itself rather than assuming it.

On one machine, N CPU processes form a multi-host system for tests (see tests/test_multihost.py):
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` and ``initialize("localhost:PORT", N, i)``;
CPU collectives go through gloo.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import re
import sys
import threading
import time
from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlajax.distributed.sharding import logical_to_spec

__all__ = ["JOIN_TIMEOUT_EXIT_CODE", "JobInfo", "initialize", "batch_spec", "local_rows", "global_batch",
           "assign_groups", "aggregate_metrics", "is_count_metric", "described_processes", "local_mesh",
           "local_view", "allgather_ints", "allgather_floats", "host_scalars"]

log = logging.getLogger(__name__)

# Exit status of a process whose join timed out (EX_TEMPFAIL: a retry of the job may succeed).
JOIN_TIMEOUT_EXIT_CODE = 75
# jax's connect deadline is this much past ours, so that ours fires first (see `initialize`).
_JAX_DEADLINE_GRACE_S = 60

# Same keys as `sharding.maybe_initialize_distributed`, so launch scripts work with either.
_ENV_ADDR = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
_ENV_NPROC = ("JAX_NUM_PROCESSES", "NUM_PROCESSES", "WORLD_SIZE")
_ENV_PID = ("JAX_PROCESS_ID", "PROCESS_ID", "RANK")


@dataclasses.dataclass(frozen=True)
class JobInfo:
    """Where this process stands in the job. coordinator is None for a single process."""

    process_id: int
    num_processes: int
    coordinator: str | None

    @property
    def multi(self) -> bool:
        return self.num_processes > 1


# -- joining the job ------------------------------------------------------------------------------
def _env(*keys: str) -> str | None:
    return next((os.environ[k] for k in keys if os.environ.get(k)), None)


def _slurm_tasks() -> int:
    """Tasks of the SLURM job step (0 outside SLURM): what jax's SLURM auto-detection would use."""
    if not os.environ.get("SLURM_JOB_ID"):
        return 0
    return int(_env("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1)


def _resolve(coordinator: str | None, num_processes: int | None,
             process_id: int | None) -> tuple[str | None, int, int | None, bool]:
    """(coordinator, num_processes, process_id, auto): explicit arguments, else the JAX_* launch
    variables, else SLURM (auto=True: jax auto-detects what is still unset), else one process."""
    coordinator = coordinator or _env(*_ENV_ADDR)
    if coordinator is None and os.environ.get("MASTER_ADDR"):
        coordinator = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '1234')}"
    if num_processes is None and (n := _env(*_ENV_NPROC)) is not None:
        num_processes = int(n)
    if process_id is None and (i := _env(*_ENV_PID)) is not None:
        process_id = int(i)
    if num_processes is None:
        if (slurm := _slurm_tasks()) > 1:
            pid = process_id if process_id is not None else int(os.environ.get("SLURM_PROCID", 0))
            return coordinator, slurm, pid, True
        if coordinator is not None:
            raise ValueError(f"coordinator {coordinator} given but not the number of processes "
                             "(num_processes or JAX_NUM_PROCESSES)")
        num_processes = 1
    return coordinator, num_processes, process_id, False


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, initialization_timeout: int = 300, heartbeat_timeout: int = 100,
               cpu_collectives: str = "gloo") -> JobInfo:
    """Join the multi-host job; must run before anything touches the jax backend.

    Arguments left None come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (or
    MASTER_ADDR:MASTER_PORT / WORLD_SIZE / RANK), else from SLURM (``jax.distributed.initialize()``
    auto-detects coordinator, count and id from SLURM_* variables), else the job is one process.

    One process: returns at once without a coordinator (no sockets, no backend touched), so the
    single-host path costs nothing. Several: every process must call this within
    `initialization_timeout` seconds of the others; if one never joins, each one that did writes an
    error naming the coordinator and its process id and exits with `JOIN_TIMEOUT_EXIT_CODE` after
    that timeout (jax's runtime would abort it later and silently; see `_start_join_watchdog`).
    Bad arguments and auto-detection failures raise ValueError / RuntimeError.
    `heartbeat_timeout`: seconds after which a silent (dead) peer fails the job.
    `cpu_collectives`: cross-process collectives of CPU devices (tests, CPU-only runs); the GPU
    backend uses NCCL regardless. Calling it again after a successful join returns the same info.
    """
    addr, n, pid, auto = _resolve(coordinator, num_processes, process_id)
    if n < 1:
        raise ValueError(f"num_processes must be >= 1, got {n}")
    if n == 1:
        return JobInfo(0, 1, None)
    if jax.distributed.is_initialized():
        return JobInfo(jax.process_index(), jax.process_count(), _coordinator_in_use() or addr)
    if not auto and (addr is None or pid is None):
        raise ValueError(f"{n} processes requested but the coordinator address ({addr}) or this process's id "
                         f"({pid}) is not set (arguments or JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID)")
    if not auto and not 0 <= pid < n:
        raise ValueError(f"process_id {pid} is not in [0, {n}) for {n} processes")
    if jax.config.jax_cpu_collectives_implementation != cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    where = addr or "auto-detected from SLURM"
    joined = threading.Event()
    _start_join_watchdog(joined, initialization_timeout, pid, n, where)
    try:
        # jax's own deadline is set past ours: when it expires, its runtime aborts the process
        # (LOG(FATAL) "Terminating process because the JAX distributed service detected fatal
        # errors") without naming anything, so our watchdog must be the one to fire.
        jax.distributed.initialize(addr, None if auto else n, None if auto else pid,
                                   initialization_timeout=initialization_timeout + _JAX_DEADLINE_GRACE_S,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except Exception as e:  # config errors raise; an unreachable peer aborts (see above)
        joined.set()
        _abandon()
        raise RuntimeError(f"process {pid} of {n} could not join the job at coordinator {where}: "
                           f"{_first_line(e)}") from e
    joined.set()
    return JobInfo(jax.process_index(), jax.process_count(), _coordinator_in_use() or addr)


def _start_join_watchdog(joined: threading.Event, timeout_s: float, pid: int | None, n: int, where: str) -> None:
    """Exit with `JOIN_TIMEOUT_EXIT_CODE` and a message naming the coordinator and this process if
    the join has not finished after `timeout_s`.

    A failed join cannot surface as a Python exception: the blocked connect ends in a process abort
    inside jax's runtime, and no Python code runs in the main thread until then. So a daemon thread
    writes the error and ends the process (`os._exit`: the main thread is stuck in C++ and the
    half-connected client must not be torn down). Launchers (SLURM, the tests) see the exit code.
    """
    def watch() -> None:
        if joined.wait(timeout_s):
            return
        at = _coordinator_in_use() or where  # jax sets it before connecting (SLURM: auto-detected)
        msg = (f"vlajax.distributed.multihost: process {pid} of {n} could not join the job at coordinator "
               f"{at} within initialization_timeout={timeout_s:g} s: another process never started, "
               f"crashed before joining, or cannot reach the coordinator (address/port, firewall). "
               f"Exiting with code {JOIN_TIMEOUT_EXIT_CODE}.")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed stream must not keep the process alive
                pass
        os.write(2, (msg + "\n").encode())
        os._exit(JOIN_TIMEOUT_EXIT_CODE)

    threading.Thread(target=watch, name="vlajax-join-watchdog", daemon=True).start()


def _coordinator_in_use() -> str | None:
    """The address jax connected to (set before connecting, so also after a failed join)."""
    from jax._src import distributed as _dist  # the only place jax keeps the auto-detected address
    return getattr(_dist.global_state, "coordinator_address", None)


def _abandon() -> None:
    """Drop the half-made client/service of a failed join so that exiting does not wait on it."""
    try:
        jax.distributed.shutdown()
    except Exception as e:  # the client never connected: shutting it down may fail too
        log.debug("shutdown after a failed join: %s", _first_line(e))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


# -- the global batch -----------------------------------------------------------------------------
def batch_spec(ndim: int, mesh: Mesh) -> P:
    """The PartitionSpec of a batch leaf: leading dim by the "batch" logical rule, the rest replicated."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh)


def local_rows(mesh: Mesh, global_rows: int, spec: P | None = None) -> slice:
    """The rows [start, stop) of a `global_rows`-row batch that this process's devices hold.

    With the devices of `mesh` in process order this is block `jax.process_index()`; computed
    from the sharding so that a mesh in another order cannot silently pair rows with the wrong
    groups. Raises if this process's rows are not one contiguous block.
    """
    sharding = NamedSharding(mesh, P(*(spec or batch_spec(1, mesh))[:1]))
    idx = sharding.addressable_devices_indices_map((global_rows,)).values()
    spans = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop) for s in idx})
    start, stop = spans[0][0], spans[-1][1]
    covered = sum(b - a for a, b in spans)
    if covered != stop - start:
        raise ValueError(f"process {jax.process_index()} holds rows {spans} of {global_rows}: not one block; "
                         "build the mesh with its devices in process order")
    return slice(start, stop)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh,
                 specs: Mapping[str, P] | None = None, *, check: bool = True) -> dict[str, jax.Array]:
    """Assemble global arrays from each process's local rows.

    local: name -> (m_local, ...) array: this process's rows, `local_rows(mesh, m_local * P)` of the
      global batch; every process passes the same names, shapes and dtypes.
    specs: name -> PartitionSpec; default `batch_spec` (the sharding rules' "batch" axes).
    check: all-gather every process's row counts first (one tiny collective) and raise, naming the
      key, when they differ; without it, unequal local batches (e.g. after dynamic sampling dropped
      groups unevenly) make a wrong global shape or a hang. Pad to a common size instead
      (`vlajax.rl.samples.pad_samples`).
    Returns name -> jax.Array of shape (m_local * num_processes, ...), sharded over the whole mesh.
    With one process this is a plain `device_put` of `local` with the same shardings.
    """
    keys = sorted(local)
    arrays = {k: np.asarray(local[k]) for k in keys}
    for k, x in arrays.items():
        if x.ndim == 0:
            raise ValueError(f"batch[{k!r}] is a scalar; every batch leaf needs a leading row dim")
    if check and jax.process_count() > 1:
        rows = np.asarray([arrays[k].shape[0] for k in keys], np.int64)
        every = multihost_utils.process_allgather(rows)  # (num_processes, len(keys))
        for j, k in enumerate(keys):
            if len(set(every[:, j].tolist())) > 1:
                raise ValueError(f"batch[{k!r}] has {every[:, j].tolist()} local rows on processes "
                                 f"0..{jax.process_count() - 1}; every process must pass the same number")
    out = {}
    for k in keys:
        x = arrays[k]
        spec = specs[k] if specs is not None and k in specs else batch_spec(x.ndim, mesh)
        sharding = NamedSharding(mesh, spec)
        share = _row_shards(sharding) // jax.process_count()  # row blocks this process holds
        if share and x.shape[0] % share:
            raise ValueError(f"batch[{k!r}] has {x.shape[0]} local rows, not divisible by the {share} row "
                             f"shards of this process's devices (pad the batch)")
        out[k] = jax.make_array_from_process_local_data(sharding, x)
    return out


def _row_shards(sharding: NamedSharding) -> int:
    """Number of distinct row blocks the leading dim is cut into over the whole mesh."""
    first = sharding.spec[0] if len(sharding.spec) else None
    axes = () if first is None else (first,) if isinstance(first, str) else tuple(first)
    return int(np.prod([sharding.mesh.shape[a] for a in axes], dtype=np.int64))


# -- who trains what ------------------------------------------------------------------------------
def assign_groups(train_batch_size: int, num_processes: int | None = None, process_index: int | None = None,
                  *, key: str = "data.train_batch_size") -> range:
    """The GRPO groups this process rolls out and trains: indices into the step's list of
    `train_batch_size` groups (as every process's identically seeded sampler draws them).

    Rule: contiguous block p of k = train_batch_size / num_processes groups, for process p. Groups
    never straddle processes (GRPO normalizes advantages within a group, so all its rollouts must
    be on one process) and block p is where process p's rows land in the global batch
    (`local_rows`), so the global batch keeps the single-process sample order. Deterministic: no
    communication, same answer on every process and after a restart. Raises a ValueError naming
    `key` when num_processes does not divide train_batch_size.
    """
    n = jax.process_count() if num_processes is None else num_processes
    p = jax.process_index() if process_index is None else process_index
    if n < 1 or not 0 <= p < n:
        raise ValueError(f"process_index {p} is not in [0, {n})")
    if train_batch_size < 1 or train_batch_size % n:
        raise ValueError(f"{key}={train_batch_size} groups cannot be split evenly over {n} processes; "
                         f"make {key} a multiple of {n}")
    k = train_batch_size // n
    return range(p * k, (p + 1) * k)


# -- metrics --------------------------------------------------------------------------------------
# Summed (counts); everything else is averaged. Matched against the last "/" part of the name.
_COUNT = re.compile(r"^(num|n)_|_(count|total|calls)(_|$)|^(episodes|successes|env_steps|restarts|"
                    r"valid_tokens|valid_samples|samples|tokens|groups_seen|groups_kept|carried_in|carried_out|"
                    r"dropped_excess)$")


def is_count_metric(name: str) -> bool:
    """True for a count, summed across processes: the last "/" part starts with ``num_`` / ``n_``,
    contains ``_count``, ``_total`` or ``_calls`` as a word, or is one of train.py's counts: episodes,
    successes, env_steps, restarts, valid_tokens, valid_samples, samples, tokens, and dynamic sampling's
    groups_seen, groups_kept, carried_in, carried_out, dropped_excess."""
    return bool(_COUNT.search(name.rsplit("/", 1)[-1]))


def aggregate_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Combine each process's local metrics into job-wide values, identical on every process.

    Counts (`is_count_metric`) are summed, everything else is the mean over the processes that
    report it (a per-task rate that only some processes saw is averaged over those). The mean is
    unweighted: rates are right when every process has the same number of episodes, which
    `assign_groups` guarantees. Every process must call it (it is a collective). Do not pass the
    learner's metrics: a global update already returns job-wide values on every process.
    Single process: returns the metrics as floats.
    """
    names = sorted(metrics)
    if jax.process_count() == 1:
        return {k: float(metrics[k]) for k in names}
    union = _all_names(names)
    vec = np.zeros((2, len(union)), np.float64)  # row 0: values, row 1: 1 = reported
    pos = {k: i for i, k in enumerate(union)}
    for k in names:
        vec[:, pos[k]] = float(metrics[k]), 1.0
    every = multihost_utils.process_allgather(vec)  # (num_processes, 2, len(union))
    out = {}
    for j, k in enumerate(union):
        seen = every[every[:, 1, j] > 0, 0, j]
        out[k] = float(np.sum(seen) if is_count_metric(k) else np.mean(seen))
    return out


def _all_names(names: list[str]) -> list[str]:
    """Sorted union of every process's metric names (two small all-gathers: lengths, then bytes)."""
    blob = np.frombuffer("\n".join(names).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([blob.size], np.int64))[:, 0]
    padded = np.zeros(int(sizes.max()) + 1, np.uint8)
    padded[: blob.size] = blob
    every = multihost_utils.process_allgather(padded)
    union = set()
    for row, size in zip(every, sizes):
        text = bytes(row[: int(size)]).decode()
        union.update(text.split("\n") if text else [])
    return sorted(union)


# -- the training loop across processes ------------------------------------------------------------
def described_processes() -> int:
    """How many processes this job has, without joining it or touching the backend: jax's count
    once joined, else what the launch variables (explicit JAX_* / WORLD_SIZE, or SLURM) describe.
    Config validation uses it to allow `trainer.nnodes` > 1 only in a multi-process launch."""
    if jax.distributed.is_initialized():
        return jax.process_count()
    try:
        return _resolve(None, None, None)[1]
    except ValueError:
        return 1


def local_mesh(mesh: Mesh) -> Mesh:
    """This process's sub-mesh of `mesh`: the rows of its leading ("data") axis whose devices are all
    this process's. Parameters sharded only over the inner axes ("fsdp") have a full copy in every such
    block, which `local_view` exposes to process-local computations (the rollout's decoder)."""
    me = jax.process_index()
    owner = np.vectorize(lambda d: d.process_index)(mesh.devices)
    rows = np.all(owner == me, axis=tuple(range(1, owner.ndim)))
    mixed = np.any(owner == me, axis=tuple(range(1, owner.ndim))) & ~rows
    if not rows.any() or mixed.any():
        raise ValueError(f"process {me}'s devices do not form whole rows of the mesh's {mesh.axis_names[0]!r} "
                         f"axis (mesh shape {dict(mesh.shape)}): each process needs a full copy of the weights; "
                         "use a mesh whose data axis spans the processes (trainer.mesh.data = number of processes)")
    return Mesh(mesh.devices[rows], mesh.axis_names, axis_types=mesh.axis_types)


def local_view(tree, mesh: Mesh):
    """The same arrays as process-local arrays on `local_mesh(mesh)`: built from each leaf's
    `addressable_shards` (`jax.make_array_from_single_device_arrays`), so nothing is copied and a
    jitted process-local function (one process's decode) can take them. Fully addressable leaves
    (one process) pass through. A leaf sharded over the leading mesh axis has no full copy here and
    raises, naming it. Valid as long as the global arrays are (re-view after each update)."""
    sub = None

    def one(path, x):
        nonlocal sub
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        sub = sub or local_mesh(mesh)
        spec = x.sharding.spec
        if any(mesh.axis_names[0] in ((a,) if isinstance(a, str) else tuple(a or ())) for a in spec):
            raise ValueError(f"{jax.tree_util.keystr(path)} is sharded over {mesh.axis_names[0]!r} ({spec}): "
                             "this process does not hold all of it")
        sharding = NamedSharding(sub, spec)
        want = sharding.devices_indices_map(x.shape)
        shards = x.addressable_shards
        for s in shards:
            if tuple(s.index) != tuple(want[s.device]):
                raise ValueError(f"{jax.tree_util.keystr(path)}: shard on {s.device} is {s.index}, the local "
                                 f"mesh places {want[s.device]} there")
        return jax.make_array_from_single_device_arrays(x.shape, sharding, [s.data for s in shards])

    return jax.tree_util.tree_map_with_path(one, tree)


def allgather_ints(values) -> np.ndarray:
    """(num_processes, k) int64: every process's `values` (k ints), in process order; one process:
    (1, k) without communication. The lockstep decisions of a multi-process run (dynamic-sampling
    counts, sample counts of a mini-batch) are taken from this, so every process takes the same one."""
    v = np.atleast_1d(np.asarray(values, np.int64))
    if jax.process_count() == 1:
        return v[None]
    return np.asarray(multihost_utils.process_allgather(v)).reshape(jax.process_count(), -1)


def allgather_floats(values) -> np.ndarray:
    """(num_processes, k) float64 counterpart of `allgather_ints` (evaluation results)."""
    v = np.atleast_1d(np.asarray(values, np.float64))
    if jax.process_count() == 1:
        return v[None]
    return np.asarray(multihost_utils.process_allgather(v)).reshape(jax.process_count(), -1)


def host_scalars(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    """Replicated 0-d device metrics (a global update's) as floats, read from this process's own copy
    (`jax.device_get` refuses arrays that span processes)."""
    return {k: float(np.asarray(v.addressable_data(0) if isinstance(v, jax.Array) else v))
            for k, v in metrics.items()}


# -- a peer that dies after the join ----------------------------------------------------------------
def watch_peers(exit_code: int, timeout_s: float, *, interval_s: float = 1.0, cleanup=None) -> threading.Thread | None:
    """End this process with a message naming the dead peer(s) when another process of the job stops
    beating for `timeout_s` seconds, or the coordinator (process 0, which holds the job's key-value
    store) stops answering.

    Why: after a peer dies this process is blocked in, or fails out of, a collective (a gradient
    all-reduce, an all-gather of dynamic-sampling counts: "Gloo AllGather failed: Connection closed by
    peer"), and then hangs on exit waiting for the dead peer; neither says which process died. A daemon
    thread beats (a counter in jax's distributed key-value store, `vlajax/beat/<process>`) and watches
    the others' counters, which needs no clock agreement across nodes and never blocks on a dead peer.
    On a loss it runs `cleanup` (this process's simulators / Ray, at most 15 s), kills what is left of
    its child processes, writes the error and exits with `exit_code` (`os._exit`: the main thread may
    be stuck in C++). One process: does nothing, returns None.

    The thread is stopped and joined at exit (atexit, before jax's own teardown): a daemon thread
    still inside the store's client when Python finalizes is torn down mid-call (pthread_exit through
    a noexcept C++ frame), which aborts the process (SIGABRT) after a run that had succeeded.
    """
    if jax.process_count() == 1:
        return None
    from jax._src import distributed as _dist

    client = _dist.global_state.client
    me, n = jax.process_index(), jax.process_count()
    peers = [p for p in range(n) if p != me]

    stop = threading.Event()

    def watch() -> None:
        beat, seen, changed = 0, {}, {p: time.monotonic() for p in peers}
        why = None
        while why is None and not stop.is_set():
            try:
                beat += 1
                client.key_value_set(f"vlajax/beat/{me}", str(beat), allow_overwrite=True)
                for p in peers:
                    try:
                        v = client.key_value_try_get(f"vlajax/beat/{p}")
                    except Exception:  # not beating yet (NOT_FOUND)
                        v = None
                    if v is not None and v != seen.get(p):
                        seen[p], changed[p] = v, time.monotonic()
                gone = [p for p in peers if time.monotonic() - changed[p] > timeout_s]
                if gone:
                    why = f"process(es) {', '.join(map(str, gone))} stopped (no heartbeat for {timeout_s:g} s)"
            except Exception as e:  # the store (on process 0) is gone
                why = f"process 0 (the coordinator at {_coordinator_in_use()}) stopped answering ({_first_line(e)})"
            if why is None:
                stop.wait(interval_s)
        if stop.is_set():  # this process is exiting: the peers' ends are theirs to report
            return
        msg = (f"vlajax.distributed.multihost: process {me} of {n}: {why}; ending this process too "
               f"(exit code {exit_code}). See the log of that process for why it ended.")
        _end_children(cleanup)  # at most ~20 s; the message comes last, once, below what cleanup printed
        os.write(2, (msg + "\n").encode())
        os._exit(exit_code)

    t = threading.Thread(target=watch, name="vlajax-peer-watchdog", daemon=True)
    t.start()

    def stop_watching() -> None:
        stop.set()
        t.join(timeout=interval_s + 30)  # a store call under way returns or times out

    atexit.register(stop_watching)
    return t


def _end_children(cleanup, timeout_s: float = 15.0) -> None:
    """Run `cleanup` (at most `timeout_s`), then kill this process's remaining descendants."""
    if cleanup is not None:
        worker = threading.Thread(target=cleanup, daemon=True)
        worker.start()
        worker.join(timeout_s)
    try:
        import psutil

        kids = psutil.Process().children(recursive=True)
        for k in kids:
            try:
                k.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(kids, timeout=5)
    except Exception as e:  # best effort: the process exits regardless
        log.debug("killing child processes: %s", _first_line(e))
