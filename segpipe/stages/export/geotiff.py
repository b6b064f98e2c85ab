"""Stream a store layer into a tiled GeoTIFF, window by window, without holding the raster in memory.

The first half of an export (:mod:`segpipe.stages.export.cog` converts the result to a
COG). The layer's colour table, band descriptions and tags
(:mod:`segpipe.stages.export.layers`) are written before any pixel, as GDAL requires for
paletted GeoTIFFs. Windows are read from Zarr one ahead of the one GDAL compresses, so
memory stays at two windows whatever the region size. For class layers the MODE overview
levels are built in the same pass (:mod:`segpipe.stages.export.overviews`) and declared in
a VRT beside the GeoTIFF, which the COG driver then copies instead of recomputing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import zarr
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import DatasetWriter
from rasterio.windows import Window

from segpipe.grid.box import Box, iter_boxes
from segpipe.io.store import NODATA_U8, RegionInfo, read_region_info
from segpipe.stages.export.layers import ExportLayer, describe_layer
from segpipe.stages.export.overviews import (
    BandFeed,
    ModePyramid,
    level_paths,
    overview_shapes,
    write_overview_vrt,
)

__all__ = [
    "WINDOW",
    "geotiff_profile",
    "open_overview_level",
    "read_ahead",
    "stream_cache_bytes",
    "stream_step",
    "write_geotiff_layer",
    "write_layer_metadata",
]

WINDOW = 512  # COG block edge, and the smallest streaming window
_MAX_READ = 2048  # largest streaming window: one store block, if blocks are multiples of 512
# Every GeoTIFF written here only lives until the COG is built: tiled like the COG, fast and lossless.
_SCRATCH: dict[str, Any] = {
    "driver": "GTiff",
    "tiled": True,
    "blockxsize": WINDOW,
    "blockysize": WINDOW,
    "compress": "ZSTD",
    "zstd_level": 1,
    "BIGTIFF": "IF_SAFER",
}


def stream_cache_bytes(width: int) -> int:
    """GDAL's block cache while a layer of ``width`` px streams: the overview levels' open tile rows.

    The base raster's windows cover whole tiles, which GDAL can write at once. A band of an
    overview level is half the height of the band below, so from some level on it is less
    than a tile row, and that level's tiles stay open until later bands complete them: under
    ``width`` x 256 bytes over all levels. Twice that, at least 16 MB. The process's cache
    (256 MB under ``segpipe``, 5 % of RAM otherwise) held about 75 MB more at 32,768 px wide.
    """
    return max(16 * 2**20, width * 512)


def stream_step(block_size: int) -> int:
    """Edge of the streaming windows for a store of ``block_size`` blocks.

    One store block per read when blocks are multiples of 512 px and at most
    2048 px (zarr reads whole shards); else the COG block edge.
    """
    return block_size if block_size % WINDOW == 0 and block_size <= _MAX_READ else WINDOW


def geotiff_profile(info: RegionInfo, spec: ExportLayer) -> dict[str, Any]:
    """Creation options of the tiled GeoTIFF of a layer: the region's grid, the layer's bands."""
    profile: dict[str, Any] = {
        **_SCRATCH,
        "height": info.height,
        "width": info.width,
        "count": spec.count,
        "dtype": spec.dtype,
        "crs": CRS.from_wkt(info.crs_wkt) if info.crs_wkt else None,
        "transform": info.affine,
        "nodata": spec.nodata,
    }
    if spec.count > 1:
        profile["interleave"] = "pixel"
    return profile


def write_layer_metadata(dst: DatasetWriter, spec: ExportLayer, store: str | Path) -> None:
    """Band descriptions, dataset tags, colour table and band tags: everything but pixels."""
    for band, text in enumerate(spec.descriptions, start=1):
        dst.set_band_description(band, text)
    if spec.units:  # values as stored are the unit's: scale 1, offset 0, said so for readers
        dst.units = (spec.units,) * spec.count
        dst.scales = (1.0,) * spec.count
        dst.offsets = (0.0,) * spec.count
    dst.update_tags(**spec.dataset_tags(store))
    colormap = spec.colormap()
    if colormap is not None:
        dst.write_colormap(1, colormap)
    for band, tags in enumerate(spec.band_tags(), start=1):
        if tags:
            dst.update_tags(band, **tags)


def read_ahead(
    pool: ThreadPoolExecutor, array: zarr.Array[Any], boxes: Sequence[Box]
) -> Iterator[tuple[Box, np.ndarray]]:
    """Each box with its pixels (all leading bands), the next box being read in ``pool`` meanwhile.

    Args:
        pool: One-thread executor doing the reads; the caller shuts it down (waiting
            for a read still in flight if the caller stops early).
        array: Store layer, (y, x) or (band, y, x).
        boxes: Boxes to read, in order.

    Yields:
        (box, pixels) pairs, in the order of ``boxes``.
    """

    def read(box: Box) -> np.ndarray:
        return np.asarray(array[(Ellipsis, *box.slices)])

    ahead: Future[np.ndarray] | None = pool.submit(read, boxes[0]) if boxes else None
    for i, box in enumerate(boxes):
        assert ahead is not None
        block = ahead.result()
        ahead = pool.submit(read, boxes[i + 1]) if i + 1 < len(boxes) else None
        yield box, block


def open_overview_level(path: Path, height: int, width: int, level: int) -> DatasetWriter:
    """A tiled GeoTIFF for one overview level of a class raster (pixels only: the VRT georeferences)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(
            path, "w", **_SCRATCH, height=height, width=width, count=1, dtype="uint8", nodata=NODATA_U8
        )


