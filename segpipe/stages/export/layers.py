"""What each exportable store layer is as a GeoTIFF: bands, dtype, nodata, resampling, colours, tags, classes.

Also the class metadata every class GeoTIFF carries: a colour table (the classes' colours,
all else transparent) and band tags naming the classes, which :mod:`segpipe.stages.evaluate.prediction`
reads back from COGs written by other runs. Nothing here touches a file but the store:
:mod:`segpipe.stages.export.geotiff` writes what this module describes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from rasterio.io import DatasetReader

from segpipe.errors import InputError, StoreError
from segpipe.io.store import NODATA_U8, RegionInfo, open_layer, read_region_info
from segpipe.types import ClassInfo, classes_from_json, classes_to_json, default_colour

__all__ = [
    "EXPORT_LAYERS",
    "Colormap",
    "ExportLayer",
    "band_colormap",
    "class_colormap",
    "class_tags",
    "classes_from_tags",
    "describe_layer",
]

# layer -> overview resampling: class ids must never be averaged, everything else may
EXPORT_LAYERS = {"classes": "MODE", "confidence": "AVERAGE", "probabilities": "AVERAGE", "image": "AVERAGE"}
# what to run when a layer is missing (the store's own message names the layer)
_MISSING = {
    "image": "run 'segpipe ingest' first",
    "probabilities": "run 'segpipe predict' with probabilities first",
}
_MISSING_DEFAULT = "run 'segpipe predict' first"

Colormap = dict[int, tuple[int, int, int, int]]
# Confidence and probabilities are stored as whole percent (0-100; scale 1, offset 0).
PERCENT = "percent"


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
        units: Unit of every band (``percent`` for confidence and probabilities; empty
            for classes and image bands, whose values have no unit segpipe knows).
    """

    name: str
    count: int
    dtype: str
    nodata: float | None
    descriptions: tuple[str, ...]
    classes: tuple[ClassInfo, ...]
    resampling: str
    units: str = ""

    def dataset_tags(self, store: str | Path) -> dict[str, str]:
        """Dataset tags naming the layer and the store it came from."""
        return {"SEGPIPE_LAYER": self.name, "SEGPIPE_STORE": Path(str(store)).name}

    def colormap(self) -> Colormap | None:
        """The colour table of band 1 (class rasters only)."""
        return class_colormap(self.classes) if self.name == "classes" else None

    def band_tags(self) -> tuple[dict[str, str], ...]:
        """Tags of each band: the class list of a class raster, the class of each probability band."""
        if self.name == "classes":
            return (class_tags(self.classes) if self.classes else {},)
        if self.name == "probabilities":
            return tuple({"CLASS_VALUE": str(c.value), "CLASS_NAME": c.name} for c in self.classes)
        return tuple({} for _ in range(self.count))


def class_colormap(classes: Sequence[ClassInfo]) -> Colormap:
    """Colour table for a class raster: the class colours, everything else transparent.

    0 (unlabelled) and 255 (nodata) are transparent, and so are values without a class
    (a repeated class colour would read as that class in a map). A store that describes
    no class at all keeps the default palette colour of each value 1-254, so its
    prediction is still visible. A GeoTIFF colour table has no alpha: GDAL reads every
    entry but the nodata one back as opaque, so those entries show black (0, 0, 0) where a
    viewer draws the bare palette; the QGIS style and the RAT of
    :mod:`segpipe.stages.export.legend` list the classes only.
    """
    clear = (0, 0, 0, 0)
    table: Colormap = dict.fromkeys(range(256), clear)
    if not classes:
        for value in range(1, NODATA_U8):
            table[value] = (*ClassInfo(value, "", default_colour(value)).rgb, 255)
    for c in classes:
        if 0 < c.value < NODATA_U8:
            table[c.value] = (*c.rgb, 255)
    return table


def band_colormap(src: DatasetReader, band: int = 1) -> Colormap:
    """The colour table of a band of an open raster, empty when it has none."""
    try:
        return src.colormap(band)  # type: ignore[no-any-return]
    except ValueError:  # rasterio's way of saying "no colour table"
        return {}


def class_tags(classes: Sequence[ClassInfo]) -> dict[str, str]:
    """Band tags naming the classes: ``CLASS_<value>=<name>`` and a JSON ``classes`` list."""
    tags = {f"CLASS_{c.value}": c.name for c in classes}
    tags["classes"] = json.dumps(classes_to_json(classes))
    return tags


