"""A STAC Collection over the Items of a batch of exports.

A batch of regions publishes one COG (and one Item) per region and layer; the Collection
gathers them so a catalogue or a STAC browser loads the whole batch at once: its extent is
the union of the Items' footprints and acquisition times, its summaries list the layers
and CRSs, and one ``item`` link per Item (relative to the Collection file where both are
local) leads to each. The Items themselves are left as they are.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path

import pystac

from segpipe.errors import InputError, MissingInputError
from segpipe.models.files import atomic_write
from segpipe.stages.export.stac import stac_json

__all__ = ["collection_of", "write_collection"]


def _read(path: Path) -> pystac.Item:
    if not path.is_file():
        raise MissingInputError(f"STAC Item {path} does not exist: export the layer first")
    try:
        return pystac.Item.from_file(str(path))
    except Exception as exc:  # pystac raises several types for a file that is no Item
        raise InputError(
            f"{path} is not a STAC Item ({exc}): give the .stac.json files segpipe export writes"
        ) from exc


def _span(item: pystac.Item) -> tuple[dt.datetime, dt.datetime]:
    """The item's acquisition interval (one instant twice)."""
    start = item.common_metadata.start_datetime or item.datetime
    end = item.common_metadata.end_datetime or item.datetime
    assert start is not None and end is not None  # pystac refuses an Item with neither
    return start, end


def _extent(items: Sequence[pystac.Item]) -> pystac.Extent:
    """Union bbox of the Items with a footprint, and the span of their times."""
    boxes = [i.bbox for i in items if i.bbox]
    bbox = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
            max(b[3] for b in boxes)] if boxes else [-180.0, -90.0, 180.0, 90.0]
    spans = [_span(i) for i in items]
    interval = [min(s for s, _ in spans), max(e for _, e in spans)]
    return pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([interval]))


def collection_of(
    item_files: Sequence[str | Path], out: str | Path, collection_id: str, description: str
) -> pystac.Collection:
    """The Collection of some Item files, with links relative to ``out``.

    Raises:
        InputError: No Item given, one path instead of a list, an Item twice, ``out`` a
            folder or among the Items, or a file is not a STAC Item.
        MissingInputError: An Item file does not exist.
    """
    if not item_files:
        raise InputError(f"collection {out}: no STAC Item to gather (export at least one layer)")
    paths = [Path(p).resolve() for p in item_files]
    items = [_read(p) for p in paths]
    collection = pystac.Collection(
        id=collection_id, description=description, extent=_extent(items), license="other",
        title=f"segpipe {collection_id}",
    )
    collection.summaries.add("segpipe:layer", sorted({str(i.properties.get("segpipe:layer")) for i in items}))
    codes = sorted({str(i.properties["proj:code"]) for i in items if i.properties.get("proj:code")})
    if codes:
        collection.summaries.add("proj:code", codes)
    base = Path(out).resolve().parent
    for path, item in zip(paths, items, strict=True):
        href = os.path.relpath(path, base)
        collection.add_link(pystac.Link("item", href if href.startswith(".") else f"./{href}",
                                        media_type="application/geo+json", title=item.id))
    return collection


def write_collection(
    item_files: Sequence[str | Path],
    out: str | Path,
    collection_id: str | None = None,
    description: str = "Pixel classifications made by segpipe",
) -> Path:
    """Write the Collection of some Item files to ``out``, atomically.

    Args:
        item_files: The Items (``<name>.stac.json`` beside each exported COG).
        out: The Collection file to write (``collection.json``).
        collection_id: Its id (default: the name of the folder it is written to).
        description: Its description.

    Returns:
        The file written.

    Raises:
        InputError: No Item given, one path instead of a list, an Item twice, ``out`` a
            folder or among the Items, or a file is not a STAC Item.
        MissingInputError: An Item file does not exist.
    """
    dest = Path(out)
    if dest.is_dir():
        example = dest / "collection.json"
        raise InputError(f"{out} is a folder: name the Collection file to write, e.g. {example}")
    if isinstance(item_files, str | Path):  # one path given where a list belongs (the API)
        raise InputError(f"item_files {str(item_files)!r}: give a list of .stac.json paths")
    seen: set[Path] = set()
    for item in item_files:
        if Path(item).resolve() == dest.resolve():
            raise InputError(f"{out} is one of the Items: name another file for the Collection")
        if Path(item).resolve() in seen:
            raise InputError(f"STAC Item {item} is given twice: name each Item once")
        seen.add(Path(item).resolve())
    collection = collection_of(item_files, dest, collection_id or dest.resolve().parent.name, description)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, stac_json(collection).encode())
    return dest
