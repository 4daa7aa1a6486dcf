"""The pipelined rollout loop: Ray sim actors step envs while the host decodes other envs' actions.

Pipeline
--------
N = workers x stages x envs trajectories. Trajectory row n lives on worker w = n // (S*E), stage
s = (n // E) % S, env slot n % E (worker-major, contiguous: the rollout.n repeats of one initial
state usually share a stage). A (worker, stage) pair is a *unit*; units advance independently,
there is no barrier across stages or workers:

    loop:
      poll the units' outstanding env calls (`ray.wait`; it blocks only when no decode is
        in flight and none is ready to issue)
      for every unit whose observations arrived: gather its *running* envs' rows
      issue ONE jitted decode for all of them (JAX async dispatch: returns at once)
      fetch the oldest decode in flight (blocks on the device), turn tokens into actions and
        send each unit its actions (`actor.step.remote`, returns an ObjectRef at once)

So while a sim actor steps one stage, the host decodes for the units whose results are in, and a
decode is always issued before the host blocks on an earlier one. With the default
`concurrent_stages=False` an actor simulates one stage at a time, so S = 2 stages keep it busy as
long as a decode is shorter than a stage's step (the reference's ping-pong, without its per-step
barrier). `RolloutConfig(pipelined=False)` turns the same loop into the serial baseline: wait for
every unit, decode everything, step everything.

Finished envs (success or episode limit) leave the batch: the actor does not step them (it is
sent only running rows) and the host does not decode for them. Decode batches are padded to a
few fixed bucket sizes (`PolicyDecoder.buckets`), so shapes do not recompile as envs finish.

`start_reset(...)` issues the next rollout's env resets and returns at once (call it before the
learner's update, so the resets overlap it); the next `rollout()` consumes them. Greedy evaluation
(`evaluate`, temperature 0) runs the same loop.

Trajectory layout (`RolloutBatch`)
----------------------------------
Row n of every array is request row n (`task_ids[n]`, `state_ids[n]`, `group_ids[n]`): the ids are
sent with the envs at reset, echoed by the actor with every result, and results are written by the
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

Faults: when a sim actor dies, a simulator process inside it crashes or hangs (`EnvWorkerError`
in the actor, `SimEnvFailure` here), or a call exceeds its timeout, the actor is replaced (`SimPool.restart`) and all the
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
from typing import Any, Callable, Sequence

import jax
import numpy as np
import ray

from vlajax.distributed.ray_sim import SimEnvFailure, SimPool
from vlajax.rl.policy_step import DecodeInputs, Decoder, default_buckets
from vlajax.rl.samples import Trajectories

log = logging.getLogger(__name__)

__all__ = ["RolloutBatch", "RolloutConfig", "RolloutEngine", "RolloutError", "RolloutStats", "StepEvent"]


class RolloutError(RuntimeError):
    """The rollout cannot complete (bad request, a simulator error that a restart cannot fix)."""


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """temperature: sampling temperature of `rollout` (`evaluate` uses 0 = greedy).
    pipelined: False = the serial baseline (barrier: step all, then decode all).
    step_timeout_s / reset_timeout_s: an env call (reset includes a restarted actor's start-up)
        that takes longer is treated as a dead actor.
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
    env_calls: actor step calls; restarts: actor replacements in this rollout.
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
    worker: int
    stage: int
    rows: np.ndarray  # (E,) trajectory rows, slot order
    ref: Any = None  # outstanding ObjectRef
    kind: str = ""  # "reset" | "step"
    deadline: float = 0.0
    epoch: int = 0  # bumped on restart: decodes of an older epoch are dropped


@dataclasses.dataclass
class _Request:
    task_ids: np.ndarray
    state_ids: np.ndarray
    group_ids: np.ndarray
    seed: int


class RolloutEngine:
    """Drives a `SimPool` with a `Decoder` (e.g. `PolicyDecoder`). See the module docstring.

    The engine does not own the pool: close it (and the Ray session) yourself.
    """

    def __init__(self, pool: SimPool, decoder: Decoder, cfg: RolloutConfig | None = None):
        self.pool = pool
        self.decoder = decoder
        self.cfg = cfg or RolloutConfig()
        info = pool.infos[0]
        if info["action_dim"] != decoder.action_dim:
            raise RolloutError(f"the envs take {info['action_dim']}-d actions, the policy emits {decoder.action_dim}")
        if len(pool.cameras) != decoder.num_images:
            raise RolloutError(f"the pool returns cameras {pool.cameras} but the policy takes "
                               f"{decoder.num_images} image(s)")
        self.tasks = info["tasks"]  # (name, instruction, num_init_states, max_episode_steps)
        limit = info["max_episode_steps"] or max(t[3] for t in self.tasks)
        self.max_episode_steps = int(limit)
        self.max_chunks = math.ceil(self.max_episode_steps / decoder.chunk_len)
        self.capacity = pool.capacity
        if hasattr(decoder, "buckets") and decoder.buckets is None:
            decoder.buckets = default_buckets(self.capacity)  # fixed decode shapes as envs finish
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
        refs = [u.ref for u in self._units if u.ref is not None]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        return len(ready) == len(refs)

    def rollout(self, task_ids: Sequence[int] | None = None, state_ids: Sequence[int] | None = None,
                group_ids: Sequence[int] | None = None, *, seed: int = 0, temperature: float | None = None,
                key: jax.Array | None = None, on_step: Callable[[StepEvent], None] | None = None) -> RolloutBatch:
        """Run one rollout: of the ids given here, or of the last `start_reset` (then pass none).

        temperature: default `cfg.temperature`; 0 = greedy. key: sampling key (default: derived
        from cfg.seed and a rollout counter). on_step: progress callback (StepEvent)."""
        t0 = time.perf_counter()
        busy_refs = [a.take_busy.remote() for a in self.pool.actors]  # clears the clocks
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
        del busy_refs
        try:
            return self._run(req, temperature, key, on_step, t0)
        except BaseException:
            # Leave no half-done state behind: the next rollout resets every env anyway.
            for u in self._units:
                u.ref = None
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
            if not 0 <= si < self.tasks[ti][2]:
                raise RolloutError(f"row {i} (task {self.tasks[ti][0]}): state id {si} out of range "
                                   f"(0..{self.tasks[ti][2] - 1})")
        if group_ids is None:
            _, g = np.unique(np.stack([t, s], 1), axis=0, return_inverse=True)
            g = g.reshape(-1).astype(np.int64)
        else:
            g = np.asarray(group_ids, np.int64).reshape(-1)
            if g.shape != (n,):
                raise RolloutError(f"group_ids must have {n} entries, got {g.size}")
        return _Request(t, s, g, int(seed))

    def _issue_reset(self, u: _Unit, req: _Request, now: float) -> None:
        actor = self.pool.actors[u.worker]
        r = u.rows
        u.ref = actor.reset.remote(u.stage, r, req.task_ids[r], req.state_ids[r], req.group_ids[r], req.seed)
        u.kind = "reset"
        u.deadline = now + self.cfg.reset_timeout_s

    def _run(self, req: _Request, temperature: float, key, on_step, t0: float) -> RolloutBatch:
        cfg, dec = self.cfg, self.decoder
        n, c_max, t_tok = self.capacity, self.max_chunks, dec.num_tokens
        k, a = dec.chunk_len, dec.action_dim
        stats = RolloutStats()
        restarts = collections.Counter()
        tokens = np.zeros((n, c_max, t_tok), np.int32)
        logp = np.zeros((n, c_max, t_tok), np.float32)
        valid = np.zeros((n, c_max), bool)
        actions = np.zeros((n, c_max, k, a), np.float32)
        success = np.zeros(n, bool)
        finish = np.zeros(n, np.int32)
        calls = np.zeros(n, np.int32)
        echoed = np.zeros(n, bool)  # ids confirmed by the actor
        group = np.full(n, -1, np.int64)
        task = np.full(n, -1, np.int64)
        state = np.full(n, -1, np.int64)
        instructions = [""] * n
        prompt_ids = prompt_mask = images = proprio = None
        units = self._units
        ready: list[tuple[_Unit, np.ndarray, np.ndarray, np.ndarray]] = []  # unit, rows, images, proprio
        inflight: collections.deque = collections.deque()

        def clear_rows(rows):
            for arr in (tokens, logp, valid, actions, success, finish, calls, echoed):
                arr[rows] = 0
            if images is not None:
                images[rows] = 0
                proprio[rows] = 0

        def restart(w: int, why: str) -> None:
            nonlocal ready
            restarts[w] += 1
            if restarts[w] > cfg.max_restarts:
                raise RolloutError(f"sim worker {w} failed {restarts[w]} times in this rollout "
                                   f"(max_restarts={cfg.max_restarts}); last failure: {why}")
            log.warning("sim worker %d: %s; restarting it and re-running its episodes", w, why)
            self.pool.restart(w)
            stats.restarts += 1
            self.total_restarts += 1
            now = time.perf_counter()
            for u in units:
                if u.worker == w:
                    u.epoch += 1
                    clear_rows(u.rows)
                    self._issue_reset(u, req, now)
            ready = [r for r in ready if r[0].worker != w]

        def on_result(u: _Unit, res: dict) -> None:
            nonlocal prompt_ids, prompt_mask, images, proprio
            rows = np.asarray(res["rows"], np.int64)
            if not np.isin(rows, u.rows).all():
                raise RolloutError(f"sim worker {u.worker} stage {u.stage} returned rows {rows.tolist()}, "
                                   f"it holds {u.rows.tolist()}")
            if u.kind == "reset":
                if sorted(rows.tolist()) != sorted(u.rows.tolist()):
                    raise RolloutError(f"sim worker {u.worker} stage {u.stage} reset rows {rows.tolist()}, "
                                       f"expected {u.rows.tolist()}")
                want = (req.task_ids[rows], req.state_ids[rows], req.group_ids[rows])
                got = (res["task_id"], res["state_id"], res["group_id"])
                if any(not np.array_equal(x, y) for x, y in zip(want, got)):
                    raise RolloutError(f"sim worker {u.worker} stage {u.stage}: reset ids do not match the request "
                                       f"for rows {rows.tolist()}")
                group[rows], task[rows], state[rows] = got[2], got[0], got[1]
                echoed[rows] = True
                for r, text in zip(rows, res["instructions"]):
                    instructions[r] = text
                ids, mask = dec.encode_prompts(list(res["instructions"]))
                if prompt_ids is None:
                    prompt_ids = np.zeros((n, ids.shape[1]), np.int32)
                    prompt_mask = np.zeros((n, ids.shape[1]), np.int32)
                prompt_ids[rows], prompt_mask[rows] = ids, mask
                obs_rows = rows
            else:
                if not (np.array_equal(res["group_id"], group[rows]) and np.array_equal(res["task_id"], task[rows])
                        and echoed[rows].all()):
                    raise RolloutError(f"sim worker {u.worker} stage {u.stage}: step result ids do not match the "
                                       f"trajectories of rows {rows.tolist()} (mixed up)")
                finish[rows] = res["elapsed_steps"]
                success[rows] = res["terminated"]
                obs_rows = rows[res["active"]]
            cams = [np.asarray(res["images"][c]) for c in self.pool.cameras]
            img = np.stack(cams, axis=1)  # (n, n_img, H, W, 3)
            pro = np.asarray(res["proprio"], np.float32)
            if images is None and len(obs_rows):
                images = np.zeros((n, c_max) + img.shape[1:], np.uint8)
                proprio = np.zeros((n, c_max, pro.shape[-1]), np.float32)
            if on_step is not None:
                on_step(StepEvent(u.kind, u.worker, u.stage, rows.copy(), calls[rows].copy()))
            if len(obs_rows):
                ready.append((u, obs_rows, img, pro))

        while True:
            live = [u for u in units if u.ref is not None]
            if not live and not ready and not inflight:
                break
            # 1. poll env results
            if live:
                now = time.perf_counter()
                refs = [u.ref for u in live]
                if not cfg.pipelined:
                    want, timeout = len(refs), max(0.0, min(u.deadline for u in live) - now)
                elif ready or inflight:
                    want, timeout = len(refs), 0.0
                else:
                    want, timeout = 1, max(0.0, min(u.deadline for u in live) - now)
                tw = time.perf_counter()
                done_refs, _ = ray.wait(refs, num_returns=want, timeout=timeout)
                if cfg.pipelined and want == 1 and len(done_refs) < len(refs):
                    more, _ = ray.wait([r for r in refs if r not in done_refs], num_returns=len(refs) - len(done_refs),
                                       timeout=0)
                    done_refs += more
                stats.env_wait_s += time.perf_counter() - tw
                done_set = set(done_refs)
                for u in live:
                    if u.ref is None or u.ref not in done_set:
                        continue
                    ref, u.ref = u.ref, None
                    try:
                        res = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        if isinstance(e, SimEnvFailure) or isinstance(getattr(e, "cause", None), SimEnvFailure):
                            cause = str(getattr(e, "cause", e)).strip().splitlines()
                            restart(u.worker, f"a simulator process failed ({cause[0]} ... {cause[-1]})")
                            continue
                        cause = getattr(e, "cause", None) or e
                        raise RolloutError(f"sim worker {u.worker} stage {u.stage}: {u.kind} failed: {cause}") from e
                    except ray.exceptions.RayError as e:  # actor died, node lost, ...
                        restart(u.worker, f"{type(e).__name__} during {u.kind}")
                        continue
                    if u.kind == "step":
                        stats.env_calls += 1
                    elif math.isnan(stats.first_result_s):  # the first reset result
                        stats.first_result_s = time.perf_counter() - t0
                    on_result(u, res)
                now = time.perf_counter()
                for u in units:
                    if u.ref is not None and now > u.deadline:
                        timeout_s = cfg.reset_timeout_s if u.kind == "reset" else cfg.step_timeout_s
                        restart(u.worker, f"{u.kind} of stage {u.stage} exceeded {timeout_s:g} s")
                if not cfg.pipelined and any(u.ref is not None for u in units):
                    continue  # serial: decode only when every unit's result is in
            # 2. one decode for every unit whose observations are in
            if ready:
                batch_units, ready = ready, []
                rows = np.concatenate([r[1] for r in batch_units])
                c_idx = calls[rows]
                if (c_idx >= c_max).any():
                    raise RolloutError(f"rows {rows[c_idx >= c_max].tolist()} still running after {c_max} "
                                       f"policy calls ({self.max_episode_steps} env steps)")
                img = np.concatenate([r[2] for r in batch_units])
                pro = np.concatenate([r[3] for r in batch_units])
                images[rows, c_idx] = img
                proprio[rows, c_idx] = pro
                x = DecodeInputs(images=img, input_ids=prompt_ids[rows], attention_mask=prompt_mask[rows],
                                 proprio=pro, rows=rows.astype(np.int32), calls=c_idx.astype(np.int32))
                td = time.perf_counter()
                handle = dec.dispatch(x, temperature=temperature, key=key)
                stats.dispatch_s += time.perf_counter() - td
                bucket = dec.bucket(len(rows)) if hasattr(dec, "bucket") else len(rows)
                stats.decode_calls += 1
                stats.decoded_rows += len(rows)
                stats.padded_rows += bucket
                stats.decode_buckets[bucket] = stats.decode_buckets.get(bucket, 0) + 1
                segs = []
                off = 0
                for u, r, _, _ in batch_units:
                    segs.append((u, u.epoch, r, slice(off, off + len(r))))
                    off += len(r)
                inflight.append((handle, segs, c_idx))
            # 3. fetch the oldest decode and send its units their actions
            if inflight:
                handle, segs, c_idx = inflight.popleft()
                tf = time.perf_counter()
                out = dec.fetch(handle)
                stats.decode_wait_s += time.perf_counter() - tf
                now = time.perf_counter()
                for u, epoch, r, sl in segs:
                    if epoch != u.epoch:
                        continue  # its worker was restarted meanwhile
                    c = c_idx[sl]
                    tokens[r, c] = out.tokens[sl]
                    logp[r, c] = out.logp[sl]
                    actions[r, c] = out.actions[sl]
                    valid[r, c] = True
                    calls[r] = c + 1
                    u.ref = self.pool.actors[u.worker].step.remote(u.stage, r, out.actions[sl])
                    u.kind = "step"
                    u.deadline = now + cfg.step_timeout_s

        stats.wall_s = time.perf_counter() - t0
        stats.sim_busy_s = self.pool.take_busy()
        if not echoed.all():
            raise RolloutError(f"rows {np.flatnonzero(~echoed).tolist()} were never reset")
        traj = Trajectories(actions_tokens=tokens, old_logp=logp, chunk_valid=valid, success=success,
                            finish_step=finish, group_id=group, task_id=task)
        traj.validate(action_dim=a, chunk_len=k)
        return RolloutBatch(
            trajectories=traj, state_id=state, images=images, proprio=proprio, prompt_ids=prompt_ids,
            prompt_mask=prompt_mask, actions=actions, instructions=instructions, temperature=temperature,
            preprocess=dict(getattr(dec, "preprocess", {})), stats=stats)
