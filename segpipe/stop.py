"""A stop asked for by a signal, seen by every thread of the process.

Python runs signal handlers in the main thread only. Inside a flow the work runs in a
task runner's thread, which the main thread joins on its way out: told nothing, that
thread carried on, and a SIGTERM (or Ctrl-C) during ``segpipe demo``'s training ended the
process only when the whole training had finished. The signal relay every flow runs
in (:mod:`flows.signals`) calls :func:`request_stop`; long loops call
:func:`check_stop` between their steps (a training step, a wave of blocks, a finished
task), which raises the signal's exception in their own thread, so their ``finally``
blocks clean up as the main thread's do.
"""

from __future__ import annotations

import threading

__all__ = ["check_stop", "clear_stop", "request_stop"]

_requested: type[BaseException] | None = None


def request_stop(kind: type[BaseException]) -> None:
    """Ask every thread to stop by raising ``kind`` (``KeyboardInterrupt``, or SIGTERM's)."""
    global _requested
    _requested = kind


def clear_stop() -> None:
    """Forget an earlier request (a new flow in this process starts afresh)."""
    global _requested
    _requested = None


def check_stop() -> None:
    """Raise the requested stop's exception, in any thread but the main one.

    The main thread needs no check: the signal handler raised there already.
    """
    kind = _requested
    if kind is not None and threading.current_thread() is not threading.main_thread():
        raise kind()
