"""Training labels (a class raster or class polygons) brought onto a region's pixel grid.

Regions can be far larger than memory, so labels are produced window by window:
:func:`open_labels` validates once and returns a small :class:`LabelSource` that dask
tasks carry; :func:`labels_window` gives the uint8 labels (0 = unlabelled) of one window
of the grid. Rasters on another grid or CRS are warped with nearest resampling (class
ids never blend); polygons in any CRS are reprojected once per process and burnt in
with their class field.

Labels may be ``s3://`` URLs: rasters are read through GDAL's ``/vsis3/`` and polygons
through pyogrio's, both configured by :mod:`segpipe.io.remote`; ``LabelSource.path``
keeps the URL, so every worker configures its own GDAL from its environment.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyogrio
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window

from segpipe.errors import LabelsError, MissingInputError
from segpipe.io.remote import as_url, gdal_env, gdal_path, is_remote, posix_suffix, remote_info, vector_path
from segpipe.types import ClassInfo, Grid, default_colour

__all__ = ["LabelSource", "check_overlap", "label_classes", "labels_window", "open_labels"]

_RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".img", ".jp2"}
_VECTOR_SUFFIXES = {".shp", ".gpkg", ".geojson", ".json", ".fgb", ".gml", ".kml", ".sqlite"}
_FIELD_CANDIDATES = ("class", "id", "value", "classvalue")
_NAME_FIELDS = ("label", "name", "class_name", "classname")
_COLOUR_FIELDS = ("colour", "color")
_SCAN_BLOCK = 2048  # window edge when a whole label raster must be scanned


@dataclass(frozen=True)
class LabelSource:
    """A validated labels file, small enough to ship inside dask graphs.

    Attributes:
        path: Absolute path of the labels file, or its ``s3://`` URL.
        kind: ``"raster"`` (class ids as pixel values) or ``"vector"`` (polygons).
        field: For polygons, the integer attribute holding the class value.
    """

    path: str
    kind: Literal["raster", "vector"]
    field: str | None = None


def _is_vector(p: str) -> bool:
    suffix = posix_suffix(p)
    if suffix in _VECTOR_SUFFIXES:
        return True
    if suffix in _RASTER_SUFFIXES:
        return False
    try:
        pyogrio.read_info(vector_path(p))
        return True
    except Exception:  # not readable as vector: try it as a raster below
        return False


def _pick_field(p: str, field: str | None) -> str:
    info = pyogrio.read_info(vector_path(p))
    fields = [str(f) for f in info["fields"]]
    dtypes = {str(f): str(d) for f, d in zip(info["fields"], info["dtypes"], strict=True)}
    if field is not None:
        exact = [f for f in fields if f == field] or [f for f in fields if f.lower() == field.lower()]
        if not exact:
            raise LabelsError(f"labels {p} have no field {field!r}; available fields: {', '.join(fields)}")
        chosen = exact[0]
    else:
        by_lower = {f.lower(): f for f in fields}
        found = [by_lower[c] for c in _FIELD_CANDIDATES if c in by_lower]
        if not found:
            raise LabelsError(
                f"labels {p} have none of the fields {', '.join(_FIELD_CANDIDATES)}; "
                f"pass the class field (--label-field), one of: {', '.join(fields)}"
            )
        chosen = found[0]
    kind = dtypes[chosen]
    if kind.startswith(("int", "uint", "float")):
        # Checked here, from the attribute table alone, so a bad value stops ingest
        # before the image is written rather than in the middle of the labels.
        values = pyogrio.read_dataframe(vector_path(p), columns=[chosen], read_geometry=False)[chosen]
        if values.isna().any():
            raise LabelsError(f"labels {p}: {int(values.isna().sum())} features have no {chosen!r} value")
        numbers = values.to_numpy(dtype=np.float64)
        if np.all(numbers == np.round(numbers)):
            _checked(numbers, LabelSource(str(p), "vector", chosen))
            return chosen
    ints = [f for f in fields if dtypes[f].startswith(("int", "uint"))]
    raise LabelsError(
        f"field {chosen!r} of labels {p} does not hold integer class values ({kind}); "
        f"pass an integer field with --label-field: {', '.join(ints) or 'none found'}"
    )


def open_labels(path: str | Path, field: str | None = None) -> LabelSource:
    """Validate a labels file and describe it.

    Args:
        path: A single-band class raster, or polygons (Shapefile, GeoPackage, GeoJSON...).
        field: For polygons, the integer field holding class values; by default the
            first of ``class``, ``id``, ``value``, ``classvalue`` present.

    Raises:
        MissingInputError: The file does not exist.
        LabelsError: Polygons lack the field, or it holds a value that is not an
            integer 0-254 or none at all; a raster has several bands, or ``field``
            was given for a raster.
    """
    if is_remote(path):
        p = as_url(path)
        remote_info(p, "labels")  # MissingInputError naming the URL, before GDAL's vaguer one
    else:
        if not Path(path).exists():
            raise MissingInputError(f"labels {Path(path)} do not exist")
        p = str(Path(path).resolve())
    if _is_vector(p):
        return LabelSource(p, "vector", _pick_field(p, field))
    try:
        with gdal_env(p), rasterio.open(gdal_path(p)) as ds:
            count = ds.count
    except rasterio.errors.RasterioIOError as exc:
        raise LabelsError(f"labels {p} are neither a raster nor polygons GDAL can read") from exc
    if count != 1:
        raise LabelsError(f"labels raster {p} has {count} bands: give a single-band class raster")
    if field is not None:
        raise LabelsError(f"labels {p} are a raster: a label field applies only to polygons")
    return LabelSource(p, "raster", None)


def _crs(wkt_or_crs: str | CRS | None) -> CRS | None:
    if wkt_or_crs is None or wkt_or_crs == "":
        return None
    return wkt_or_crs if isinstance(wkt_or_crs, CRS) else CRS.from_user_input(wkt_or_crs)


def _checked(values: np.ndarray, src: LabelSource) -> np.ndarray:
    """Class values as uint8, or LabelsError when one is not an integer 0-254."""
    if values.size == 0:
        return values.astype(np.uint8)
    bad = (values < 0) | (values > 254) | (values != np.round(values))
    if np.any(bad):
        raise LabelsError(
            f"labels {src.path} hold class value {values[bad].flat[0].item()!r}: class values must be "
            "integers 0-254 (0 = unlabelled, 255 is reserved for nodata)"
        )
    return values.astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _polygons(
    path: str, field: str, crs_wkt: str, version: str
) -> tuple[np.ndarray, np.ndarray, shapely.STRtree]:
    """Polygons in the grid's CRS with their class values and a spatial index.

    Cached per process (keyed with the file's version) so the file is read and
    reprojected once per worker, not once per block.
    """
    del version  # part of the cache key only
    src = LabelSource(path, "vector", field)
    gdf = pyogrio.read_dataframe(vector_path(path), columns=[field])
    gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)]
    if gdf[field].isna().any():
        raise LabelsError(f"labels {path}: {int(gdf[field].isna().sum())} polygons have no {field!r} value")
    target = _crs(crs_wkt)
    if target is not None and gdf.crs is not None:
        gdf = gdf.to_crs(target)
    geoms = gdf.geometry.to_numpy()
    values = _checked(gdf[field].to_numpy(dtype=np.float64), src)
    return geoms, values, shapely.STRtree(geoms)


def _bounds(t: Affine, h: int, w: int) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of an h x w pixel window with transform ``t``."""
    xs, ys = zip(*(t @ c for c in ((0, 0), (w, 0), (0, h), (w, h))), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def _window_transform(grid: Grid, y0: int, x0: int) -> Affine:
    return Affine(*grid.transform) @ Affine.translation(x0, y0)


def _version(path: str) -> str:
    """What changes when the file changes: mtime locally, the ETag on object storage."""
    if is_remote(path):
        info = remote_info(path, "labels")
        return f"{info.get('ETag')}|{info.get('size')}"
    return str(os.stat(path).st_mtime_ns)


def _vector_window(src: LabelSource, grid: Grid, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    assert src.field is not None
    geoms, values, tree = _polygons(src.path, src.field, grid.crs_wkt, _version(src.path))
    t = _window_transform(grid, y0, x0)
    hits = np.sort(tree.query(shapely.box(*_bounds(t, h, w))))
    if hits.size == 0:
        return np.zeros((h, w), np.uint8)
    # Burnt in file order, so where polygons overlap the later one wins.
    burnt: np.ndarray = rasterize(
        zip(geoms[hits], values[hits].tolist(), strict=True),
        out_shape=(h, w),
        transform=t,
        fill=0,
        all_touched=False,
        dtype="uint8",
    )
    return burnt


def _to_labels(data: np.ndarray, nodata: float | None, src: LabelSource) -> np.ndarray:
    """Pixel values as uint8 labels: nodata becomes 0 (unlabelled), the rest is checked."""
    if nodata is not None:
        data = np.where(np.isnan(data) if math.isnan(nodata) else data == nodata, 0, data)
    return _checked(data, src)


def _raster_window(src: LabelSource, grid: Grid, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    target = _window_transform(grid, y0, x0)
    with gdal_env(src.path), rasterio.open(gdal_path(src.path)) as ds:
        nodata = ds.nodata
        grid_crs = _crs(grid.crs_wkt)
        same_crs = ds.crs is None or grid_crs is None or ds.crs == grid_crs
        # Offset of the window inside the raster, if both share one pixel grid.
        col, row = ~ds.transform @ (target.c, target.f)
        tol = 1e-9 * abs(target.a)
        same_grid = (
            same_crs
            and all(math.isclose(ds.transform[i], target[i], abs_tol=tol) for i in (0, 1, 3, 4))
            and abs(col - round(col)) < 1e-6
            and abs(row - round(row)) < 1e-6
        )
        if same_grid:
            # Plain read, no warping: exact, and pixels beyond the raster stay 0.
            out = np.zeros((h, w), np.uint8)
            r0, c0 = round(row), round(col)
            rs, cs = max(r0, 0), max(c0, 0)
            re, ce = min(r0 + h, ds.height), min(c0 + w, ds.width)
            if re > rs and ce > cs:
                data = ds.read(1, window=Window(cs, rs, ce - cs, re - rs))
                out[rs - r0 : re - r0, cs - c0 : ce - c0] = _to_labels(data, nodata, src)
            return out
        dtype = ds.dtypes[0] if np.issubdtype(np.dtype(ds.dtypes[0]), np.integer) else "float64"
        fill = 0 if nodata is None else nodata
        data = np.full((h, w), fill, dtype=dtype)
        reproject(
            source=rasterio.band(ds, 1),
            destination=data,
            src_crs=ds.crs or grid_crs,
            src_nodata=nodata,
            dst_transform=target,
            dst_crs=grid_crs or ds.crs,
            dst_nodata=fill,
            resampling=Resampling.nearest,
        )
    return _to_labels(data, fill, src)


def labels_window(src: LabelSource, grid: Grid, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Labels of one window of the grid.

    Args:
        src: Labels from :func:`open_labels`.
        grid: The region's pixel grid.
        y0: First row of the window in the grid.
        x0: First column of the window in the grid.
        h: Rows of the window.
        w: Columns of the window.

    Returns:
        A uint8 (h, w) array of class values, 0 where unlabelled.

    Raises:
        LabelsError: A class value is not an integer 0-254.
    """
    if src.kind == "vector":
        return _vector_window(src, grid, y0, x0, h, w)
    return _raster_window(src, grid, y0, x0, h, w)


def _scan_raster(src: LabelSource) -> list[int]:
    """Distinct label values of a whole raster, read window by window."""
    counts = np.zeros(256, np.int64)
    with gdal_env(src.path), rasterio.open(gdal_path(src.path)) as ds:
        for r in range(0, ds.height, _SCAN_BLOCK):
            for c in range(0, ds.width, _SCAN_BLOCK):
                win = Window(c, r, min(_SCAN_BLOCK, ds.width - c), min(_SCAN_BLOCK, ds.height - r))
                labels = _to_labels(ds.read(1, window=win), ds.nodata, src)
                counts += np.bincount(labels.ravel(), minlength=256)
    return [int(v) for v in np.flatnonzero(counts)]


def label_classes(src: LabelSource, values: Iterable[int] | None = None) -> list[ClassInfo]:
    """Classes the labels define.

    Polygons: every class value of the field, named from a ``label``/``name``/
    ``class_name`` field and coloured from a ``colour``/``color`` field when present.
    Rasters: the distinct values (``values`` if given, e.g. counted while
    rasterizing, else a scan of the raster), named ``class N``, coloured from the
    raster's colour table when it has one (black entries count as unset).

    Returns:
        Classes sorted by value, 0 (unlabelled) excluded.
    """
    if src.kind == "vector":
        assert src.field is not None
        fields = {str(f).lower(): str(f) for f in pyogrio.read_info(vector_path(src.path))["fields"]}
        name_f = next((fields[n] for n in _NAME_FIELDS if n in fields and fields[n] != src.field), None)
        colour_f = next((fields[n] for n in _COLOUR_FIELDS if n in fields), None)
        cols = [c for c in (src.field, name_f, colour_f) if c is not None]
        table = pyogrio.read_dataframe(vector_path(src.path), columns=cols, read_geometry=False)
        table = table.dropna(subset=[src.field])
        found: dict[int, ClassInfo] = {}
        for _, row in table.iterrows():
            value = int(_checked(np.asarray([float(row[src.field])]), src)[0])
            if value == 0 or value in found:
                continue
            name = str(row[name_f]) if name_f and row[name_f] is not None else f"class {value}"
            colour = str(row[colour_f]) if colour_f and row[colour_f] is not None else ""
            if not (len(colour) == 7 and colour.startswith("#")):
                colour = default_colour(value)
            found[value] = ClassInfo(value, name, colour)
        return [found[v] for v in sorted(found)]
    present = sorted(set(values) if values is not None else _scan_raster(src))
    with gdal_env(src.path), rasterio.open(gdal_path(src.path)) as ds:
        try:
            cmap: dict[int, tuple[int, ...]] = ds.colormap(1)
        except ValueError:  # no colour table
            cmap = {}
    # GeoTIFF colour tables always hold 256 entries and unset ones read as opaque
    # black, so black (or transparent) entries count as "no colour given".
    cmap = {v: c for v, c in cmap.items() if tuple(c[:3]) != (0, 0, 0) and (len(c) < 4 or c[3] > 0)}
    return [
        ClassInfo(
            v,
            f"class {v}",
            "#{:02x}{:02x}{:02x}".format(*cmap[v][:3]) if v in cmap else default_colour(v),
        )
        for v in present
        if v != 0
    ]


def check_overlap(src: LabelSource, grid: Grid) -> None:
    """Refuse labels that lie entirely outside the image.

    Labels without a CRS are taken to be in the grid's CRS.

    Raises:
        LabelsError: The labels' bounds, reprojected to the grid's CRS, do not
            intersect the grid (or the labels hold no polygon).
    """
    if src.kind == "vector":
        info = pyogrio.read_info(vector_path(src.path), force_total_bounds=True)
        if not info["features"]:
            raise LabelsError(f"labels {src.path} hold no polygons")
        crs, bounds = _crs(info["crs"]), tuple(float(b) for b in info["total_bounds"])
    else:
        with gdal_env(src.path), rasterio.open(gdal_path(src.path)) as ds:
            crs, bounds = ds.crs, tuple(ds.bounds)
    grid_crs = _crs(grid.crs_wkt)
    if crs is not None and grid_crs is not None and crs != grid_crs:
        try:
            bounds = transform_bounds(crs, grid_crs, *bounds, densify_pts=21)
        except Exception as exc:  # projection failure: the areas cannot meet
            raise LabelsError(f"labels {src.path} cannot be projected to the image CRS: {exc}") from exc
    gx0, gy0, gx1, gy1 = _bounds(Affine(*grid.transform), grid.height, grid.width)
    lx0, ly0, lx1, ly1 = bounds
    if not (lx0 < gx1 and gx0 < lx1 and ly0 < gy1 and gy0 < ly1):
        raise LabelsError(
            f"labels {src.path} do not overlap the image: labels span {_fmt(bounds)}, "
            f"the image spans {_fmt((gx0, gy0, gx1, gy1))} (in the image CRS); check both CRSs"
        )


def _fmt(b: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in b) + ")"
