"""Open the simulator pool a placement asks for: Ray actors (`ray_sim.SimPool`, Ray started or joined
here) or workers on threads of this process (`envs.local_pool.LocalSimPool`, no Ray imported).

Both pools serve the rollout engine through the same `SimPoolAPI`, so everything above this module
(`vlajax.session`, `vlajax.demos`) is the same with or without Ray.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from vlajax.distributed.placement import Placement

__all__ = ["open_sim_pool"]


def open_sim_pool(placement: Placement, env_fn: Callable[..., Any], *, num_envs: int, num_stages: int,
                  cameras: Sequence[str], mujoco_gl: str | None, ray_address: str | None = None,
                  ray_num_cpus: int | None = None, ray_temp_dir: str | None = None) -> tuple[Any, list[Callable[[], None]]]:
    """(pool, closers): the pool `placement` asks for, and what to call, in order, to close it and
    whatever was started for it (Ray, when this call started it)."""
    kw = dict(num_envs=num_envs, num_stages=num_stages, cameras=tuple(cameras), mujoco_gl=mujoco_gl)
    if not placement.uses_ray:
        from vlajax.envs.local_pool import LocalSimPool

        pool = LocalSimPool(env_fn, num_workers=placement.num_workers, **kw)
        return pool, [pool.close]
    from vlajax.distributed.ray_sim import SimPool, init_ray

    session = init_ray(ray_address, num_cpus=ray_num_cpus, temp_dir=ray_temp_dir)
    try:
        pool = SimPool(env_fn, placement=placement, **kw)
    except BaseException:
        session.shutdown()
        raise
    return pool, [pool.close, session.shutdown]
