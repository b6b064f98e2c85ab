"""The prediction being evaluated: a region store's class layer or a class GeoTIFF, read by window.

A store is found by its ``zarr.json`` (local folder or ``s3://`` prefix); anything else
must be a single-band integer raster GDAL can read (e.g. the exported COG, whose band
tags name the classes). :class:`PredictionSource` is small, so dask ships it inside the
graph and every task opens the prediction itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
from rasterio.windows import Window

from segpipe.errors import InputError, MissingInputError, StoreError
from segpipe.grid.box import Box
from segpipe.io.remote import as_url, gdal_env, gdal_path, is_remote, join, remote_exists
from segpipe.io.store import NODATA_U8, open_layer, read_region_info, same_nodata
from segpipe.stages.export.layers import classes_from_tags
from segpipe.types import ClassInfo, Grid

__all__ = ["PredictionSource", "describe_prediction", "open_prediction", "preview_rgb", "read_prediction"]

_RGB_NAMES = ("red", "green", "blue")

@dataclass(frozen=True)
class PredictionSource:
    """A class prediction to evaluate, small enough to ship inside dask graphs.

    Attributes:
        path: Region store or GeoTIFF.
        kind: ``"store"`` or ``"raster"``.
        layer: Store layer holding the classes (stores only).
        nodata: The raster's nodata value, read as 255 (rasters only).
    """

    path: str
    kind: Literal["store", "raster"]
    layer: str = "classes"
    nodata: float | None = None


Opened = tuple[PredictionSource, Grid, list[ClassInfo], int]
"""What :func:`open_prediction` returns: the source, its grid, its classes, the block to align to."""


def open_prediction(prediction: str | Path, layer: str = "classes") -> Opened:
    """Describe a prediction: where its pixels are, its grid, its classes and a window alignment.

    Args:
        prediction: Region store (Zarr directory or ``s3://`` prefix) or single-band class GeoTIFF.
        layer: Store layer to evaluate.

    Returns:
        The source, its grid, the classes its metadata names (band tags of a GeoTIFF,
        the store's classes; possibly empty) and the block size windows should align to.

    Raises:
        MissingInputError: The prediction or its layer does not exist.
        StoreError: The store's layer is not a (y, x) layer of the region grid.
        InputError: A GeoTIFF is multi-band or not of integers, or not a raster at all.
    """
    location, is_store = _locate(prediction)
    if is_store:
        return _open_store(location, layer)
    return _open_raster(location)


def _locate(prediction: str | Path) -> tuple[str | Path, bool]:
    """The prediction's location (a normalised URL or a path) and whether it is a region store.

    Raises:
        MissingInputError: Nothing is there.
    """
    if is_remote(prediction):
        url = as_url(prediction)
        is_store = remote_exists(join(url, "zarr.json"))
        if not is_store and not remote_exists(url):
            raise MissingInputError(f"prediction {url} does not exist")
        return url, is_store
    path = Path(prediction)
    if not path.exists():
        raise MissingInputError(f"prediction {path} does not exist")
    return path, path.is_dir()


def _open_store(store: str | Path, layer: str) -> Opened:
    """:func:`open_prediction` of a region store's class layer."""
    info = read_region_info(store)
    array = open_layer(store, layer, missing="run 'segpipe predict' first")
    if tuple(array.shape) != (info.height, info.width):
        raise StoreError(f"layer '{layer}' of {store} is not a (y, x) layer of the region grid")
    return PredictionSource(str(store), "store", layer), info.grid, list(info.classes), info.block_size


def _open_raster(path: str | Path) -> Opened:
    """:func:`open_prediction` of a single-band integer GeoTIFF (windows align to single pixels)."""
    try:
        with gdal_env(path), rasterio.open(gdal_path(path)) as src:
            if src.count != 1 or not np.issubdtype(np.dtype(src.dtypes[0]), np.integer):
                raise InputError(
                    f"prediction {path} has {src.count} band(s) of {src.dtypes[0]}: "
                    "give a single-band integer class raster"
                )
            grid = Grid(src.crs.to_wkt() if src.crs else "", tuple(src.transform)[:6], src.height, src.width)
            classes = classes_from_tags(src.tags(1))
            return PredictionSource(str(path), "raster", nodata=src.nodata), grid, classes, 1
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"prediction {path} is neither a region store nor a raster GDAL can read") from exc


def describe_prediction(pred: PredictionSource) -> dict[str, Any]:
    """What a report names: the layer evaluated and the model package that predicted it.

    A store's layer records its model (``segpipe predict`` writes it); a GeoTIFF names
    its layer in segpipe's ``SEGPIPE_LAYER`` tag. Either may be unknown (None): a layer
    written by an older segpipe, a raster from another tool.
    """
    if pred.kind == "store":
        model = open_layer(pred.path, pred.layer).attrs.get("model")
        if isinstance(model, str):  # segpipe.classify records the package's location alone
            model = {"package": model}
        return {"layer": pred.layer, "model": dict(model) if isinstance(model, dict) else None}
    with gdal_env(pred.path), rasterio.open(gdal_path(pred.path)) as src:
        return {"layer": src.tags().get("SEGPIPE_LAYER"), "model": None}


def read_prediction(pred: PredictionSource, box: Box) -> np.ndarray:
    """Prediction pixels of one box, nodata as 255."""
    if pred.kind == "store":
        return np.asarray(open_layer(pred.path, pred.layer)[box.slices])
    with gdal_env(pred.path), rasterio.open(gdal_path(pred.path)) as src:
        data: np.ndarray = src.read(1, window=Window.from_slices(*box.slices))
    if pred.nodata is not None and not same_nodata(pred.nodata, NODATA_U8):
        data = np.where(data == pred.nodata, NODATA_U8, data)
    return data


def preview_rgb(pred: PredictionSource, box: Box, step: int) -> np.ndarray | None:
    """Decimated (h', w', 3) image of a store whose bands are named red/green/blue, else None.

    Every ``step``-th pixel on the global lattice, as
    :func:`segpipe.stages.evaluate.report.decimate` takes them; nodata as NaN.
    """
    if pred.kind != "store":
        return None
    info = read_region_info(pred.path)
    names = [n.lower() for n in info.band_names]
    if not all(n in names for n in _RGB_NAMES):
        return None
    image = open_layer(pred.path, "image")
    rows = slice(box.y0 + (-box.y0) % step, box.y1, step)
    cols = slice(box.x0 + (-box.x0) % step, box.x1, step)
    bands = [np.asarray(image[names.index(n), rows, cols], np.float64) for n in _RGB_NAMES]
    rgb = np.stack(bands, axis=-1)
    return np.where(rgb == info.nodata, np.nan, rgb) if info.nodata is not None else rgb
