"""What a run needs besides the learner, shared by `vlajax train` and `vlajax eval`: the policy named
by the config, the simulators in Ray actors, and the pipelined rollout engine that joins them.

`SimSession(cfg, policy)` starts (or joins) Ray, places the simulator actors, builds the decoder and
the engine, and closes exactly what it started; `evaluate(pairs)` runs greedy (or sampled) episodes
for (task, init-state) pairs through the same loop that training uses.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import jax
import numpy as np

from vlajax.config import ConfigError, RunConfig
from vlajax.model.family import IOAdapter, SpecError, get_family
from vlajax.rl.lora import with_lora
from vlajax.rl.policy_step import PolicyDecoder

log = logging.getLogger(__name__)


# `PolicySpec` fields (a `SpecError`'s field) -> the config key that sets them
_SPEC_KEYS = {"path": "actor_rollout_ref.model.path", "proprio_dim": "actor_rollout_ref.actor.use_proprio",
              "num_images": "actor_rollout_ref.actor.num_images_in_input",
              "chunk": "env.actor.model.num_action_chunks", "action_dim": "env.actor.model.action_dim",
              "simulator": "env.train.simulator_type"}


def family_call(cfg: RunConfig, fn: Callable):
    """`fn(family)` for the run's family, a `SpecError` turned into a ConfigError naming the run's key."""
    try:
        return fn(get_family(cfg.actor_rollout_ref.model.family))
    except SpecError as e:
        key = _SPEC_KEYS.get(e.field, f"actor_rollout_ref.model.{e.field}")
        value = functools.reduce(getattr, key.split("."), cfg)
        raise ConfigError(f"{key}={value} but {e}", key=key) from None


def policy_adapter(cfg: RunConfig) -> IOAdapter:
    """How the run's policy family meets the run's simulator (image flip, gripper, statistics key)."""
    return family_call(cfg, lambda family: family.adapter(cfg.simulator.name))


def policy_spec(cfg: RunConfig):
    """What the run asks of its policy (`vlajax.model.family.PolicySpec`): `actor_rollout_ref.model`
    for the simulator's cameras, robot state and action chunks."""
    m, a, am = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.actor, cfg.env.actor.model
    reads = family_call(cfg, lambda family: family.options)
    if reads is not None:  # an option the family does not read is an error where it was set, not ignored
        default = type(m)()
        for k in m.FAMILY_OPTIONS:
            if k not in reads and getattr(m, k) != getattr(default, k):
                raise ConfigError(f"actor_rollout_ref.model.{k}={getattr(m, k)} does not apply to the {m.family} policy "
                                  f"family (its options: {', '.join(reads)})", key=f"actor_rollout_ref.model.{k}")
    stats = cfg.simulator.dataset_statistics(am.action_dim, policy_adapter(cfg).stats_key)
    return m.policy_spec(num_images=a.num_images_in_input,
                         proprio_dim=cfg.simulator.proprio_dim if a.use_proprio else None,
                         chunk=am.num_action_chunks, action_dim=am.action_dim, seed=cfg.trainer.seed,
                         dataset_statistics=stats)


def build_policy(cfg: RunConfig):
    """The policy named by `actor_rollout_ref.model` (`family`, `path`: a preset or a checkpoint),
    for the simulator's cameras, robot state and action chunks. With
    `actor_rollout_ref.model.lora_rank` > 0 it has its adapters (`with_lora`), so training, its
    rollouts and the evaluation of its checkpoints all see the same graph."""
    m = cfg.actor_rollout_ref.model
    spec = policy_spec(cfg)
    policy = family_call(cfg, lambda family: family.load(spec))
    return with_lora(policy, m.lora_config(cfg.trainer.seed))


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
            io = policy_adapter(cfg)
            self.decoder = PolicyDecoder(policy, params=params, flip=io.image_flip, center_crop=True,
                                         unnorm_key=io.unnorm_key(t.task_suite_name, policy.dataset_statistics),
                                         gripper=io.gripper, capacity=self.pool.capacity)
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
