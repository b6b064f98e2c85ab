"""Write a synthetic region to disk: GeoTIFF tiles + VRT, truth, sparse labels.

Everything is written window by window, so a 20,000 x 20,000 px scene needs no
more memory than a few windows. Windows are computed in a thread pool (numpy
releases the GIL in its heavy loops) and written by the calling thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import rasterio
from affine import Affine
from rasterio.io import DatasetWriter
from rasterio.windows import Window
from shapely.geometry import Polygon

from segpipe.cores import usable_cores
from segpipe.errors import InputError
from segpipe.grid.box import Box, iter_boxes
from segpipe.io.mosaic import mosaic_vrt_xml
from segpipe.synth.labels import LABEL_CELL, label_polygons, rasterize_polygons
from segpipe.synth.scene import IMAGE_NODATA, SCENE_CLASSES, SceneSpec, class_block, image_block
from segpipe.types import write_classes_file

__all__ = ["SynthRegion", "synthesize"]

T = TypeVar("T")
R = TypeVar("R")

CRS = "EPSG:32617"  # UTM 17N: a real projected CRS, metres
PIXEL_SIZE = 10.0
ORIGIN = (500_000.0, 4_000_000.0)
WINDOW = 1024  # a multiple of LABEL_CELL, so label polygons never straddle windows

LabelPolygons = list[tuple[Polygon, int]]
WindowData = tuple[np.ndarray, np.ndarray, np.ndarray, LabelPolygons]
"""One window's image, dense truth, sparse labels and label polygons."""


@dataclass(frozen=True)
class SynthRegion:
    """Paths of a written synthetic region.

    Attributes:
        image: The VRT over the image tiles.
        tiles: The GeoTIFF tiles.
        truth: Dense truth raster (0 = nodata).
        labels: Sparse label raster (0 = unlabelled).
        labels_vector: The same sparse labels as polygons (GeoPackage).
        classes: classes.json.
        labelled_fraction: Fraction of pixels carrying a sparse label.
    """

    image: Path
    tiles: tuple[Path, ...]
    truth: Path
    labels: Path
    labels_vector: Path
    classes: Path
    labelled_fraction: float


# Label polygons are written to the GeoPackage in batches of this many, so a scene's
# polygons (about 130,000 at 32768² px) are never all held at once. Each batch is held
# three times over while it is written (the polygons, their map-coordinate copies and
# the frame's encoding), outside numpy: 20,000 at a time cost 50 MB more peak RSS than
# 5,000 at 16384² px.
_POLYGON_BATCH = 5_000


@dataclass
class _Tally:
    """What the windows written so far add up to, and the progress callback told of each.

    Label polygons go to ``vector`` in batches as they come (see :class:`_PolygonLayer`).
    """

    total: int
    progress: Callable[[int, int], None] | None
    vector: _PolygonLayer
    done: int = 0
    labelled: int = 0

    def add(self, labels: np.ndarray, polygons: LabelPolygons) -> None:
        """Count one written window."""
        self.labelled += int(np.count_nonzero(labels))
        self.vector.add(polygons)
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total)


@dataclass
class _PolygonLayer:
    """The GeoPackage layer ``labels`` of the sparse label polygons, appended batch by batch.

    It is written under a temporary name and renamed by :meth:`finish`, so ``path`` is
    either the whole layer or absent.
    """

    path: Path
    transform: Affine
    pending: LabelPolygons = field(default_factory=list)
    written: int = 0

    @property
    def partial(self) -> Path:
        """Where the layer is written until it is complete."""
        return self.path.with_name(self.path.stem + ".partial.gpkg")

    def add(self, polygons: LabelPolygons) -> None:
        """Queue polygons (pixel coordinates); write a batch once enough are queued."""
        self.pending.extend(polygons)
        if len(self.pending) >= _POLYGON_BATCH:
            self._flush()

    def finish(self) -> None:
        """Write what is queued (an empty layer when no polygon came) and move the layer into place."""
        if self.pending or not self.written:
            self._flush()
        self.partial.replace(self.path)

    def _flush(self) -> None:
        if not self.written:
            self.partial.unlink(missing_ok=True)
        _write_polygons(self.pending, self.transform, self.partial, append=self.written > 0)
        self.written += len(self.pending)
        self.pending = []


