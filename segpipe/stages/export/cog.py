"""Export store layers to Cloud-Optimized GeoTIFFs without holding the raster in memory.

The raster is streamed window by window from Zarr into a tiled GeoTIFF next to the
destination (colour table, band descriptions and tags written before any pixel),
converted by GDAL's COG driver, checked, validated with ``rio_cogeo``, and only then
renamed over the destination; a STAC Item is written beside it.
``rio.to_raster(driver="COG")`` would hold ~3x the raster in RAM (ARCHITECTURE.md).
Overviews: for class rasters the MODE levels are built during the stream
(:mod:`segpipe.stages.export.overviews`; GDAL 3.10's own MODE pass was most of the export's time) and
copied by the COG driver; other layers get GDAL's AVERAGE overviews.

Measured on GDAL 3.10 / rasterio 1.4: the COG driver keeps the colour table, band
descriptions, dataset and band tags of its source, so nothing needs re-adding after
the conversion (re-adding would rewrite the IFD at the end of the file and break the
COG layout); :func:`write_cog` still checks they survived and fails loudly if not.

Temporaries carry the writing process's id, so an export killed outright (SIGKILL,
out-of-memory killer) leaves only hidden temporaries, never a destination file, and
the next export to the same destination removes those of dead processes.

An ``s3://`` destination is exported the same way into a local temporary folder
(``TMPDIR``: it needs room for the COG), validated there, and only then uploaded, the
COG before its STAC Item; S3 shows an object only once its upload completes, so a
failed export leaves the destination as it was.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import tempfile
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import DatasetWriter
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate

from segpipe.errors import InputError, SegpipeError, StorageError
from segpipe.io.remote import (
    as_url,
    check_bucket,
    is_remote,
    remote_exists,
    storage_errors,
    upload,
    url_name,
    url_parent,
)
from segpipe.io.store import NODATA_U8, RegionInfo, read_region_info, same_nodata
from segpipe.stages.export.layers import (
    EXPORT_LAYERS,
    ExportLayer,
    class_colormap,
    class_tags,
    classes_from_tags,
    describe_layer,
)
from segpipe.stages.export.overviews import ModePyramid, overview_shapes, write_overview_vrt
from segpipe.stages.export.stac import stac_item, stac_item_path

__all__ = [
    "COMPRESSIONS",
    "EXPORT_LAYERS",
    "GDAL_CACHE_MB",
    "WINDOW",
    "ExportLayer",
    "class_colormap",
    "class_tags",
    "classes_from_tags",
    "describe_layer",
    "write_cog",
    "write_geotiff_layer",
]

WINDOW = 512  # COG block edge, and the smallest streaming window
COMPRESSIONS = ("DEFLATE", "ZSTD")
# GDAL's block cache during the conversion. Its default (5 % of RAM, 1.2 GB here) lets the
# COG driver's overview pass fill the cache and dominates peak RSS; 256 MB measured no
# slower on 32,768^2 (docs/benchmarks.md).
GDAL_CACHE_MB = 256
_MAX_READ = 2048  # largest streaming window: one store block, if blocks are multiples of 512


def _windows(height: int, width: int, step: int) -> list[tuple[int, int, int, int]]:
    return [
        (y0, x0, min(step, height - y0), min(step, width - x0))
        for y0 in range(0, height, step)
        for x0 in range(0, width, step)
    ]


def write_geotiff_layer(
    store: str | Path,
    path: str | Path,
    layer: str = "classes",
    info: RegionInfo | None = None,
    on_window: Callable[[int, int], None] | None = None,
    overviews: bool = False,
) -> Path:
    """Stream one store layer into a tiled, compressed GeoTIFF, window by window.

    Memory stays at two windows (one being read while the previous one is written)
    whatever the region size, plus, with ``overviews`` on a class layer, one
    full-width band of windows. The colour table (classes layer), band descriptions
    and tags are written before any pixel, as GDAL requires for paletted GeoTIFFs.

    Args:
        store: Region store.
        path: GeoTIFF to write (replaced if it exists).
        layer: ``classes``, ``confidence``, ``probabilities`` or ``image``.
        info: The store's info, if already read.
        on_window: Called with (row, col) before each window is written (progress hooks, tests).
        overviews: For MODE layers (classes), also build the overview levels in the same
            pass (:mod:`segpipe.stages.export.overviews`), each in a GeoTIFF beside ``path``.

    Returns:
        ``path``, or with ``overviews`` on a class layer a VRT beside it that declares
        the levels as its overviews.

    Raises:
        StoreError: The layer does not exist (run ``segpipe predict`` first).
    """
    info = info or read_region_info(store)
    spec, array = describe_layer(store, layer, info)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": info.height,
        "width": info.width,
        "count": spec.count,
        "dtype": spec.dtype,
        "crs": CRS.from_wkt(info.crs_wkt) if info.crs_wkt else None,
        "transform": info.affine,
        "nodata": spec.nodata,
        "tiled": True,
        "blockxsize": WINDOW,
        "blockysize": WINDOW,
        # fast and lossless: this file only lives until the COG is built
        "compress": "ZSTD",
        "zstd_level": 1,
        "BIGTIFF": "IF_SAFER",
    }
    if spec.count > 1:
        profile["interleave"] = "pixel"
    # One store block per read when blocks are multiples of 512 (zarr reads whole shards).
    b = info.block_size
    step = b if b % WINDOW == 0 and b <= _MAX_READ else WINDOW
    two_d = len(array.shape) == 2

    def read(win: tuple[int, int, int, int]) -> np.ndarray:
        y0, x0, h, w = win
        return np.asarray(array[..., y0 : y0 + h, x0 : x0 + w])

    pushed: Future[None] | None = None
    with (
        rasterio.open(path, "w", **profile) as dst,
        ThreadPoolExecutor(1) as pool,
        ThreadPoolExecutor(1) as ovr,
    ):
        for band, text in enumerate(spec.descriptions, start=1):
            dst.set_band_description(band, text)
        dst.update_tags(SEGPIPE_LAYER=layer, SEGPIPE_STORE=Path(str(store)).name)
        if layer == "classes":
            dst.write_colormap(1, class_colormap(spec.classes))
            if spec.classes:
                dst.update_tags(1, **class_tags(spec.classes))
        elif layer == "probabilities":
            for band, cls in enumerate(spec.classes, start=1):
                dst.update_tags(band, CLASS_VALUE=str(cls.value), CLASS_NAME=cls.name)
        pyramid = None
        if overviews and spec.resampling == "MODE":
            shapes = overview_shapes(info.height, info.width, WINDOW)
            paths = [Path(path).with_name(f"{Path(path).stem}.ovr{i + 1}.tif") for i in range(len(shapes))]
            pyramid = ModePyramid(paths, shapes, NODATA_U8, _open_level)
            strip = np.empty((min(step, info.height), info.width), np.uint8)
        wins = _windows(info.height, info.width, step)
        # read the next window while GDAL compresses the current one
        ahead: Future[np.ndarray] | None = pool.submit(read, wins[0]) if wins else None
        try:
            for i, (y0, x0, h, w) in enumerate(wins):
                if on_window is not None:
                    on_window(y0, x0)
                assert ahead is not None
                block = ahead.result()
                ahead = pool.submit(read, wins[i + 1]) if i + 1 < len(wins) else None
                window = Window(x0, y0, w, h)
                if two_d:
                    dst.write(block, 1, window=window)
                else:
                    dst.write(block, window=window)
                if pyramid is not None:
                    strip[:h, x0 : x0 + w] = block
                    if x0 + w == info.width:
                        # the levels are computed in another thread (numpy releases the GIL) while
                        # GDAL compresses the next band; one band in flight bounds the memory
                        if pushed is not None:
                            pushed.result()
                        pushed = ovr.submit(pyramid.push, strip[:h], y0 + h == info.height)
                        strip = np.empty_like(strip)
            if pushed is not None:
                pushed.result()
        except BaseException:
            if pushed is not None:
                pushed.exception()  # wait: the levels must not be closed while being written
            if pyramid is not None:
                pyramid.close()
            raise
    if pyramid is None:
        return Path(path)
    pyramid.close()
    return write_overview_vrt(Path(path).with_suffix(".vrt"), Path(path), pyramid.paths)


def _open_level(path: Path, height: int, width: int, level: int) -> DatasetWriter:
    """A tiled GeoTIFF for one overview level of a class raster (pixels only: the VRT georeferences)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(
            path,
            "w",
            driver="GTiff",
            height=height,
            width=width,
            count=1,
            dtype="uint8",
            nodata=NODATA_U8,
            tiled=True,
            blockxsize=WINDOW,
            blockysize=WINDOW,
            compress="ZSTD",
            zstd_level=1,
            BIGTIFF="IF_SAFER",
        )



