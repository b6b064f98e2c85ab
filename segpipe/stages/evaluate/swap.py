"""Switch a finished report folder in whole: a kill leaves the earlier report or the new one.

A local report is written into a hidden staging folder beside ``--out`` and published
whole by :func:`segpipe.io.swap.staged_folder`, as ingest publishes a store, after a
report whose swap a kill interrupted is put back. So a new report holds only the files
its own run wrote (no ``points.csv`` of an earlier point assessment beside a full-pixel
one), and entries of ``out`` that are not report files (:data:`REPORT_FILES`), a user's
notes for instance, are carried over.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from segpipe.io import swap

__all__ = ["REPORT_FILES", "recover", "staged_report"]

REPORT_FILES = frozenset({"metrics.json", "report.md", "confusion_matrix.png", "preview.png", "points.csv"})
"""What ``segpipe evaluate`` writes: an earlier run's are never carried into a new report."""

_WHAT = "report folder"


def recover(out: str | Path) -> None:
    """Restore an earlier report whose swap a kill interrupted; remove killed runs' folders.

    Local folders only (an ``s3://`` report is uploaded, not swapped).

    Raises:
        InputError: ``out`` is or holds the current folder.
    """
    swap.recover(swap.target_folder(out, _WHAT))


def staged_report(out: str | Path) -> AbstractContextManager[Path]:
    """A hidden staging folder for the report; swapped in as ``out`` when the block ends without error.

    Raises:
        InputError: ``out`` is or holds the current folder.
    """
    return swap.staged_folder(out, REPORT_FILES.__contains__, _WHAT)
