"""Scenes in several CRSs and resolutions, warped onto one target grid block by block.

:func:`target_grid` chooses the grid (CRS covering most of the area, finest band's pixel
size, union of the footprints or an area of interest, aligned to whole multiples of the
pixel size like ``gdalwarp -tap``); :func:`open_warped` returns the image on that grid as
a lazy dask array with the same contract as :func:`segpipe.io.mosaic.open_mosaic`.

Each dask block is made by one task that warps, for its window only, every band of every
scene whose footprint meets the window through GDAL's warper
(:func:`rasterio.warp.reproject`), so memory stays flat whatever the region's size and
workers read only the source windows they need. Where scenes overlap, a pixel takes the
first scene (in the chosen order) whose every band is valid there.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask.array
import numpy as np
import rasterio
import shapely
import xarray as xr
from affine import Affine
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.features import geometry_mask
from rasterio.warp import Resampling, calculate_default_transform, reproject, transform_bounds, transform_geom
from shapely.geometry import box, mapping, shape

from segpipe.errors import InputError, MissingInputError, TileMismatchError
from segpipe.io.aoi import Aoi, aoi_geojson
from segpipe.io.remote import gdal_env, gdal_path, is_remote
from segpipe.io.sources import BandFile, Scene, SceneSet
from segpipe.types import Grid

__all__ = ["Order", "open_warped", "scenes_from_files", "target_grid"]

Order = Literal["given", "latest", "least-cloudy"]

# Footprint areas are compared in an equal-area CRS, so a degree-based CRS does not win
# or lose by the size of its units.
_EQUAL_AREA = CRS.from_epsg(6933)
_ORDERS = ("given", "latest", "least-cloudy")
MIN_COVERAGE = 0.01
"""Least share of the target grid the scenes must cover when no bounds or AOI is given."""

# reproject() into an array first builds an in-memory dataset without a transform and
# warns about it, though the warp then uses dst_transform: noise in every block task.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module=r"rasterio\.warp")


@dataclass(frozen=True)
class _Band:
    """What a block task needs about one band file (read once, on the driver)."""

    href: str
    band: int
    crs_wkt: str
    transform: tuple[float, ...]
    width: int
    height: int
    dtype: str
    nodata: float | None
    scale: float
    offset: float

    @property
    def crs(self) -> CRS:
        return CRS.from_wkt(self.crs_wkt)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the band's own CRS."""
        a, b, c, d, e, f = self.transform
        cols, rows = (0, self.width), (0, self.height)
        corners = [(a * col + b * row + c, d * col + e * row + f) for col in cols for row in rows]
        xs, ys = [p[0] for p in corners], [p[1] for p in corners]
        return min(xs), min(ys), max(xs), max(ys)


@dataclass(frozen=True)
class _SceneSrc:
    """One scene's bands and its footprint box in the target CRS (for skipping blocks)."""

    id: str
    bands: tuple[_Band, ...]
    footprint: tuple[float, float, float, float]
    scales: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class _Plan:
    """Everything a block task needs: pickled into each task of the graph."""

    grid: Grid
    scenes: tuple[_SceneSrc, ...]
    resampling: str
    dtype: str
    nodata: float | None
    scaled: bool
    aoi: dict[str, Any] | None
    work_dtype: str = "float64"


def _open_error(href: str, exc: Exception) -> MissingInputError:
    return MissingInputError(
        f"image {href} cannot be read as a raster (missing, truncated or not a GeoTIFF): {exc}"
    )


