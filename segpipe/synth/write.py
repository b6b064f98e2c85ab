"""Write a synthetic region to disk: GeoTIFF tiles + VRT, truth, sparse labels.

Everything is written window by window, so a 20,000 x 20,000 px scene needs no
more memory than a few windows. Windows are computed in a thread pool (numpy
releases the GIL in its heavy loops) and written by the calling thread.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from segpipe.errors import InputError
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


def _windows(y0: int, x0: int, h: int, w: int) -> Iterator[tuple[int, int, int, int]]:
    for wy in range(y0, y0 + h, WINDOW):
        for wx in range(x0, x0 + w, WINDOW):
            yield wy, wx, min(WINDOW, y0 + h - wy), min(WINDOW, x0 + w - wx)


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
        "compress": "deflate",
        "predictor": 2,
        "BIGTIFF": "IF_SAFER",
    }


def _band_names(bands: int) -> list[str]:
    if bands == 4:
        return ["blue", "green", "red", "nir"]
    return [f"b{i + 1}" for i in range(bands)]


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
    if size < 64:
        raise InputError(f"--size {size} is too small: use at least 64 px")
    if not 1 <= bands <= 64:
        raise InputError(f"--bands {bands} is out of range: use 1-64")
    if not 1 <= tiles <= size // 32:
        raise InputError(f"--tiles {tiles} is out of range for a {size} px scene: use 1-{size // 32}")
    spec = SceneSpec(size=size, bands=bands, seed=seed)
    root = Path(out)
    (root / "tiles").mkdir(parents=True, exist_ok=True)
    transform = Affine(PIXEL_SIZE, 0.0, ORIGIN[0], 0.0, -PIXEL_SIZE, ORIGIN[1])
    # Tile edges on the label-cell lattice keep tile windows aligned with label cells.
    edge = -(-size // tiles)
    edge = -(-edge // LABEL_CELL) * LABEL_CELL
    tile_boxes = [
        (ty, tx, min(edge, size - ty), min(edge, size - tx))
        for ty in range(0, size, edge)
        for tx in range(0, size, edge)
    ]
    total = sum(1 for box in tile_boxes for _ in _windows(*box))
    names = _band_names(bands)

    def compute(win: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        wy, wx, h, w = win
        dense = class_block(spec, wy, wx, h, w)
        polys = label_polygons(spec, wy, wx, h, w, truth=dense)
        labels = rasterize_polygons(polys, wy, wx, h, w)
        return image_block(spec, wy, wx, h, w, classes=dense), dense, labels, polys

    workers = max(1, min(4, os.cpu_count() or 1))
    tile_paths: list[Path] = []
    all_polys: list = []
    labelled = 0
    dense_prof = _profile(size, size, 1, "uint8", 0)
    with (
        # GDAL's block cache (5 % of RAM by default) would hold dirty blocks of every
        # output; a small cache keeps memory flat however big the scene.
        rasterio.Env(GDAL_CACHEMAX=64),
        rasterio.open(root / "truth.tif", "w", **{**dense_prof, "transform": transform}) as truth,
        rasterio.open(root / "labels_sparse.tif", "w", **{**dense_prof, "transform": transform}) as sparse,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        for dst in (truth, sparse):
            dst.write_colormap(1, {c.value: (*c.rgb, 255) for c in SCENE_CLASSES})
        done = 0
        for ty, tx, th, tw in tile_boxes:
            path = root / "tiles" / f"tile_{ty // edge:02d}_{tx // edge:02d}.tif"
            tile_paths.append(path)
            tile_t = transform * Affine.translation(tx, ty)
            prof = {**_profile(tw, th, bands, "uint16", IMAGE_NODATA), "transform": tile_t}
            wins = list(_windows(ty, tx, th, tw))
            results = _bounded_map(pool, compute, wins, 2 * workers)
            with rasterio.open(path, "w", **prof) as tile:
                tile.descriptions = tuple(names)
                for win, (image, dense, labels, polys) in zip(wins, results, strict=True):
                    wy, wx, h, w = win
                    tile.write(image, window=Window(wx - tx, wy - ty, w, h))
                    truth.write(dense, 1, window=Window(wx, wy, w, h))
                    sparse.write(labels, 1, window=Window(wx, wy, w, h))
                    labelled += int(np.count_nonzero(labels))
                    all_polys.extend(polys)
                    done += 1
                    if progress:
                        progress(done, total)
    vrt = root / "image.vrt"
    vrt.write_text(mosaic_vrt_xml(tile_paths, relative_to=root))
    vector = root / "labels_sparse.gpkg"
    _write_polygons(all_polys, transform, vector)
    classes = root / "classes.json"
    write_classes_file(classes, SCENE_CLASSES)
    return SynthRegion(
        image=vrt,
        tiles=tuple(tile_paths),
        truth=root / "truth.tif",
        labels=root / "labels_sparse.tif",
        labels_vector=vector,
        classes=classes,
        labelled_fraction=labelled / float(size * size),
    )


def _write_polygons(polys: list, transform: Affine, path: Path) -> None:
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
    path.unlink(missing_ok=True)
    frame.to_file(path, driver="GPKG", layer="labels")
