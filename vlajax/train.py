"""`vlajax train`: a config-driven GRPO run joining the policy, the simulators, the pipelined rollout
engine and the learner.

One training step (SimpleVLA-RL's recipe):
  1. draw `data.train_batch_size` initial states, run `rollout.n` episodes from each (one GRPO
     group per state) in rollout rounds of `envs_per_round` trajectories; with dynamic sampling keep
     only groups whose success rate is in [lower, upper] and roll out more rounds until the batch is
     full (at most `data.max_sampling_rounds`);
  2. advantages per trajectory (GRPO or REINFORCE++), one sample per policy call with its 56 tokens,
     tokens after the success step masked;
  3. `ppo_mini_batch_size` trajectories per optimizer step; the first rollout round of the next step
     is reset before the update so the resets overlap it (async mode: the whole next rollout runs);
  4. validate greedily every `trainer.test_freq`, log, then checkpoint every `trainer.save_freq`
     (the record first, so that no committed step lacks its record; the save's time is in the
     next step's `timing/checkpoint_s`).

Async mode (`actor_rollout_ref.rollout.mode=async`, one step off-policy): the next step's whole
rollout runs on a thread during this step's update, so the simulators keep stepping; it decodes with a
copy of the weights from before the update (+1x the trained parameters' memory; LoRA: the adapters),
and its log-probs are those weights', which the next update's PPO ratio divides by. No rollout runs
ahead of a validation, a checkpoint or the last step (only the next resets, as in sync mode): so a
checkpoint never has a rollout in flight, the step after it rolls out with the checkpointed weights
in both an uninterrupted and a resumed run, and async resumes are exact too.

Exact resume: rollout sampling keys derive from (seed, step, round; and the process id in a
multi-process job, `job.rollout_key`), env starts from (task, state, seed), the sampler position and
the learner state are checkpointed; so a run resumed after step k
computes the same steps as one that never stopped: bit-identical on CPU when a rollout round decodes
at most 32 rows (the demo's 16; `policy_step.default_buckets` says why), else the rollout's log-probs
can differ at float32 rounding, depending on how simulator timing groups the decodes. On GPUs only
the data order, sampling keys and restored state are exact. Groups carried over by
`data.keep_excess_groups=true` are not checkpointed, so exactness needs it false (the default,
and what SimpleVLA-RL's code does).

Several processes (one per train node, `trainer.nnodes` = the job's process count; launched with
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, SLURM, or `vlajax train`'s Ray launch): the
loop below is the single-process loop; every place where processes must agree is a method of
`vlajax.distributed.job.Job` (the identity for one process). The mesh is data = processes x fsdp = each
process's devices, so every process holds a full copy of the weights and decodes on its own devices
from a process-local view of them. Every process runs the same seeded sampler, draws each rollout
round's groups for the whole job and rolls out its own block on its own simulators (its own share of
the placement, `RunConfig.per_process`); dynamic sampling stops in lockstep; each mini-batch is one
global array of every process's rows; advantages see the job's whole batch (so REINFORCE++ whitens
job-wide); metrics are the job's and only process 0 writes logs, videos, the learning curve and the
evaluation table. Checkpoints are written by all processes (orbax) into the one run directory; the
sampler state in them is the same on every process, so a run resumes on the same or another process
count.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import jax
import numpy as np

from vlajax import stopping
from vlajax.compile_meter import CompileMeter
from vlajax.config import ConfigError, RunConfig, save_config, to_dict
from vlajax.distributed.job import Job
from vlajax.eval_report import write_eval_report
from vlajax.metrics import (TRAIN_SUCCESS, VAL_SUCCESS, MetricsLogger, Progress, Timer, plot_learning_curve,
                            resource_metrics)
from vlajax.model.family import get_family
from vlajax.rl.advantages import compute_advantages
from vlajax.rl.checkpoint import CheckpointManager
from vlajax.rl.data import StateSampler
from vlajax.rl.dynamic_sampling import GroupBuffer
from vlajax.rl.learner import Learner
from vlajax.rl.policy_step import bucket_size
from vlajax.rl.samples import make_samples, pad_samples, token_mask, trim_prompts
from vlajax.resume import restore_from, resume_source
from vlajax.session import Closing, SimSession, build_policy, policy_adapter, val_temperature
from vlajax.states import eval_states_line, select_pairs, train_states_line, training_trials

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- building blocks


def trajectory_advantages(cfg: RunConfig, traj, *, action_dim: int, chunk_len: int, job: Job | None = None) -> np.ndarray:
    """(N,) advantage per trajectory by `algorithm.adv_estimator`: GRPO within groups; REINFORCE++
    whitened over all valid *tokens* of the batch, as verl does (each trajectory weighted by its
    valid-token count, `samples.token_mask`).

    Several processes: the estimator sees the job's whole batch (every process's rewards, weights and
    group ids, all-gathered: a few floats per trajectory; every process has the same count) and each
    keeps its own rows, so a batch-wide baseline (REINFORCE++) is the job's, as on one process. GRPO's
    groups never straddle processes, so it gets the same values either way."""
    job = job or Job.current()
    rewards = traj.success.astype(np.float64) * cfg.env.train.reward_coef
    weights = token_mask(traj, action_dim=action_dim, chunk_len=chunk_len).sum(axis=(1, 2))
    # group ids are job-wide (one sampler), so they stay distinct
    (rewards, weights, group_ids), mine = job.job_wide(rewards, weights, np.asarray(traj.group_id, np.float64))
    group_ids = group_ids.astype(np.int64)
    adv = compute_advantages(cfg.algorithm.adv_estimator, rewards.astype(np.float32), group_ids,
                             token_weights=weights, norm_by_std=cfg.algorithm.norm_adv_by_std_in_grpo)
    return adv[mine]


def video_dir(cfg: RunConfig) -> str | None:
    """Where the final evaluation's videos go (`env.train.video_cfg`), or None."""
    v = cfg.env.train.video_cfg
    return (v.video_base_dir or str(cfg.run_dir / "videos")) if v.save_video else None