def scenes_from_files(files: Sequence[str | Path] | str | Path) -> SceneSet:
    """GeoTIFF tiles or VRTs as scenes: one per file, its bands 1..N, nodata from the file.

    Args:
        files: Files, VRTs and/or folders of GeoTIFFs (see :func:`segpipe.io.mosaic.expand_inputs`).

    Returns:
        The scenes in the given order; band names from the first file's band descriptions.

    Raises:
        MissingInputError: A file does not exist or is not a raster.
        TileMismatchError: Files have different band counts.
    """
    from segpipe.io.mosaic import expand_inputs

    scenes: list[Scene] = []
    names: tuple[str, ...] = ()
    for f in expand_inputs(files):
        href = str(f) if is_remote(f) else str(Path(f).resolve())
        try:
            with gdal_env(f), rasterio.open(gdal_path(f)) as ds:
                bands = tuple(
                    BandFile(href, i + 1, ds.nodatavals[i], ds.scales[i], ds.offsets[i])
                    for i in range(ds.count)
                )
                desc = tuple(d or f"band{i + 1}" for i, d in enumerate(ds.descriptions))
        except (RasterioError, CPLE_BaseError) as exc:
            raise _open_error(href, exc) from exc
        if scenes and len(bands) != len(names):
            raise TileMismatchError(
                f"tile {href} has {len(bands)} bands but {scenes[0].id} has {len(names)}: "
                "every scene of an image must have the same bands"
            )
        names = names or desc
        scenes.append(Scene(id=href, bands=bands))
    return SceneSet(
        scenes=tuple(scenes),
        band_names=names,
        source=", ".join(str(f) for f in files) if not isinstance(files, str | Path) else str(files),
    )


def _read_band(bf: BandFile, cache: dict[str, Any]) -> _Band:
    """The header of one band file (each file opened once per call of the caller)."""
    if bf.href not in cache:
        try:
            with gdal_env(bf.href), rasterio.open(gdal_path(bf.href)) as ds:
                if ds.crs is None:
                    raise InputError(f"image {bf.href} has no CRS: it cannot be warped onto a grid")
                cache[bf.href] = (
                    ds.crs.to_wkt(),
                    tuple(ds.transform)[:6],
                    ds.width,
                    ds.height,
                    ds.dtypes,
                    ds.nodatavals,
                    ds.count,
                )
        except (RasterioError, CPLE_BaseError) as exc:
            raise _open_error(bf.href, exc) from exc
    wkt, transform, width, height, dtypes, nodatas, count = cache[bf.href]
    if not 1 <= bf.band <= count:
        raise InputError(f"image {bf.href} has {count} band(s), no band {bf.band}")
    nodata = bf.nodata if bf.nodata is not None else nodatas[bf.band - 1]
    return _Band(
        bf.href,
        bf.band,
        wkt,
        transform,
        width,
        height,
        dtypes[bf.band - 1],
        nodata,
        1.0 if bf.scale is None else float(bf.scale),
        0.0 if bf.offset is None else float(bf.offset),
    )


def _headers(sceneset: SceneSet) -> list[tuple[Scene, tuple[_Band, ...]]]:
    if not sceneset.scenes:
        raise MissingInputError(f"{sceneset.source} holds no scene")
    cache: dict[str, Any] = {}
    return [(s, tuple(_read_band(b, cache) for b in s.bands)) for s in sceneset.scenes]


def _area(band: _Band) -> float:
    """Footprint area of a band file in m² of an equal-area CRS.

    Raises:
        InputError: The file's corners are not valid coordinates of its CRS.
    """
    try:
        geom = transform_geom(band.crs, _EQUAL_AREA, mapping(box(*band.bounds)))
        area = float(shape(geom).area)
    except Exception as exc:  # PROJ errors come as several rasterio and pyproj classes
        raise InputError(
            f"image {band.href} has bounds {band.bounds} that are not valid coordinates of its CRS "
            f"{band.crs.to_string()}: fix its georeferencing"
        ) from exc
    if not math.isfinite(area):
        raise InputError(f"image {band.href} has bounds {band.bounds} outside its CRS {band.crs.to_string()}")
    return area


def _majority_crs(headers: list[tuple[Scene, tuple[_Band, ...]]]) -> CRS:
    """The CRS whose scenes cover the most area (first seen wins a tie)."""
    areas: dict[str, float] = {}
    for _, bands in headers:
        wkt = bands[0].crs_wkt
        areas[wkt] = areas.get(wkt, 0.0) + _area(bands[0])
    best = max(areas.values())
    return CRS.from_wkt(next(w for w, a in areas.items() if a == best))


