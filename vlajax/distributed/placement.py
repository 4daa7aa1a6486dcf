"""Where the simulator actors and the trainer go: `PlacementOptions`, the one reading of the placement
config keys (`RunConfig.placement()` builds it; `vlajax.distributed.ray_sim.SimPool` places by it).

Imports neither Ray nor JAX, so loading and checking a config can size the pool with it.

Fields and the reference recipe's config keys (verl VLA recipe §4-5):

    field                      config key                         meaning
    disagg_sim_enable          env.disagg_sim.enable              sim actors only on nodes started with
                                                                  `ray start --resources='{"sim": 1}'`,
                                                                  the trainer on `{"train_rollout": 1}` nodes
    disagg_sim_nnodes          env.disagg_sim.nnodes              number of sim nodes (disaggregated)
    trainer_nnodes             trainer.nnodes                     number of train/rollout nodes; colocated:
                                                                  also the number of nodes holding sim actors
    n_env_gpus_per_node        trainer.n_env_gpus_per_node        GPUs for simulation per node (EGL / Isaac);
                                                                  0 = CPU-only simulators
    n_rollout_gpus_per_node    trainer.n_rollout_gpus_per_node    GPUs for train/rollout per trainer node
    env_workers_per_node       (vlajax)                           sim actors per node; default: one per env
                                                                  GPU, or 1 when CPU-only
    env_cpus_per_worker        (vlajax)                           CPUs reserved per sim actor
    trainer_cpus_per_node      (vlajax)                           CPUs reserved for the trainer per node

The ranges of the config keys are checked where the config is loaded (`vlajax.config.validate`, errors
naming the key); `PlacementOptions.validate` checks only the fields that have no config key.
"""

from __future__ import annotations

import dataclasses

SIM_RESOURCE = "sim"
TRAIN_RESOURCE = "train_rollout"
MARKER_SHARE = 1e-4  # share of the marker resource per bundle, as the reference recipe uses

__all__ = ["PlacementOptions", "SIM_RESOURCE", "TRAIN_RESOURCE", "MARKER_SHARE"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlacementOptions:
    """Where sim actors and the trainer go. Field <-> config key table in the module docstring.

    The fields named by config keys have no defaults here: a run builds this from its config
    (`RunConfig.placement()`), whose defaults are the only ones; `standalone()` is the layout of a
    pool used on its own (tests, benchmarks)."""

    disagg_sim_enable: bool
    disagg_sim_nnodes: int
    trainer_nnodes: int
    n_env_gpus_per_node: int
    n_rollout_gpus_per_node: int
    env_workers_per_node: int | None = None
    env_cpus_per_worker: float = 1.0
    trainer_cpus_per_node: float = 0.0
    placement_timeout_s: float = 60.0

    @classmethod
    def standalone(cls, **overrides) -> "PlacementOptions":
        """One node, CPU-only simulators, no trainer reservation; `overrides` set any field."""
        base = dict(disagg_sim_enable=False, disagg_sim_nnodes=1, trainer_nnodes=1, n_env_gpus_per_node=0,
                    n_rollout_gpus_per_node=0)
        return cls(**{**base, **overrides})

    @property
    def sim_nnodes(self) -> int:
        """Nodes holding sim actors: the sim nodes when disaggregated, else the trainer nodes."""
        return self.disagg_sim_nnodes if self.disagg_sim_enable else self.trainer_nnodes

    @property
    def workers_per_node(self) -> int:
        if self.env_workers_per_node is not None:
            return int(self.env_workers_per_node)
        return self.n_env_gpus_per_node or 1

    @property
    def num_workers(self) -> int:
        """Sim actors in the pool."""
        return self.sim_nnodes * self.workers_per_node

    @property
    def gpus_per_worker(self) -> float:
        return self.n_env_gpus_per_node / self.workers_per_node

    def validate(self) -> None:
        """Check the fields that have no config key (the others: `vlajax.config.validate`)."""
        if self.workers_per_node < 1:
            raise ValueError(f"placement: env_workers_per_node must be >= 1, got {self.workers_per_node}")
        if self.env_cpus_per_worker <= 0 and self.gpus_per_worker <= 0:
            raise ValueError("placement: a sim actor must reserve some CPU (env_cpus_per_worker > 0) or GPU")
        if self.env_cpus_per_worker < 0 or self.trainer_cpus_per_node < 0:
            raise ValueError("placement: CPU reservations must be >= 0")

    # One bundle per node of each kind.
    def sim_bundle(self) -> dict[str, float]:
        b = {"CPU": self.workers_per_node * self.env_cpus_per_worker, "GPU": float(self.n_env_gpus_per_node)}
        if self.disagg_sim_enable:
            b[SIM_RESOURCE] = MARKER_SHARE
        return {k: v for k, v in b.items() if v > 0}

    def trainer_bundle(self) -> dict[str, float]:
        b = {"CPU": float(self.trainer_cpus_per_node), "GPU": float(self.n_rollout_gpus_per_node)}
        if self.disagg_sim_enable:
            b[TRAIN_RESOURCE] = MARKER_SHARE
        return {k: v for k, v in b.items() if v > 0}

    def colocated_bundle(self) -> dict[str, float]:
        """Colocated placement: one bundle per trainer node holding its sim actors and the trainer."""
        sim, trainer = self.sim_bundle(), self.trainer_bundle()
        return {r: sim.get(r, 0) + trainer.get(r, 0) for r in sim.keys() | trainer.keys()}
