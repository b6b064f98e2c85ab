"""Ctrl-C and SIGTERM during a flow stop its task threads too, not only the main thread.

A flow's tasks run in a task runner's threads, and Python runs signal handlers in the
main thread only; Prefect's own SIGTERM handler (installed for each flow run) raises
there and then joins the task threads on its way out. Told nothing, a task thread ran to
its end: a SIGTERM during ``segpipe demo``'s training ended the process only when the
whole training had finished, long after a batch scheduler's grace period. Every segpipe
flow is wrapped in :func:`relays_signals`: while it runs, either signal first requests a
stop (:func:`segpipe.stop.request_stop`, raised by the threads' next
:func:`segpipe.stop.check_stop`), then goes on to the handler it had before.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

from segpipe.boundary import Terminated
from segpipe.stop import clear_stop, request_stop

__all__ = ["relay_signals", "relays_signals"]

P = ParamSpec("P")
R = TypeVar("R")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_depth = 0  # flows running inside one another in this process (main thread only)


def _relay(previous: dict[int, Any]) -> Callable[[int, Any], None]:
    def relay(signum: int, frame: Any) -> None:
        request_stop(KeyboardInterrupt if signum == signal.SIGINT else Terminated)
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            raise Terminated

    return relay


@contextlib.contextmanager
def relay_signals() -> Iterator[None]:
    """While inside, SIGTERM and Ctrl-C also ask every thread to stop (in the main thread only).

    A signal the process ignores (a shell's background job ignores Ctrl-C) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _depth
    if _depth == 0:  # a request left by an earlier flow of this process (a notebook's) is over
        clear_stop()
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    # An ignored signal stays ignored; None is a handler not set from Python: left alone.
    relayed = [sig for sig, handler in previous.items() if handler not in (signal.SIG_IGN, None)]
    relay = _relay(previous)
    for sig in relayed:
        signal.signal(sig, relay)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for sig in relayed:
            signal.signal(sig, previous[sig])


def relays_signals(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run inside :func:`relay_signals` (put under ``@flow``)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with relay_signals():
            return fn(*args, **kwargs)

    return wrapper
