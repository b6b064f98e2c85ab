"""Export store layers to Cloud-Optimized GeoTIFFs without holding the raster in memory.

The raster is streamed window by window from Zarr into a tiled GeoTIFF next to the
destination (colour table and tags written before any pixel), converted by GDAL's COG
driver (which builds the overviews from that file, on disk), validated, and only then
moved over the destination. ``rio.to_raster(driver="COG")`` would hold ~3x the raster
in RAM (ARCHITECTURE.md).

Measured on GDAL 3.10 / rasterio 1.4: the COG driver keeps the colour table, band
description, dataset and band tags of its source, so nothing needs re-adding after the
conversion (re-adding would rewrite the IFD at the end of the file and break the COG
layout); :func:`write_cog` still checks they survived and fails loudly if not.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import zarr
from rasterio.crs import CRS
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate

from segpipe.errors import InputError, SegpipeError, StoreError
from segpipe.io.store import NODATA_U8, RegionInfo, open_layer, read_region_info
from segpipe.types import ClassInfo, classes_from_json, classes_to_json, default_colour

__all__ = [
    "EXPORT_LAYERS",
    "WINDOW",
    "class_colormap",
    "class_tags",
    "classes_from_tags",
    "write_cog",
    "write_geotiff_layer",
]

WINDOW = 512  # streaming window and COG block edge
EXPORT_LAYERS = {"classes": "MODE", "confidence": "AVERAGE"}  # layer -> overview resampling


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


def _check_layer(layer: str) -> str:
    if layer not in EXPORT_LAYERS:
        raise InputError(f"cannot export layer {layer!r}: choose one of {sorted(EXPORT_LAYERS)}")
    return EXPORT_LAYERS[layer]


def _open_export_layer(store: str | Path, layer: str, info: RegionInfo) -> zarr.Array:
    try:
        array = open_layer(store, layer)
    except StoreError as exc:
        raise StoreError(f"region store {store} has no '{layer}' layer: run 'segpipe predict' first") from exc
    if tuple(array.shape) != (info.height, info.width) or np.dtype(array.dtype) != np.uint8:
        raise StoreError(
            f"layer '{layer}' of {store} is {array.dtype} {tuple(array.shape)}, expected uint8 "
            f"({info.height}, {info.width}): rerun 'segpipe predict'"
        )
    return array


def write_geotiff_layer(
    store: str | Path,
    path: str | Path,
    layer: str = "classes",
    info: RegionInfo | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> Path:
    """Stream one store layer into a tiled, compressed GeoTIFF, window by window.

    Memory stays at one 512 x 512 window whatever the region size. The colour table
    (classes layer) and tags are written before any pixel, as GDAL requires for
    paletted GeoTIFFs.

    Args:
        store: Region store.
        path: GeoTIFF to write (replaced if it exists).
        layer: ``classes`` or ``confidence``.
        info: The store's info, if already read.
        on_window: Called with (row, col) before each window is written (progress hooks, tests).

    Returns:
        ``path``.

    Raises:
        StoreError: The layer does not exist (run ``segpipe predict`` first).
    """
    _check_layer(layer)
    info = info or read_region_info(store)
    array = _open_export_layer(store, layer, info)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": info.height,
        "width": info.width,
        "count": 1,
        "dtype": "uint8",
        "crs": CRS.from_wkt(info.crs_wkt) if info.crs_wkt else None,
        "transform": info.affine,
        "nodata": NODATA_U8,
        "tiled": True,
        "blockxsize": WINDOW,
        "blockysize": WINDOW,
        # fast, lossless and small: this file only lives until the COG is built
        "compress": "ZSTD",
        "zstd_level": 1,
        "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.set_band_description(1, layer)
        dst.update_tags(SEGPIPE_LAYER=layer, SEGPIPE_STORE=Path(str(store)).name)
        if layer == "classes":
            dst.write_colormap(1, class_colormap(info.classes))
            if info.classes:
                dst.update_tags(1, **class_tags(info.classes))
        for y0 in range(0, info.height, WINDOW):
            for x0 in range(0, info.width, WINDOW):
                if on_window is not None:
                    on_window(y0, x0)
                h, w = min(WINDOW, info.height - y0), min(WINDOW, info.width - x0)
                block = np.asarray(array[y0 : y0 + h, x0 : x0 + w])
                dst.write(block, 1, window=Window(x0, y0, w, h))
    return Path(path)


def _check_survived(path: Path, layer: str, info: RegionInfo) -> None:
    """Fail if the COG lost its georeferencing, nodata, colour table or class tags."""
    with rasterio.open(path) as src:
        problems = []
        if src.nodata != NODATA_U8:
            problems.append(f"nodata is {src.nodata}")
        if src.transform != info.affine:
            problems.append("transform changed")
        if info.crs_wkt and (src.crs is None or src.crs != CRS.from_wkt(info.crs_wkt)):
            problems.append("CRS changed")
        if src.descriptions[0] != layer:
            problems.append("band description lost")
        if layer == "classes":
            try:
                cmap = src.colormap(1)
            except ValueError:
                cmap = {}
            if any(cmap.get(c.value, (0, 0, 0, 0))[:3] != c.rgb for c in info.classes):
                problems.append("colour table lost")
            if info.classes and classes_from_tags(src.tags(1)) != list(info.classes):
                problems.append("class tags lost")
    if problems:
        raise SegpipeError(f"COG conversion of {path} damaged the raster: {'; '.join(problems)}")


def write_cog(
    store: str | Path,
    out: str | Path,
    layer: str = "classes",
    overwrite: bool = True,
    compress: str = "DEFLATE",
) -> Path:
    """Export a store layer (``classes`` or ``confidence``) to a validated Cloud-Optimized GeoTIFF.

    The COG has the store's CRS and transform, 512-px blocks, internal overviews
    (MODE for classes, so overviews hold class ids only; AVERAGE for confidence),
    ``compress`` with predictor 2, BIGTIFF if needed, nodata 255, band description =
    layer name and, for classes, a colour table plus band tags ``CLASS_<value>=<name>``
    and a JSON ``classes`` tag. ``out`` is replaced only once the new file is
    complete and valid; on any failure the temporaries are removed and an existing
    ``out`` is left untouched.

    Args:
        store: Region store holding the layer.
        out: Destination ``.tif``.
        layer: ``classes`` or ``confidence``.
        overwrite: Replace an existing ``out``.
        compress: ``DEFLATE`` (readable everywhere) or ``ZSTD`` (faster, smaller).

    Returns:
        The destination path.

    Raises:
        MissingInputError: The store does not exist.
        StoreError: The layer does not exist (run ``segpipe predict`` first).
        InputError: ``out`` exists and ``overwrite`` is false, or a bad layer/compression.
        SegpipeError: The COG failed validation.
    """
    resampling = _check_layer(layer)
    if compress.upper() not in ("DEFLATE", "ZSTD"):
        raise InputError(f"compression {compress!r} is not supported: use DEFLATE or ZSTD")
    dest = Path(out)
    if dest.exists() and not overwrite:
        raise InputError(f"{dest} exists: remove it or export with overwrite")
    info = read_region_info(store)
    _open_export_layer(store, layer, info)  # fail before any file is created
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Temporaries next to the destination: same filesystem, so the final os.replace is atomic.
    token = uuid.uuid4().hex[:8]
    stream = dest.with_name(f".{dest.name}.{token}.stream.tif")
    cog = dest.with_name(f".{dest.name}.{token}.cog.tif")
    try:
        write_geotiff_layer(store, stream, layer, info=info)
        rasterio.shutil.copy(
            stream,
            cog,
            driver="COG",
            COMPRESS=compress.upper(),
            PREDICTOR="YES",  # horizontal differencing (2) for integers
            BLOCKSIZE=WINDOW,
            OVERVIEW_RESAMPLING=resampling,
            OVERVIEWS="IGNORE_EXISTING",
            BIGTIFF="IF_SAFER",
            NUM_THREADS="ALL_CPUS",
        )
        _check_survived(cog, layer, info)
        valid, errors, _warnings = cog_validate(cog, strict=False, quiet=True)
        if not valid:
            raise SegpipeError(f"exported {layer} of {store} is not a valid COG: {'; '.join(errors)}")
        os.replace(cog, dest)
    finally:
        for tmp in (stream, cog):
            tmp.unlink(missing_ok=True)
    return dest