def _check_survived(path: Path, spec: ExportLayer, info: RegionInfo) -> None:
    """Fail if the COG lost its georeferencing, nodata, descriptions, colour table or class tags."""
    with rasterio.open(path) as src:
        problems = []
        if not same_nodata(src.nodata, spec.nodata):
            problems.append(f"nodata is {src.nodata}")
        if src.transform != info.affine:
            problems.append("transform changed")
        if info.crs_wkt and (src.crs is None or src.crs != CRS.from_wkt(info.crs_wkt)):
            problems.append("CRS changed")
        if tuple(src.descriptions) != spec.descriptions:
            problems.append("band descriptions lost")
        if spec.name == "classes":
            try:
                cmap = src.colormap(1)
            except ValueError:
                cmap = {}
            if any(cmap.get(c.value, (0, 0, 0, 0))[:3] != c.rgb for c in spec.classes):
                problems.append("colour table lost")
            if spec.classes and classes_from_tags(src.tags(1)) != list(spec.classes):
                problems.append("class tags lost")
    if problems:
        raise SegpipeError(f"COG conversion of {path} damaged the raster: {'; '.join(problems)}")


def _remove_stale_temporaries(dest: Path) -> None:
    """Delete temporaries of earlier exports to ``dest`` whose process no longer runs."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(\d+)-[0-9a-f]{{8}}\.")
    for tmp in dest.parent.glob(f".{glob.escape(dest.name)}.*"):
        match = pattern.match(tmp.name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # another user's live process


def _stac_bands(spec: ExportLayer) -> list[dict[str, Any]]:
    bands = []
    for name in spec.descriptions:
        band: dict[str, Any] = {"name": name, "description": name, "data_type": spec.dtype}
        if spec.nodata is not None:
            band["nodata"] = "nan" if math.isnan(spec.nodata) else spec.nodata
        bands.append(band)
    return bands


def write_cog(
    store: str | Path,
    out: str | Path,
    layer: str = "classes",
    overwrite: bool = True,
    compress: str = "DEFLATE",
    stac: bool = True,
) -> Path | str:
    """Export a store layer to a validated Cloud-Optimized GeoTIFF, plus a STAC Item.

    The COG has the store's CRS and transform, 512-px blocks, internal overviews
    (MODE for classes, so overviews hold class ids only; AVERAGE otherwise),
    ``compress`` with a predictor (horizontal differencing for integers, floating
    point for floats), BIGTIFF if needed and one description per band. ``classes``:
    nodata 255, a colour table and band tags ``CLASS_<value>=<name>`` plus a JSON
    ``classes`` tag. ``confidence``: nodata 255. ``probabilities``: one band per
    class (described by the class name, tags ``CLASS_VALUE``/``CLASS_NAME``), nodata
    255. ``image``: the mosaic with its own dtype, nodata and band names.

    ``out`` is replaced only once the new file is complete and valid; on any failure
    the temporaries are removed and an existing ``out`` is left untouched.

    Args:
        store: Region store holding the layer (a path or an ``s3://`` URL).
        out: Destination ``.tif`` (a path or an ``s3://`` URL).
        layer: ``classes``, ``confidence``, ``probabilities`` or ``image``.
        overwrite: Replace an existing ``out``.
        compress: ``DEFLATE`` (readable everywhere) or ``ZSTD`` (faster, smaller).
        stac: Also write a STAC Item ``<name>.stac.json`` beside ``out``.

    Returns:
        The destination: a path, or the URL for an ``s3://`` destination.

    Raises:
        MissingInputError: The store (or the destination bucket) does not exist.
        TransientError: Object storage could not be reached.
        StoreError: The layer does not exist (run ``segpipe predict`` first).
        InputError: ``out`` exists and ``overwrite`` is false, names a folder, or a bad
            layer/compression.
        StorageError: ``out`` cannot be written (full disk, read-only or forbidden
            folder, a file in the way); nothing is left and an earlier ``out`` is kept.
        SegpipeError: The COG failed validation.
    """
    if compress.upper() not in COMPRESSIONS:
        raise InputError(f"compression {compress!r} is not supported: use DEFLATE or ZSTD")
    if is_remote(out):
        return _write_remote_cog(store, as_url(out), layer, overwrite, compress, stac)
    dest = Path(out)
    _check_destination(dest, overwrite)
    info = read_region_info(store)
    spec, _ = describe_layer(store, layer, info)  # fail before any file is created
    with storage_errors(dest, "COG"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(dest)
        # Temporaries next to the destination: same filesystem, so the final os.replace is atomic.
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            cog = _convert(store, dest, token, layer, info, spec, compress)
            item_tmp = None
            if stac:
                # Written before the COG is published: a full disk fails here, with the
                # earlier COG and Item still in place; renames below need no space.
                item = stac_item(
                    dest,
                    info.grid,
                    layer,
                    _stac_bands(spec),
                    spec.classes if layer == "classes" else (),
                    item_id=f"{Path(str(store)).stem}-{dest.stem}",
                )
                item_tmp = dest.with_name(f".{dest.name}.{token}.stac.json")
                item_tmp.write_text(json.dumps(item, indent=2) + "\n")
            os.replace(cog, dest)
            if item_tmp is not None:
                os.replace(item_tmp, stac_item_path(dest))
        finally:
            for tmp in dest.parent.glob(f".{glob.escape(dest.name)}.{token}.*"):
                tmp.unlink(missing_ok=True)
    return dest


def _check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse a destination that cannot become a file, before any work.

    Raises:
        InputError: ``dest`` is a folder, or exists and ``overwrite`` is false.
        StorageError: A file is in the way where one of its folders should be.
    """
    if dest.is_dir():
        raise InputError(f"--out {dest} is a folder: name the .tif to write, e.g. {dest / 'classes.tif'}")
    if dest.exists() and not overwrite:
        raise InputError(f"{dest} exists: remove it or export with overwrite")
    for parent in dest.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StorageError(f"cannot write COG {dest}: {parent} is a file, not a folder")
            break


def _convert(
    store: str | Path, dest: Path, token: str, layer: str, info: RegionInfo, spec: ExportLayer, compress: str
) -> Path:
    """Stream the layer beside ``dest``, convert it to a COG, check and validate it.

    Returns:
        The hidden, validated COG (``dest`` is not touched).
    """
    stream = dest.with_name(f".{dest.name}.{token}.stream.tif")
    cog = dest.with_name(f".{dest.name}.{token}.cog.tif")
    source = write_geotiff_layer(store, stream, layer, info=info, overviews=True)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        rasterio.shutil.copy(
            source,
            cog,
            driver="COG",
            COMPRESS=compress.upper(),
            PREDICTOR="YES",  # 2 for integers, 3 for floats
            BLOCKSIZE=WINDOW,
            OVERVIEW_RESAMPLING=spec.resampling,
            # levels built while streaming (classes) are copied, not recomputed
            OVERVIEWS="FORCE_USE_EXISTING" if source != stream else "IGNORE_EXISTING",
            BIGTIFF="IF_SAFER",
            NUM_THREADS="ALL_CPUS",
        )
    _check_survived(cog, spec, info)
    valid, errors, _warnings = cog_validate(cog, strict=False, quiet=True)
    if not valid:
        raise SegpipeError(f"exported {layer} of {store} is not a valid COG: {'; '.join(errors)}")
    return cog


def _write_remote_cog(
    store: str | Path, url: str, layer: str, overwrite: bool, compress: str, stac: bool
) -> str:
    """:func:`write_cog` to ``s3://``: export into a local temporary folder, then upload."""
    check_bucket(url)
    if not overwrite and remote_exists(url):
        raise InputError(f"{url} exists: remove it or export with overwrite")
    with tempfile.TemporaryDirectory(prefix="segpipe-export-") as tmp:
        local = Path(write_cog(store, Path(tmp) / url_name(url), layer, True, compress, stac))
        upload(local, url)
        if stac:
            # After the COG: an Item never points at a COG that is not there yet.
            item = stac_item_path(local)
            upload(item, f"{url_parent(url)}/{item.name}")
    return url
