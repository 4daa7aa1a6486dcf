"""What a run needs besides the learner, shared by `vlajax train` and `vlajax eval`: the policy named
by the config, the simulators in Ray actors, and the pipelined rollout engine that joins them.

`SimSession(cfg, policy)` starts (or joins) Ray, places the simulator actors, builds the decoder and
the engine, and closes exactly what it started; `evaluate(pairs)` runs greedy (or sampled) episodes
for (task, init-state) pairs through the same loop that training uses.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from vlajax.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

PROPRIO_DIM = 8  # LIBERO's and the tabletop task's robot state: eef xyz, axis-angle, 2 finger qpos
TABLETOP_STATS_KEY = "tabletop"


def build_policy(cfg: RunConfig):
    """The policy named by `actor_rollout_ref.model.path`: `preset:<name>` (random init, the shipped
    tiny tokenizer) or a HF / vlajax checkpoint directory; its chunk must be the config's."""
    policy = _load_policy(cfg)
    am = cfg.env.actor.model
    if (policy.cfg.chunk, policy.cfg.action_dim) != (am.num_action_chunks, am.action_dim):
        raise ConfigError(f"env.actor.model.num_action_chunks={am.num_action_chunks} and action_dim={am.action_dim}, "
                          f"but the policy {cfg.actor_rollout_ref.model.path} decodes {policy.cfg.chunk} actions of "
                          f"{policy.cfg.action_dim} dims per call", key="env.actor.model.num_action_chunks")
    return policy


def _load_policy(cfg: RunConfig):
    from vlajax.model import Policy, build_model, load_pretrained, preset
    from vlajax.model.init import apply_init
    from vlajax.model.tokenizer import load_tokenizer

    m, a = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.actor
    n_img = a.num_images_in_input
    if m.path.startswith("preset:"):
        kw = {"num_images": n_img, "proprio_dim": PROPRIO_DIM if a.use_proprio else None,
              "action_queries": m.action_queries}
        if m.image_size:
            kw["image_size"] = m.image_size
        mcfg = preset(m.path.split(":", 1)[1], **kw)
        model = build_model(mcfg, seed=cfg.trainer.seed, dtype=jnp.dtype(m.param_dtype))
        apply_init(model, m.init_scheme, seed=cfg.trainer.seed)
        return Policy(model, tokenizer=load_tokenizer("tiny"), compute_dtype=jnp.dtype(m.compute_dtype),
                      dataset_statistics=simulator_statistics(cfg))
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


def simulator_statistics(cfg: RunConfig) -> dict | None:
    """`dataset_statistics.json` content for a policy trained from scratch on the built-in tabletop
    task: identity actions and the proprio ranges of the env (normalised to [-1, 1] as OFT does with a
    dataset's q01 / q99; raw, the gripper xy would be a +-0.26 ripple beside a constant pi). Keyed
    "tabletop" (all its suites share them); None for other simulators (LIBERO runs bring a checkpoint)."""
    if cfg.env.train.simulator_type != "tabletop":
        return None
    from vlajax.envs.tabletop import PROPRIO_HIGH, PROPRIO_LOW
    from vlajax.model.actions import ActionStats

    stats = ActionStats.identity(cfg.env.actor.model.action_dim, key=TABLETOP_STATS_KEY).to_json()
    stats[TABLETOP_STATS_KEY]["proprio"] = {"q01": PROPRIO_LOW.tolist(), "q99": PROPRIO_HIGH.tolist()}
    return stats


def lora_config(cfg: RunConfig):
    """The `LoraConfig` of `actor_rollout_ref.model.lora_rank/alpha/target_modules`, or None (rank 0)."""
    m = cfg.actor_rollout_ref.model
    if m.lora_rank <= 0:
        return None
    from vlajax.rl.lora import LoraConfig

    targets = m.lora_target_regex()
    return LoraConfig(rank=m.lora_rank, alpha=m.lora_alpha, seed=cfg.trainer.seed,
                      **({"targets": targets} if targets else {}))


