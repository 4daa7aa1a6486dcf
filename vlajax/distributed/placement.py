"""Where the simulator workers and the trainer go: one placement object per run, built from the config
once (`RunConfig.placement()`), so nothing else asks which layout it is.

    Colocated      sim actors and the trainer share each trainer node (Ray; the default)
    Disaggregated  sim actors only on simulator nodes, started with `ray start --resources='{"sim": 1}'`,
                   the trainer on `{"train_rollout": 1}` nodes (`env.disagg_sim.enable=true`)
    InProcess      sim workers in the trainer's own process, no Ray (`ray.enable=false`): one node,
                   a faster start, what a first run on a laptop needs

A Ray layout is a list of `NodeGroup`s: what each node of a group must hold, how many such nodes, and
whether the sim actors or the trainer go there. `vlajax.distributed.ray_sim` checks a cluster against
the groups and makes one placement group per group, whatever the layout; `vlajax.distributed.pools`
opens the pool a layout asks for.

Fields and the reference recipe's config keys (verl VLA recipe §4-5):

    field                      config key                         meaning
    trainer_nnodes             trainer.nnodes                     train/rollout nodes; colocated: also the
                                                                  nodes holding sim actors
    sim_nnodes (Disaggregated) env.disagg_sim.nnodes              simulator nodes
    n_env_gpus_per_node        trainer.n_env_gpus_per_node        GPUs for simulation per node (EGL / Isaac);
                                                                  0 = CPU-only simulators
    n_rollout_gpus_per_node    trainer.n_rollout_gpus_per_node    GPUs for train/rollout per trainer node
    env_workers_per_node       (vlajax)                           sim workers per node; default: one per env
                                                                  GPU, or 1 when CPU-only
    env_cpus_per_worker        (vlajax)                           CPUs reserved per sim actor
    trainer_cpus_per_node      (vlajax)                           CPUs reserved for the trainer per node

Imports neither Ray nor JAX, so loading and checking a config can size the pool with it. The ranges of
the config keys are checked where the config is loaded (`vlajax.config.validate`, errors naming the
key); `Placement.validate` checks only the fields that have no config key.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

SIM_RESOURCE = "sim"
TRAIN_RESOURCE = "train_rollout"
MARKER_SHARE = 1e-4  # share of the marker resource per bundle, as the reference recipe uses

__all__ = ["Placement", "Colocated", "Disaggregated", "InProcess", "NodeGroup", "SIM_RESOURCE", "TRAIN_RESOURCE",
           "MARKER_SHARE"]


@dataclasses.dataclass(frozen=True)
class NodeGroup:
    """`count` nodes that must each hold `bundle` (and carry the `marker` resource, if any)."""

    kind: str  # how errors name these nodes: "sim", "train_rollout", "trainer (colocated ...)"
    bundle: dict[str, float]
    count: int
    marker: str | None
    sized_by: str  # the config keys that size the group, for errors
    sims: bool  # the sim actors go here
    trainer: bool  # the trainer (this process) runs on one of these nodes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Placement:
    """What every layout shares; the subclasses say where things go. Field <-> key table above.

    The fields named by config keys have no defaults here: a run builds this from its config, whose
    defaults are the only ones; `standalone()` is the layout of a pool used on its own (tests,
    benchmarks)."""

    trainer_nnodes: int
    n_env_gpus_per_node: int
    n_rollout_gpus_per_node: int
    env_workers_per_node: int | None = None
    env_cpus_per_worker: float = 1.0
    trainer_cpus_per_node: float = 0.0
    placement_timeout_s: float = 60.0

    uses_ray: ClassVar[bool] = True
    sim_nodes_key: ClassVar[str] = "trainer.nnodes"  # the config key that counts the nodes holding sims

    @classmethod
    def standalone(cls, **overrides) -> "Placement":
        """One node, CPU-only simulators, no trainer reservation; `overrides` set any field."""
        base = dict(trainer_nnodes=1, n_env_gpus_per_node=0, n_rollout_gpus_per_node=0)
        return cls(**{**base, **overrides})

    @property
    def sim_nnodes(self) -> int:
        """Nodes holding sim workers."""
        return self.trainer_nnodes

    @property
    def workers_per_node(self) -> int:
        if self.env_workers_per_node is not None:
            return int(self.env_workers_per_node)
        return self.n_env_gpus_per_node or 1

    @property
    def num_workers(self) -> int:
        """Sim workers in the pool."""
        return self.sim_nnodes * self.workers_per_node

    @property
    def gpus_per_worker(self) -> float:
        return self.n_env_gpus_per_node / self.workers_per_node

    def per_process(self, num_processes: int) -> "Placement":
        """The share one trainer process of a `num_processes`-process job places itself (each places
        its own simulators: one train node's worth)."""
        return dataclasses.replace(self, trainer_nnodes=self.trainer_nnodes // num_processes)

    def validate(self) -> None:
        """Check the fields that have no config key (the others: `vlajax.config.validate`)."""
        if self.workers_per_node < 1:
            raise ValueError(f"placement: env_workers_per_node must be >= 1, got {self.workers_per_node}")
        if self.env_cpus_per_worker <= 0 and self.gpus_per_worker <= 0:
            raise ValueError("placement: a sim actor must reserve some CPU (env_cpus_per_worker > 0) or GPU")
        if self.env_cpus_per_worker < 0 or self.trainer_cpus_per_node < 0:
            raise ValueError("placement: CPU reservations must be >= 0")

    def node_groups(self) -> list[NodeGroup]:
        """The Ray layout: one placement group per entry."""
        raise NotImplementedError

    # What one node of each kind holds.
    def sim_bundle(self) -> dict[str, float]:
        return _positive({"CPU": self.workers_per_node * self.env_cpus_per_worker,
                          "GPU": float(self.n_env_gpus_per_node)})

    def trainer_bundle(self) -> dict[str, float]:
        return _positive({"CPU": float(self.trainer_cpus_per_node), "GPU": float(self.n_rollout_gpus_per_node)})

    def _sims_sized_by(self) -> str:
        return (f"trainer.n_env_gpus_per_node={self.n_env_gpus_per_node}, {self.workers_per_node} sim worker(s) x "
                f"{self.env_cpus_per_worker:g} CPU")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Colocated(Placement):
    """Each trainer node holds its sim actors and the trainer: one bundle per trainer node."""

    def node_groups(self) -> list[NodeGroup]:
        sim, trainer = self.sim_bundle(), self.trainer_bundle()
        both = {r: sim.get(r, 0) + trainer.get(r, 0) for r in sim.keys() | trainer.keys()}
        return [NodeGroup("trainer (colocated sim + train_rollout)", both, self.trainer_nnodes, None,
                          f"colocated placement with trainer.nnodes={self.trainer_nnodes}, {self._sims_sized_by()} + "
                          f"trainer.n_rollout_gpus_per_node={self.n_rollout_gpus_per_node}", sims=True, trainer=True)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Disaggregated(Placement):
    """Sim actors on `sim_nodes` simulator nodes (marked `sim`), the trainer on `train_rollout` nodes."""

    sim_nodes: int
    sim_nodes_key: ClassVar[str] = "env.disagg_sim.nnodes"

    @classmethod
    def standalone(cls, **overrides) -> "Disaggregated":
        return super().standalone(**{"sim_nodes": 1, **overrides})

    @property
    def sim_nnodes(self) -> int:
        return self.sim_nodes

    def per_process(self, num_processes: int) -> "Disaggregated":
        """Each trainer process owns an equal share of the simulator nodes (the config checks it divides)."""
        return dataclasses.replace(super().per_process(num_processes), sim_nodes=self.sim_nodes // num_processes)

    def node_groups(self) -> list[NodeGroup]:
        return [NodeGroup("sim", {**self.sim_bundle(), SIM_RESOURCE: MARKER_SHARE}, self.sim_nodes, SIM_RESOURCE,
                          f"env.disagg_sim.nnodes={self.sim_nodes}, {self._sims_sized_by()}", sims=True, trainer=False),
                NodeGroup("train_rollout", {**self.trainer_bundle(), TRAIN_RESOURCE: MARKER_SHARE},
                          self.trainer_nnodes, TRAIN_RESOURCE,
                          f"trainer.nnodes={self.trainer_nnodes}, trainer.n_rollout_gpus_per_node="
                          f"{self.n_rollout_gpus_per_node}", sims=False, trainer=True)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class InProcess(Placement):
    """Sim workers on threads of the trainer's own process (`vlajax.envs.local_pool`), no Ray: one
    node per trainer process; the env processes of each worker still simulate in parallel."""

    uses_ray: ClassVar[bool] = False

    def node_groups(self) -> list[NodeGroup]:
        return []


def _positive(bundle: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in bundle.items() if v > 0}
