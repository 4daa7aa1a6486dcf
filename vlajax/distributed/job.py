"""`Job`: this process's place in a training job, and every decision that differs between one process
and several, so that the trainer's loop reads as the single-process loop it is.

A job is one process, or one process per train node (`trainer.nnodes`; launched by `vlajax train` through
Ray, by SLURM, or with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). Every method is the
identity, or a plain local computation, for one process. For several (the rules, `vlajax.train` and
`vlajax.distributed.multihost` say why):
  * every process draws each rollout round's groups for the whole job and keeps its own block
    (`own_groups`), with its own sampling noise (`round_key`);
  * dynamic sampling stops when every process has its share (`sampling_done`: lockstep);
  * estimators that look at the whole batch see the whole job's (`job_wide`);
  * each mini-batch is one global array of every process's rows, padded to the same shape everywhere
    (`agree_rows`, `global_batch`);
  * metrics are the job's (`aggregate`, `scalars`), and only process 0 writes (`primary`);
  * an evaluation is shared out and gathered back (`share`, `gather_episodes`).
"""

from __future__ import annotations

import os
import time
from typing import Mapping, Sequence

import jax
import numpy as np

from vlajax.distributed import multihost
from vlajax.distributed.sharding import make_mesh

__all__ = ["Job", "rollout_key", "HEARTBEAT_ENV", "PEER_LOST_EXIT_CODE"]

# Seconds after which a silent (dead) peer process fails the job (jax's coordination-service heartbeat).
HEARTBEAT_ENV = "VLAJAX_HEARTBEAT_TIMEOUT_S"
# Exit status of a process whose peer died (EX_SOFTWARE is taken by tracebacks; 70 + 4 = "peer lost").
PEER_LOST_EXIT_CODE = 74
JAX_HEARTBEAT_GRACE_S = 30


def heartbeat_timeout_s() -> int:
    """$VLAJAX_HEARTBEAT_TIMEOUT_S, default 100: how long a peer may be silent before the others end."""
    return int(os.environ.get(HEARTBEAT_ENV, "100"))


def rollout_key(base: jax.Array, step: int, round_: int, process_id: int | None = None) -> jax.Array:
    """The sampling key of a training rollout round: from (seed, step, round), and the process id in a
    multi-process job. The decoder derives each row's key from it and the row's index in its process's
    round, so without the process id row i of every process would draw the same noise."""
    key = jax.random.fold_in(jax.random.fold_in(base, step), round_)
    return key if process_id is None else jax.random.fold_in(key, process_id)


