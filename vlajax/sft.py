"""`vlajax sft`: supervised fine-tuning of the OFT policy on LIBERO demonstrations, so that a user with
the OpenVLA base checkpoint (or none: `preset:small`) gets the SFT policy GRPO starts from.

Why it is built from the RL pieces: SFT must train exactly what RL later samples. One sample is frame t
of an episode: its camera image(s) as rendered, preprocessed inside the learner's step by the same
`preprocess_images` options the rollout decoder uses (180° flip, resize, centre crop; in training a
random crop of the same area instead, OFT's augmentation); the instruction encoded by the decoder's
`encode_prompts`; proprio normalised by the decoder's `model_proprio`; and as target the chunk
actions[t:t+K] (past the episode's end the last action repeats, as OpenVLA-OFT pads) turned into the
K x 7 tokens the decoder un-discretises (`vlajax.model.oft.actions.actions_to_tokens`, its inverse). The
update is the GRPO learner with objective "nll" (token-mean cross-entropy at temperature 1): the
same sharded step, micro-batches, remat, LoRA or full parameters, clipping, AdamW, checkpoints.

Statistics: BOUNDS_Q99 q01/q99 of the training episodes' actions (after the LIBERO gripper transform,
as OFT computes them) and proprio, stored as `dataset_statistics.json` under the suite's key (what
`SimulatorSpec.unnorm_key` looks up: `libero_spatial`, ...), in the run directory and in the export.
A resumed run keeps the statistics it started with (the targets must not move under it).

Around the updates: checkpoints every `trainer.save_freq` steps (`trainer.resume` as in `vlajax
train`), metrics to JSONL/TensorBoard, every `trainer.test_freq` steps the held-out episodes' token
accuracy and greedy success in the simulator on the fixed init states of the demonstrated tasks
(`SimSession.evaluate`, as training's validation), and at the end a Hugging Face-layout export
(`<run>/export/step_<N>`: weights with LoRA merged, config.json, tokenizer, dataset_statistics.json)
that `vlajax train ... actor_rollout_ref.model.path=<export>` loads like a downloaded checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from vlajax.config import ConfigError, RunConfig, save_config, to_dict
from vlajax.data import DatasetError, Episode, action_statistics, proprio_statistics, read_dataset
from vlajax.distributed.job import Job
from vlajax.metrics import MetricsLogger, Progress, Timer, resource_metrics
from vlajax.model.oft.actions import ActionStats, actions_to_tokens, gripper_target, load_action_stats
from vlajax.resume import restore_from, resume_source
from vlajax.rl.checkpoint import CheckpointManager
from vlajax.rl.learner import Learner
from vlajax.rl.lora import merged_policy
from vlajax.rl.policy_step import PolicyDecoder, bucket_size
from vlajax.rl.samples import trim_prompts
from vlajax.session import SimSession, build_policy, policy_adapter, val_temperature
from vlajax.states import select_pairs

log = logging.getLogger(__name__)

STATS_FILE = "dataset_statistics.json"  # the run's statistics (HF name), beside config.yaml
EXPORT_DIR = "export"


# ----------------------------------------------------------------------------- data


def action_chunks(actions: np.ndarray, chunk: int) -> np.ndarray:
    """(T, A) actions -> (T, chunk, A): row t = actions[t:t+chunk], the last action repeated past the
    episode's end (OpenVLA-OFT's `chunk_act_obs` clamps the indices the same way)."""
    t = actions.shape[0]
    idx = np.minimum(np.arange(t)[:, None] + np.arange(chunk)[None, :], t - 1)
    return actions[idx]


def split_held_out(episodes: Sequence[Episode], per_task: int) -> tuple[list[Episode], list[Episode]]:
    """(training, held-out): the last `per_task` episodes of each task are held out, unless that
    would leave the task without a training episode."""
    by_task: dict[str, list[Episode]] = defaultdict(list)
    for ep in episodes:
        by_task[ep.task].append(ep)
    train, held = [], []
    for eps in by_task.values():
        k = per_task if len(eps) > per_task else 0
        train += eps[:len(eps) - k]
        held += eps[len(eps) - k:]
    return train, held


def dataset_statistics(episodes: Sequence[Episode], key: str, gripper: str | None) -> dict:
    """`dataset_statistics.json` content of `episodes` under `key`: OpenVLA's action entry (over the
    policy's targets, i.e. after the gripper transform), proprio entry and counts."""
    targets = [dataclasses.replace(ep, actions=gripper_target(ep.actions, gripper)) for ep in episodes]
    return {key: {"action": action_statistics(targets), "proprio": proprio_statistics(episodes),
                  "num_transitions": int(sum(ep.length for ep in episodes)), "num_trajectories": len(episodes)}}


