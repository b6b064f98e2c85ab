"""Where an exported layer came from: the imagery's time, its inputs and the model.

The STAC Item of an export dates the imagery, not the export: ingest records the scenes'
acquisition times in the store (``segpipe.acquired``: ``start``, ``end`` and, for one
instant, ``datetime``) and the inputs it read (``segpipe.sources``); predict records the
model package on each layer it writes (``model``). Stores made before these records exist
give an empty :class:`Lineage`, and the Item falls back to the export time (saying so).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from segpipe.io.store import store_group

__all__ = ["Lineage", "read_lineage"]


@dataclass(frozen=True)
class Lineage:
    """What an exported layer derives from.

    Attributes:
        datetime: The imagery's acquisition instant (ISO 8601), or None.
        start: Start of the acquisition interval, or None.
        end: End of the acquisition interval, or None.
        sources: The inputs ingest read (files, URLs, STAC Items), in order.
        store: The region store the layer was exported from.
        model: The model package that predicted the layer, or None (image layer, old store).
    """

    datetime: str | None = None
    start: str | None = None
    end: str | None = None
    sources: tuple[str, ...] = ()
    store: str = ""
    model: str | None = None


def _layer_model(group: zarr.Group, layer: str) -> str | None:
    """The ``model`` a prediction layer records, if it is one."""
    if layer not in group:
        return None
    model = group[layer].attrs.get("model")
    return str(model) if model else None


def read_lineage(store: str | Path, layer: str) -> Lineage:
    """The lineage of ``layer`` of a region store (see the module doc)."""
    path = str(store)
    group = store_group(path)
    segpipe: dict[str, Any] = dict(group.attrs.get("segpipe", {}))  # type: ignore[arg-type]
    acquired: dict[str, Any] = dict(segpipe.get("acquired") or {})
    sources = tuple(str(s) for s in segpipe.get("sources") or ())
    return Lineage(
        datetime=acquired.get("datetime"),
        start=acquired.get("start"),
        end=acquired.get("end"),
        sources=sources,
        store=path if "://" in path else str(Path(path).resolve()),
        model=_layer_model(group, layer),
    )
