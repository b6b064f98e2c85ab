"""The error boundary: any exception turned into one line and an exit code.

segpipe maps library errors into its own tree where they happen (naming the file, tile
or address). This module is the fallback for whatever slips through from rasterio/GDAL,
zarr, JSON, the operating system or distributed, kept small and in one place: the
``segpipe`` command prints :func:`classify`'s line and exits with its code, and batch
summaries name each failed region's cause with :func:`one_line`.

Exit codes: 0 ok, 1 internal error (a bug), 2 bad input or usage, 3 a fault of the
environment (disk, permissions, memory, network, cluster, engine), 4 a store held by
another run, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import errno
import json
import sys
from dataclasses import dataclass
from typing import Any

from segpipe.errors import STORAGE_HINTS, SegpipeError, exit_code

__all__ = [
    "INTERRUPTED",
    "TERMINATED",
    "Terminated",
    "Verdict",
    "catch_sigterm",
    "classify",
    "one_line",
    "one_line_warnings",
]

INTERRUPTED = 130
TERMINATED = 143  # 128 + SIGTERM, as shells report it


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler's time limit, ``kill``, ``timeout``).

    Raised in the main thread so that every ``finally`` and cleanup handler runs, as for
    Ctrl-C: staged results, hidden trees and temporary files are dealt with before the
    process ends. A BaseException, so ``except Exception`` blocks do not swallow it.
    """


def catch_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` in this (main) thread.

    A signal's exception can land in a ``__del__`` (or a weakref callback), where Python
    drops it; the unraisable hook then has the signal sent again a moment later from a
    helper thread (not from the hook itself, where it would be dropped too), so it is
    raised once more in ordinary code.
    """
    import os
    import signal
    import threading

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    chained = sys.unraisablehook

    def redeliver(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, Terminated):
            again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
            again.daemon = True
            again.start()
            return
        chained(unraisable)

    sys.unraisablehook = redeliver
    signal.signal(signal.SIGTERM, terminate)

# What to do about each OS error a destination can raise; the file is named in front.
# The destination faults segpipe maps where they happen, plus a name already taken.
_ERRNO_HINTS: dict[int, str] = {
    **STORAGE_HINTS,
    errno.EEXIST: "already exists: remove it or choose another name",
}

_MAX_LINE = 400

# Packages whose errors mean an unreadable input file: what it is, what to check.
_READERS: dict[str, tuple[str, str]] = {
    "rasterio": ("raster", "is the file a complete GeoTIFF/VRT with a CRS?"),
    "pyogrio": ("vector file", "is it a complete GeoPackage/Shapefile/GeoJSON?"),
    "fiona": ("vector file", "is it a complete GeoPackage/Shapefile/GeoJSON?"),
}


@dataclass(frozen=True)
class Verdict:
    """How an error ends the command.

    Attributes:
        message: One line for the user (without the ``error:`` prefix).
        code: The process exit code.
    """

    message: str
    code: int


def _flat(text: object) -> str:
    """One line: GDAL and zarr messages carry newlines and runs of spaces."""
    line = " ".join(str(text).split())
    return line if len(line) <= _MAX_LINE else line[: _MAX_LINE - 1] + "…"


def _is_instance(exc: BaseException, module: str, names: tuple[str, ...]) -> bool:
    """Whether ``exc`` is one of ``module``'s classes, without importing the module.

    A module that was never imported cannot have raised, and importing rasterio, zarr
    or distributed only to classify an error would slow down every failing command.
    """
    mod = sys.modules.get(module)
    classes = tuple(c for c in (getattr(mod, n, None) for n in names) if isinstance(c, type))
    return bool(classes) and isinstance(exc, classes)


def _os_error(exc: OSError) -> Verdict:
    where = exc.filename if exc.filename is not None else None
    hint = _ERRNO_HINTS.get(exc.errno) if exc.errno is not None else None
    if hint is None:
        hint = _flat(exc.strerror or exc) or type(exc).__name__
    return Verdict(f"{where}: {hint}" if where else hint, 3)


def _connection(exc: BaseException) -> bool:
    if _is_instance(exc, "distributed.comm.core", ("CommClosedError",)):
        return True
    return isinstance(exc, ConnectionError | TimeoutError)


def classify(exc: BaseException) -> Verdict:
    """The one-line message and exit code for any error.

    Args:
        exc: The error that ended the command.

    Returns:
        segpipe's own errors keep their message and family code; unreadable rasters,
        JSON and Zarr metadata are bad input (2); file-system and connection errors are
        environment faults (3); anything else is an internal error (1) whose message
        asks for ``--debug``.
    """
    if isinstance(exc, KeyboardInterrupt):
        return Verdict("interrupted", INTERRUPTED)
    if isinstance(exc, Terminated):
        return Verdict(
            "terminated by SIGTERM: partial work was cleaned up; rerun to continue (predict and train "
            "resume where they stopped)",
            TERMINATED,
        )
    if isinstance(exc, MemoryError):
        return Verdict(
            f"out of memory ({_flat(exc) or 'MemoryError'}): use a smaller --tile-size, --batch-size or "
            "--block-size, or a machine with more memory",
            3,
        )
    if isinstance(exc, SegpipeError):
        return Verdict(_flat(exc), exit_code(exc))
    # Before OSError: RasterioIOError is an OSError, but it means an unreadable raster.
    # By the defining package: rasterio's errors do not share one base (CRSError is a
    # ValueError, GDAL's CPLE_* errors live in rasterio._err).
    reader = _READERS.get(type(exc).__module__.partition(".")[0])
    if reader is not None:
        return Verdict(f"cannot read the {reader[0]}: {_flat(exc)} ({reader[1]})", 2)
    if isinstance(exc, FileNotFoundError):
        where = exc.filename if exc.filename is not None else _flat(exc)
        return Verdict(f"{where}: no such file or folder", 2)
    if _connection(exc):
        return Verdict(
            f"connection failed: {_flat(exc) or type(exc).__name__} "
            "(check the scheduler address, that it is running, and the network)",
            3,
        )
    if isinstance(exc, OSError):
        return _os_error(exc)
    if isinstance(exc, json.JSONDecodeError):
        return Verdict(f"invalid JSON: {_flat(exc)} (a truncated or hand-edited .json file?)", 2)
    if _is_instance(exc, "zarr.errors", ("BaseZarrError",)):
        return Verdict(f"unusable Zarr store: {_flat(exc)} (rebuild it with segpipe ingest)", 2)
    return Verdict(
        f"internal error: {type(exc).__name__}: {_flat(exc)} (rerun with --debug for the traceback)", 1
    )


def one_line_warnings() -> None:
    """Print every warning as one ``warning:`` line on stderr, without Python's source line.

    Python's own format names the module and repeats the line of code that warned, over
    several lines (rasterio's NotGeoreferencedWarning, segpipe's SingleClassWarning); a
    user needs what the warning says. ``--debug`` keeps Python's format.
    """
    import warnings

    def show(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
        sys.stderr.write(f"warning: {_flat(message)} ({category.__name__})\n")

    warnings.showwarning = show


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for a batch summary naming each failure's cause.

    The message is :func:`classify`'s, so a batch names a region's cause as the command
    would.
    """
    verdict = classify(exc)
    if verdict.code == 1:  # no --debug in a batch summary: the flow's log has the traceback
        return f"{type(exc).__name__}: {_flat(exc)}"
    return f"{type(exc).__name__}: {verdict.message}"