def make_env_fn(cfg: RunConfig, video_dir: str | None = None) -> Callable:
    """`env_fn(num_envs, *, name) -> VectorEnv` for the simulator in the config (picklable);
    `video_dir`: one mp4 per episode there."""
    t = cfg.env.train
    size = (t.init_params.camera_heights, t.init_params.camera_widths)
    video = {"video_dir": video_dir} if video_dir else {}
    if t.simulator_type == "tabletop":
        from vlajax.envs.tabletop import make_tabletop_vector_env

        return functools.partial(make_tabletop_vector_env, image_size=size, max_episode_steps=t.max_episode_steps,
                                 suite=t.task_suite_name, **video)
    if t.simulator_type == "libero":
        from vlajax.envs.libero import make_libero_vector_env

        return functools.partial(make_libero_vector_env, t.task_suite_name, cameras=tuple(t.init_params.camera_names),
                                 image_size=size, max_episode_steps=t.max_episode_steps, **video)
    if t.simulator_type == "isaac":
        if video_dir:
            raise ConfigError("videos are not supported for env.train.simulator_type=isaac yet",
                              key="env.train.simulator_type")
        from vlajax.envs import isaac

        return isaac.vector_env_fn(cfg)
    raise ConfigError(f"env.train.simulator_type: unknown simulator {t.simulator_type!r}",
                      key="env.train.simulator_type")


def val_temperature(cfg: RunConfig) -> float:
    """Validation decoding (`actor_rollout_ref.rollout.val_kwargs`): 0 = greedy, else the sampling
    temperature."""
    vk = cfg.actor_rollout_ref.rollout.val_kwargs
    return float(vk.temperature) if vk.do_sample else 0.0


def image_flip(cfg: RunConfig) -> bool:
    """LIBERO renders upside-down (the OpenVLA preprocessing flips it); tabletop and Isaac are upright."""
    return cfg.env.train.simulator_type == "libero"


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

    The decoder reads `policy.state` at every call, so a learner that updates the policy in place is
    seen by the next rollout without any weight copy."""

    def __init__(self, cfg: RunConfig, policy, *, video_dir: str | None = None):
        from vlajax.distributed.ray_sim import SimPool, init_ray
        from vlajax.rl.policy_step import PolicyDecoder
        from vlajax.rl.rollout import RolloutConfig, RolloutEngine

        self.cfg = cfg
        self._closers: list[Callable[[], None]] = []
        t = cfg.env.train
        libero = t.simulator_type == "libero"
        try:
            self.ray = init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, temp_dir=cfg.ray.temp_dir)
            self._closers.append(self.ray.shutdown)
            n_img = cfg.actor_rollout_ref.actor.num_images_in_input
            self.pool = SimPool(make_env_fn(cfg, video_dir), num_envs=t.num_envs,
                                num_stages=cfg.env.rollout.pipeline_stage_num,
                                placement=cfg.placement(),
                                cameras=tuple(t.init_params.camera_names[:n_img]),
                                mujoco_gl=t.mujoco_gl if t.simulator_type in ("libero", "tabletop") else None)
            self._closers.insert(0, self.pool.close)
            unnorm = None
            if libero and policy.dataset_statistics:
                unnorm = t.task_suite_name
            elif t.simulator_type == "tabletop" and TABLETOP_STATS_KEY in (policy.dataset_statistics or {}):
                unnorm = TABLETOP_STATS_KEY
            self.decoder = PolicyDecoder(policy, flip=image_flip(cfg), center_crop=True, unnorm_key=unnorm,
                                         gripper="libero" if libero else None, capacity=self.pool.capacity)
            er = cfg.env.rollout
            self.engine = RolloutEngine(self.pool, self.decoder, RolloutConfig(
                temperature=cfg.actor_rollout_ref.rollout.temperature, seed=cfg.trainer.seed,
                step_timeout_s=er.step_timeout_s, reset_timeout_s=er.reset_timeout_s))
        except BaseException:
            self.close()
            raise
        self.tasks = self.engine.tasks  # [(name, instruction, num_init_states), ...]

    @property
    def capacity(self) -> int:
        """Trajectories per rollout round."""
        return self.pool.capacity

    def evaluate(self, pairs: Sequence[tuple[int, int]], *, temperature: float = 0.0, seed: int | None = None,
                 on_round: Callable[[list[dict]], None] | None = None) -> list[dict]:
        """Episodes for (task_id, state_id) pairs, greedy (temperature 0) or sampled, in rounds of
        `capacity` (the last padded with repeats whose results are dropped). One record per pair: task,
        state_id, success, length; `on_round` gets each round's records as they finish. Sampling keys
        derive from `seed` and the round, so an evaluation is reproducible."""
        import jax

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
            tr = self.engine.rollout(t_ids, s_ids, np.arange(cap), seed=seed, temperature=temperature,
                                     key=key).trajectories
            recs = [{"task": self.tasks[t_ids[i]][0], "state_id": int(s_ids[i]), "success": bool(tr.success[i]),
                     "length": int(tr.finish_step[i])} for i in range(real)]
            results += recs
            if on_round is not None:
                on_round(recs)
        return results
