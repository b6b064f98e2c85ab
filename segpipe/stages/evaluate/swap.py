"""Switch a finished report folder in whole: a kill leaves the earlier report or the new one.

A local report is written into a hidden staging folder beside ``--out`` and published
with :func:`segpipe.io.swap.swap_in`, as ingest publishes a store, after
:func:`segpipe.io.swap.recover` has restored a report whose swap a kill interrupted and
removed killed runs' leftovers. So a new report holds only the files its own run wrote
(no ``points.csv`` of an earlier point assessment beside a full-pixel one).

Entries of ``out`` that are not report files (:data:`REPORT_FILES`), a user's notes for
instance, are carried into the staging folder as hard links (copies where the filesystem
has none) just before the swap: they survive it, and the earlier folder stays whole until
it is swapped out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from segpipe.errors import InputError
from segpipe.io import swap

__all__ = ["REPORT_FILES", "recover", "staged_report"]

REPORT_FILES = frozenset({"metrics.json", "report.md", "confusion_matrix.png", "preview.png", "points.csv"})
"""What ``segpipe evaluate`` writes: an earlier run's are never carried into a new report."""


def _target(out: str | Path) -> Path:
    """``out`` as an absolute path with links resolved: the real folder is swapped, not a link to it.

    Raises:
        InputError: ``out`` is the current folder or holds it (it cannot be replaced whole).
    """
    target = Path(os.path.realpath(out))
    cwd = Path.cwd()
    if target == cwd or target in cwd.parents:
        raise InputError(
            f"--out {out} is or holds the current folder: a report folder is replaced whole, "
            "so name a folder of its own, e.g. --out report"
        )
    return target


def recover(out: str | Path) -> None:
    """Restore an earlier report whose swap a kill interrupted; remove killed runs' folders.

    Local folders only (an ``s3://`` report is uploaded, not swapped).

    Raises:
        InputError: ``out`` is or holds the current folder.
    """
    swap.recover(_target(out))


@contextlib.contextmanager
def staged_report(out: str | Path) -> Iterator[Path]:
    """A hidden staging folder for the report; swapped in as ``out`` when the block ends without error.

    On error (or when the swap itself fails) the staging folder is removed and ``out`` is
    left as it was.

    Raises:
        InputError: ``out`` is or holds the current folder.
    """
    target = _target(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    swap.recover(target)
    tag = swap.run_tag()
    staging = swap.staging_path(target, tag)
    staging.mkdir()
    try:
        yield staging
        _carry_over(target, staging)
        swap.swap_in(staging, target, tag)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _link(src: str, dst: str) -> str:
    """Hard-link ``src`` to ``dst`` (no bytes copied), or copy it where links are refused."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
    return dst


def _carry_over(target: Path, staging: Path) -> None:
    """Bring the entries of ``target`` that are not report files into ``staging``; ``target`` stays whole."""
    if not target.is_dir():
        return
    shutil.copymode(target, staging)  # the folder keeps its permissions across the swap
    for entry in target.iterdir():
        dst = staging / entry.name
        if entry.name in REPORT_FILES or os.path.lexists(dst):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dst, symlinks=True, copy_function=_link)
        else:
            _link(str(entry), str(dst))
