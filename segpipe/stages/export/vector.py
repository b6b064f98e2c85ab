"""Polygons of the classes: one feature per connected class patch, written block by block.

``write_vector(store, "classes.gpkg")`` gives what ``rasterio.features.shapes`` gives on the
whole ``classes`` layer at once (4-connectivity, 0 and 255 skipped): one polygon per
connected patch, with its ``class``, ``class_name``, ``area`` (map units squared) and
``mean_confidence`` (mean of the ``confidence`` layer over the patch, percent; null
without that layer), in the store's CRS. It never holds the whole raster:

1. With ``min_area``, a first pass over the blocks labels their components and lists
   their sizes and adjacencies (:func:`~.vector_blocks.sieve_facts`); the sieve is decided
   on that component graph exactly as GDAL's whole-raster sieve decides it
   (:mod:`~.vector_sieve`), giving each block a small lookup table.
2. Each block is read, sieved by its table, labelled and polygonized (one polygon per
   component, in global pixel coordinates; :func:`~.vector_blocks.polygonize_block`).
3. Rows of blocks are merged in order (:class:`~.vector_merge.RowMerger`): components that
   touch across a block border with the same class are one patch, their parts unioned
   once the patch is complete; complete patches are appended to the file at once.

Block work runs on a dask cluster when a client is given, else in this process. The file
is written under a hidden temporary name beside the destination and renamed over it only
when complete, so an error never leaves a partial file nor destroys an earlier one. The
temporary carries the writing process's id, as the COG export's do: a kill leaves only
hidden temporaries, and the next export to the same destination removes those of dead
processes with the COG export's own sweep.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely

from segpipe.errors import InputError, VectorFormatError
from segpipe.grid.box import Box, iter_boxes
from segpipe.io.remote import is_remote, storage_errors
from segpipe.io.store import RegionInfo, has_layer, open_layer, read_region_info
from segpipe.io.swap import remove_stale_temporaries, temporary_name
from segpipe.stages.export.vector_blocks import BlockPolygons, polygonize_block, sieve_facts
from segpipe.stages.export.vector_merge import Patches, RowMerger
from segpipe.stages.export.vector_parquet import GeoParquetSink
from segpipe.stages.export.vector_sieve import sieve_plan

if TYPE_CHECKING:
    import distributed

__all__ = [
    "LAYER_NAME",
    "VECTOR_FORMATS",
    "VectorFormatError",
    "check_vector_request",
    "sieve_threshold",
    "vector_driver",
    "write_vector",
]

LAYER_NAME = "classes"
VECTOR_FORMATS = {".gpkg": "GPKG", ".parquet": "GeoParquet"}

T = TypeVar("T")


def vector_driver(out: str | Path) -> str:
    """The format of a destination, from its extension: ``GPKG`` (pyogrio) or ``GeoParquet`` (pyarrow).

    Raises:
        VectorFormatError: The extension is neither ``.gpkg`` nor ``.parquet``.
    """
    suffix = Path(str(out)).suffix.lower()
    if suffix not in VECTOR_FORMATS:
        raise VectorFormatError(
            f"cannot write polygons to {out}: unknown extension {suffix or '(none)'!r}; "
            "name a .gpkg (GeoPackage) or .parquet (GeoParquet) file"
        )
    return VECTOR_FORMATS[suffix]


def check_vector_request(
    out: str | Path, min_area: float | None = None, simplify: float | None = None, overwrite: bool = True
) -> tuple[Path, str]:
    """Refuse a polygon export's destination or settings before anything is read or written.

    The command checks these before it writes the COG of the same run, so a bad
    ``--min-area`` cannot leave a new COG over an earlier one and no polygons.

    Returns:
        The destination and its format (:func:`vector_driver`).

    Raises:
        VectorFormatError: ``out`` is neither ``.gpkg`` nor ``.parquet``.
        InputError: ``out`` is a folder, on ``s3://``, or exists without ``overwrite``; a
            negative or non-finite ``min_area`` or ``simplify``.
    """
    if is_remote(out):
        raise InputError(f"--vector {out}: write polygons to a local file, then upload it")
    dest = Path(out)
    _check_destination(dest, overwrite)
    driver = vector_driver(dest)
    if simplify is not None and (not math.isfinite(simplify) or simplify < 0):
        raise InputError(f"--simplify {simplify} must be a tolerance in map units, 0 or more")
    _check_min_area(min_area)
    return dest, driver


def _check_min_area(min_area: float | None) -> None:
    """Refuse a minimum mapping unit that is negative or not a number (the one check of it)."""
    if min_area is not None and (not math.isfinite(min_area) or min_area < 0):
        raise InputError(f"--min-area {min_area} must be a number of map units squared, 0 or more")


def sieve_threshold(min_area: float | None, info: RegionInfo) -> int:
    """The sieve's size in pixels for a minimum mapping unit in map units squared (0: no sieve).

    A patch of ``n`` pixels is kept when ``n * pixel_area >= min_area``.

    Raises:
        InputError: ``min_area`` is negative or not a number.
    """
    if min_area is None:
        return 0
    _check_min_area(min_area)
    a, b, _, d, e, _ = info.transform
    pixel_area = abs(a * e - b * d)
    # The tolerance keeps e.g. 900 m2 on 30 m pixels at one pixel despite float rounding.
    return max(0, math.ceil(min_area / pixel_area - 1e-9))


Pending = Callable[[], list[Any]]


def _runner(client: distributed.Client | None) -> Callable[..., Pending]:
    """Start a function over argument lists, on the cluster or here; the result gives the outputs in order.

    On a cluster the work starts at once (the driver can merge one row while the next is
    computed); here it runs when the outputs are asked for, one call at a time.
    """

    def start(fn: Callable[..., T], *args: Sequence[Any]) -> Callable[[], list[T]]:
        if client is None:
            return lambda: [fn(*call) for call in zip(*args, strict=True)]
        futures = client.map(fn, *args, pure=False)
        return lambda: list(client.gather(futures))

    return start


def _lookup_tables(store: str, info: RegionInfo, boxes: list[Box], threshold: int,
                   start: Callable[..., Pending]) -> list[np.ndarray | None]:
    """Per block, the sieved class of each component label; all None without a sieve."""
    if threshold <= 1:  # no component has fewer than one pixel
        return [None] * len(boxes)
    facts = start(sieve_facts, [store] * len(boxes), boxes, [info.width] * len(boxes))()
    return list(sieve_plan(facts, info.blocks[1], info.width, threshold))


class _Writer:
    """Append complete patches to the temporary file as features in the store's CRS."""

    def __init__(self, path: Path, driver: str, info: RegionInfo, simplify: float | None, confidence: bool):
        self.path, self.driver, self.info = path, driver, info
        self.simplify, self.confidence = simplify, confidence
        self.names = {c.value: c.name for c in info.classes}
        self.features = 0
        self.features_started = False
        self.parquet = GeoParquetSink(path, info.crs_wkt) if driver == "GeoParquet" else None

    def _to_map(self, coords: np.ndarray) -> np.ndarray:
        # Same arithmetic as GDAL's polygonizer (x*a + y*b + c), so axis-aligned grids match it to the bit.
        a, b, c, d, e, f = self.info.transform
        x, y = coords[:, 0], coords[:, 1]
        return np.column_stack([x * a + y * b + c, x * d + y * e + f])

    def write(self, patches: Patches) -> None:
        """Append ``patches`` (possibly none: the first call creates the layer)."""
        if not len(patches) and self.features_started:
            return
        self.features_started = True
        frame = self._frame(patches)
        if self.parquet is not None:
            self.parquet.append(frame)
        else:
            pyogrio.write_dataframe(frame, self.path, layer=LAYER_NAME, driver=self.driver,
                                    append=self.path.exists(), geometry_type="Polygon")
        self.features += len(patches)

    def close(self) -> None:
        """Finish the file (GeoParquet writes its row groups and metadata last)."""
        if self.parquet is not None:
            self.parquet.close()

    def _frame(self, patches: Patches) -> gpd.GeoDataFrame:
        """The features of ``patches`` in map coordinates, with their attributes."""
        geometry = shapely.transform(patches.column("geometry"), self._to_map)
        if self.simplify:
            geometry = shapely.simplify(geometry, self.simplify, preserve_topology=True)
        a, b, _, d, e, _ = self.info.transform
        values = patches.column("values")
        count = patches.column("conf_count").astype(np.float64)
        mean = np.divide(patches.column("conf_sum"), count, out=np.full(len(count), np.nan), where=count > 0)
        table = pd.DataFrame({
            "class": pd.Series(values, dtype="int32"),
            "class_name": pd.Series([self.names.get(int(v)) for v in values], dtype="object"),
            "area": pd.Series(patches.column("pixels") * abs(a * e - b * d), dtype="float64"),
            "mean_confidence": pd.Series(mean if self.confidence else np.nan, index=range(len(count)),
                                         dtype="float64"),
        })
        return gpd.GeoDataFrame(table, geometry=gpd.GeoSeries(geometry), crs=self.info.crs_wkt or None)


