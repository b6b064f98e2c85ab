"""The file names inside a model package folder, and how its files are written.

Shared by the package, its fetcher, its ONNX form and its STAC MLM description.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
import threading
from collections.abc import Collection
from pathlib import Path

__all__ = [
    "MLM_FILE",
    "ONNX_FILE",
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "atomic_write",
    "give_default_mode",
    "remove_stale_plots",
    "replace_package_files",
    "settle_package",
]

SPEC_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
# The weights of an ONNX package (model.json's weights_format "onnx"), run by onnxruntime.
ONNX_FILE = "model.onnx"
MLM_FILE = "mlm.json"  # the package's STAC MLM description (segpipe.models.mlm)


def _umask() -> int:
    """The process's umask (read by setting it, the only portable way, and setting it back)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()

# What mkstemp adds to atomic_write's prefix: 8 of these characters (tempfile's name sequence).
_MKSTEMP_PART = re.compile(r"[a-z0-9_]{8}")


def give_default_mode(path: Path) -> None:
    """Give a file the mode ``open()`` would have (0666 less the umask).

    mkstemp makes its files 0600: workers or containers running as another user could not
    read a package or an ONNX file renamed from one.
    """
    os.chmod(path, 0o666 & ~_umask())


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temporary beside it, renamed over it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        give_default_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_plots(folder: Path, keep: Collection[str] = ()) -> None:
    """Delete the PNG plots in ``folder`` not named in ``keep``.

    An earlier package's plots (loss curve, confusion matrix) must not pass for those of
    the package written over it.
    """
    for stale in folder.glob("*.png"):
        if stale.name not in keep:
            stale.unlink()


def _staged(folder: Path, name: str) -> Path:
    return folder / f".{name}.staged"


def _write_temporaries(path: Path) -> list[Path]:
    """The temporaries :func:`atomic_write` leaves beside ``path`` when killed mid-write."""
    prefix = f".{path.name}."
    return [tmp for tmp in path.parent.glob(glob.escape(prefix) + "*")
            if _MKSTEMP_PART.fullmatch(tmp.name[len(prefix):])]


def _remove_write_temporaries(folder: Path) -> None:
    """Delete what killed writes of a package left of the files they write through :func:`atomic_write`.

    Only a writer calls this (see :func:`settle_package`): a package has one writer at a
    time, so none of these can belong to a write still at work.
    """
    names = (WEIGHTS_FILE, ONNX_FILE, SPEC_FILE)
    for path in (*(_staged(folder, n) for n in names), folder / SPEC_FILE, folder / MLM_FILE):
        for tmp in _write_temporaries(path):
            tmp.unlink(missing_ok=True)


def replace_package_files(folder: Path, weights_name: str, weights: bytes, spec: bytes) -> None:
    """Replace a package's weights and ``model.json`` so that a kill leaves one whole package.

    Both are staged beside their targets (weights first), then the weights are renamed in,
    which commits the package, then the description. A kill before that rename leaves the
    earlier package whole (the staged files and the temporaries of their writing are removed
    by the next write); a kill after it leaves the new weights and a staged description
    alone, which :func:`settle_package` (run by every reader of a local package) renames in.
    """
    settle_package(folder, discard=True)
    atomic_write(_staged(folder, weights_name), weights)
    atomic_write(_staged(folder, SPEC_FILE), spec)
    os.replace(_staged(folder, weights_name), folder / weights_name)
    try:
        os.replace(_staged(folder, SPEC_FILE), folder / SPEC_FILE)
    except FileNotFoundError:  # a reader rolled it forward in the moment between the renames
        if not (folder / SPEC_FILE).is_file():
            raise


def settle_package(folder: Path, discard: bool = False) -> None:
    """Finish a package write that a kill cut between its two renames (a no-op otherwise).

    A staged ``model.json`` without a staged weights file means the weights were committed:
    it is renamed in. With ``discard`` (a writer about to write), staged files of a write
    that never committed are removed, and so are the temporaries :func:`atomic_write` left
    of a package's files (a kill mid-write leaves one as big as the weights); readers leave
    both, as a writer may be at work.
    """
    if discard:
        _remove_write_temporaries(folder)
    spec = _staged(folder, SPEC_FILE)
    staged_weights = [_staged(folder, n) for n in (WEIGHTS_FILE, ONNX_FILE) if _staged(folder, n).exists()]
    if staged_weights:
        if discard:
            for path in (*staged_weights, spec):
                path.unlink(missing_ok=True)
        return
    if spec.is_file():
        # Another reader may be first, or the copy read-only: the next write settles it then.
        with contextlib.suppress(OSError):
            os.replace(spec, folder / SPEC_FILE)
