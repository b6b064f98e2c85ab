"""Records that let a rerun skip a product already made from the same inputs.

A product (a COG, an evaluation report) gets a small JSON record beside it, written
only after the product is complete: what it was made from, and the product file's
size and modification time, so a product replaced by other means is not mistaken for
an up-to-date one. The record is removed before the product is remade, so a crash in
between never leaves a record over a half-made or different product. Products on
object storage (``s3://``) keep their record beside them there, read and written
through fsspec; their "modification time" is the object's ETag.
"""

# No `from __future__ import annotations`: modules in flows/ keep evaluated annotations.
import json
import os
from pathlib import Path
from typing import Any

from segpipe.io.remote import as_url, filesystem, is_remote

__all__ = ["forget", "is_current", "record_of", "remember"]

SUFFIX = ".segpipe.json"


def _record_path(product: str | Path) -> str:
    return f"{as_url(product) if is_remote(product) else product}{SUFFIX}"


def _stat(product: str | Path) -> dict[str, Any] | None:
    """Size and version of ``product`` (mtime locally, ETag on S3); None if it is missing."""
    if is_remote(product):
        try:
            info = filesystem().info(as_url(product))
        except FileNotFoundError:
            return None
        return {"size": int(info["size"]), "etag": str(info.get("ETag", ""))}
    try:
        st = Path(product).stat()
    except FileNotFoundError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_text(path: str) -> str:
    if is_remote(path):
        with filesystem().open(path, "r") as f:
            return str(f.read())
    return Path(path).read_text()


def record_of(product: str | Path) -> dict[str, Any] | None:
    """The record beside ``product``, or None (none, or unreadable)."""
    try:
        data = json.loads(_read_text(_record_path(product)))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_current(product: str | Path, made_from: dict[str, Any]) -> bool:
    """Whether ``product`` exists, unchanged, and was made from ``made_from``.

    A ``made_from`` holding a None value (an input without a fingerprint) is never current.
    """
    record = record_of(product)
    if record is None or any(v is None for v in made_from.values()):
        return False
    stat = _stat(product)
    return bool(stat is not None and record.get("made_from") == made_from and record.get("product") == stat)


def forget(product: str | Path) -> None:
    """Remove the record of ``product`` (before remaking it)."""
    path = _record_path(product)
    if is_remote(path):
        fs = filesystem()
        if fs.exists(path):
            fs.rm(path)
    else:
        Path(path).unlink(missing_ok=True)


def remember(product: str | Path, made_from: dict[str, Any], **extra: Any) -> None:
    """Record that ``product``, as it is now, was made from ``made_from``."""
    path = _record_path(product)
    text = json.dumps({"made_from": made_from, "product": _stat(product), **extra}, indent=2, sort_keys=True)
    if is_remote(path):
        filesystem().pipe(path, (text + "\n").encode())  # an object appears whole or not at all
        return
    local = Path(path)
    tmp = local.with_name(f".{local.name}.{os.getpid()}")
    tmp.write_text(text + "\n")
    os.replace(tmp, local)  # atomic: a reader sees the old record or the new one