def _check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse a destination that cannot become the file, before any work.

    Raises:
        InputError: ``dest`` is a folder, or exists and ``overwrite`` is false.
    """
    if dest.is_dir():
        raise InputError(f"--vector {dest} is a folder: name the file to write, e.g. {dest / 'classes.gpkg'}")
    if dest.exists() and not overwrite:
        raise InputError(f"{dest} exists: remove it or export with overwrite")


@contextlib.contextmanager
def _staged(dest: Path) -> Iterator[Path]:
    """A hidden temporary beside ``dest`` (same filesystem: the rename is atomic), always removed.

    Its name (:func:`segpipe.io.swap.temporary_name`) is the one the sweep of dead processes'
    leftovers (:func:`segpipe.io.swap.remove_stale_temporaries`) recognises.
    """
    tmp = temporary_name(dest, dest.suffix)
    try:
        yield tmp
    finally:
        # SQLite (GeoPackage) may leave a journal beside the file it was writing.
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal"), tmp.with_name(tmp.name + "-wal"),
                         tmp.with_name(tmp.name + "-shm")):
            leftover.unlink(missing_ok=True)


def _polygonize(store: str, info: RegionInfo, luts: list[np.ndarray | None], writer: _Writer,
                start: Callable[..., Pending]) -> None:
    """Polygonize the blocks row by row, merging patches across borders, appending complete ones."""
    boxes = list(iter_boxes(info.height, info.width, info.block_size))
    rows, cols = info.blocks
    confidence = has_layer(store, "confidence")

    def row_of(r: int) -> Pending:
        part = slice(r * cols, (r + 1) * cols)
        return start(polygonize_block, [store] * cols, boxes[part], luts[part], [confidence] * cols)

    merger = RowMerger(info.width)
    writer.write(Patches())  # the layer exists even when no pixel is classified
    pending = row_of(0)
    for r in range(rows):
        row: list[BlockPolygons] = pending()
        if r + 1 < rows:
            pending = row_of(r + 1)  # on a cluster, computed while this row is merged
        writer.write(merger.add_row(row, last=r == rows - 1))


def write_vector(
    store: str | Path,
    out: str | Path,
    min_area: float | None = None,
    simplify: float | None = None,
    client: distributed.Client | None = None,
    overwrite: bool = True,
) -> Path:
    """Write one polygon per connected class patch of the store's ``classes`` layer.

    The polygons equal those of ``rasterio.features.shapes`` on the whole (sieved) layer
    with 4-connectivity, values 0 and 255 skipped, yet the layer is read block by block.

    Args:
        store: Region store with a ``classes`` layer (a path or an ``s3://`` URL).
        out: Destination ``.gpkg`` (GeoPackage) or ``.parquet`` (GeoParquet) file, local.
        min_area: Minimum mapping unit in map units squared: patches smaller than this are
            first merged into their largest neighbour, as ``rasterio.features.sieve`` does
            on the whole layer (4-connectivity; 0 and 255 are never changed and neighbour
            nothing). None: no sieve.
        simplify: Tolerance in map units for ``shapely.simplify(preserve_topology=True)``,
            applied to each polygon on its own (neighbours may then overlap or gap
            slightly). None: the exact pixel outlines.
        client: Dask client to run the block work on; None: in this process.
        overwrite: Replace an existing ``out``.

    Returns:
        The written file.

    Raises:
        VectorFormatError: ``out`` is neither ``.gpkg`` nor ``.parquet``.
        InputError: ``out`` is a folder, on ``s3://``, or exists without ``overwrite``; a
            negative ``min_area`` or ``simplify``.
        MissingLayerError: The store has no ``classes`` layer (run ``segpipe predict``).
        StorageError: ``out`` cannot be written; an earlier ``out`` is left as it was.
    """
    dest, driver = check_vector_request(out, min_area, simplify, overwrite)
    open_layer(store, "classes", missing="run 'segpipe predict' first")
    info = read_region_info(store)
    threshold = sieve_threshold(min_area, info)
    location = info.path
    start = _runner(client)
    boxes = list(iter_boxes(info.height, info.width, info.block_size))
    with storage_errors(dest, "polygons"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(dest)  # a killed export's partial files (any format, and their journals)
        with _staged(dest) as tmp:
            luts = _lookup_tables(location, info, boxes, threshold, start)
            writer = _Writer(tmp, driver, info, simplify, has_layer(store, "confidence"))
            _polygonize(location, info, luts, writer, start)
            writer.close()
            os.replace(tmp, dest)
    return dest
