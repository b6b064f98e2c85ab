"""Publish a finished folder whole: a kill leaves the earlier folder or the new one, never a mix.

A stage builds its result (a region store, an evaluation report, exported chips) in a hidden sibling of
its destination ``out``, ``.NAME.tmp-TAG``, on the same filesystem so that renames are
atomic, and :func:`swap_in` publishes it with two renames: ``out`` to ``.NAME.old-TAG``,
then the sibling to ``out``; the earlier folder is removed last. ``TAG`` is
``HOST-PID-TOKEN`` (:func:`run_tag`), so a later run can tell a killed run's leftovers
from a live one's.

:func:`recover`, run before a stage writes to ``out``: a run killed between the two
renames left no ``out`` but its ``.old-`` folder, which holds the whole earlier result;
it is renamed back (the killed run never finished, so the earlier result stands). Then
the ``.tmp-`` and ``.old-`` leftovers of killed runs (this host, process gone) are
removed; those of live processes and of other hosts are left alone.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from segpipe.errors import InputError
from segpipe.io.runs import pid_alive

__all__ = [
    "recover",
    "remove_stale_temporaries",
    "run_tag",
    "staged_folder",
    "staging_path",
    "swap_in",
    "target_folder",
    "temporary_name",
]


def run_tag() -> str:
    """``HOST-PID-TOKEN``: names this run's hidden folders."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def staging_path(out: Path, tag: str) -> Path:
    """The hidden sibling of ``out`` a run with ``tag`` builds its result in."""
    return out.with_name(f".{out.name}.tmp-{tag}")


def _remove(path: Path) -> None:
    """Remove a leftover folder or file, best effort (a staging VRT is a file)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _leftovers(out: Path, kind: str) -> tuple[list[Path], bool]:
    """Hidden ``kind`` entries of ``out`` whose process is gone, and whether a live one holds any.

    Only this host's are judged: a pid says nothing about another machine's processes.
    """
    prefix = f".{out.name}.{kind}-{socket.gethostname()}-"
    dead, live = [], False
    for path in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name.removeprefix(prefix).split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        if pid_alive(int(pid)):
            live = True
        else:
            dead.append(path)
    return dead, live


def recover(out: Path) -> None:
    """Restore an earlier folder whose swap a kill interrupted; remove killed runs' leftovers.

    Args:
        out: The destination (local).
    """
    old, swapping = _leftovers(out, "old")
    staging, _ = _leftovers(out, "tmp")
    # No "out" but a killed run's ".old-" folder: that run died between its two renames.
    # Not while a live run holds an ".old-" folder: it is between its own renames now.
    if old and not swapping and not os.path.lexists(out):
        newest = max(old, key=lambda p: p.stat().st_ctime)  # a rename sets ctime
        os.replace(newest, out)
        old.remove(newest)
    for path in old + staging:
        _remove(path)


def swap_in(staging: Path, out: Path, tag: str) -> None:
    """Rename ``out`` aside, ``staging`` to ``out``, then remove the earlier folder.

    Between the two renames ``out`` is missing; :func:`recover` renames the earlier one
    back if a kill strikes there, and an error there puts it back at once.

    Args:
        staging: The finished result.
        out: Where it is published.
        tag: This run's :func:`run_tag` (names the earlier folder while it is aside).
    """
    if not os.path.lexists(out):
        os.replace(staging, out)
        return
    old = out.with_name(f".{out.name}.old-{tag}")
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)
        raise
    _remove(old)


def target_folder(out: str | Path, what: str) -> Path:
    """``out`` as an absolute path with links resolved: the real folder is swapped, not a link to it.

    Args:
        out: The destination as the user gave it.
        what: What it holds ("report folder"), for the message.

    Raises:
        InputError: ``out`` is the current folder or holds it (it cannot be replaced whole).
    """
    target = Path(os.path.realpath(out))
    cwd = Path.cwd()
    if target == cwd or target in cwd.parents:
        raise InputError(
            f"--out {out} is or holds the current folder: a {what} is replaced whole, so name a folder "
            "of its own"
        )
    return target


@contextlib.contextmanager
def staged_folder(out: str | Path, owned: Callable[[str], bool], what: str) -> Iterator[Path]:
    """A hidden staging folder for a stage's files; swapped in as ``out`` when the block ends without error.

    Entries of an earlier ``out`` that the stage does not write (``owned`` is False for
    their names: a user's notes, say) are carried into the staging folder as hard links
    (copies where the filesystem has none) just before the swap, so they survive it and the
    earlier folder stays whole until it is swapped out; the stage's own files of an earlier
    run never are. On error (or when the swap itself fails) the staging folder is removed
    and ``out`` is left as it was.

    Raises:
        InputError: ``out`` is or holds the current folder.
    """
    target = target_folder(out, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tag = run_tag()
    staging = staging_path(target, tag)
    staging.mkdir()
    try:
        yield staging
        _carry_over(target, staging, owned)
        swap_in(staging, target, tag)
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


def _carry_over(target: Path, staging: Path, owned: Callable[[str], bool]) -> None:
    """Bring the entries of ``target`` the stage does not own into ``staging``; ``target`` stays whole."""
    if not target.is_dir():
        return
    shutil.copymode(target, staging)  # the folder keeps its permissions across the swap
    for entry in target.iterdir():
        dst = staging / entry.name
        if owned(entry.name) or os.path.lexists(dst):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dst, symlinks=True, copy_function=_link)
        else:
            _link(str(entry), str(dst))


def temporary_name(dest: Path, suffix: str = "") -> Path:
    """A hidden temporary ``.NAME.PID-HEX<suffix>`` beside ``dest``: what remove_stale_temporaries sweeps."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def remove_stale_temporaries(dest: Path) -> None:
    """Delete temporaries of earlier exports to ``dest`` (``.NAME.PID-HEX.*``) whose process has ended.

    The COG's, its legend's, the polygons' and the ONNX file's temporaries share that form
    (:func:`temporary_name`), so one sweep serves every export.
    """
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(\d+)-[0-9a-f]{{8}}\.")
    for tmp in dest.parent.glob(f".{glob.escape(dest.name)}.*"):
        match = pattern.match(tmp.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            tmp.unlink(missing_ok=True)