def add_rollout_timing(timer: Timer, stats, wall_s: float) -> None:
    """A rollout round in the step's phases. This process's time, disjoint (so "idle" stays true):
    "reset" (waiting for the first reset results), "env_wait" (waiting for simulators after that),
    "decode" (issuing and waiting for policy calls), "rollout_host" (the rest: gathering rows, buffers).
    Beside it, "sim": the busiest simulator worker's simulating seconds, which overlap the others."""
    first = stats.first_result_s if np.isfinite(stats.first_result_s) else 0.0
    reset = min(first, stats.env_wait_s)
    decode = stats.decode_wait_s + stats.dispatch_s
    timer.add("reset", reset)
    timer.add("env_wait", stats.env_wait_s - reset)
    timer.add("decode", decode)
    timer.add("rollout_host", max(0.0, wall_s - stats.env_wait_s - decode))
    busy = [b for b in stats.sim_busy_s if np.isfinite(b)]
    timer.add("sim", max(busy, default=0.0), concurrent=True)


class _Quiet:
    """Stands in for the logger and the progress bar on processes other than 0 (they write nothing)."""

    def log(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass



# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    steps: int
    history: list[dict]
    final_eval: dict | None
    primary: bool = True  # process 0 of the job (the one that wrote the run's logs)


class Trainer(Closing):
    """Owns everything a run starts (Ray session, sim pool, learner) and closes it on exit.

    Weights: the learner owns them; the rollout's decoder is handed `learner.decode_params()` at the
    start and after every update or restore (`_hand_over`), the same arrays, never a copy."""

    def __init__(self, cfg: RunConfig, job: Job | None = None):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._closers = []
        self.job = job = job or Job.join()
        if (problem := job.check_nnodes(cfg.trainer.nnodes)) is not None:
            raise ConfigError(problem, key="trainer.nnodes")
        t = cfg.env.train
        self.n = cfg.actor_rollout_ref.rollout.n
        self.async_rollout = cfg.actor_rollout_ref.rollout.mode == "async"
        self._next: tuple[threading.Thread, dict] | None = None  # async: the next step's rollout, running
        decode_devices = cfg.actor_rollout_ref.rollout.decode_devices
        self.mesh = cfg.trainer.mesh.build(job, decode_devices)
        self.decode_device = job.decode_device(decode_devices)  # None: decoding shares the learner's devices
        self.handoff = {"seconds": 0.0, "bytes": 0}  # weights copied to the decode device, this step
        lcfg = cfg.actor_rollout_ref.learner_config(self.mesh.size, policy_adapter(cfg).image_flip)
        # The built policy's arrays go to the learner; nothing else keeps them (a LoRA run's fp32
        # base would otherwise stay next to the learner's bf16 copy).
        self.learner = Learner(build_policy(cfg), lcfg, self.mesh)
        self.policy = self.learner.policy  # graph, tokenizer, statistics for the decoders
        self._closers.append(self.learner.close)
        self.sim_cfg = cfg.per_process(job.num_processes)  # this process's own simulators
        train_t, val_t = cfg.actor_rollout_ref.rollout.temperature, val_temperature(cfg)
        self.sim = SimSession(self.sim_cfg, self.policy, params=self._decode_params(),
                              temperatures=(val_t, train_t) if cfg.trainer.val_before_train else (train_t, val_t))
        self._closers.append(self.sim.close)
        self._closers.append(self._end_next_rollout)  # after the simulators it waits on are closed
        try:  # from here on, a failure closes the simulators it started
            self.engine, self.tasks = self.sim.engine, self.sim.tasks
            if self.sim.capacity % self.n:
                raise ConfigError(f"a rollout round runs {self.sim.capacity} trajectories, not a multiple of "
                                  f"actor_rollout_ref.rollout.n={self.n}", key="actor_rollout_ref.rollout.n")
            # groups of one rollout round of the whole job (every process draws them all)
            self.round_groups = self.sim.capacity * job.num_processes // self.n
            self.sampler = StateSampler(len(self.tasks), training_trials(cfg, self.tasks), seed=t.seed,
                                        shuffle=cfg.data.shuffle, init_states=t.init_states)
            # The update's prompt width, fixed for the run: every task's prompt fits, so a step whose
            # tasks have longer prompts than the last one's compiles nothing new (the padding columns
            # are masked: the logits are those of the trimmed prompt).
            ids, mask = self.sim.decoder.encode_prompts([task.instruction for task in self.tasks])
            self.prompt_width = trim_prompts(ids, mask)[0].shape[1]
            cams = cfg.env.train.init_params
            self.family = get_family(cfg.actor_rollout_ref.model.family)
            self.batch_spec = self.family.batch_spec(self.policy, image_shape=(cams.camera_heights, cams.camera_widths),
                                                     prompt_width=self.prompt_width)
            self._sample = {k: np.zeros((1, *f.shape), f.dtype) for k, f in self.batch_spec.items()}  # what compiles
            self._precompile(self._update_rows(self._most_samples()))  # while validation and step 1 roll out
            self.ckpt = CheckpointManager(self.run_dir / "checkpoints", save_interval_steps=1,
                                          max_to_keep=cfg.trainer.max_actor_ckpt_to_keep)
            self._closers.insert(0, self.ckpt.close)
            job.watch_peers(cleanup=self.sim.close)
        except BaseException:
            self.close()
            raise
        self.step = 0
        self.pending = None  # groups whose resets were issued before the update
        self.buffer = None  # dynamic-sampling buffer (carries excess groups if keep_excess_groups)
        self.key = jax.random.key(cfg.trainer.seed)

    # -- lifecycle ------------------------------------------------------------------------------
    def maybe_resume(self, source: tuple[str, int] | None) -> None:
        """Continue from `source` = (checkpoint root, step) as `resume_source` chose it (None: start
        fresh); a checkpoint of another run is only read. Prints what it resumed."""
        if source is None:
            return
        root, step = source
        restored = restore_from(self.learner, self.ckpt, root, step)
        self._hand_over()
        ds = restored.data_state or {}
        if "rl_step" not in ds or "sampler" not in ds:
            raise ConfigError(f"checkpoint {root}/{restored.step} has no training data state (sampler, RL step): "
                              "it is not a `vlajax train` checkpoint", key="trainer.resume")
        self.sampler.load_state_dict(ds["sampler"])
        self.step = int(ds["rl_step"])
        if self.primary:
            print(f"vlajax train: resumed from checkpoint {root}/{restored.step} at training step {self.step}",
                  flush=True)

    @property
    def primary(self) -> bool:
        return self.job.primary

    def _decode_params(self) -> dict:
        if self.decode_device is not None:  # a copy on the decode device (the frozen part once)
            return self.learner.decode_params(place=self._to_decode_device)
        # async: a copy, since the update that runs while the next rollout decodes donates the learner's
        return self.job.decode_view(self.learner.decode_params(copy=self.async_rollout), self.mesh)

    def _to_decode_device(self, tree: dict) -> dict:
        """The hand-off: `tree` copied to the decode device, timed and counted (`perf/handoff_*`)."""
        t0 = time.perf_counter()
        out = jax.block_until_ready(jax.device_put(self.job.decode_view(tree, self.mesh), self.decode_device))
        self.handoff["seconds"] += time.perf_counter() - t0
        self.handoff["bytes"] += sum(x.nbytes for x in jax.tree.leaves(out))
        return out

    def _hand_over(self) -> None:
        """Give the decoder the learner's current parameters (after an update or a restore)."""
        self.sim.decoder.set_params(self._decode_params())

    # -- rollouts -------------------------------------------------------------------------------
    def _round_groups(self):
        """This process's groups of the next rollout round: every process draws the whole round from
        its identical sampler (so the samplers stay equal) and keeps its own block."""
        return self.job.own_groups(self.sampler.next_groups(self.round_groups))

    def _ids(self, groups):
        rep = lambda xs: np.repeat(np.asarray(xs, np.int64), self.n)  # noqa: E731
        return (rep([g.task_id for g in groups]), rep([g.state_id for g in groups]),
                rep([g.group_id for g in groups]))

    def _rollout_round(self, groups, key, issued: bool):
        t_ids, s_ids, g_ids = self._ids(groups)
        if issued:
            return self.engine.rollout(key=key)
        return self.engine.rollout(t_ids, s_ids, g_ids, seed=self.cfg.env.train.seed, key=key)

    def collect(self, timer, step: int | None = None):
        """Roll out until the batch is full (dynamic sampling). Returns (GroupBatch, round stats).

        Several processes (lockstep rule): each keeps its own groups in a buffer of
        k = data.train_batch_size / processes; after every round all processes all-gather their kept
        counts and stop together once every one has k (or the round bound is reached: rounds are the
        same everywhere). Each then trains min(kept counts, k) groups, the same number on every process,
        so the step trains exactly data.train_batch_size groups when the batch filled, and fewer (as
        one process would, with its warning) only when the round bound cut it short.
        `step`: the completed steps the rollout's keys count from (default: `self.step`)."""
        step = self.step if step is None else step
        d = self.cfg.data
        lower, upper = (d.accuracy_lower_bound, d.accuracy_upper_bound) if d.filter_accuracy else (0.0, 1.0)
        if self.buffer is None:
            self.buffer = GroupBuffer(d.train_batch_size // self.job.num_processes, lower=lower, upper=upper,
                                      max_rounds=d.max_sampling_rounds, keep_excess=d.keep_excess_groups)
        buf = self.buffer
        rounds = []
        r = 0
        take = None  # groups to train (several processes: the same number on every one)
        while True:
            done, take = self.job.sampling_done(buf.num_groups, buf.groups_per_batch, buf.rounds, buf.max_rounds)
            if done:
                break
            groups, issued = (self.pending, True) if self.pending is not None else (self._round_groups(), False)
            self.pending = None
            key = self.job.round_key(self.key, step, r)
            t0 = time.perf_counter()
            rb = self._rollout_round(groups, key, issued)
            add_rollout_timing(timer, rb.stats, time.perf_counter() - t0)
            rounds.append(rb)
            stopping.check()  # a stop signal whose exception Python lost (vlajax.stopping)
            tr = rb.trajectories
            buf.add({"traj": tr, "images": rb.images, "proprio": rb.proprio, "prompt_ids": rb.prompt_ids,
                     "prompt_mask": rb.prompt_mask}, tr.success, tr.group_id)
            r += 1
        return buf.pop(limit=take), rounds

    def issue_next_reset(self) -> None:
        """Reset the envs of the next step's first round now, so the resets overlap the update."""
        self._sampler_before_pending = self.sampler.state_dict()
        groups = self._round_groups()
        t_ids, s_ids, g_ids = self._ids(groups)
        self.engine.start_reset(t_ids, s_ids, g_ids, seed=self.cfg.env.train.seed)
        self.pending = groups

    def start_next_rollout(self) -> None:
        """Async mode: roll out the next step on a thread now, during this step's update, with the
        weights as they are (a copy: the update donates the learner's). Its trajectories were sampled
        by those weights and carry their log-probs, which the next update's PPO ratio divides by.
        Not before a checkpoint (train() says why)."""
        self._hand_over()
        self._sampler_before_pending = self.sampler.state_dict()
        out: dict = {"timer": Timer()}
        step = self.step + 1

        def run() -> None:
            try:
                out["result"] = self.collect(out["timer"], step)
            except BaseException as e:  # raised in the main thread by `next_rollout`
                out["error"] = e

        thread = threading.Thread(target=run, name="vlajax-next-rollout", daemon=True)
        thread.start()
        self._next = (thread, out)

    def next_rollout(self, timer):
        """The rollout `start_next_rollout` began: waits for it; its phases join `timer` as concurrent
        (they ran beside the update)."""
        thread, out = self._next
        while thread.is_alive():
            thread.join(timeout=0.5)
            stopping.check()
        self._next = None
        if "error" in out:
            raise out["error"]
        timer.add_phases(out["timer"])
        return out["result"]

    def _end_next_rollout(self, timeout_s: float = 60.0) -> None:
        """On close (an error or Ctrl-C with a rollout in flight): wait for its thread, which fails
        out once the simulators are closed, so no thread is inside jax when Python finalizes."""
        if self._next is not None:
            self._next[0].join(timeout_s)
            self._next = None

    def data_state(self) -> dict:
        """Sampler position as of the end of this step: groups already drawn for a pending reset
        are drawn again by a resumed run."""
        if self._next is not None:
            raise RuntimeError("a checkpoint with a rollout in flight (train() starts none before a save)")
        sampler = self._sampler_before_pending if self.pending is not None else self.sampler.state_dict()
        return {"sampler": sampler, "rl_step": self.step}

    # -- update ---------------------------------------------------------------------------------
    def _most_samples(self) -> int:
        """The most samples (policy calls) a mini-batch of this process can have: every trajectory
        running to the episode limit."""
        procs, cfg = self.job.num_processes, self.cfg
        trajectories = max(1, cfg.data.train_batch_size * self.n // procs)
        return min(max(1, cfg.actor_rollout_ref.actor.ppo_mini_batch_size // procs), trajectories) * self.engine.max_chunks

    def _update_rows(self, samples: int) -> int:
        """The global rows of an update whose fullest process has `samples` samples: padded to the
        row buckets (`bucket_size`), the same on every process."""
        procs = self.job.num_processes
        return bucket_size(samples, self.learner.batch_multiple // procs) * procs

    def _precompile(self, rows: int) -> None:
        """Compile the update for `rows` in the background (a no-op if it was), so no step waits for it:
        the fullest bucket before step 1, and after each update the next smaller one, where the
        mini-batches go as episodes get shorter."""
        if rows >= self.learner.batch_multiple and rows % self.learner.batch_multiple == 0:
            self.learner.precompile(self._sample, rows)

    def update(self, batch) -> list[dict]:
        cfg, pc = self.cfg, self.policy.cfg
        tr = batch.trajectories
        traj = tr["traj"]
        adv = trajectory_advantages(cfg, traj, action_dim=pc.action_dim, chunk_len=pc.chunk, job=self.job)
        n_traj = len(traj.success)  # this process's (the same on every process)
        procs = self.job.num_processes
        mb = min(max(1, cfg.actor_rollout_ref.actor.ppo_mini_batch_size // procs), n_traj)
        self.learner.set_lr(cfg.actor_rollout_ref.actor.optim.learning_rate(self.step))
        out = []
        for epoch in range(cfg.actor_rollout_ref.actor.ppo_epochs):
            order = np.random.default_rng([cfg.trainer.seed, self.step, epoch]).permutation(n_traj)
            for start in range(0, n_traj, mb):
                idx = np.sort(order[start:start + mb])
                sub = jax.tree.map(lambda x: x[idx], tr)
                s = make_samples(sub["traj"], adv[idx], action_dim=pc.action_dim, chunk_len=pc.chunk)
                rows, _ = self.job.agree_rows(len(s), self.prompt_width)  # one global batch, one shape
                if rows == 0:
                    continue
                s = pad_samples(s, bucket_size(rows, self.learner.batch_multiple // procs))
                w = self.prompt_width
                ids, mask = sub["prompt_ids"][s.traj_index][:, :w], sub["prompt_mask"][s.traj_index][:, :w]
                b = {"images": sub["images"][s.traj_index, s.chunk_index], "input_ids": ids,
                     "attention_mask": mask, "tokens": s.tokens,
                     "old_logp": s.old_logp, "advantages": s.advantages, "mask": s.mask}
                if pc.proprio_dim:
                    b["proprio"] = self.sim.decoder.model_proprio(sub["proprio"][s.traj_index, s.chunk_index])
                m = self.learner.update(self.job.global_batch(b, self.mesh, {k: f.dtype for k, f in self.batch_spec.items()}))
                if not self.async_rollout:  # async: the rollout in flight keeps its weights (train() hands over)
                    self._hand_over()
                if self.step + 1 < self.cfg.trainer.total_training_steps:  # no update follows the last step's
                    self._precompile(self._update_rows(rows) // 2)
                out.append(self.job.scalars(m))
        return out

    # -- validation -----------------------------------------------------------------------------
    def validate(self, num_trials: int | None = None, video_dir: str | None = None) -> dict:
        """Validation episodes (`val_kwargs`: greedy by default, or `n` sampled ones per state) from
        every task's first `num_trials` stored init states (padded to whole rounds), also when training
        starts from sampled states (`env.train.init_states`).
        With `video_dir` they run in a fresh simulator session that records them (the training
        session is closed first: this is for the final evaluation)."""
        n_trials = num_trials or self.cfg.data.val_num_trials_per_task or self.sampler.num_trials
        reps = self.cfg.actor_rollout_ref.rollout.val_kwargs.n
        pairs = [p for p in select_pairs(self.tasks, None, n_trials) for _ in range(reps)]
        temp = val_temperature(self.cfg)
        job = self.job
        mine = job.share(pairs)  # one process: all of them
        if video_dir is None:
            res = self.sim.evaluate(mine, temperature=temp, stream=job.stream)
        else:  # the final evaluation records videos, each process its own share
            self.sim.close()
            with SimSession(self.sim_cfg, self.policy, params=self._decode_params(), temperatures=(temp,),
                            video_dir=job.own_folder(video_dir)) as sim:
                res = sim.evaluate(mine, temperature=temp, stream=job.stream)
        results = job.gather_episodes(pairs, res, [t.name for t in self.tasks])
        return {"episodes": results, "success_rate": float(np.mean([r["success"] for r in results]))}


def _step_metrics(trainer: Trainer, rounds, batch, upd: list[dict], timing: dict) -> dict:
    succ = np.concatenate([rb.trajectories.success for rb in rounds])
    tasks = np.concatenate([rb.trajectories.task_id for rb in rounds])
    length = np.concatenate([rb.trajectories.finish_step for rb in rounds])
    env_steps = int(length.sum())
    sim_s = sum(rb.stats.wall_s for rb in rounds)
    decoded = sum(rb.stats.decoded_rows for rb in rounds)
    m = {"train/success_rate": float(succ.mean()), "train/successes": int(succ.sum()), "train/episodes": len(succ),
         "train/episode_length": float(length.mean()),
         "train/env_steps": env_steps, "perf/env_steps_per_s": env_steps / max(sim_s, 1e-9),
         "perf/policy_tflops": decoded * trainer.family.flops_per_row(trainer.policy, trainer.sim.decoder.prompt_len) / 1e12
         / max(sum(rb.stats.decode_wait_s + rb.stats.dispatch_s for rb in rounds), 1e-9),
         "rollout/rounds": len(rounds), "rollout/restarts": sum(rb.stats.restarts for rb in rounds),
         "rollout/sim_busy_fraction": float(np.nanmean([rb.stats.sim_busy_fraction for rb in rounds])),
         "rollout/wall_s": sim_s, "rollout/first_result_s": rounds[0].stats.first_result_s,
         "rollout/sim_busy_s": float(sum(np.nanmax(rb.stats.sim_busy_s) for rb in rounds if rb.stats.sim_busy_s)),
         **resource_metrics()}
    for rb in rounds:
        for b, n in rb.stats.decode_buckets.items():
            m[f"rollout/decode_calls_b{b}"] = m.get(f"rollout/decode_calls_b{b}", 0) + n
    for ti in np.unique(tasks):
        m[f"train/success_rate/{trainer.tasks[int(ti)].name}"] = float(succ[tasks == ti].mean())
    if batch is not None:
        m.update({f"sampling/{k}": v for k, v in batch.metrics.items()})
    if upd:
        for k in upd[0]:
            m[f"actor/{k}"] = float(np.mean([u[k] for u in upd]))
        m["actor/updates"] = len(upd)
    m.update(timing)
    return m


def train(cfg: RunConfig, job: Job | None = None) -> TrainResult:
    """Run (or resume) the GRPO run described by `cfg` as this process of `job` (default: join the one
    the launch environment describes, before anything starts jax's backend); returns its history."""
    job = job or Job.join()
    if (problem := job.check_nnodes(cfg.trainer.nnodes)) is not None:
        raise ConfigError(problem, key="trainer.nnodes")
    primary = job.primary
    run_dir = cfg.run_dir
    source = resume_source(cfg)  # before anything starts (Ray, the model) or is written
    history = []
    # from here: step 1's record counts the warm-up (the update compiled ahead, validation's decodes)
    compiles = CompileMeter({"update": "_update", "decode": "decode_step"})
    with Trainer(cfg, job) as tr:
        tr.maybe_resume(source)
        if primary:  # once the run is sure to go on: a refused command leaves the run's config as it was
            save_config(cfg, run_dir)
        logger = MetricsLogger(run_dir, backends=tuple(cfg.trainer.logger), wandb_project=cfg.trainer.project_name,
                               experiment_name=cfg.trainer.experiment_name,
                               config=to_dict(cfg), start_step=tr.step + 1 if tr.step else 0,  # keep the resumed step's own record
                               total_steps=cfg.trainer.total_training_steps) if primary else _Quiet()
        total = cfg.trainer.total_training_steps
        if cfg.trainer.val_before_train and tr.step == 0:
            v = tr.validate()
            logger.log(0, {"val/success_rate": v["success_rate"]})
        progress = Progress(total - tr.step, desc="GRPO steps", unit="step") if primary else _Quiet()
        try:
            timer = Timer()
            while tr.step < total:
                if tr._next is not None:  # async: rolled out during the last update
                    with timer("rollout_wait"):
                        batch, rounds = tr.next_rollout(timer)
                else:
                    batch, rounds = tr.collect(timer)
                nxt = tr.step + 1
                val_due = cfg.trainer.test_freq > 0 and (nxt % cfg.trainer.test_freq == 0 or nxt == total)
                save_due = cfg.trainer.save_freq > 0 and nxt % cfg.trainer.save_freq == 0
                if nxt < total and not val_due:  # validation uses the same simulators: nothing runs ahead of it
                    if tr.async_rollout and not save_due:  # the next step's whole rollout during this update
                        tr.start_next_rollout()
                    else:  # the next step's resets during this update (they do not depend on the weights)
                        with timer("reset"):
                            tr.issue_next_reset()
                upd, ahead = [], tr.learner.precompiled_hits
                if batch is not None:
                    with timer("update"):
                        upd = tr.update(batch)
                    if tr.async_rollout and tr._next is None:  # validation and the final evaluation
                        tr._hand_over()
                tr.step += 1
                m = _step_metrics(tr, rounds, batch, upd, timer.breakdown())
                m["perf/updates_precompiled"] = tr.learner.precompiled_hits - ahead  # of len(upd) optimizer steps
                if tr.decode_device is not None:  # the weights' copies to the decode device since the last record
                    m["perf/handoff_s"], m["perf/handoff_bytes"] = tr.handoff["seconds"], tr.handoff["bytes"]
                    tr.handoff = {"seconds": 0.0, "bytes": 0}
                m = job.aggregate(m)  # job-wide values, the same on every process
                if val_due:  # validation uses the same envs, so the next resets wait for it
                    v = tr.validate()
                    m["val/success_rate"] = v["success_rate"]
                m.update(compiles.take())  # this process's (each compiles the same), validation's included
                # logged before its checkpoint starts: a committed step always has its record (a record
                # past the last commit is dropped on resume and the step run again)
                logger.log(tr.step, m)
                history.append(m)
                progress.update(1, successes=m["train/successes"], episodes=m["train/episodes"],
                                env_steps=m["train/env_steps"])
                timer = Timer()  # the next step's: its "checkpoint" phase is this step's save
                if (cfg.trainer.save_freq > 0 and tr.step % cfg.trainer.save_freq == 0) or tr.step == total:
                    with timer("checkpoint"):
                        tr.learner.save(tr.ckpt, step=tr.step, data_state=tr.data_state(), config=to_dict(cfg),
                                        force=True)
            tr.ckpt.wait_until_finished()
            final = tr.validate(video_dir=video_dir(cfg))
            t = val_temperature(cfg)
            e = cfg.env.train
            notes = [eval_states_line(e.simulator_type, tr.tasks, [ep["state_id"] for ep in final["episodes"]]),
                     train_states_line(e.simulator_type, e.init_states, tr.sampler.num_trials)]
            if primary:
                write_eval_report(final["episodes"], run_dir / "eval", name="final", notes=notes,
                                  title="final evaluation, " + (f"sampled at temperature {t:g}" if t else "greedy"))
        finally:
            progress.close()
            logger.close()
        t = val_temperature(cfg)
        val = f"validation (sampled, T={t:g})" if t else "validation (greedy)"
        if primary and "jsonl" in cfg.trainer.logger:  # the curve is drawn from the JSONL record
            plot_learning_curve(run_dir / "metrics.jsonl", run_dir / "learning_curve.png",
                                keys=((TRAIN_SUCCESS, "train (sampled rollouts)"), (VAL_SUCCESS, val)))
        return TrainResult(run_dir, tr.step, history, final, primary)