def _mode_feed(path: Path, info: RegionInfo, step: int) -> BandFeed:
    """The overview levels of a class raster at ``path``, fed by ``step``-tall bands of windows."""
    shapes = overview_shapes(info.height, info.width, WINDOW)
    pyramid = ModePyramid(
        level_paths(path, len(shapes)), shapes, NODATA_U8, open_overview_level, base=(info.height, info.width)
    )
    return BandFeed(pyramid, info.height, info.width, step)


def write_geotiff_layer(
    store: str | Path,
    path: str | Path,
    layer: str = "classes",
    info: RegionInfo | None = None,
    on_window: Callable[[int, int], None] | None = None,
    overviews: bool = False,
    on_block: Callable[[np.ndarray], None] | None = None,
) -> Path:
    """Stream one store layer into a tiled, compressed GeoTIFF (see the module docstring).

    Args:
        store: Region store.
        path: GeoTIFF to write (replaced if it exists).
        layer: ``classes``, ``confidence``, ``probabilities`` or ``image``.
        info: The store's info, if already read.
        on_window: Called with (row, col) before each window is written (progress hooks, tests).
        overviews: For MODE layers (classes), also build the overview levels in the same
            pass, each in a GeoTIFF beside ``path`` (one more full-width band of windows
            in memory).
        on_block: Called with each window's pixels as they are written (the legend's
            pixel counts, without a second read).

    Returns:
        ``path``, or with ``overviews`` on a class layer a VRT beside it that declares
        the levels as its overviews.

    Raises:
        MissingLayerError: The layer does not exist (run ``segpipe predict`` first).
    """
    info = info or read_region_info(store)
    spec, array = describe_layer(store, layer, info)
    step = stream_step(info.block_size)
    feed: BandFeed | None = None
    try:
        with (
            # rasterio takes GDAL_CACHEMAX in bytes (GDAL's own option reads small numbers as MB).
            rasterio.Env(GDAL_CACHEMAX=stream_cache_bytes(info.width)),
            rasterio.open(path, "w", **geotiff_profile(info, spec)) as dst,
            ThreadPoolExecutor(1) as pool,
        ):
            write_layer_metadata(dst, spec, store)
            if overviews and spec.resampling == "MODE":
                feed = _mode_feed(Path(path), info, step)
            for box, block in read_ahead(pool, array, list(iter_boxes(info.height, info.width, step))):
                if on_window is not None:
                    on_window(box.y0, box.x0)
                dst.write(block, 1 if block.ndim == 2 else None, window=Window.from_slices(*box.slices))
                if feed is not None:
                    feed.add(box, block)
                if on_block is not None:
                    on_block(block)
    except BaseException:
        if feed is not None:
            feed.close()
        raise
    if feed is None:
        return Path(path)
    feed.close()
    return write_overview_vrt(Path(path).with_suffix(".vrt"), Path(path), feed.pyramid.paths)