def _bounded_map(pool: Executor, fn: Callable[[T], R], items: list[T], ahead: int) -> Iterator[R]:
    """``pool.map`` that keeps at most ``ahead`` results in flight.

    ``Executor.map`` submits everything at once, so results pile up in memory whenever
    writing is slower than computing; a bound keeps a huge scene's memory flat.
    """
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _profile(width: int, height: int, count: int, dtype: str, nodata: int | None) -> dict[str, object]:
    return {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": dtype,
        "crs": CRS,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        # Deflate (readable everywhere) at its fastest level: on noisy imagery level 1
        # compresses as well as the default 6 in 60 % of the time, and the writer (one
        # thread) is what limits a large scene (docs/benchmarks.md).
        "compress": "deflate",
        "zlevel": 1,
        "num_threads": "ALL_CPUS",
        "predictor": 2,
        "BIGTIFF": "IF_SAFER",
    }


def _band_names(bands: int) -> list[str]:
    if bands == 4:
        return ["blue", "green", "red", "nir"]
    return [f"b{i + 1}" for i in range(bands)]


def _check_parameters(size: int, bands: int, tiles: int) -> None:
    """Refuse a scene too small, too many or no bands, or tiles under 32 px.

    Raises:
        InputError: A parameter is out of range (named as the CLI option).
    """
    if size < 64:
        raise InputError(f"--size {size} is too small: use at least 64 px")
    if not 1 <= bands <= 64:
        raise InputError(f"--bands {bands} is out of range: use 1-64")
    if not 1 <= tiles <= size // 32:
        raise InputError(f"--tiles {tiles} is out of range for a {size} px scene: use 1-{size // 32}")


