"""What each exportable store layer becomes in a GeoTIFF: bands, dtype, nodata, classes.

Also the class metadata every class GeoTIFF carries: a colour table (0 black, 255
transparent) and band tags naming the classes, which :mod:`segpipe.stages.evaluate.assess` reads
back from COGs written by other runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from segpipe.errors import InputError, StoreError
from segpipe.io.store import NODATA_U8, RegionInfo, open_layer, read_region_info
from segpipe.types import ClassInfo, classes_from_json, classes_to_json, default_colour

__all__ = [
    "EXPORT_LAYERS",
    "ExportLayer",
    "class_colormap",
    "class_tags",
    "classes_from_tags",
    "describe_layer",
]

# layer -> overview resampling: class ids must never be averaged, everything else may
EXPORT_LAYERS = {"classes": "MODE", "confidence": "AVERAGE", "probabilities": "AVERAGE", "image": "AVERAGE"}
_HINTS = {"image": "run 'segpipe ingest'", "probabilities": "run 'segpipe predict' with probabilities"}


@dataclass(frozen=True)
class ExportLayer:
    """How a store layer is written as a GeoTIFF.

    Attributes:
        name: Store layer name.
        count: Bands.
        dtype: Band dtype name.
        nodata: Nodata value (None if the layer has none).
        descriptions: One band description per band.
        classes: Classes of a class raster, or the class of each probability band.
        resampling: Overview resampling (``MODE`` or ``AVERAGE``).
    """

    name: str
    count: int
    dtype: str
    nodata: float | None
    descriptions: tuple[str, ...]
    classes: tuple[ClassInfo, ...]
    resampling: str


def class_colormap(classes: Sequence[ClassInfo]) -> dict[int, tuple[int, int, int, int]]:
    """Colour table for a class raster: class colours, 0 black, 255 (nodata) transparent.

    Values without a class get the default palette colour of their value, so a
    prediction of a class the store does not describe is still visible.
    """
    table: dict[int, tuple[int, int, int, int]] = {0: (0, 0, 0, 255), NODATA_U8: (0, 0, 0, 0)}
    known = {c.value: c for c in classes}
    for value in range(1, 255):
        cls = known.get(value) or ClassInfo(value, "", default_colour(value))
        table[value] = (*cls.rgb, 255)
    return table


def class_tags(classes: Sequence[ClassInfo]) -> dict[str, str]:
    """Band tags naming the classes: ``CLASS_<value>=<name>`` and a JSON ``classes`` list."""
    tags = {f"CLASS_{c.value}": c.name for c in classes}
    tags["classes"] = json.dumps(classes_to_json(classes))
    return tags


def classes_from_tags(tags: dict[str, str]) -> list[ClassInfo]:
    """Read classes back from band tags written by :func:`write_cog` (empty if none).

    The JSON ``classes`` tag wins (it keeps colours); ``CLASS_<value>`` tags are the
    fallback for files written by other tools.
    """
    if "classes" in tags:
        try:
            return classes_from_json(json.loads(tags["classes"]))
        except (json.JSONDecodeError, TypeError, InputError):
            pass
    items = []
    for key, name in tags.items():
        if key.upper().startswith("CLASS_") and key[6:].isdigit() and 1 <= int(key[6:]) <= 254:
            items.append({"value": int(key[6:]), "name": name})
    return classes_from_json(items)


def _layer_classes(array: zarr.Array, info: RegionInfo) -> tuple[ClassInfo, ...]:
    """The model's classes recorded on the layer by predict, else the store's."""
    raw = array.attrs.get("classes")
    if isinstance(raw, list) and raw:
        try:
            return tuple(classes_from_json(raw))  # type: ignore[arg-type]
        except (InputError, TypeError, ValueError):
            pass
    return info.classes


def describe_layer(
    store: str | Path, layer: str, info: RegionInfo | None = None
) -> tuple[ExportLayer, zarr.Array]:
    """Check a store layer can be exported and say how.

    Raises:
        InputError: ``layer`` is not an exportable layer.
        StoreError: The layer is missing or not on the region grid.
    """
    if layer not in EXPORT_LAYERS:
        raise InputError(f"cannot export layer {layer!r}: choose one of {sorted(EXPORT_LAYERS)}")
    info = info or read_region_info(store)
    try:
        array = open_layer(store, layer)
    except StoreError as exc:
        hint = _HINTS.get(layer, "run 'segpipe predict'")
        raise StoreError(f"region store {store} has no '{layer}' layer: {hint} first") from exc
    shape, dtype = tuple(array.shape), np.dtype(array.dtype)
    resampling = EXPORT_LAYERS[layer]
    grid = (info.height, info.width)
    if layer in ("classes", "confidence"):
        if shape != grid or dtype != np.uint8:
            raise StoreError(
                f"layer '{layer}' of {store} is {dtype} {shape}, expected uint8 {grid}: "
                "rerun 'segpipe predict'"
            )
        classes = _layer_classes(array, info) if layer == "classes" else ()
        return ExportLayer(layer, 1, "uint8", NODATA_U8, (layer,), classes, resampling), array
    if len(shape) != 3 or shape[1:] != grid or shape[0] < 1:
        raise StoreError(
            f"layer '{layer}' of {store} is {shape}, expected (band, {info.height}, {info.width})"
        )
    if layer == "probabilities":
        if dtype != np.uint8:
            raise StoreError(
                f"layer 'probabilities' of {store} is {dtype}, expected uint8: rerun 'segpipe predict'"
            )
        classes = _layer_classes(array, info)
        if len(classes) != shape[0]:
            classes = tuple(
                ClassInfo(i + 1, f"class {i + 1}", default_colour(i + 1)) for i in range(shape[0])
            )
        names = tuple(c.name for c in classes)
        return ExportLayer(layer, shape[0], "uint8", NODATA_U8, names, classes, resampling), array
    names = (
        info.band_names
        if len(info.band_names) == shape[0]
        else tuple(f"band{i + 1}" for i in range(shape[0]))
    )
    nodata = info.nodata
    if nodata is not None and np.issubdtype(dtype, np.integer):
        nodata = int(nodata)
    return ExportLayer(layer, shape[0], dtype.name, nodata, names, (), resampling), array
