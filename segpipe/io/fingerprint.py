"""Fingerprints of stage inputs, so reruns skip work already done for the same inputs.

A fingerprint hashes what identifies an input cheaply (resolved path, size and
modification time of every file, the files a VRT points to included) together with
the settings that shape the output. Equal fingerprints mean "same inputs": a rerun
of a failed batch skips finished stages instead of recomputing them.

Objects on ``s3://`` are identified by URL, size, ETag and last-modified time from one
metadata request each (nothing is downloaded but the text of a remote VRT).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from segpipe.io.remote import as_url, filesystem, is_remote, storage_options_for

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


def _remote_entries(url: str) -> list[str]:
    """One line per object behind ``url`` (a prefix stands for every object under it)."""
    fs = filesystem()
    try:
        info = fs.info(url)
        if info.get("type") == "directory":
            found: dict[str, dict[str, Any]] = fs.find(url, detail=True)
            infos = [found[k] for k in sorted(found)]
        else:
            infos = [info]
        lines = [
            f"s3://{i['name']}|{i.get('size')}|{i.get('ETag')}|{i.get('LastModified')}" for i in infos
        ]
        if url.lower().endswith(".vrt") and info.get("type") != "directory":
            base = url.rsplit("/", 1)[0]
            text = fs.cat_file(url).decode("utf-8", errors="replace")
            for relative, name in _VRT_SOURCE.findall(text):
                source = f"{base}/{name}" if relative == "1" else _vsis3_to_url(name)
                lines += _remote_entries(source) if is_remote(source) else _local_entries(Path(source))
        return lines
    except FileNotFoundError:
        return [f"{url}|missing"]
    except Exception:  # unreachable storage: a fingerprint never raises, and never matches
        return [f"{url}|unreachable"]


def _vsis3_to_url(name: str) -> str:
    return "s3://" + name[len("/vsis3/") :] if name.startswith("/vsis3/") else name


def _local_entries(path: Path) -> list[str]:
    lines = []
    for f in _expand(path):
        source = _vsis3_to_url(str(f))
        if source != str(f):  # a local VRT over remote tiles
            lines += _remote_entries(source)
            continue
        try:
            st = f.stat()
            lines.append(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}")
        except OSError:
            lines.append(f"{f}|missing")
    return lines


def files_fingerprint(paths: Iterable[str | Path]) -> str:
    """Hash of the files behind ``paths`` (folders, prefixes and VRT sources expanded).

    Missing files hash as missing, so a fingerprint never raises.
    """
    h = hashlib.sha256()
    for p in paths:
        lines = _remote_entries(as_url(p)) if is_remote(p) else _local_entries(Path(p))
        for line in lines:
            h.update(f"{line}\n".encode())
    return h.hexdigest()[:20]


def ingest_fingerprint(
    images: Iterable[str | Path],
    labels: str | Path | None,
    label_field: str | None,
    classes: str | Path | None,
    block_size: int,
    options: dict[str, Any] | None = None,
    extra_files: Iterable[str | Path] | None = None,
) -> str:
    """Fingerprint of everything that determines a region store.

    Args:
        images: The image arguments (files, folders, VRTs, a STAC document).
        labels: The labels file, if any.
        label_field: The polygon class field, if any.
        classes: The classes file, if any.
        block_size: The store's block size.
        options: Further settings that shape the store (a warped ingest's grid,
            resampling and overlap rule); JSON-serialisable.
        extra_files: Further files the store is made from (the band files a STAC
            document names, the area-of-interest file).

    Without ``options`` and ``extra_files`` the fingerprint is the one earlier versions
    computed, so stores built before stay recognised.
    """
    settings = json.dumps({"label_field": label_field, "block_size": block_size}, sort_keys=True)
    parts = [
        files_fingerprint(images),
        files_fingerprint([labels] if labels else []),
        files_fingerprint([classes] if classes else []),
        settings,
    ]
    if options:
        parts.append(json.dumps(options, sort_keys=True, default=str))
    if extra_files:
        parts.append(files_fingerprint(extra_files))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _root(store: str | Path) -> Any:
    """The store's root group as it is now (never its consolidated snapshot)."""
    import zarr

    location = as_url(store) if is_remote(store) else str(store)
    options = storage_options_for(location)
    return zarr.open_group(location, mode="r", storage_options=options, use_consolidated=False)


def store_inputs(store: str | Path) -> str | None:
    """The inputs fingerprint recorded by ingest, or None (no store, or none recorded)."""
    try:
        group = _root(store)
        meta: Any = group.attrs.get("segpipe")
    except Exception:  # no store there, or not a zarr group: nothing recorded
        return None
    return meta.get("inputs") if isinstance(meta, dict) else None


def layer_fingerprint(store: str | Path, layer: str) -> str | None:
    """Fingerprint of one layer of a region store: what it was made from.

    Hashes the store's recorded inputs (see :func:`store_inputs`) with the layer's
    attributes, which say how the layer was made (predict records its model hash and
    window settings there), so products of the layer (a COG, a report) can tell
    whether they are up to date. None when the store records no inputs or the layer
    does not exist.
    """
    inputs = store_inputs(store)
    if inputs is None:
        return None
    try:
        group = _root(store)
        attrs = dict(group[layer].attrs)
    except Exception:  # no such layer: nothing to fingerprint
        return None
    text = json.dumps({"inputs": inputs, "layer": layer, "attrs": attrs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]