class FrameSet:
    """Every frame of some episodes as learner samples (images stay in the episodes; targets and
    prompts are computed once).

    index (N, 2) int: (episode, t) of sample i; tokens (N, K*A) int32 target columns; prompt ids
    and masks (E, P) per episode; proprio (N, D) float32 as the model sees it."""

    def __init__(self, episodes: Sequence[Episode], decoder: PolicyDecoder, stats: ActionStats, cameras: Sequence[str],
                 gripper: str | None):
        self.episodes, self.cameras = list(episodes), tuple(cameras)
        k = decoder.chunk_len
        self.index = np.array([(e, t) for e, ep in enumerate(self.episodes) for t in range(ep.length)], np.int64)
        self.index = self.index.reshape(-1, 2)
        self.tokens = (np.concatenate([actions_to_tokens(action_chunks(ep.actions, k), stats, gripper)
                                       for ep in self.episodes]) if self.episodes else np.zeros((0, decoder.num_tokens), np.int32))
        if self.episodes:
            self.prompt_ids, self.prompt_mask = decoder.encode_prompts([ep.instruction for ep in self.episodes])
            self.proprio = decoder.model_proprio(np.concatenate([ep.proprio for ep in self.episodes]))
        self.use_proprio = bool(decoder.policy.cfg.proprio_dim)

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, rows: np.ndarray, valid: np.ndarray | None = None, crop_offsets: np.ndarray | None = None) -> dict:
        """The learner batch (objective "nll") of samples `rows`; `valid` (B,) bool marks padding rows
        (mask 0); `crop_offsets` (B, 2) the training crop."""
        e, t = self.index[rows, 0], self.index[rows, 1]
        images = np.stack([np.stack([self.episodes[i].images[c][j] for c in self.cameras]) for i, j in zip(e, t)])
        ids, mask = trim_prompts(self.prompt_ids[e], self.prompt_mask[e])
        tok_mask = np.ones(self.tokens[rows].shape, np.float32)
        if valid is not None:
            tok_mask *= valid[:, None]
        b = {"images": images, "input_ids": ids, "attention_mask": mask, "tokens": self.tokens[rows], "mask": tok_mask}
        if self.use_proprio:
            b["proprio"] = self.proprio[rows]
        if crop_offsets is not None:
            b["crop_offsets"] = crop_offsets.astype(np.float32)
        return b


def batch_rows(n: int, batch: int, step: int, seed: int, shuffle: bool) -> np.ndarray:
    """(batch,) sample rows of optimizer step `step`: positions step*batch ... of the sequence of
    epochs, each a permutation seeded by (seed, epoch) (or in order): a resumed run draws the same."""
    pos = step * batch + np.arange(batch)
    epoch, within = pos // n, pos % n
    out = np.empty(batch, np.int64)
    for ep in np.unique(epoch):
        order = np.random.default_rng([seed, int(ep)]).permutation(n) if shuffle else np.arange(n)
        out[epoch == ep] = order[within[epoch == ep]]
    return out


def load_demonstrations(cfg: RunConfig) -> list[Episode]:
    """The episodes of `data.train_files`; DatasetError (naming file and field) if one is malformed,
    from another suite or of another action size."""
    t = cfg.env.train
    files = cfg.data.train_files
    cams = tuple(t.init_params.camera_names[:cfg.actor_rollout_ref.actor.num_images_in_input])
    src = files if isinstance(files, str) else list(files)
    episodes = read_dataset(src, suite=t.task_suite_name, action_dim=cfg.env.actor.model.action_dim, cameras=cams)
    if not episodes:
        raise DatasetError(f"{files}: no demonstrations (data.train_files)")
    size = (t.init_params.camera_heights, t.init_params.camera_widths)
    odd = {ep.images[cams[0]].shape[1:3] for ep in episodes} - {size}
    if odd:
        log.warning("demonstration images are %s, the simulator renders %s (env.train.init_params): the policy "
                    "will see differently resized images in training and in rollouts", sorted(odd), size)
    return episodes


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class SFTResult:
    run_dir: Path
    steps: int
    history: list[dict]
    export_dir: Path | None


def export_policy(learner: Learner, out: Path) -> Path:
    """The learner's policy as a checkpoint `load_pretrained` (and so `vlajax train`) reads: the Hugging
    Face layout, LoRA merged, each tensor in its source dtype (float32 for a preset trained here), with
    tokenizer and statistics; a policy with learned action queries (no HF tensor for them) as a vlajax
    policy checkpoint instead."""
    policy = merged_policy(learner.policy) if learner.lora else learner.policy
    if policy.cfg.action_queries:
        policy.save(out)
    else:
        policy.export_hf(out, dtype=None if policy.hf_dtypes else "float32")
    return out


