"""Which Prefect engine runs the flows when the user has not configured one.

Without a Prefect API, flows run on Prefect's ephemeral engine: a local API server in
a subprocess, which Prefect gives 20 s to answer. On a busy machine that is not
enough (the first start also creates its database), and the flow died with "Timed
out while attempting to connect to ephemeral Prefect API server". segpipe starts the
engine itself, before the first flow, with a longer timeout and one retry, and ends
with a one-line :class:`~segpipe.errors.EngineError` if it still does not answer.

The server runs in a process group of its own, tied to this process's life (on Linux
it gets SIGTERM when segpipe dies, even by SIGKILL). Ctrl-C in a terminal, or a SIGTERM
to segpipe's process group, then reaches segpipe alone: its flow records the crash and
cleans up while the server still answers, and segpipe stops the server as it exits.
Sharing segpipe's group, the server died first and every later API call (the crash's
state, the last log lines) was retried against a dead port for about 2.5 minutes.
"""

import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

from segpipe.errors import EngineError, InputError

__all__ = ["START_TIMEOUT_ENV", "leave_tracebacks_to_the_command", "start_local_engine", "use_local_engine"]

log = logging.getLogger(__name__)

START_TIMEOUT_ENV = "SEGPIPE_PREFECT_START_TIMEOUT"
DEFAULT_START_TIMEOUT = 90
START_ATTEMPTS = 2


def _start_timeout() -> int:
    raw = os.environ.get(START_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_START_TIMEOUT
    try:
        seconds = int(float(raw))
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise InputError(f"{START_TIMEOUT_ENV}={raw!r} must be a whole number of seconds, 1 or more")
    return seconds


class _NoTraceback(logging.Filter):
    """Keep a failed task's or flow's log line, without its traceback (the command prints the error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


# Prefect's loggers of task and flow runs: each failure is logged there with its traceback.
_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


def leave_tracebacks_to_the_command() -> None:
    """Log failed tasks and flows in one line: the ``segpipe`` command ends with the error itself.

    Without this, a missing image in a region file printed Prefect's ERROR records with
    the full traceback (112 lines for ``run``, three tracebacks for a ``batch``) before
    the command's one ``error:`` line; ``--debug`` prints the traceback there. Only with
    the local engine, which ends with the command: a configured Prefect server keeps the
    traceback in the run's logs (the filter would cut it from them too).
    """
    if "PREFECT_API_URL" in os.environ:
        return
    for name in _RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTraceback) for f in logger.filters):
            logger.addFilter(_NoTraceback())


def use_local_engine(home: Path | None = None, start: bool = True) -> None:
    """Use Prefect's ephemeral engine, quietly, unless a Prefect API is configured.

    Args:
        home: Keep the engine's database in this folder (e.g. inside the demo's output).
        start: Start the engine now (:func:`start_local_engine`), so a slow start is
            retried and named rather than failing the first flow.

    Raises:
        EngineError: The engine did not answer in time, twice.
    """
    if "PREFECT_API_URL" in os.environ:
        return
    if home is not None:
        os.environ.setdefault("PREFECT_HOME", str(home.resolve()))
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    # The telemetry service races the flow for the fresh SQLite file ("database is
    # locked") and has nothing to report from a throwaway engine.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's own setting, for any start Prefect makes itself (a later restart).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(_start_timeout()))
    if start:
        start_local_engine()


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(prctl: Any) -> None:
    """In the server's child, between fork and exec: SIGTERM when the starting thread ends."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _launch_options() -> dict[str, Any]:
    """Popen options that put the server in a group of its own, dying with this process."""
    options: dict[str, Any] = {"process_group": 0}
    # The parent-death signal follows the thread that forks: only the main thread lives as
    # long as the process.
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the child
        options["preexec_fn"] = functools.partial(_die_with_parent, prctl)
    return options


@functools.cache
def _server_class() -> type[Any]:
    """Prefect's ephemeral server class, launching its process with :func:`_launch_options`."""
    import prefect.server.api.server as server_module

    class GroupedServer(server_module.SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect builds the command and its environment; only the Popen it calls
            # changes, and only in its server module, for this one call.
            popen = functools.partial(subprocess.Popen, **_launch_options())
            server_module.subprocess = types.SimpleNamespace(**{**vars(subprocess), "Popen": popen})  # type: ignore[assignment]
            try:
                process: subprocess.Popen[Any] = super()._run_uvicorn_command()
            finally:
                server_module.subprocess = subprocess
            return process

    return GroupedServer


def _new_server() -> Any:
    """A fresh ephemeral server (Prefect's one instance, if one is already running)."""
    return _server_class()()


def start_local_engine(timeout: int | None = None, attempts: int = START_ATTEMPTS) -> None:
    """Start Prefect's ephemeral API server now, retrying once, unless an API is configured.

    Prefect reuses the running server for every later flow of this process.

    Args:
        timeout: Seconds to wait for each start; default ``SEGPIPE_PREFECT_START_TIMEOUT``,
            else 90.
        attempts: Starts to try before giving up.

    Raises:
        EngineError: No start answered within the timeout.
    """
    from prefect.settings import PREFECT_API_URL

    seconds = timeout or _start_timeout()  # a bad setting is named even where unused
    if PREFECT_API_URL.value():  # a server, Prefect Cloud, or a test harness
        return
    cause: BaseException | None = None
    for attempt in range(1, attempts + 1):
        server = _new_server()  # a stopped server is forgotten: this is a fresh one
        try:
            server.start(timeout=seconds)
            return
        except Exception as exc:  # Prefect raises RuntimeError with the server's whole output
            cause = exc
            # Stopped, so a server that answers late neither holds the port nor lingers.
            server.stop()
            if attempt < attempts:
                log.warning("the local Prefect engine did not start within %d s; trying again", seconds)
    raise EngineError(
        f"the local Prefect engine did not start within {seconds} s ({attempts} tries): the machine may "
        f"be overloaded; set {START_TIMEOUT_ENV} to wait longer, or PREFECT_API_URL to use a running "
        "Prefect server"
    ) from cause
