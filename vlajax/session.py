"""What a run needs besides the learner, shared by `vlajax train` and `vlajax eval`: the policy named
by the config, the simulators in Ray actors, and the pipelined rollout engine that joins them.

`SimSession(cfg, policy)` starts (or joins) Ray, places the simulator actors, builds the decoder and
the engine, and closes exactly what it started; `evaluate(pairs)` runs greedy (or sampled) episodes
for (task, init-state) pairs through the same loop that training uses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlajax.config import ConfigError, RunConfig
from vlajax.model import Policy, build_model, load_pretrained, preset
from vlajax.model.init import apply_init
from vlajax.model.tokenizer import load_tokenizer
from vlajax.rl.lora import with_lora
from vlajax.rl.policy_step import PolicyDecoder

log = logging.getLogger(__name__)


def build_policy(cfg: RunConfig):
    """The policy named by `actor_rollout_ref.model.path`: `preset:<name>` (random init, the shipped
    tiny tokenizer) or a HF / vlajax checkpoint directory; its chunk must be the config's. With
    `actor_rollout_ref.model.lora_rank` > 0 it has its adapters (`with_lora`), so training, its
    rollouts and the evaluation of its checkpoints all see the same graph."""
    policy = _load_policy(cfg)
    am = cfg.env.actor.model
    if (policy.cfg.chunk, policy.cfg.action_dim) != (am.num_action_chunks, am.action_dim):
        raise ConfigError(f"env.actor.model.num_action_chunks={am.num_action_chunks} and action_dim={am.action_dim}, "
                          f"but the policy {cfg.actor_rollout_ref.model.path} decodes {policy.cfg.chunk} actions of "
                          f"{policy.cfg.action_dim} dims per call", key="env.actor.model.num_action_chunks")
    return with_lora(policy, cfg.actor_rollout_ref.model.lora_config(cfg.trainer.seed))


def _load_policy(cfg: RunConfig):
    m, a = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.actor
    n_img = a.num_images_in_input
    if m.path.startswith("preset:"):
        kw = {"num_images": n_img, "proprio_dim": cfg.simulator.proprio_dim if a.use_proprio else None,
              "action_queries": m.action_queries}
        if m.image_size:
            kw["image_size"] = m.image_size
        mcfg = preset(m.path.split(":", 1)[1], **kw)
        model = build_model(mcfg, seed=cfg.trainer.seed, dtype=jnp.dtype(m.param_dtype))
        apply_init(model, m.init_scheme, seed=cfg.trainer.seed)
        return Policy(model, tokenizer=load_tokenizer("tiny"), compute_dtype=jnp.dtype(m.compute_dtype),
                      dataset_statistics=cfg.simulator.dataset_statistics(cfg.env.actor.model.action_dim))
    path = Path(m.path)
    if not path.exists():
        raise ConfigError(f"actor_rollout_ref.model.path: checkpoint {path} does not exist",
                          key="actor_rollout_ref.model.path")
    policy = load_pretrained(path, dtype=m.param_dtype, compute_dtype=m.compute_dtype, num_images=n_img)
    if policy.tokenizer is None:
        raise ConfigError(f"actor_rollout_ref.model.path: {path} has no tokenizer.json / tokenizer.model",
                          key="actor_rollout_ref.model.path")
    has = policy.cfg.proprio_dim is not None
    if has != a.use_proprio:
        raise ConfigError(f"actor_rollout_ref.actor.use_proprio={a.use_proprio} but the checkpoint {path} "
                          f"{'has' if has else 'has no'} proprio projector", key="actor_rollout_ref.actor.use_proprio")
    if policy.cfg.action_queries != m.action_queries:
        raise ConfigError(f"actor_rollout_ref.model.action_queries={m.action_queries} but the checkpoint {path} "
                          f"{'has' if policy.cfg.action_queries else 'has no'} action queries",
                          key="actor_rollout_ref.model.action_queries")
    return policy


def make_env_fn(cfg: RunConfig, video_dir: str | None = None) -> Callable:
    """`env_fn(num_envs, *, name) -> VectorEnv` for the simulator in the config (picklable);
    `video_dir`: one mp4 per episode there."""
    t, sim = cfg.env.train, cfg.simulator
    if video_dir and not sim.videos:
        raise ConfigError(f"videos are not supported for env.train.simulator_type={sim.name} yet",
                          key="env.train.simulator_type")
    return sim.env_fn(suite=t.task_suite_name, image_size=(t.init_params.camera_heights, t.init_params.camera_widths),
                      cameras=t.init_params.camera_names, max_episode_steps=t.max_episode_steps, video_dir=video_dir)


def val_temperature(cfg: RunConfig) -> float:
    """Validation decoding (`actor_rollout_ref.rollout.val_kwargs`): 0 = greedy, else the sampling
    temperature."""
    vk = cfg.actor_rollout_ref.rollout.val_kwargs
    return float(vk.temperature) if vk.do_sample else 0.0


class Closing:
    """Owns what `self._closers` lists and closes it on `close()` / leaving a `with` block, in list
    order, once; one failing closer does not stop the others."""

    _closers: list[Callable[[], None]]

    def close(self) -> None:
        for fn in getattr(self, "_closers", []):
            try:
                fn()
            except Exception as e:  # keep closing the rest
                log.warning("closing: %s", e)
        self._closers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SimSession(Closing):
    """Ray + simulator actors + decoder + rollout engine for `policy` (see module docstring).

    The decoder decodes with `params` (default: the policy's own); a training loop hands it the
    learner's after each update (`decoder.set_params(learner.decode_params())`: no weight copy).
    `temperatures`: what it will decode at, first needed first; their decodes compile in the
    background from the start (`PolicyDecoder.precompile`)."""

    def __init__(self, cfg: RunConfig, policy, *, params: dict | None = None, video_dir: str | None = None,
                 temperatures: Sequence[float] = ()):
        # Ray (if the placement uses it) only here: building a policy does not need it.
        from vlajax.distributed.pools import open_sim_pool
        from vlajax.rl.rollout import RolloutEngine

        self.cfg = cfg
        self._closers: list[Callable[[], None]] = []
        t, sim = cfg.env.train, cfg.simulator
        try:
            n_img = cfg.actor_rollout_ref.actor.num_images_in_input
            self.pool, closers = open_sim_pool(
                cfg.placement(), make_env_fn(cfg, video_dir), num_envs=t.num_envs,
                num_stages=cfg.env.rollout.pipeline_stage_num, cameras=tuple(t.init_params.camera_names[:n_img]),
                mujoco_gl=t.mujoco_gl if sim.mujoco_gl else None, ray_address=cfg.ray.address,
                ray_num_cpus=cfg.ray.num_cpus, ray_temp_dir=cfg.ray.temp_dir)
            self._closers += closers
            self.decoder = PolicyDecoder(policy, params=params, flip=sim.image_flip, center_crop=True,
                                         unnorm_key=sim.unnorm_key(t.task_suite_name, policy.dataset_statistics),
                                         gripper=sim.gripper, capacity=self.pool.capacity)
            self._closers.append(self.decoder.close)
            if temperatures:  # the decodes compile while the simulators reset, not when the first is due
                self.decoder.precompile((t.init_params.camera_heights, t.init_params.camera_widths), temperatures)
            self.engine = RolloutEngine(self.pool, self.decoder, cfg.rollout_config())
        except BaseException:
            self.close()
            raise
        self.tasks = self.engine.tasks  # [TaskSpec, ...]: task id -> task

    @property
    def capacity(self) -> int:
        """Trajectories per rollout round."""
        return self.pool.capacity

    def evaluate(self, pairs: Sequence[tuple[int, int]], *, temperature: float = 0.0, seed: int | None = None,
                 on_round: Callable[[list[dict]], None] | None = None, stream: int | None = None) -> list[dict]:
        """Episodes for (task_id, state_id) pairs, greedy (temperature 0) or sampled, in rounds of
        `capacity` (the last padded with repeats whose results are dropped). One record per pair: task,
        state_id, success, length; `on_round` gets each round's records as they finish. Sampling keys
        derive from `seed` and the round, so an evaluation is reproducible; `stream` (a process id)
        is folded in too, so that processes sharing an evaluation do not share sampling noise."""
        seed = self.cfg.env.train.seed if seed is None else seed
        cap = self.capacity
        results = []
        for r, start in enumerate(range(0, len(pairs), cap)):
            chunk = list(pairs[start:start + cap])
            real = len(chunk)
            chunk += [chunk[0]] * (cap - real)
            t_ids = np.array([p[0] for p in chunk])
            s_ids = np.array([p[1] for p in chunk])
            key = jax.random.fold_in(jax.random.key(seed), r)
            if stream is not None:
                key = jax.random.fold_in(key, stream)
            tr = self.engine.rollout(t_ids, s_ids, np.arange(cap), seed=seed, temperature=temperature,
                                     key=key).trajectories
            recs = [{"task": self.tasks[t_ids[i]].name, "state_id": int(s_ids[i]), "success": bool(tr.success[i]),
                     "length": int(tr.finish_step[i])} for i in range(real)]
            results += recs
            if on_round is not None:
                on_round(recs)
        return results