class _Run:
    """What an SFT run holds: learner, checkpoints, the data as samples, the simulators (opened at the
    first evaluation); `close()` releases them."""

    def __init__(self, cfg: RunConfig, train_eps: list[Episode], held_eps: list[Episode], stats: dict):
        self.cfg = cfg
        io, t = policy_adapter(cfg), cfg.env.train
        self.mesh = cfg.trainer.mesh.build(Job.join())
        policy = build_policy(cfg)
        policy.dataset_statistics = {**(policy.dataset_statistics or {}), **stats}
        lcfg = cfg.actor_rollout_ref.learner_config(self.mesh.size, io.image_flip, objective="nll")
        self.learner = Learner(policy, lcfg, self.mesh)
        key = io.unnorm_key(t.task_suite_name, stats)
        # the rollout's own prompt encoding and proprio normalisation (no simulators needed)
        decoder = PolicyDecoder(self.learner.policy, flip=io.image_flip, center_crop=True, unnorm_key=key,
                                gripper=io.gripper)
        cams = t.init_params.camera_names[:cfg.actor_rollout_ref.actor.num_images_in_input]
        astats = load_action_stats(stats, key)
        self.train = FrameSet(train_eps, decoder, astats, cams, io.gripper)
        self.held = FrameSet(held_eps, decoder, astats, cams, io.gripper)
        self.task_names = sorted({ep.task for ep in train_eps})
        b = cfg.data.train_batch_size
        if b % self.learner.batch_multiple:
            raise ConfigError(f"{b} frames do not split into micro-batches of actor_rollout_ref.actor."
                              f"ppo_micro_batch_size_per_gpu x {self.mesh.size} devices = {self.learner.batch_multiple}",
                              key="data.train_batch_size")
        self.ckpt = CheckpointManager(cfg.run_dir / "checkpoints", save_interval_steps=1,
                                      max_to_keep=cfg.trainer.max_actor_ckpt_to_keep)
        self.sim: SimSession | None = None
        self.step = 0

    def close(self) -> None:
        if self.sim is not None:
            self.sim.close()
            self.sim = None
        self.ckpt.close()

    def maybe_resume(self, point: tuple[str, int] | None) -> None:
        """Continue from `point` as `resume_source` chose it (None: start fresh)."""
        if point is None:
            return
        restored = restore_from(self.learner, self.ckpt, *point)
        ds = restored.data_state or {}
        if "sft_step" not in ds:
            raise ConfigError(f"checkpoint {point[0]}/{restored.step} has no SFT step: it is not a `vlajax sft` "
                              "checkpoint", key="trainer.resume")
        self.step = int(ds["sft_step"])
        print(f"vlajax sft: resumed from checkpoint {point[0]}/{restored.step} at step {self.step}", flush=True)

    def update(self, timer: Timer) -> dict:
        cfg = self.cfg
        b, seed = cfg.data.train_batch_size, cfg.trainer.seed
        with timer("data"):
            rows = batch_rows(len(self.train), b, self.step, seed, cfg.data.shuffle)
            crop = (np.random.default_rng([seed, self.step, 1]).uniform(size=(b, 2)) if cfg.data.image_aug else None)
            batch = self.train.batch(rows, crop_offsets=crop)
        with timer("update"):
            self.learner.set_lr(cfg.actor_rollout_ref.actor.optim.learning_rate(self.step))
            m = {f"actor/{k}": float(v) for k, v in jax.device_get(self.learner.update(batch)).items()}
        self.step += 1
        m["train/epoch"] = self.step * b / len(self.train)
        return m

    def held_out(self) -> dict:
        """Token accuracy and NLL of the held-out episodes' frames (centre crop, as in rollouts)."""
        n = len(self.held)
        if not n:
            return {}
        step = bucket_size(min(n, 64), self.learner.batch_multiple)
        tot: dict[str, float] = defaultdict(float)
        for start in range(0, n, step):
            rows = np.arange(start, min(start + step, n))
            valid = np.ones(step, bool)
            valid[len(rows):] = False
            rows = np.concatenate([rows, np.full(step - len(rows), rows[0])])
            m = jax.device_get(self.learner.evaluate(self.held.batch(rows, valid)))
            w = float(m["valid_tokens"])
            for k in ("nll", "token_accuracy"):
                tot[k] += w * float(m[k])
            tot["tokens"] += w
        return {f"val/{k}": tot[k] / tot["tokens"] for k in ("nll", "token_accuracy")}

    def evaluate_sim(self) -> dict:
        """Greedy (or `val_kwargs`) success on the fixed init states of the demonstrated tasks."""
        cfg = self.cfg
        if self.sim is None:
            self.sim = SimSession(cfg, self.learner.policy, params=self.learner.decode_params(),
                                  temperatures=(val_temperature(cfg),))
        self.sim.decoder.set_params(self.learner.decode_params())
        tasks = self.sim.tasks
        ids = [i for i, t in enumerate(tasks) if t.name in self.task_names] or None
        n = cfg.data.val_num_trials_per_task or cfg.env.train.num_trials_per_task
        reps = cfg.actor_rollout_ref.rollout.val_kwargs.n
        pairs = [p for p in select_pairs(tasks, ids, n) for _ in range(reps)]
        res = self.sim.evaluate(pairs, temperature=val_temperature(cfg))
        m = {"val/success_rate": float(np.mean([r["success"] for r in res]))}
        for name in sorted({r["task"] for r in res}):
            m[f"val/success_rate/{name}"] = float(np.mean([r["success"] for r in res if r["task"] == name]))
        return m

    def validate(self) -> dict:
        return {**self.held_out(), **self.evaluate_sim()}