def _band_res(band: _Band, crs: CRS) -> float:
    """A band's pixel size in the units of ``crs`` (GDAL's suggested warp resolution)."""
    if band.crs == crs:
        return min(abs(band.transform[0]), abs(band.transform[4]))
    t, _, _ = calculate_default_transform(band.crs, crs, band.width, band.height, *band.bounds)
    return float(min(abs(t.a), abs(t.e)))


def _aligned(
    bounds: tuple[float, float, float, float], rx: float, ry: float
) -> tuple[float, float, int, int]:
    """``bounds`` widened to whole multiples of the pixel size: (left, top, width, height)."""
    left, bottom, right, top = bounds
    # A tolerance keeps float noise (2999.9999999) from adding a column.
    x0, x1 = math.floor(left / rx + 1e-9), math.ceil(right / rx - 1e-9)
    y0, y1 = math.floor(bottom / ry + 1e-9), math.ceil(top / ry - 1e-9)
    return x0 * rx, y1 * ry, max(1, x1 - x0), max(1, y1 - y0)


def _union(boxes: Sequence[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _footprint(band: _Band, crs: CRS) -> tuple[float, float, float, float]:
    if band.crs == crs:
        return band.bounds
    left, bottom, right, top = transform_bounds(band.crs, crs, *band.bounds, densify_pts=21)
    return left, bottom, right, top


def target_grid(
    sceneset: SceneSet,
    crs: str | CRS | None = None,
    resolution: float | tuple[float, float] | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    aoi: Aoi | None = None,
) -> Grid:
    """The grid the scenes are warped onto.

    Args:
        sceneset: The scenes.
        crs: Target CRS (anything :meth:`rasterio.crs.CRS.from_user_input` takes); default
            the CRS whose scenes cover the most area.
        resolution: Pixel size in target CRS units (one number, or x and y); default the
            finest band's pixel size, converted into target units where the CRS differ.
        bounds: (left, bottom, right, top) in the target CRS; default the union of the
            footprints, or with ``aoi`` the AOI's bounding box cut to that union.
        aoi: An area of interest (see :func:`read_aoi`).

    Returns:
        A north-up grid whose edges are whole multiples of the pixel size (as ``gdalwarp -tap``).

    Raises:
        InputError: The CRS is unknown, the resolution is not positive, or the bounds
            or AOI do not overlap the scenes.
    """
    headers = _headers(sceneset)
    if crs is None:
        dst = _majority_crs(headers)
    else:
        try:
            dst = CRS.from_user_input(crs)
        except Exception as exc:  # rasterio raises CRSError, pyproj others
            raise InputError(
                f"CRS {crs!r} is not one GDAL knows: give an EPSG code (EPSG:32633) or WKT"
            ) from exc
    if resolution is None:
        res = min(_band_res(b, dst) for _, bands in headers for b in bands)
        rx = ry = res
    else:
        rx, ry = (resolution, resolution) if isinstance(resolution, int | float) else resolution
    if not (rx > 0 and ry > 0):
        raise InputError(f"resolution {resolution} is not a positive pixel size")
    data = _union([_footprint(b, dst) for _, bands in headers for b in bands])
    if bounds is None and aoi is None:
        _check_coverage(headers, dst, data)
    area = _area_bounds(data, dst, bounds, aoi)
    left, top, width, height = _aligned(area, float(rx), float(ry))
    return Grid(dst.to_wkt(), (float(rx), 0.0, left, 0.0, -float(ry), top), height, width)


def _check_coverage(
    headers: list[tuple[Scene, tuple[_Band, ...]]], dst: CRS, data: tuple[float, float, float, float]
) -> None:
    """Refuse scenes so far apart that the grid holding them all would be almost empty.

    Two tiles in different UTM zones with the same eastings, or a CRS tag that is wrong,
    would otherwise make a mosaic hundreds of kilometres wide of nodata, silently.

    Raises:
        InputError: The scenes cover less than :data:`MIN_COVERAGE` of their union's box.
    """
    covered = shapely.union_all([box(*_footprint(b, dst)) for _, bands in headers for b in bands[:1]]).area
    whole = (data[2] - data[0]) * (data[3] - data[1])
    if whole > 0 and covered / whole < MIN_COVERAGE:
        names = ", ".join(Path(bands[0].href).name for _, bands in headers)
        raise InputError(
            f"the inputs ({names}) cover only {100 * covered / whole:.2g} % of the box that holds them all "
            "in one CRS: they lie far apart (check each file's CRS); give --bounds or --aoi to ingest that "
            "area anyway"
        )


def _area_bounds(
    data: tuple[float, float, float, float],
    dst: CRS,
    bounds: tuple[float, float, float, float] | None,
    aoi: Aoi | None,
) -> tuple[float, float, float, float]:
    """The bounds the grid covers: given ones, else the AOI's box cut to the data, else the data."""
    if bounds is not None:
        left, bottom, right, top = (float(v) for v in bounds)
        if not (right > left and top > bottom):
            raise InputError(
                f"bounds {bounds} are empty: give left, bottom, right, top with left < right, bottom < top"
            )
        return left, bottom, right, top
    if aoi is None:
        return data
    a = shape(aoi_geojson(aoi, dst)).bounds
    cut = max(a[0], data[0]), max(a[1], data[1]), min(a[2], data[2]), min(a[3], data[3])
    if not (cut[2] > cut[0] and cut[3] > cut[1]):
        raise InputError("the area of interest does not overlap the scenes: check the AOI file and its CRS")
    return cut


def _ordered(
    headers: list[tuple[Scene, tuple[_Band, ...]]], order: str
) -> list[tuple[Scene, tuple[_Band, ...]]]:
    """Scenes in overlap priority order; scenes without the sort key keep their order, last."""
    if order not in _ORDERS:
        raise InputError(f"order {order!r} is unknown: use one of {', '.join(_ORDERS)}")
    if order == "latest":
        known = [h for h in headers if _when(h[0])]
        return sorted(known, key=lambda h: _when(h[0]) or "", reverse=True) + [
            h for h in headers if not _when(h[0])
        ]
    if order == "least-cloudy":
        known = [h for h in headers if h[0].cloud_cover is not None]
        rest = [h for h in headers if h[0].cloud_cover is None]
        return sorted(known, key=lambda h: float(h[0].cloud_cover or 0.0)) + rest
    return headers


def _when(scene: Scene) -> str | None:
    return scene.datetime or scene.end_datetime or scene.start_datetime


def _out_type(bands: Sequence[_Band]) -> tuple[str, float | None, bool]:
    """Output dtype, nodata and whether physical values are computed (any non-neutral scale/offset)."""
    if any(b.scale != 1.0 or b.offset != 0.0 for b in bands):
        return "float32", math.nan, True
    dtype = np.result_type(*[np.dtype(b.dtype) for b in bands])
    nodatas = [b.nodata for b in bands if b.nodata is not None]
    if nodatas:
        return str(dtype), nodatas[0], False
    # Pixels no scene covers need a value: NaN for floats, else 0 (what gdalwarp fills with).
    return str(dtype), math.nan if np.issubdtype(dtype, np.floating) else 0.0, False


def _resampling(name: str) -> Resampling:
    try:
        return Resampling[name]
    except KeyError:
        known = ", ".join(r.name for r in Resampling if r.value < 15)
        raise InputError(f"resampling {name!r} is unknown: use one of {known}") from None


def _warp_scene(
    scene: _SceneSrc, plan: _Plan, dst_t: Affine, shape: tuple[int, int], where: str
) -> np.ndarray:
    """One scene's bands warped onto a window: (band, y, x) floats, NaN where it has no valid pixel.

    Raises:
        InputError: GDAL could not read a band file (named, with the window).
    """
    out = np.full((len(scene.bands), *shape), np.nan, dtype=plan.work_dtype)
    # Bands of one file that share nodata and scale are warped in one call: GDAL then
    # reads the source window and computes the transformation once for all of them.
    calls: dict[tuple[str, float | None, tuple[float, float]], list[int]] = {}
    for i, b in enumerate(scene.bands):
        calls.setdefault((b.href, b.nodata, scene.scales[i]), []).append(i)
    for (href, nodata, scale), idx in calls.items():
        failure: str | None = None
        try:
            # Full resolution always: GDAL would pick overviews window by window.
            with gdal_env(href), rasterio.open(gdal_path(href), OVERVIEW_LEVEL="NONE") as ds:
                part = out[idx[0]] if len(idx) == 1 else np.full((len(idx), *shape), np.nan, plan.work_dtype)
                reproject(
                    rasterio.band(
                        ds, [scene.bands[i].band for i in idx] if len(idx) > 1 else scene.bands[idx[0]].band
                    ),
                    part,
                    src_nodata=nodata,
                    dst_nodata=np.nan,
                    dst_transform=dst_t,
                    dst_crs=CRS.from_wkt(plan.grid.crs_wkt),
                    resampling=Resampling[plan.resampling],
                    XSCALE=repr(scale[0]),
                    YSCALE=repr(scale[1]),
                    # Each band's own nodata, as if warped alone (GDAL would otherwise unify them).
                    UNIFIED_SRC_NODATA="NO",
                )
                if len(idx) > 1:
                    out[idx] = part
        except (RasterioError, CPLE_BaseError) as exc:
            failure = str(exc.__cause__ or exc)
        if failure is not None:
            # Raised outside the handler: GDAL's error classes do not unpickle on a cluster.
            raise InputError(
                f"image {href} (scene {scene.id}) cannot be read for window {where} of the target grid "
                f"(truncated or damaged file?): {failure}; replace the file and rerun"
            )
    return out


def _warp_block(plan: _Plan, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """One (band, y, x) block of the target grid: scenes warped, first valid pixel wins, AOI applied."""
    t = Affine(*plan.grid.transform) * Affine.translation(x0, y0)
    shape = (y1 - y0, x1 - x0)
    left, top = t.c, t.f
    right, bottom = left + shape[1] * t.a, top + shape[0] * t.e
    inside = None
    if plan.aoi is not None:
        inside = geometry_mask([plan.aoi], out_shape=shape, transform=t, invert=True)
    nb = len(plan.scenes[0].bands) if plan.scenes else 0
    out = np.full((nb, *shape), np.nan, dtype=plan.work_dtype)
    todo = np.ones(shape, bool) if inside is None else inside.copy()
    where = f"rows {y0}-{y1}, columns {x0}-{x1}"
    with rasterio.Env():
        for scene in plan.scenes:
            fl, fb, fr, ft = scene.footprint
            if not todo.any():
                break
            if fr <= left or fl >= right or ft <= bottom or fb >= top:
                continue  # never opened: the scene misses this window
            warped = _warp_scene(scene, plan, t, shape, where)
            take = todo & np.isfinite(warped).all(axis=0)
            np.copyto(out, warped, where=take[None])
            todo &= ~take
    return _finish(out, plan)


def _finish(out: np.ndarray, plan: _Plan) -> np.ndarray:
    """Warped stored values as the output: physical (scaled) float32 or the input dtype, nodata filled."""
    if plan.scaled:
        for i, b in enumerate(plan.scenes[0].bands):
            out[i] = out[i].astype(np.float64) * b.scale + b.offset
    missing = ~np.isfinite(out)
    dtype = np.dtype(plan.dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        # GDAL rounds resampled values to the nearest integer when writing integer bands.
        out = np.clip(np.rint(np.where(missing, 0.0, out)), info.min, info.max)
    fill = math.nan if plan.nodata is None else plan.nodata
    out[missing] = fill
    return out.astype(dtype)


def _scene_srcs(
    headers: list[tuple[Scene, tuple[_Band, ...]]], grid: Grid, names: tuple[str, ...]
) -> tuple[_SceneSrc, ...]:
    """The scenes as block tasks see them, with each band's resampling scale on ``grid``.

    The scale (target pixels per source pixel) is fixed here for the whole grid: GDAL
    would otherwise estimate it per warped window from the window's shape, so the kernel
    of bilinear or cubic resampling, and with it the pixels, would depend on the blocks.
    """
    crs = CRS.from_wkt(grid.crs_wkt)
    srcs = []
    for scene, bands in headers:
        if len(bands) != len(names):
            raise TileMismatchError(
                f"scene {scene.id} has {len(bands)} bands but the image has {len(names)} ({', '.join(names)})"
            )
        res = [_band_res(b, crs) for b in bands]
        scales = tuple((r / grid.transform[0], r / -grid.transform[4]) for r in res)
        srcs.append(_SceneSrc(scene.id, bands, _union([_footprint(b, crs) for b in bands]), scales))
    return tuple(srcs)


def open_warped(
    sceneset: SceneSet,
    grid: Grid,
    resampling: str = "bilinear",
    chunk_size: int = 1024,
    aoi: Aoi | None = None,
    order: Order | str = "given",
) -> xr.DataArray:
    """The scenes warped onto ``grid`` as one lazy mosaic, chunked ``(all bands, chunk_size, chunk_size)``.

    Args:
        sceneset: The scenes (same bands in each).
        grid: The target grid (see :func:`target_grid`).
        resampling: GDAL resampling for imagery (``nearest``, ``bilinear``, ``cubic``...).
        chunk_size: Dask chunk edge along y and x.
        aoi: Pixels outside this area become nodata.
        order: Overlap rule: the first valid pixel in the ``given`` order, or of the
            ``latest`` scene (datetime, newest first), or the ``least-cloudy`` one.

    Returns:
        A (band, y, x) DataArray backed by dask (one task per block), band coordinate 1..N,
        attribute ``long_name`` = band names, CRS and transform through rioxarray and
        ``rio.nodata``. Float32 physical values (nodata NaN) where any band has a scale or
        offset; the input dtype otherwise.

    Raises:
        MissingInputError: A band file does not exist or is not a raster.
        InputError: Unknown resampling or order, a band file without CRS. Reading the
            array raises it too, naming the file and window, when a file cannot be read.
        TileMismatchError: Scenes with different band counts.
    """
    method = _resampling(resampling)
    headers = _ordered(_headers(sceneset), order)
    crs = CRS.from_wkt(grid.crs_wkt)
    scenes = _scene_srcs(headers, grid, sceneset.band_names)
    dtype, nodata, scaled = _out_type([b for s in scenes for b in s.bands])
    # float32 holds every value of 8- and 16-bit integers and of float32 exactly; wider types need float64.
    narrow = all(np.dtype(b.dtype).itemsize <= 2 or b.dtype == "float32" for s in scenes for b in s.bands)
    work = "float32" if narrow else "float64"
    plan = _Plan(grid, scenes, method.name, dtype, nodata, scaled, aoi_geojson(aoi, crs), work)
    data = _graph(plan, len(sceneset.band_names), chunk_size)
    t = Affine(*grid.transform)
    da = xr.DataArray(
        data,
        dims=("band", "y", "x"),
        coords={
            "band": np.arange(1, len(sceneset.band_names) + 1, dtype=np.int64),
            "y": t.f + (np.arange(grid.height) + 0.5) * t.e,
            "x": t.c + (np.arange(grid.width) + 0.5) * t.a,
        },
        name="image",
    )
    da = da.rio.write_crs(crs).rio.write_transform(t).rio.write_nodata(nodata, encoded=False)
    da.attrs["long_name"] = tuple(sceneset.band_names)
    assert isinstance(da, xr.DataArray)
    return da


def _graph(plan: _Plan, nbands: int, chunk_size: int) -> dask.array.Array:
    """The dask array of the warped image: exactly one task per block, no inputs."""
    h, w = plan.grid.height, plan.grid.width
    ys = [(y, min(y + chunk_size, h)) for y in range(0, h, chunk_size)]
    xs = [(x, min(x + chunk_size, w)) for x in range(0, w, chunk_size)]
    name = f"warp-{dask.base.tokenize(plan, chunk_size)}"
    dsk = {
        (name, 0, i, j): (_warp_block, plan, y0, y1, x0, x1)
        for i, (y0, y1) in enumerate(ys)
        for j, (x0, x1) in enumerate(xs)
    }
    chunks = ((nbands,), tuple(b - a for a, b in ys), tuple(b - a for a, b in xs))
    return dask.array.Array(dsk, name, chunks, dtype=plan.dtype, meta=np.empty((0, 0, 0), plan.dtype))
