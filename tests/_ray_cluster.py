"""A real multi-node Ray cluster inside the test process (`ray.cluster_utils.Cluster`), joined by it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from ray.cluster_utils import Cluster

from vlajax.distributed.ray_sim import RaySession, init_ray


@contextlib.contextmanager
def local_cluster(prefix: str, head: dict, *nodes: dict) -> Iterator[tuple[Cluster, list, RaySession]]:
    """A head node (`head`: its `Cluster` node args) plus one node per `nodes` entry, in a fresh temp dir
    ($RAY_TMPDIR while it runs: the Cluster writes its address file there), joined by this process.
    Yields (cluster, the added nodes, the session); shuts everything down and restores $RAY_TMPDIR."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    c = Cluster(initialize_head=True, head_node_args={**head, "include_dashboard": False})
    try:
        added = [c.add_node(**n) for n in nodes]
        session = init_ray(c.address)
        c.wait_for_nodes()
        try:
            yield c, added, session
        finally:
            session.shutdown()
    finally:
        c.shutdown()
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)
