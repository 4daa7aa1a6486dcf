"""Stopping a run with a signal (Ctrl-C, SIGTERM): the exception that unwinds it, so that the run closes
what it started (simulator actors, an embedded Ray, whose agents would otherwise outlive it).

Python raises a signal handler's exception wherever the main thread is; when that is a gc callback or a
`__del__` (jax runs one at every collection), Python prints it as 'Exception ignored' and goes on, and
the run would not stop. So the signal is also remembered: `check()`, called by the training loop at each
rollout round, raises it again, and the lost copy is not printed.
"""

from __future__ import annotations

import signal
import sys

_requested: int | None = None  # the signal that asked the run to stop


class Terminated(SystemExit):
    """SIGTERM (a scheduler's stop, `kill`), raised in the main thread as Ctrl-C raises KeyboardInterrupt."""


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(128 + signum)


def _handler(signum, frame):
    global _requested
    _requested = signum
    raise _exception(signum)


def check() -> None:
    """Raise the stop a signal asked for, if that exception was lost (see the module docstring)."""
    if _requested is not None:
        raise _exception(_requested)


def install():
    """Handle SIGINT and SIGTERM as above; returns a function that puts the previous handlers back."""
    global _requested
    _requested = None
    before = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook

    def quiet(u):  # the lost copy: `check` raises it again
        if not isinstance(u.exc_value, (KeyboardInterrupt, Terminated)):
            hook(u)

    sys.unraisablehook = quiet

    def restore() -> None:
        global _requested
        _requested = None
        sys.unraisablehook = hook
        for s, h in before.items():
            signal.signal(s, h)

    return restore


def name(e: BaseException) -> str:
    return "SIGTERM" if isinstance(e, Terminated) else "SIGINT (Ctrl-C)"


def exit_code(e: BaseException) -> int:
    """128 + the signal number, as a shell reports a process the signal ended."""
    return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