class Job:
    """This process in its job (`multihost.JobInfo`), with the job-wide decisions as methods."""

    def __init__(self, info: multihost.JobInfo):
        self.info = info
        self.process_id, self.num_processes = info.process_id, info.num_processes
        self.multi = info.multi

    @classmethod
    def join(cls) -> "Job":
        """Join the job the launch environment describes (one process: no-op); must run before jax's
        backend starts, and may run again (it returns the same job). jax's own heartbeat is set later
        than `watch_peers`' so ours, which names the dead peer, fires first."""
        return cls(multihost.initialize(heartbeat_timeout=heartbeat_timeout_s() + JAX_HEARTBEAT_GRACE_S))

    @classmethod
    def current(cls) -> "Job":
        """This process as jax sees it now (after a join, if any)."""
        return cls(multihost.JobInfo(jax.process_index(), jax.process_count(), None))

    @property
    def primary(self) -> bool:
        """Process 0: the one that writes logs, videos and reports."""
        return self.process_id == 0

    def check_nnodes(self, nnodes: int) -> str | None:
        """What is wrong with running `trainer.nnodes=nnodes` in this job (None: nothing)."""
        if nnodes > 1 and not self.multi:
            return (f"trainer.nnodes={nnodes} cannot train in a single process: `vlajax train` then runs as one "
                    f"JAX process per train node. Launch it with `vlajax train ... trainer.nnodes={nnodes} "
                    f"ray.address=auto` on a Ray cluster, or `srun -N {nnodes} --ntasks-per-node=1 vlajax train ...` "
                    "under SLURM (or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID in each "
                    "process). Or use trainer.nnodes=1 (simulators can still run on other nodes: "
                    "env.disagg_sim.enable=true)")
        if self.multi and self.num_processes != nnodes:
            return (f"the job has {self.num_processes} processes but trainer.nnodes={nnodes}: run one process "
                    "per train node")
        return None

    # -- devices ---------------------------------------------------------------------------------
    def mesh(self, data: int, fsdp: int, decode_devices: int = 0):
        """The learner's mesh (`trainer.mesh`'s axes, -1 = infer) over every process's devices but its
        last `decode_devices` (`decode_device`). One process: as configured. Several: data = processes
        (unless set) x fsdp = the rest, so the data axis crosses processes and FSDP stays inside each,
        which therefore holds a full copy of the weights for its own decoding (ValueError if not)."""
        devices = self.train_devices(decode_devices)
        if not self.multi:
            return make_mesh(data, fsdp, devices)
        mesh = make_mesh(self.num_processes if data == -1 else data, fsdp, devices)
        multihost.local_mesh(mesh)
        return mesh

    @staticmethod
    def train_devices(decode_devices: int = 0) -> list:
        """Every process's devices but its last `decode_devices` (ValueError if that leaves one none)."""
        out = []
        for p in range(jax.process_count()):
            local = sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
            if len(local) <= decode_devices:
                raise ValueError(f"process {p} has {len(local)} device(s): {decode_devices} for decoding "
                                 "(actor_rollout_ref.rollout.decode_devices) leave none to train on")
            out += local[:len(local) - decode_devices]
        return out

    @staticmethod
    def decode_device(decode_devices: int = 0):
        """This process's device that only decodes (its last local one), or None (decoding shares the
        learner's devices)."""
        return sorted(jax.local_devices(), key=lambda d: d.id)[-1] if decode_devices else None

    def decode_view(self, params, mesh):
        """The learner's parameters as this process's decoder takes them: the arrays themselves, or
        their process-local view (`multihost.local_view`, no copy)."""
        return multihost.local_view(params, mesh) if self.multi else params

    def watch_peers(self, cleanup) -> None:
        """A peer that dies ends this process too, naming it, within the heartbeat timeout."""
        multihost.watch_peers(PEER_LOST_EXIT_CODE, heartbeat_timeout_s(), cleanup=cleanup)

    def lost_peer(self, error: BaseException) -> bool:
        """Whether `error` is a collective that failed because a peer process went away (gloo's
        "Connection closed by peer", ...): its text names no process, `watch_peers` will."""
        text = str(error).lower()
        return self.multi and any(k in text for k in ("closed by peer", "connection reset", "connection refused",
                                                      "socket closed", "broken pipe"))

    def await_peer_verdict(self) -> None:
        """Wait for `watch_peers` to name the lost peer and end this process (exit code
        `PEER_LOST_EXIT_CODE`); returns only if it has not done so within the heartbeat timeout."""
        time.sleep(heartbeat_timeout_s() + 30)

    # -- rollouts --------------------------------------------------------------------------------
    def own_groups(self, groups: list) -> list:
        """This process's block of a rollout round's groups (every process drew them all)."""
        if not self.multi:
            return groups
        mine = multihost.assign_groups(len(groups), self.num_processes, self.process_id,
                                       key="groups of a rollout round")
        return groups[mine.start:mine.stop]

    def round_key(self, base: jax.Array, step: int, round_: int) -> jax.Array:
        return rollout_key(base, step, round_, self.process_id if self.multi else None)

    def sampling_done(self, kept: int, wanted: int, rounds: int, max_rounds: int) -> tuple[bool, int | None]:
        """(stop now, groups to take) for dynamic sampling. One process: stop once `kept` >= `wanted`
        or the round bound is hit, take what the buffer gives (None). Several (lockstep): all processes
        all-gather their kept counts and stop together once every one has `wanted`; each then takes
        min(kept counts, wanted), the same number everywhere."""
        if not self.multi:
            return kept >= wanted or rounds >= max_rounds, None
        common = int(min(multihost.allgather_ints([kept])[:, 0].min(), wanted))
        return common >= wanted or rounds >= max_rounds, common

    # -- the update ------------------------------------------------------------------------------
    def job_wide(self, *columns: np.ndarray) -> tuple[list[np.ndarray], slice]:
        """(every process's `columns` concatenated in process order, this process's slice of them):
        what a batch-wide estimator needs. Each process must pass the same row count."""
        n = len(columns[0])
        if not self.multi:
            return list(columns), slice(0, n)
        every = multihost.allgather_floats(np.concatenate(columns))  # (P, k * n)
        out = [every[:, i * n:(i + 1) * n].ravel() for i in range(len(columns))]
        return out, slice(self.process_id * n, (self.process_id + 1) * n)

    def agree_rows(self, rows: int, width: int) -> tuple[int, int]:
        """The mini-batch's rows and prompt width on every process (their maxima): one global batch
        has one shape. Raises if this process has no rows where another has some."""
        if not self.multi:
            return rows, width
        most_rows, most_width = (int(v) for v in multihost.allgather_ints([rows, width]).max(axis=0))
        if most_rows and not rows:
            raise RuntimeError(f"process {self.process_id} has no samples in a mini-batch that other processes "
                               "have samples in")
        return most_rows, most_width

    def global_batch(self, batch: Mapping[str, np.ndarray], mesh, dtypes: Mapping[str, type]):
        """The mini-batch the learner takes: this process's rows as they are, or the global array of
        every process's rows in process order."""
        if not self.multi:
            return batch
        return multihost.global_batch({k: np.asarray(v, dtypes[k]) for k, v in batch.items()}, mesh)

    def scalars(self, metrics) -> dict[str, float]:
        """An update's metrics as floats (a global update's from this process's own copy)."""
        if self.multi:
            return multihost.host_scalars(metrics)
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def aggregate(self, metrics: dict) -> dict:
        """A step's metrics as the job's (the same on every process)."""
        return multihost.aggregate_metrics(metrics) if self.multi else metrics

    # -- evaluation ------------------------------------------------------------------------------
    def share(self, pairs: Sequence) -> list:
        """This process's contiguous share of an evaluation's `pairs`, padded with repeats of the first
        to equal shares."""
        if not self.multi:
            return list(pairs)
        size = -(-len(pairs) // self.num_processes)
        padded = list(pairs) + [pairs[0]] * (size * self.num_processes - len(pairs))
        return padded[self.process_id * size:(self.process_id + 1) * size]

    @property
    def stream(self) -> int | None:
        """Folded into an evaluation's sampling keys, so that processes sharing one draw their own noise."""
        return self.process_id if self.multi else None

    def own_folder(self, folder: str) -> str:
        """Where this process writes files whose names are only unique within one process (videos)."""
        return os.path.join(folder, f"process{self.process_id}") if self.multi else folder

    def gather_episodes(self, pairs: Sequence[tuple[int, int]], mine: list[dict], task_names: Sequence[str]) -> list[dict]:
        """Every process's episode records of `pairs` (each ran its `share`), in `pairs` order."""
        if not self.multi:
            return mine
        got = multihost.allgather_floats([v for r in mine for v in (r["success"], r["length"])])
        got = got.reshape(-1, 2)[:len(pairs)]
        return [{"task": task_names[t], "state_id": int(sid), "success": bool(ok), "length": int(n)}
                for (t, sid), (ok, n) in zip(pairs, got)]