def _tile_edge(size: int, tiles: int) -> int:
    """Edge of the mosaic's tiles: ``tiles`` per side, rounded up to the label-cell lattice.

    Tile edges on the lattice keep tile windows aligned with label cells.
    """
    edge = -(-size // tiles)
    return -(-edge // LABEL_CELL) * LABEL_CELL


def _tile_windows(tile: Box) -> list[Box]:
    """The windows a tile is computed in (global coordinates, cut short at the tile's edge)."""
    return list(iter_boxes(tile.h, tile.w, WINDOW, origin=(tile.y0, tile.x0)))


def _window_data(spec: SceneSpec, box: Box) -> WindowData:
    """Everything one window contributes: image, dense truth, sparse labels and their polygons."""
    y0, x0, h, w = box.y0, box.x0, box.h, box.w
    dense = class_block(spec, y0, x0, h, w)
    polys = label_polygons(spec, y0, x0, h, w, truth=dense)
    labels = rasterize_polygons(polys, y0, x0, h, w)
    return image_block(spec, y0, x0, h, w, classes=dense), dense, labels, polys


def synthesize(
    out: str | Path,
    size: int = 2048,
    bands: int = 4,
    tiles: int = 2,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> SynthRegion:
    """Generate a synthetic region.

    Args:
        out: Output folder (created).
        size: Scene edge in pixels.
        bands: Number of spectral bands.
        tiles: Tiles per side of the mosaic (``tiles`` x ``tiles`` GeoTIFFs).
        seed: Seed of the scene.
        progress: Called with (windows done, windows total).

    Returns:
        The written paths.

    Raises:
        InputError: A parameter is out of range.
    """
    _check_parameters(size, bands, tiles)
    root = Path(out)
    (root / "tiles").mkdir(parents=True, exist_ok=True)
    transform = Affine(PIXEL_SIZE, 0.0, ORIGIN[0], 0.0, -PIXEL_SIZE, ORIGIN[1])
    spec = SceneSpec(size=size, bands=bands, seed=seed)
    vector = _PolygonLayer(root / "labels_sparse.gpkg", transform)
    tile_paths, tally = _write_rasters(root, spec, transform, _tile_edge(size, tiles), vector, progress)
    vrt = root / "image.vrt"
    vrt.write_text(mosaic_vrt_xml(tile_paths, relative_to=root))
    vector.finish()
    classes = root / "classes.json"
    write_classes_file(classes, SCENE_CLASSES)
    return SynthRegion(
        image=vrt,
        tiles=tuple(tile_paths),
        truth=root / "truth.tif",
        labels=root / "labels_sparse.tif",
        labels_vector=vector.path,
        classes=classes,
        labelled_fraction=tally.labelled / float(size * size),
    )


def _write_rasters(
    root: Path,
    spec: SceneSpec,
    transform: Affine,
    edge: int,
    vector: _PolygonLayer,
    progress: Callable[[int, int], None] | None,
) -> tuple[list[Path], _Tally]:
    """Write the image tiles, ``truth.tif`` and ``labels_sparse.tif`` by window; polygons to ``vector``.

    Windows are computed in a thread pool (numpy releases the GIL in its heavy loops)
    and written by the calling thread, at most two per worker in flight.

    Returns:
        The tiles' paths, and what the windows added up to.
    """
    tile_boxes = list(iter_boxes(spec.size, spec.size, edge))
    tally = _Tally(sum(len(_tile_windows(tile)) for tile in tile_boxes), progress, vector)
    workers = min(4, usable_cores())
    dense = {**_profile(spec.size, spec.size, 1, "uint8", 0), "transform": transform}
    paths = []
    with (
        # GDAL's block cache (5 % of RAM by default) would hold dirty blocks of every
        # output. rasterio takes this value in bytes: 64 bytes is no cache at all, each
        # block written as its window completes it (the 1024 px windows cover whole 256 px
        # blocks), so memory stays flat however big the scene (synth's figures since
        # session 12 were measured so).
        rasterio.Env(GDAL_CACHEMAX=64),
        rasterio.open(root / "truth.tif", "w", **dense) as truth,
        rasterio.open(root / "labels_sparse.tif", "w", **dense) as sparse,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        for dst in (truth, sparse):
            dst.write_colormap(1, {c.value: (*c.rgb, 255) for c in SCENE_CLASSES})
        for tile in tile_boxes:
            paths.append(root / "tiles" / f"tile_{tile.y0 // edge:02d}_{tile.x0 // edge:02d}.tif")
            windows = _tile_windows(tile)
            results = _bounded_map(pool, partial(_window_data, spec), windows, 2 * workers)
            profile = {
                **_profile(tile.w, tile.h, spec.bands, "uint16", IMAGE_NODATA),
                "transform": transform * Affine.translation(tile.x0, tile.y0),
            }
            with rasterio.open(paths[-1], "w", **profile) as dst:
                dst.descriptions = tuple(_band_names(spec.bands))
                _write_tile(dst, tile, zip(windows, results, strict=True), (truth, sparse), tally)
    return paths, tally


def _write_tile(
    dst: DatasetWriter,
    tile: Box,
    windows: Iterator[tuple[Box, WindowData]],
    dense: tuple[DatasetWriter, DatasetWriter],
    tally: _Tally,
) -> None:
    """Write each window's image into its tile, and its truth and labels into the region-wide rasters."""
    truth, sparse = dense
    for box, (image, classes, labels, polys) in windows:
        dst.write(image, window=Window.from_slices(*box.within(tile)))
        truth.write(classes, 1, window=Window.from_slices(*box.slices))
        sparse.write(labels, 1, window=Window.from_slices(*box.slices))
        tally.add(labels, polys)


def _write_polygons(polys: LabelPolygons, transform: Affine, path: Path, append: bool = False) -> None:
    """The label polygons, moved from pixel to map coordinates, into the GeoPackage layer ``labels``."""
    import geopandas as gpd
    from shapely import affinity

    names = {c.value: c.name for c in SCENE_CLASSES}
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    geoms = [affinity.affine_transform(p, [a, b, d, e, c, f]) for p, _ in polys]
    values = [v for _, v in polys]
    frame = gpd.GeoDataFrame(
        {"class": np.asarray(values, dtype=np.int32), "label": [names[v] for v in values]},
        geometry=geoms,
        crs=CRS,
    )
    frame.to_file(path, driver="GPKG", layer="labels", mode="a" if append else "w")
