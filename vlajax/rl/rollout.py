"""The pipelined rollout loop: sim workers step envs while the host decodes other envs' actions.

Pipeline
--------
N = workers x stages x envs trajectories. Trajectory row n lives on worker w = n // (S*E), stage
s = (n // E) % S, env slot n % E (worker-major, contiguous: the rollout.n repeats of one initial
state usually share a stage). A (worker, stage) pair is a *unit*; units advance independently,
there is no barrier across stages or workers:

    loop:
      poll the units' outstanding env calls (`pool.wait`; it blocks only when no decode is
        in flight and none is ready to issue)
      for every unit whose observations arrived: gather its *running* envs' rows
      issue ONE jitted decode for all of them (JAX async dispatch: returns at once)
      fetch the oldest decode in flight (blocks on the device), turn tokens into actions and
        send each unit its actions (`pool.issue_step`, returns a handle at once)

So while a sim worker steps one stage, the host decodes for the units whose results are in, and a
decode is always issued before the host blocks on an earlier one. With the default
`concurrent_stages=False` a worker simulates one stage at a time, so S = 2 stages keep it busy as
long as a decode is shorter than a stage's step (the reference's ping-pong, without its per-step
barrier). `EngineConfig(pipelined=False)` turns the same loop into the serial baseline: wait for
every unit, decode everything, step everything.

Finished envs (success or episode limit) leave the batch: the worker does not step them (it is
sent only running rows) and the host does not decode for them. Decode batches are padded to a
few fixed bucket sizes (`PolicyDecoder.buckets`), so shapes do not recompile as envs finish.

`start_reset(...)` issues the next rollout's env resets and returns at once (call it before the
learner's update, so the resets overlap it); the next `rollout()` consumes them. Greedy evaluation
(`evaluate`, temperature 0) runs the same loop.

Trajectory layout (`RolloutBatch`)
----------------------------------
Row n of every array is request row n (`task_ids[n]`, `state_ids[n]`, `group_ids[n]`): the ids are
sent with the envs at reset, echoed by the worker with every result, and results are written by the
echoed row, never by arrival position. C = ceil(max_episode_steps / K) policy calls; call c of row
n exists iff `chunk_valid[n, c]` (calls are contiguous from 0). T = K * A tokens per call.

    trajectories.actions_tokens (N, C, T) int32    sampled action-bin columns 0..255
    trajectories.old_logp       (N, C, T) float32  their log-probs at the rollout temperature
                                                  (temperature 1 for greedy rollouts)
    trajectories.chunk_valid    (N, C)    bool
    trajectories.success        (N,)      bool     the task predicate held
    trajectories.finish_step    (N,)      int32    env steps executed, success step included
    trajectories.group_id       (N,)      int64    GRPO group (same initial state)
    trajectories.task_id        (N,)      int64
    state_id                    (N,)      int64    initial-state id; with `seed` it fixes the start
    images            (N, C, n_img, H, W, 3) uint8 the raw frames of each call (zeros where invalid);
                                                  `preprocess_images(images[n, c], **preprocess)`
                                                  gives the pixel_values the policy saw (this is the
                                                  compact "cache key" of the preprocessed images)
    proprio                     (N, C, D) float32  robot state of each call
    prompt_ids, prompt_mask     (N, P)    int32    the prompt of every call of row n (an episode's
                                                  instruction is fixed)
    actions                     (N, C, K, A) float32 env actions sent (after un-normalisation)

Re-computing `old_logp` from (images, prompt, proprio, tokens) with the same parameters reproduces
it, which is what the learner's ratio needs.

The pool (`SimPoolAPI`: Ray actors in `vlajax.distributed.ray_sim.SimPool`, or in-process workers in
`vlajax.envs.local_pool.LocalSimPool`) hides its transport: this module never imports Ray.

Faults: when a sim worker dies or a simulator process inside it crashes or hangs (`SimFailure`),
or a call exceeds its timeout, the worker is replaced (`pool.restart`) and all the
episodes it held in this rollout are re-run from their initial state (same task, state, seed),
finished ones included: keeping the finished ones and re-running only the rest would bias the batch
toward short (successful) episodes. Re-runs draw the same samples for the same observations
(per-row keys, see `policy_step`). `stats.restarts` counts replacements.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from typing import Any, Callable, Hashable, Sequence

import jax
import numpy as np

from vlajax.envs.base import SAMPLED_STATE_BASE, TaskSpec, sampled_state_seed
from vlajax.envs.sim_worker import SimFailure, SimPoolAPI, SimResult
from vlajax.rl.policy_step import Decoder
from vlajax.rl.rollout_buffer import RolloutError, TrajectoryBuffer

log = logging.getLogger(__name__)

__all__ = ["RolloutBatch", "EngineConfig", "RolloutEngine", "RolloutError", "RolloutStats", "StepEvent"]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """temperature: sampling temperature of `rollout` (`evaluate` uses 0 = greedy).
    pipelined: False = the serial baseline (barrier: step all, then decode all).
    step_timeout_s / reset_timeout_s: an env call (reset includes a restarted worker's start-up)
        that takes longer is treated as a dead worker.
    max_restarts: replacements of one worker within one rollout before giving up.
    seed: base of the per-rollout sampling keys."""

    temperature: float = 1.6
    pipelined: bool = True
    step_timeout_s: float = 120.0
    reset_timeout_s: float = 600.0
    max_restarts: int = 3
    seed: int = 0


@dataclasses.dataclass
class RolloutStats:
    """wall_s: rollout() wall time (from its start, resets issued earlier not included).
    env_wait_s: host blocked waiting for env results; decode_wait_s: host blocked on decode results;
    dispatch_s: host time issuing decodes (gathering rows, and compiling a new shape if any).
    decode_calls / decoded_rows / padded_rows: jitted calls, real rows decoded, rows incl. padding.
    env_calls: worker step calls; restarts: worker replacements in this rollout.
    sim_busy_s: per worker, seconds its envs were simulating during the rollout.
    first_result_s: from the start until the first reset result (near 0 when the resets were issued
    before, e.g. overlapping the update, and are done). decode_buckets: decode calls per padded size
    (with a per-size decode time, the decoder's busy time)."""

    wall_s: float = 0.0
    env_wait_s: float = 0.0
    decode_wait_s: float = 0.0
    dispatch_s: float = 0.0
    decode_calls: int = 0
    decoded_rows: int = 0
    padded_rows: int = 0
    env_calls: int = 0
    restarts: int = 0
    sim_busy_s: list[float] = dataclasses.field(default_factory=list)
    first_result_s: float = float("nan")  # until the first env result (resets done, when issued earlier)
    decode_buckets: dict[int, int] = dataclasses.field(default_factory=dict)  # padded batch size -> calls

    @property
    def sim_busy_fraction(self) -> float:
        """Mean over workers of busy time / wall time."""
        busy = [b for b in self.sim_busy_s if np.isfinite(b)]
        return float(np.mean(busy) / self.wall_s) if busy and self.wall_s > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    """One rollout; layout in the module docstring."""

    trajectories: Trajectories
    state_id: np.ndarray
    images: np.ndarray
    proprio: np.ndarray
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    actions: np.ndarray
    instructions: list[str]
    temperature: float
    preprocess: dict
    stats: RolloutStats

    def __len__(self) -> int:
        return len(self.trajectories)


@dataclasses.dataclass(frozen=True)
class StepEvent:
    """Passed to `on_step` after each env result: kind "reset" or "step", the unit, the rows it
    returned and how many policy calls each has had so far."""

    kind: str
    worker: int
    stage: int
    rows: np.ndarray
    calls: np.ndarray


@dataclasses.dataclass
class _Unit:
    """A (worker, stage) pair and its one outstanding env call."""

    worker: int
    stage: int
    rows: np.ndarray  # (E,) trajectory rows, slot order
    call: Hashable | None = None  # the pool's handle of the outstanding call
    kind: str = ""  # "reset" | "step"
    deadline: float = 0.0
    epoch: int = 0  # bumped on restart: decodes of an older epoch are dropped


@dataclasses.dataclass
class _Request:
    task_ids: np.ndarray
    state_ids: np.ndarray
    group_ids: np.ndarray
    seed: int


@dataclasses.dataclass
class _Segment:
    """The rows of one unit within a decode batch."""

    unit: _Unit
    epoch: int  # the unit's epoch when the decode was issued
    rows: np.ndarray
    part: slice  # their positions in the batch


@dataclasses.dataclass
class _Decode:
    handle: Any  # the decoder's
    segments: list[_Segment]
    calls: np.ndarray  # (B,) policy-call index of each batch row


class RolloutEngine:
    """Drives a sim pool (`SimPoolAPI`) with a `Decoder` (e.g. `PolicyDecoder`). See the module docstring.

    The engine does not own the pool: close it (and the Ray session, if any) yourself.
    """

    def __init__(self, pool: SimPoolAPI, decoder: Decoder, cfg: EngineConfig | None = None):
        self.pool = pool
        self.decoder = decoder
        self.cfg = cfg or EngineConfig()
        info = pool.infos[0]
        if info["action_dim"] != decoder.action_dim:
            raise RolloutError(f"the envs take {info['action_dim']}-d actions, the policy emits {decoder.action_dim}")
        if len(pool.cameras) != decoder.num_images:
            raise RolloutError(f"the pool returns cameras {pool.cameras} but the policy takes "
                               f"{decoder.num_images} image(s)")
        self.tasks: list[TaskSpec] = list(info["tasks"])
        limit = info["max_episode_steps"] or max(t.max_episode_steps for t in self.tasks)
        self.max_episode_steps = int(limit)
        self.max_chunks = math.ceil(self.max_episode_steps / decoder.chunk_len)
        self.capacity = pool.capacity
        decoder.fit_capacity(self.capacity)  # fixed decode shapes as envs finish
        self.total_restarts = 0
        self._key = jax.random.key(self.cfg.seed)
        self._count = 0
        self._units = [
            _Unit(w, s, np.arange(pool.num_envs) + (w * pool.num_stages + s) * pool.num_envs)
            for w in range(pool.num_workers) for s in range(pool.num_stages)
        ]
        self._request: _Request | None = None

    # ---- public API ------------------------------------------------------------------------------
    def start_reset(self, task_ids: Sequence[int], state_ids: Sequence[int],
                    group_ids: Sequence[int] | None = None, *, seed: int = 0) -> None:
        """Issue the resets of the next rollout's envs and return at once; `rollout()` consumes them.
        group_ids default: one group per distinct (task, state)."""
        if self._request is not None:
            raise RolloutError("start_reset called twice without a rollout() in between")
        req = self._make_request(task_ids, state_ids, group_ids, seed)
        now = time.perf_counter()
        for u in self._units:
            self._issue_reset(u, req, now)
        self._request = req

    def reset_ready(self, timeout_s: float | None = None) -> bool:
        """Wait (at most `timeout_s`) until the resets issued by `start_reset` are done, without
        consuming them; True if they are (failed ones count as done: `rollout` handles them)."""
        if self._request is None:
            raise RolloutError("reset_ready: no start_reset() pending")
        calls = [u.call for u in self._units if u.call is not None]
        return len(self.pool.wait(calls, timeout_s=timeout_s, wait_all=True)) == len(calls)

    def rollout(self, task_ids: Sequence[int] | None = None, state_ids: Sequence[int] | None = None,
                group_ids: Sequence[int] | None = None, *, seed: int = 0, temperature: float | None = None,
                key: jax.Array | None = None, on_step: Callable[[StepEvent], None] | None = None) -> RolloutBatch:
        """Run one rollout: of the ids given here, or of the last `start_reset` (then pass none).

        temperature: default `cfg.temperature`; 0 = greedy. key: sampling key (default: derived
        from cfg.seed and a rollout counter). on_step: progress callback (StepEvent)."""
        t0 = time.perf_counter()
        self.pool.clear_busy()
        if task_ids is not None or state_ids is not None:
            if self._request is not None:
                raise RolloutError("rollout() got ids but start_reset() already issued resets; pass no ids")
            if task_ids is None or state_ids is None:
                raise RolloutError("rollout() needs both task_ids and state_ids")
            self.start_reset(task_ids, state_ids, group_ids, seed=seed)
        elif self._request is None:
            raise RolloutError("rollout() needs task_ids and state_ids, or a preceding start_reset()")
        req, self._request = self._request, None
        temperature = self.cfg.temperature if temperature is None else float(temperature)
        if key is None:
            key = jax.random.fold_in(self._key, self._count)
        self._count += 1
        try:
            return _Run(self, req, temperature, key, on_step, t0).run()
        except BaseException:
            # Leave no half-done state behind: the next rollout resets every env anyway.
            for u in self._units:
                u.call = None
            raise

    def evaluate(self, task_ids: Sequence[int] | None = None, state_ids: Sequence[int] | None = None,
                 group_ids: Sequence[int] | None = None, *, seed: int = 0,
                 on_step: Callable[[StepEvent], None] | None = None) -> RolloutBatch:
        """Greedy rollout (temperature 0) through the same loop."""
        return self.rollout(task_ids, state_ids, group_ids, seed=seed, temperature=0.0, on_step=on_step)

    # ---- internals -------------------------------------------------------------------------------
    def _make_request(self, task_ids, state_ids, group_ids, seed) -> _Request:
        t = np.asarray(task_ids, np.int64).reshape(-1)
        s = np.asarray(state_ids, np.int64).reshape(-1)
        n = self.capacity
        if t.shape != (n,) or s.shape != (n,):
            raise RolloutError(
                f"a rollout runs exactly workers x stages x envs = {self.pool.num_workers} x {self.pool.num_stages} x "
                f"{self.pool.num_envs} = {n} trajectories; got {t.size} task ids and {s.size} state ids")
        for i, (ti, si) in enumerate(zip(t, s)):
            if not 0 <= ti < len(self.tasks):
                raise RolloutError(f"row {i}: task id {ti} out of range (0..{len(self.tasks) - 1})")
            task = self.tasks[ti]
            # a sampled state id passes; the simulator says whether it can sample states
            if not (0 <= si < task.num_init_states or sampled_state_seed(si) is not None):
                raise RolloutError(f"row {i} (task {task.name}): state id {si} out of range "
                                   f"(0..{task.num_init_states - 1}, or a sampled state id >= {SAMPLED_STATE_BASE})")
        if group_ids is None:
            _, g = np.unique(np.stack([t, s], 1), axis=0, return_inverse=True)
            g = g.reshape(-1).astype(np.int64)
        else:
            g = np.asarray(group_ids, np.int64).reshape(-1)
            if g.shape != (n,):
                raise RolloutError(f"group_ids must have {n} entries, got {g.size}")
        return _Request(t, s, g, int(seed))

    def _issue_reset(self, u: _Unit, req: _Request, now: float) -> None:
        r = u.rows
        u.call = self.pool.issue_reset(u.worker, u.stage, r, req.task_ids[r], req.state_ids[r], req.group_ids[r],
                                       req.seed)
        u.kind = "reset"
        u.deadline = now + self.cfg.reset_timeout_s


class _Run:
    """One rollout in progress: the units' env calls, the observations waiting for a decode, the
    decodes in flight, and the buffer they fill."""

    def __init__(self, engine: RolloutEngine, req: _Request, temperature: float, key, on_step, t0: float):
        self.engine, self.pool, self.dec, self.cfg = engine, engine.pool, engine.decoder, engine.cfg
        self.req, self.temperature, self.key, self.on_step, self.t0 = req, temperature, key, on_step, t0
        self.units = engine._units
        dec = self.dec
        self.buf = TrajectoryBuffer(engine.capacity, engine.max_chunks, dec.num_tokens, dec.chunk_len, dec.action_dim,
                                    dec.sample_dtype, dec.sample_shape)
        self.stats = RolloutStats()
        self.restarts: collections.Counter = collections.Counter()
        self.ready: list[tuple[_Unit, np.ndarray]] = []  # units whose observations are in, their running rows
        self.inflight: collections.deque[_Decode] = collections.deque()

    def run(self) -> RolloutBatch:
        """The loop of the module docstring."""
        while self.ready or self.inflight or any(u.call is not None for u in self.units):
            if not self.collect_env_results():
                continue  # serial: decode only when every unit's result is in
            self.decode_ready_units()
            self.act_on_oldest_decode()
        return self.finish()

    # ---- 1. env results --------------------------------------------------------------------------
    def collect_env_results(self) -> bool:
        """Take the env results that are in (blocking only when there is nothing else to do), restart
        failed or late workers. False while the serial loop still waits for some unit."""
        live = [u for u in self.units if u.call is not None]
        if not live:
            return True
        for u, call in self._wait(live):
            if u.call is not call:
                continue  # re-issued by a restart of its worker in this loop
            u.call = None
            try:
                res = self.pool.result(call)
            except SimFailure as e:
                self._restart(u.worker, f"a simulator process failed ({e.brief()})")
                continue
            except Exception as e:
                raise RolloutError(f"sim worker {u.worker} stage {u.stage}: {u.kind} failed: {e}") from e
            self._on_result(u, res)
        now = time.perf_counter()
        for u in self.units:
            if u.call is not None and now > u.deadline:
                timeout_s = self.cfg.reset_timeout_s if u.kind == "reset" else self.cfg.step_timeout_s
                self._restart(u.worker, f"{u.kind} of stage {u.stage} exceeded {timeout_s:g} s")
        return self.cfg.pipelined or all(u.call is None for u in self.units)

    def _wait(self, live: list[_Unit]) -> list[tuple[_Unit, Hashable]]:
        """The live units whose call is done: all of them (serial), whatever is done (a decode is
        pending), else at least one; never past the earliest deadline."""
        until_deadline = max(0.0, min(u.deadline for u in live) - time.perf_counter())
        if not self.cfg.pipelined:
            wait_all, timeout = True, until_deadline
        elif self.ready or self.inflight:
            wait_all, timeout = True, 0.0
        else:
            wait_all, timeout = False, until_deadline
        tw = time.perf_counter()
        done = set(self.pool.wait([u.call for u in live], timeout_s=timeout, wait_all=wait_all))
        self.stats.env_wait_s += time.perf_counter() - tw
        return [(u, u.call) for u in live if u.call in done]

    def _on_result(self, u: _Unit, res: SimResult) -> None:
        rows = np.asarray(res.rows, np.int64)
        self._check_ids(u, res, rows)
        if u.kind == "reset":
            if math.isnan(self.stats.first_result_s):
                self.stats.first_result_s = time.perf_counter() - self.t0
            ids, mask = self.dec.encode_prompts(list(res.instructions))
            self.buf.write_reset(rows, res.task_id, res.state_id, res.group_id, res.instructions, ids, mask)
        else:
            self.stats.env_calls += 1
            self.buf.write_outcome(rows, res.elapsed_steps, res.terminated)
        running = rows[np.asarray(res.active, bool)]
        if len(running):
            images = np.stack([np.asarray(res.images[c]) for c in self.pool.cameras], axis=1)  # (n, n_img, H, W, 3)
            self.buf.write_observation(running, images, np.asarray(res.proprio, np.float32))
        if self.on_step is not None:
            self.on_step(StepEvent(u.kind, u.worker, u.stage, rows.copy(), self.buf.calls[rows].copy()))
        if len(running):
            self.ready.append((u, running))

    def _check_ids(self, u: _Unit, res: SimResult, rows: np.ndarray) -> None:
        """Results are matched by the ids the worker echoes, never by arrival: refuse a mix-up."""
        where = f"sim worker {u.worker} stage {u.stage}"
        if not np.isin(rows, u.rows).all():
            raise RolloutError(f"{where} returned rows {rows.tolist()}, it holds {u.rows.tolist()}")
        if u.kind == "reset":
            if sorted(rows.tolist()) != sorted(u.rows.tolist()):
                raise RolloutError(f"{where} reset rows {rows.tolist()}, expected {u.rows.tolist()}")
            req = self.req
            want = (req.task_ids[rows], req.state_ids[rows], req.group_ids[rows])
            if any(not np.array_equal(x, y) for x, y in zip(want, (res.task_id, res.state_id, res.group_id))):
                raise RolloutError(f"{where}: reset ids do not match the request for rows {rows.tolist()}")
        elif not (np.array_equal(res.group_id, self.buf.group_id[rows])
                  and np.array_equal(res.task_id, self.buf.task_id[rows]) and self.buf.echoed[rows].all()):
            raise RolloutError(f"{where}: step result ids do not match the trajectories of rows {rows.tolist()} "
                               f"(mixed up)")

    def _restart(self, w: int, why: str) -> None:
        """Replace worker w and re-run all its episodes from their initial state."""
        self.restarts[w] += 1
        if self.restarts[w] > self.cfg.max_restarts:
            raise RolloutError(f"sim worker {w} failed {self.restarts[w]} times in this rollout "
                               f"(max_restarts={self.cfg.max_restarts}); last failure: {why}")
        log.warning("sim worker %d: %s; restarting it and re-running its episodes", w, why)
        self.pool.restart(w)
        self.stats.restarts += 1
        self.engine.total_restarts += 1
        now = time.perf_counter()
        for u in self.units:
            if u.worker == w:
                u.epoch += 1
                self.buf.clear(u.rows)
                self.engine._issue_reset(u, self.req, now)
        self.ready = [r for r in self.ready if r[0].worker != w]

    # ---- 2. one decode for every unit whose observations are in ----------------------------------
    def decode_ready_units(self) -> None:
        if not self.ready:
            return
        batch, self.ready = self.ready, []
        rows = np.concatenate([r for _, r in batch])
        x = self.buf.decode_inputs(rows)
        td = time.perf_counter()
        handle = self.dec.dispatch(x, temperature=self.temperature, key=self.key)
        st = self.stats
        st.dispatch_s += time.perf_counter() - td
        bucket = self.dec.bucket(len(rows))
        st.decode_calls += 1
        st.decoded_rows += len(rows)
        st.padded_rows += bucket
        st.decode_buckets[bucket] = st.decode_buckets.get(bucket, 0) + 1
        segments, off = [], 0
        for u, r in batch:
            segments.append(_Segment(u, u.epoch, r, slice(off, off + len(r))))
            off += len(r)
        self.inflight.append(_Decode(handle, segments, x.calls))

    # ---- 3. fetch the oldest decode and send its units their actions -----------------------------
    def act_on_oldest_decode(self) -> None:
        if not self.inflight:
            return
        d = self.inflight.popleft()
        tf = time.perf_counter()
        out = self.dec.fetch(d.handle)
        self.stats.decode_wait_s += time.perf_counter() - tf
        now = time.perf_counter()
        for seg in d.segments:
            u, sl = seg.unit, seg.part
            if seg.epoch != u.epoch:
                continue  # its worker was restarted meanwhile
            self.buf.write_decode(seg.rows, d.calls[sl], out.tokens[sl], out.logp[sl], out.actions[sl])
            u.call = self.pool.issue_step(u.worker, u.stage, seg.rows, out.actions[sl])
            u.kind = "step"
            u.deadline = now + self.cfg.step_timeout_s

    def finish(self) -> RolloutBatch:
        self.stats.wall_s = time.perf_counter() - self.t0
        self.stats.sim_busy_s = self.pool.take_busy()
        b = self.buf
        return RolloutBatch(
            trajectories=b.finish(), state_id=b.state_id, images=b.images, proprio=b.proprio,
            prompt_ids=b.prompt_ids, prompt_mask=b.prompt_mask, actions=b.actions, instructions=b.instructions,
            temperature=self.temperature, preprocess=dict(self.dec.preprocess), stats=self.stats)
