"""Fingerprints of stage inputs, so reruns skip work already done for the same inputs.

A fingerprint hashes what identifies an input cheaply (resolved path, size and
modification time of every file, the files a VRT points to included) together with
the settings that shape the output. Equal fingerprints mean "same inputs": a rerun
of a failed batch skips finished stages instead of recomputing them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["files_fingerprint", "ingest_fingerprint", "store_inputs"]

_VRT_SOURCE = re.compile(r'<SourceFilename relativeToVRT="(\d)">([^<]+)</SourceFilename>')


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = [path]
    if path.suffix.lower() == ".vrt" and path.is_file():
        for relative, name in _VRT_SOURCE.findall(path.read_text()):
            files.append(path.parent / name if relative == "1" else Path(name))
    return files


def files_fingerprint(paths: Iterable[str | Path]) -> str:
    """Hash of the files behind ``paths`` (folders and VRT sources expanded).

    Missing files hash as missing, so a fingerprint never raises.
    """
    h = hashlib.sha256()
    for p in paths:
        for f in _expand(Path(p)):
            try:
                st = f.stat()
                h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{f}|missing\n".encode())
    return h.hexdigest()[:20]


def ingest_fingerprint(
    images: Iterable[str | Path],
    labels: str | Path | None,
    label_field: str | None,
    classes: str | Path | None,
    block_size: int,
) -> str:
    """Fingerprint of everything that determines a region store."""
    settings = json.dumps({"label_field": label_field, "block_size": block_size}, sort_keys=True)
    parts = [
        files_fingerprint(images),
        files_fingerprint([labels] if labels else []),
        files_fingerprint([classes] if classes else []),
        settings,
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def store_inputs(store: str | Path) -> str | None:
    """The inputs fingerprint recorded by ingest, or None (no store, or none recorded)."""
    import zarr

    try:
        meta: Any = zarr.open_group(str(store), mode="r").attrs.get("segpipe")
    except Exception:  # no store there, or not a zarr group: nothing recorded
        return None
    return meta.get("inputs") if isinstance(meta, dict) else None
