"""Set-up of the worker processes of the local clusters segpipe starts (a dask preload).

The driver owns a local cluster's errors and interruptions: it re-raises a failed task's
error, which the ``segpipe`` command prints as one line, and on Ctrl-C it closes the
cluster. The worker processes would otherwise say the same things again on the shared
terminal, as tracebacks: distributed logs every failed task with its traceback
("Compute Failed"), and a terminal's Ctrl-C reaches every process of its group, so each
worker printed a ``KeyboardInterrupt`` traceback before the driver's ``error:`` line,
and a worker whose scheduler (in the driver's process) closed first logged a failed
heartbeat with a traceback.

Clusters a user runs (``--scheduler``) keep their own logging and signals.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

__all__ = ["PRELOAD", "dask_setup"]

PRELOAD = __name__
"""The module name to give a nanny's ``preload``."""


# distributed's worker log records that repeat what the driver reports: a failed task
# (re-raised in the driver), a scheduler gone away (the driver's own, closed on its way
# out) and the tasks that closing cancelled. Each logger's filters see only its own records.
_REPEATS = ("Compute Failed", "Failed to communicate with scheduler during heartbeat")
_CANCELLED = ("Async instruction for", "ended with CancelledError")
_LOGGERS = ("distributed.worker", "distributed.worker.state_machine")


class _NoRepeats(logging.Filter):
    """Drop the worker's log records of what the driver reports itself (:data:`_REPEATS`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cancelled = message.startswith(_CANCELLED[0]) and message.endswith(_CANCELLED[1])
        return not (cancelled or message.startswith(_REPEATS))


def dask_setup(worker: Any) -> None:
    """Quiet the worker's repeats of what the driver reports (called by dask at worker start).

    Args:
        worker: The starting ``distributed.Worker`` (unused: the set-up is per process).
    """
    for name in _LOGGERS:
        logging.getLogger(name).addFilter(_NoRepeats())
    # signal.signal works in the main thread only; a worker started in a thread keeps its own.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