def classes_from_tags(tags: dict[str, str]) -> list[ClassInfo]:
    """Read classes back from band tags written by :func:`class_tags` (empty if none).

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


def describe_layer(
    store: str | Path, layer: str, info: RegionInfo | None = None
) -> tuple[ExportLayer, zarr.Array[Any]]:
    """Check a store layer can be exported and say how.

    Returns:
        How the layer is written, and the layer itself.

    Raises:
        InputError: ``layer`` is not an exportable layer.
        MissingLayerError: The layer is missing (the message says what to run).
        StoreError: The layer is not on the region grid or has the wrong dtype.
    """
    if layer not in EXPORT_LAYERS:
        raise InputError(f"cannot export layer {layer!r}: choose one of {sorted(EXPORT_LAYERS)}")
    info = info or read_region_info(store)
    array = open_layer(store, layer, missing=_MISSING.get(layer, _MISSING_DEFAULT))
    if layer in ("classes", "confidence"):
        return _single_band_layer(store, layer, array, info), array
    _check_banded(store, layer, array, info)
    if layer == "probabilities":
        return _probabilities_layer(store, array, info), array
    return _image_layer(array, info), array


def _single_band_layer(
    store: str | Path, layer: str, array: zarr.Array[Any], info: RegionInfo
) -> ExportLayer:
    """``classes`` or ``confidence``: one uint8 band on the region grid, nodata 255.

    Raises:
        StoreError: The layer is not uint8 (y, x) on the region grid.
    """
    shape, dtype, grid = tuple(array.shape), np.dtype(array.dtype), (info.height, info.width)
    if shape != grid or dtype != np.uint8:
        raise StoreError(
            f"layer '{layer}' of {store} is {dtype} {shape}, expected uint8 {grid}: rerun 'segpipe predict'"
        )
    classes = _layer_classes(array, info) if layer == "classes" else ()
    units = "" if layer == "classes" else PERCENT
    return ExportLayer(layer, 1, "uint8", NODATA_U8, (layer,), classes, EXPORT_LAYERS[layer], units)


def _check_banded(store: str | Path, layer: str, array: zarr.Array[Any], info: RegionInfo) -> None:
    """Refuse a (band, y, x) layer that is not on the region grid or has no band.

    Raises:
        StoreError: The layer's shape does not fit.
    """
    shape = tuple(array.shape)
    if len(shape) != 3 or shape[1:] != (info.height, info.width) or shape[0] < 1:
        raise StoreError(
            f"layer '{layer}' of {store} is {shape}, expected (band, {info.height}, {info.width})"
        )


def _probabilities_layer(store: str | Path, array: zarr.Array[Any], info: RegionInfo) -> ExportLayer:
    """One uint8 band per class, described by the class name (``class <i>`` without known classes).

    Raises:
        StoreError: The layer is not uint8.
    """
    dtype, bands = np.dtype(array.dtype), int(array.shape[0])
    if dtype != np.uint8:
        raise StoreError(
            f"layer 'probabilities' of {store} is {dtype}, expected uint8: rerun 'segpipe predict'"
        )
    classes = _layer_classes(array, info)
    if len(classes) != bands:
        classes = tuple(ClassInfo(i + 1, f"class {i + 1}", default_colour(i + 1)) for i in range(bands))
    names = tuple(c.name for c in classes)
    resampling = EXPORT_LAYERS["probabilities"]
    return ExportLayer("probabilities", bands, "uint8", NODATA_U8, names, classes, resampling, PERCENT)


def _image_layer(array: zarr.Array[Any], info: RegionInfo) -> ExportLayer:
    """The mosaic with its own dtype, nodata (an integer for integer bands) and band names."""
    dtype, bands = np.dtype(array.dtype), int(array.shape[0])
    names = info.band_names if len(info.band_names) == bands else tuple(f"band{i + 1}" for i in range(bands))
    nodata = info.nodata
    if nodata is not None and np.issubdtype(dtype, np.integer):
        nodata = int(nodata)
    return ExportLayer("image", bands, dtype.name, nodata, names, (), EXPORT_LAYERS["image"])


def _layer_classes(array: zarr.Array[Any], info: RegionInfo) -> tuple[ClassInfo, ...]:
    """The model's classes recorded on the layer by predict, else the store's."""
    raw = array.attrs.get("classes")
    if isinstance(raw, list) and raw:
        try:
            return tuple(classes_from_json(raw))
        except (InputError, TypeError, ValueError):
            pass
    return info.classes
