"""How much a step spent compiling: JAX's own compile events, counted per step.

JAX reports every compilation through `jax.monitoring` (tracing, lowering and the backend's compile,
each with the function's name; a persistent-cache hit skips the backend compile). `CompileMeter.take()`
returns what happened since the last call, so a step's record says whether anything compiled after
warm-up (`perf/compiles` 0) and which of the run's big functions did.
"""

from __future__ import annotations

import threading

import jax

__all__ = ["CompileMeter"]

_DURATIONS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration")
_BACKEND = _DURATIONS[0]
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_local = threading.local()  # per thread: did the compile under way hit the persistent cache?

_lock = threading.Lock()
_totals = {"seconds": 0.0, "compiles": 0, "cache_hits": 0}
_by_name: dict[str, int] = {}
_installed = False


def _on_duration(event: str, seconds: float, **kw) -> None:
    if event not in _DURATIONS:
        return
    with _lock:
        _totals["seconds"] += seconds
        if event == _BACKEND:  # also fired for a persistent-cache hit (the load): that is not a compile
            if getattr(_local, "hit", False):
                _local.hit = False
                return
            _totals["compiles"] += 1
            name = kw.get("fun_name", "?")
            _by_name[name] = _by_name.get(name, 0) + 1


def _on_event(event: str, **kw) -> None:
    if event == _CACHE_HIT:
        _local.hit = True  # the backend-compile event that follows, in this thread, is this load
        with _lock:
            _totals["cache_hits"] += 1


def _install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)


class CompileMeter:
    """Compile time and counts since the last `take()`. `watch` maps a metric suffix to a substring
    of the jitted function's name (e.g. {"update": "_update"}): its compiles are counted on their own."""

    def __init__(self, watch: dict[str, str] | None = None):
        _install()
        self.watch = dict(watch or {})
        self._last = self._snapshot()

    def _snapshot(self) -> tuple[dict, dict]:
        with _lock:
            return dict(_totals), dict(_by_name)

    def take(self) -> dict[str, float]:
        """{"perf/compile_s" (tracing, lowering, compiling or loading), "perf/compiles" (programs compiled,
        persistent-cache loads not counted), "perf/compile_cache_hits", "perf/compiles/<name>"} since last."""
        (tot, names), (tot0, names0) = self._snapshot(), self._last
        self._last = (tot, names)
        out = {"perf/compile_s": tot["seconds"] - tot0["seconds"], "perf/compiles": tot["compiles"] - tot0["compiles"],
               "perf/compile_cache_hits": tot["cache_hits"] - tot0["cache_hits"]}
        for metric, part in self.watch.items():
            out[f"perf/compiles/{metric}"] = sum(n - names0.get(k, 0) for k, n in names.items() if part in k)
        return out
