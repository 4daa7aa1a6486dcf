"""Programs compiled ahead of time, on a background thread: the learner's update and the decoder's
buckets compile while the simulators start and roll out, and a call whose program is ready (or
compiling) runs it instead of compiling again. An AOT compile also lands in JAX's persistent
compilation cache, if on, so a resumed or relaunched process loads it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Hashable

import jax
import numpy as np

__all__ = ["CompileAhead", "abstract"]


def abstract(tree: Any) -> Any:
    """`tree`'s arrays as shapes and dtypes to lower with: committed arrays (parameters, train state)
    keep their sharding, the rest (host inputs) follow them."""
    def one(x):
        sharding = x.sharding if isinstance(x, jax.Array) and x.committed else None
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


class CompileAhead:
    """One background compile thread and the programs it made, by key."""

    def __init__(self, name: str):
        self._name = name
        self._futures: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, key: Hashable, lower: Callable[[], Any]) -> Future:
        """Compile `lower()` (a jitted function's `.lower(...)`) in the background, once per key."""
        with self._lock:
            if key not in self._futures:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix=self._name)
                self._futures[key] = self._pool.submit(lambda: lower().compile())
            return self._futures[key]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._futures

    def get(self, key: Hashable):
        """The compiled program for `key` (waiting for a compile under way), or None if none was asked."""
        with self._lock:
            fut = self._futures.get(key)
        return None if fut is None else fut.result()

    def close(self) -> None:
        """Drop queued compiles (one under way finishes on its own)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