def run_statistics(cfg: RunConfig, train_eps: list[Episode]) -> dict:
    """The run's statistics: the run directory's (a resumed run keeps them) or the training episodes'."""
    t = cfg.env.train
    stats = dataset_statistics(train_eps, t.task_suite_name, policy_adapter(cfg).gripper)
    path = cfg.run_dir / STATS_FILE
    if path.exists():
        kept = json.loads(path.read_text())
        if json.dumps(kept, sort_keys=True) != json.dumps(stats, sort_keys=True):
            log.warning("%s differs from the statistics of data.train_files now (the data changed): the run keeps "
                        "its own", path)
        return kept
    path.write_text(json.dumps(stats, indent=2))
    return stats


def sft(cfg: RunConfig) -> SFTResult:
    """Run (or resume) the SFT run described by `cfg` (loaded with `purpose="sft"`); see the module
    docstring. Ctrl-C stops it keeping the checkpoints written so far; rerunning resumes."""
    source = resume_source(cfg)  # before anything is read, started or written
    episodes = load_demonstrations(cfg)
    train_eps, held_eps = split_held_out(episodes, cfg.data.val_episodes_per_task)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir, command="sft")
    stats = run_statistics(cfg, train_eps)
    tr = cfg.trainer
    history: list[dict] = []
    run = _Run(cfg, train_eps, held_eps, stats)
    logger = progress = None
    try:
        run.maybe_resume(source)
        print(f"vlajax sft: {len(run.train)} training frames from {len(train_eps)} episodes of "
              f"{len(run.task_names)} task(s), {len(run.held)} held-out frames; {run.learner.num_params()['trainable']:,} "
              f"trained parameters", flush=True)
        logger = MetricsLogger(run_dir, backends=tuple(tr.logger), wandb_project=tr.project_name,
                               experiment_name=tr.experiment_name, config=to_dict(cfg),
                               start_step=run.step + 1 if run.step else 0, total_steps=tr.total_training_steps)
        if tr.val_before_train and run.step == 0 and tr.test_freq > 0:
            logger.log(0, run.validate())
        progress = Progress(tr.total_training_steps - run.step, desc="SFT steps", unit="step")
        while run.step < tr.total_training_steps:
            timer = Timer()
            timer.start()
            m = run.update(timer)
            last = run.step == tr.total_training_steps
            if (tr.save_freq > 0 and run.step % tr.save_freq == 0) or last:
                with timer("checkpoint"):
                    run.learner.save(run.ckpt, step=run.step, data_state={"sft_step": run.step}, config=to_dict(cfg),
                                     force=True)
            if tr.test_freq > 0 and (run.step % tr.test_freq == 0 or last):
                with timer("validation"):
                    m.update(run.validate())
            m.update(timer.breakdown(), **resource_metrics())
            logger.log(run.step, m)
            history.append(m)
            progress.update(1)
        run.ckpt.wait_until_finished()
        export = export_policy(run.learner, run_dir / EXPORT_DIR / f"step_{run.step}")
        print(f"vlajax sft: exported the policy to {export}", flush=True)
    except KeyboardInterrupt:
        run.ckpt.wait_until_finished()
        print(f"vlajax sft: interrupted at step {run.step}; checkpoints kept in {run_dir / 'checkpoints'} "
              f"(latest {run.ckpt.latest_step()}): rerun the same command to resume", file=sys.stderr, flush=True)
        raise
    finally:
        if progress is not None:
            progress.close()
        if logger is not None:
            logger.close()
        run.close()
    return SFTResult(run_dir, run.step, history, export)
