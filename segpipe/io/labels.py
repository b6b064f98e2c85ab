"""Training labels (a class raster or class polygons) brought onto a region's pixel grid.

Regions can be far larger than memory, so labels are produced window by window:
:func:`open_labels` validates once and returns a small :class:`LabelSource` that dask
tasks carry; :func:`labels_window` gives the uint8 labels (0 = unlabelled) of one window
of the grid. Rasters on another grid or CRS are warped with nearest resampling (class
ids never blend); polygons in any CRS are reprojected once per process and burnt in
with their class field.

Labels as users have them: a GeoPackage with one layer per class (every layer a class
named after it, values 1..N in layer order, unless one ``layer`` is chosen); a text
class field (its sorted distinct values are classes 1..N, named by the text); class
names in a text ``label``/``name``/``class`` field beside an integer one; and a
``background_value`` for masks whose 0 means background, not unlabelled: that value
becomes a class named ``background`` (kept when it is 1-254, else remapped to the lowest
class value the labels do not use, e.g. 2 in a 0/1 mask). Labels holding a single class
raise a :class:`SingleClassWarning`, since training on them scores a meaningless 1.0.

Labels may be ``s3://`` URLs: rasters are read through GDAL's ``/vsis3/`` and polygons
through pyogrio's, both configured by :mod:`segpipe.io.remote`; ``LabelSource.path``
keeps the URL, so every worker configures its own GDAL from its environment.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import geopandas as gpd
import numpy as np
import pandas as pd
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

__all__ = [
    "BACKGROUND_NAME",
    "LabelSource",
    "SingleClassWarning",
    "background_class",
    "check_overlap",
    "label_classes",
    "labels_window",
    "open_labels",
    "warn_single_class",
]

_RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".img", ".jp2"}
_VECTOR_SUFFIXES = {".shp", ".gpkg", ".geojson", ".json", ".fgb", ".gml", ".kml", ".sqlite"}
_FIELD_CANDIDATES = ("class", "id", "value", "classvalue")
# Text fields that name the classes of an integer class field (``class`` last: it is
# more often the class field itself, and then it is skipped).
_NAME_FIELDS = ("label", "name", "class_name", "classname", "class")
_COLOUR_FIELDS = ("colour", "color")
_SCAN_BLOCK = 2048  # window edge when a whole label raster must be scanned
_MAX_CLASS = 254  # 0 is unlabelled, 255 nodata
BACKGROUND_NAME = "background"


class SingleClassWarning(UserWarning):
    """The labels hold a single class: a model trained on them cannot learn to tell classes apart."""


@dataclass(frozen=True)
class LabelSource:
    """A validated labels file, small enough to ship inside dask graphs.

    Polygons give class values in one of three ways: an integer ``field``; a text
    ``field`` whose sorted distinct values become classes 1..N (``names``); or, for a
    file of several layers, one class per layer (``layers``, values 1..N in layer order).

    Attributes:
        path: Absolute path of the labels file, or its ``s3://`` URL.
        kind: ``"raster"`` (class ids as pixel values) or ``"vector"`` (polygons).
        field: For polygons, the attribute holding the class (None: one class per layer).
        layer: The layer read, where the file has several (None: its only layer).
        layers: One class per layer: class ``i + 1`` is the polygons of ``layers[i]``.
        names: A text ``field``'s values: class ``i + 1`` is the text ``names[i]``.
        background: A raw value that means background, a class of its own, or None.
        background_class: The class ``background`` becomes: the value itself when it
            is 1-254, else (0, say, in a 0/1 mask) the lowest class value the labels
            do not use.
    """

    path: str
    kind: Literal["raster", "vector"]
    field: str | None = None
    layer: str | None = None
    layers: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    background: int | None = None
    background_class: int | None = None


def _is_vector(p: str) -> bool:
    suffix = posix_suffix(p)
    if suffix in _VECTOR_SUFFIXES:
        return True
    if suffix in _RASTER_SUFFIXES:
        return False
    try:
        pyogrio.list_layers(vector_path(p))
        return True
    except Exception:  # not readable as vector: try it as a raster below
        return False


def _is_text(dtype: str) -> bool:
    return dtype in ("object", "str", "string")


def _layer_names(p: str) -> tuple[list[str], int]:
    """The file's layers that hold geometries, in file order, and how many layers it has in all."""
    listed = pyogrio.list_layers(vector_path(p))
    spatial = [str(name) for name, geom in listed if geom is not None]
    if not spatial:
        raise LabelsError(f"labels {p} hold no layer with geometries (layers: {_names(listed[:, 0])})")
    return spatial, len(listed)


def _no_polygons(where: str) -> LabelsError:
    """The one message for labels without a feature, whichever format or check finds it."""
    return LabelsError(
        f"labels {where} hold no polygons (no features): add the labelled polygons, "
        "or pass the file or layer that holds them"
    )


def _unreadable(p: str, exc: Exception) -> LabelsError:
    """GDAL's reason a vector file cannot be read, on one line, with the file named in front."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return LabelsError(
        f"labels {p} cannot be read as polygons: {reason} "
        "(is it a complete GeoPackage/Shapefile/GeoJSON? re-export it)"
    )


def _names(values: Iterable[object]) -> str:
    return ", ".join(str(v) for v in values) or "none"


def _free_class(used: Iterable[int]) -> int:
    """The lowest class value 1-254 not in ``used`` (where a background 0 goes)."""
    taken = set(used)
    free = [v for v in range(1, _MAX_CLASS + 1) if v not in taken]
    if not free:
        raise LabelsError("labels use every class value 1-254: no value is left for the background")
    return free[0]


def _background_class(background: int, used: Iterable[int]) -> int:
    return background if 1 <= background <= _MAX_CLASS else _free_class(used)


def _choose_field(p: str, where: str, fields: list[str], dtypes: dict[str, str], field: str | None) -> str:
    """The class field: ``field`` (any case), else the first integer candidate, else a text one."""
    if field is not None:
        exact = [f for f in fields if f == field] or [f for f in fields if f.lower() == field.lower()]
        if not exact:
            raise LabelsError(f"labels {where} have no field {field!r}; available fields: {_names(fields)}")
        return exact[0]
    by_lower = {f.lower(): f for f in fields}
    found = [by_lower[c] for c in _FIELD_CANDIDATES if c in by_lower]
    if not found and not fields:
        raise LabelsError(
            f"labels {where} have no attribute field to take classes from: give each class a layer of "
            "its own (every layer becomes a class named after it) or add an integer or text class field"
        )
    if not found:
        raise LabelsError(
            f"labels {where} have none of the fields {', '.join(_FIELD_CANDIDATES)}; "
            f"pass the class field (--label-field), one of: {_names(fields)}"
        )
    # A numeric candidate first: ``id`` holds the classes when ``class`` is their text.
    return next((f for f in found if not _is_text(dtypes[f])), found[0])


def _pick_field(
    p: str, layer: str | None, field: str | None, background: int | None
) -> LabelSource:
    """Polygons of one layer, classed by ``field`` (or the first candidate field present)."""
    where = p if layer is None else f"{p} (layer {layer!r})"
    info = pyogrio.read_info(vector_path(p), layer=layer)
    # Before the fields: an empty GeoJSON has no fields either, and "no class field"
    # would send the user looking for the wrong fault. -1 is an unknown count.
    if info["features"] == 0:
        raise _no_polygons(where)
    fields = [str(f) for f in info["fields"]]
    dtypes = {str(f): str(d) for f, d in zip(info["fields"], info["dtypes"], strict=True)}
    chosen = _choose_field(p, where, fields, dtypes, field)
    kind = dtypes[chosen]
    table = pyogrio.read_dataframe(vector_path(p), layer=layer, columns=[chosen], read_geometry=False)
    values = table[chosen]
    # Checked here, from the attribute table alone, so a bad value stops ingest
    # before the image is written rather than in the middle of the labels.
    if values.isna().any():
        raise LabelsError(f"labels {where}: {int(values.isna().sum())} features have no {chosen!r} value")
    if _is_text(kind):
        names = tuple(sorted({str(v) for v in values}))
        if len(names) > _MAX_CLASS:
            raise LabelsError(f"text field {chosen!r} of labels {where} holds {len(names)} distinct values: "
                              f"at most {_MAX_CLASS} classes")
        if background is not None:
            raise LabelsError(f"labels {where}: a background value applies to integer class values, not to "
                              f"the text field {chosen!r} (name the background polygons in that field)")
        return LabelSource(p, "vector", chosen, layer, names=names)
    if kind.startswith(("int", "uint", "float")):
        numbers = values.to_numpy(dtype=np.float64)
        if np.all(numbers == np.round(numbers)):
            src = LabelSource(p, "vector", chosen, layer, background=background)
            if background is not None:
                used = {int(v) for v in numbers if v != background}
                src = dataclasses.replace(src, background_class=_background_class(background, used))
            _checked(_remapped(numbers, src), src)
            return src
    usable = [f for f in fields if dtypes[f].startswith(("int", "uint")) or _is_text(dtypes[f])]
    raise LabelsError(
        f"field {chosen!r} of labels {where} holds neither integer class values nor text ({kind}); "
        f"pass an integer or text field with --label-field: {_names(usable)}"
    )


def _open_vector(p: str, field: str | None, layer: str | None, background: int | None) -> LabelSource:
    """Polygons: one layer classed by a field, or every layer as a class of its own."""
    spatial, total = _layer_names(p)
    if layer is not None:
        if layer not in spatial:
            raise LabelsError(
                f"labels {p} have no layer {layer!r} with geometries; layers: {_names(spatial)}"
            )
        return _pick_field(p, layer, field, background)
    if len(spatial) == 1:
        # Named whenever the file has other (attribute-only) layers, so GDAL does not guess.
        return _pick_field(p, spatial[0] if total > 1 else None, field, background)
    if field is not None:
        raise LabelsError(
            f"labels {p} have {len(spatial)} layers ({_names(spatial)}): choose the layer that holds "
            f"field {field!r} (--label-layer), or omit the field to make every layer a class named after it"
        )
    if len(spatial) > _MAX_CLASS:
        raise LabelsError(f"labels {p} have {len(spatial)} layers: at most {_MAX_CLASS} classes")
    if background is not None:
        raise LabelsError(f"labels {p}: a background value applies to class values, not to a file whose "
                          "layers are the classes (add a layer of background polygons)")
    return LabelSource(p, "vector", layers=tuple(spatial))


def open_labels(
    path: str | Path,
    field: str | None = None,
    layer: str | None = None,
    background_value: int | None = None,
) -> LabelSource:
    """Validate a labels file and describe it.

    Args:
        path: A single-band class raster, or polygons (Shapefile, GeoPackage, GeoJSON...).
        field: For polygons, the field holding the classes: integer class values, or
            text whose sorted distinct values become classes 1..N named by the text.
            By default the first of ``class``, ``id``, ``value``, ``classvalue`` present
            (an integer one before a text one).
        layer: For a file of several layers, the layer to read. Without it (and without
            ``field``) every layer with geometries is a class of its own: values 1..N
            in layer order, named after the layers.
        background_value: A value that means background, not "unlabelled" (0 in a 0/1
            mask): it becomes a class named ``background``, with that value when it is
            1-254, else the lowest class value the labels do not use.

    Raises:
        MissingInputError: The file does not exist.
        LabelsError: Polygons lack the field or the layer, a value is not an integer
            0-254 or missing, a raster has several bands, or a field or layer was
            given for a raster, polygons have no feature, or GDAL cannot read the
            file; the message names the file and its fields or layers.
    """
    if is_remote(path):
        p = as_url(path)
        remote_info(p, "labels")  # MissingInputError naming the URL, before GDAL's vaguer one
    else:
        if not Path(path).exists():
            raise MissingInputError(f"labels {Path(path)} do not exist")
        p = str(Path(path).resolve())
    if _is_vector(p):
        try:
            return _open_vector(p, field, layer, background_value)
        except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
            raise _unreadable(p, exc) from exc
    try:
        with gdal_env(p), rasterio.open(gdal_path(p)) as ds:
            count = ds.count
    except rasterio.errors.RasterioIOError as exc:
        raise LabelsError(f"labels {p} are neither a raster nor polygons GDAL can read") from exc
    if count != 1:
        raise LabelsError(f"labels raster {p} has {count} bands: give a single-band class raster")
    if field is not None or layer is not None:
        raise LabelsError(f"labels {p} are a raster: a label field or layer applies only to polygons")
    src = LabelSource(p, "raster", background=background_value)
    if background_value is None:
        return src
    if 1 <= background_value <= _MAX_CLASS:
        return dataclasses.replace(src, background_class=background_value)
    # The class a background 0 becomes must be known before any window is read: one scan.
    return dataclasses.replace(src, background_class=_free_class(_scan_raster(src)))


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
            "integers 0-254 (0 = unlabelled, 255 is reserved for nodata; "
            "pass --background-value for a value that means background)"
        )
    return values.astype(np.uint8)


def _remapped(values: np.ndarray, src: LabelSource) -> np.ndarray:
    """Raw class values with the background value replaced by its class (0 while it is unknown)."""
    if src.background is None:
        return values
    return np.where(values == src.background, src.background_class or 0, values)


def _read_layer(path: str, layer: str | None, columns: list[str], target: CRS | None) -> gpd.GeoDataFrame:
    """One layer's non-empty features, in ``target``'s CRS when both CRSs are known."""
    gdf = pyogrio.read_dataframe(vector_path(path), layer=layer, columns=columns)
    gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)]
    if target is not None and gdf.crs is not None:
        gdf = gdf.to_crs(target)
    return gdf


def _feature_values(src: LabelSource, column: pd.Series) -> np.ndarray:
    """Class values (float64) of a field's column: text looked up in ``src.names``, numbers remapped."""
    if src.names:
        lookup = {name: i + 1 for i, name in enumerate(src.names)}
        # A value added since open_labels has no class: 255 makes _checked name it.
        return np.asarray([lookup.get(str(v), 255) for v in column], np.float64)
    return _remapped(column.to_numpy(dtype=np.float64), src)


@functools.lru_cache(maxsize=8)
def _polygons(
    src: LabelSource, crs_wkt: str, version: str
) -> tuple[np.ndarray, np.ndarray, shapely.STRtree]:
    """Polygons in the grid's CRS with their class values and a spatial index.

    Cached per process (keyed with the file's version) so the file is read and
    reprojected once per worker, not once per block. With one class per layer, the
    layers follow one another, so where they overlap the later layer wins.
    """
    del version  # part of the cache key only
    target = _crs(crs_wkt)
    if src.layers:
        parts = [_read_layer(src.path, name, [], target) for name in src.layers]
        geoms = np.concatenate([part.geometry.to_numpy() for part in parts])
        values = np.concatenate([np.full(len(part), i + 1, np.uint8) for i, part in enumerate(parts)])
        return geoms, values, shapely.STRtree(geoms)
    assert src.field is not None
    gdf = _read_layer(src.path, src.layer, [src.field], target)
    if gdf[src.field].isna().any():
        raise LabelsError(
            f"labels {src.path}: {int(gdf[src.field].isna().sum())} polygons have no {src.field!r} value"
        )
    geoms = gdf.geometry.to_numpy()
    values = _checked(_feature_values(src, gdf[src.field]), src)
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
    geoms, values, tree = _polygons(src, grid.crs_wkt, _version(src.path))
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
    """Pixel values as uint8 labels: the background value its class, nodata 0 (unlabelled), the rest checked.

    The background is taken first: a background value that is also the raster's nodata
    still means background inside the raster (the user said so).
    """
    background = None if src.background is None else data == src.background
    if nodata is not None:
        data = np.where(np.isnan(data) if math.isnan(nodata) else data == nodata, 0, data)
    if background is not None:
        data = np.where(background, src.background_class or 0, data)
    return _checked(data, src)


def _read_same_grid(
    src: LabelSource, ds: rasterio.io.DatasetReader, row: int, col: int, h: int, w: int
) -> np.ndarray:
    """A window of a raster on the grid's own lattice: a plain read, pixels beyond the raster 0."""
    out = np.zeros((h, w), np.uint8)
    rs, cs = max(row, 0), max(col, 0)
    re, ce = min(row + h, ds.height), min(col + w, ds.width)
    if re > rs and ce > cs:
        data = ds.read(1, window=Window(cs, rs, ce - cs, re - rs))
        out[rs - row : re - row, cs - col : ce - col] = _to_labels(data, ds.nodata, src)
    return out


def _source_window(
    ds: rasterio.io.DatasetReader, target: Affine, grid_crs: CRS | None, h: int, w: int
) -> tuple[np.ndarray, Affine] | None:
    """The part of the raster a target window covers (one pixel more around), read; None if none."""
    bounds = _bounds(target, h, w)
    if ds.crs is not None and grid_crs is not None and ds.crs != grid_crs:
        bounds = transform_bounds(grid_crs, ds.crs, *bounds, densify_pts=21)
    exact = ds.window(*bounds)
    c0, r0 = math.floor(exact.col_off) - 1, math.floor(exact.row_off) - 1
    c1, r1 = math.ceil(exact.col_off + exact.width) + 1, math.ceil(exact.row_off + exact.height) + 1
    c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, ds.width), min(r1, ds.height)
    if c1 <= c0 or r1 <= r0:  # no overlap
        return None
    win = Window(c0, r0, c1 - c0, r1 - r0)
    return ds.read(1, window=win), ds.window_transform(win)


def _warp(src: LabelSource, ds: rasterio.io.DatasetReader, target: Affine, grid_crs: CRS | None,
          h: int, w: int) -> np.ndarray:
    """A window of a raster on another grid or CRS, warped with nearest resampling."""
    dtype = ds.dtypes[0] if np.issubdtype(np.dtype(ds.dtypes[0]), np.integer) else "float64"
    fill: float = 0 if ds.nodata is None else ds.nodata
    if src.background is not None and src.background == ds.nodata:
        # The nodata value means background here: warped from the window's pixels as
        # read (GDAL would skip it as nodata); NaN alone marks "outside the raster".
        data = np.full((h, w), math.nan)
        part = _source_window(ds, target, grid_crs, h, w)
        if part is not None:
            reproject(source=part[0].astype(np.float64), destination=data, src_transform=part[1],
                      src_crs=ds.crs or grid_crs, dst_transform=target, dst_crs=grid_crs or ds.crs,
                      dst_nodata=math.nan, resampling=Resampling.nearest)
        return _to_labels(data, math.nan, src)
    data = np.full((h, w), fill, dtype=dtype)
    reproject(
        source=rasterio.band(ds, 1),
        destination=data,
        src_crs=ds.crs or grid_crs,
        src_nodata=ds.nodata,
        dst_transform=target,
        dst_crs=grid_crs or ds.crs,
        dst_nodata=fill,
        resampling=Resampling.nearest,
    )
    return _to_labels(data, fill, src)


def _raster_window(src: LabelSource, grid: Grid, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    target = _window_transform(grid, y0, x0)
    with gdal_env(src.path), rasterio.open(gdal_path(src.path)) as ds:
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
            # Plain read, no warping: exact.
            return _read_same_grid(src, ds, round(row), round(col), h, w)
        return _warp(src, ds, target, grid_crs, h, w)


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


def _vector_classes(src: LabelSource) -> list[ClassInfo]:
    """Classes of polygons: their layers, their text values, or their integer values named by a text field."""
    if src.layers:
        return [ClassInfo(i + 1, name, default_colour(i + 1)) for i, name in enumerate(src.layers)]
    assert src.field is not None
    info = pyogrio.read_info(vector_path(src.path), layer=src.layer)
    kinds = {str(f).lower(): (str(f), str(d)) for f, d in zip(info["fields"], info["dtypes"], strict=True)}
    texts = {low: f for low, (f, d) in kinds.items() if _is_text(d) and f != src.field}
    name_f = None if src.names else next((texts[n] for n in _NAME_FIELDS if n in texts), None)
    colour_f = next((kinds[n][0] for n in _COLOUR_FIELDS if n in kinds), None)
    cols = list(dict.fromkeys(c for c in (src.field, name_f, colour_f) if c is not None))
    table = pyogrio.read_dataframe(vector_path(src.path), layer=src.layer, columns=cols, read_geometry=False)
    table = table.dropna(subset=[src.field])
    values = _checked(_feature_values(src, table[src.field]), src)
    found: dict[int, ClassInfo] = {}
    for value, (_, row) in zip(values.tolist(), table.iterrows(), strict=True):
        if value == 0 or value in found:
            continue
        name = f"class {value}"
        if src.names:
            name = src.names[value - 1]
        elif name_f and row[name_f] is not None:
            name = str(row[name_f])
        colour = str(row[colour_f]) if colour_f and row[colour_f] is not None else ""
        if not (len(colour) == 7 and colour.startswith("#")):
            colour = default_colour(value)
        found[value] = ClassInfo(value, name, colour)
    return [found[v] for v in sorted(found)]


def _raster_classes(src: LabelSource, values: Iterable[int] | None) -> list[ClassInfo]:
    """Classes of a raster: the values present, coloured from its colour table."""
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


def background_class(src: LabelSource) -> ClassInfo | None:
    """The class a background value becomes (named ``background``), or None without one.

    For a caller that takes its classes from a classes file: the background class is
    the labels' own, so the file need not (and, when 0 was remapped, cannot) define it.
    """
    if src.background_class is None:
        return None
    return ClassInfo(src.background_class, BACKGROUND_NAME, default_colour(src.background_class))


def warn_single_class(src: LabelSource, classes: Sequence[ClassInfo]) -> None:
    """Warn (:class:`SingleClassWarning`) when the labels hold a single class.

    A one-class training scores a perfect and meaningless accuracy; the usual cause is a
    0/1 mask whose 0 means background, which segpipe reads as unlabelled.
    """
    if len(classes) != 1:
        return
    hint = (
        "if another value means background rather than unlabelled (0 in a 0/1 mask), pass it with "
        "--background-value"
        if src.background is None
        else "add labels of the other classes"
    )
    warnings.warn(
        f"labels {src.path} hold a single class ({classes[0].value}: {classes[0].name}): a model trained "
        f"on them learns nothing and scores a meaningless 1.0; {hint}",
        SingleClassWarning,
        stacklevel=3,
    )


def label_classes(src: LabelSource, values: Iterable[int] | None = None) -> list[ClassInfo]:
    """Classes the labels define; warns (:class:`SingleClassWarning`) when there is only one.

    Polygons: one class per layer named after it; or the sorted distinct values of a
    text field, named by them; or every value of an integer field, named from a text
    ``label``/``name``/``class_name``/``classname``/``class`` field and coloured from a
    ``colour``/``color`` field when present.
    Rasters: the distinct values (``values`` if given, e.g. counted while
    rasterizing, else a scan of the raster), named ``class N``, coloured from the
    raster's colour table when it has one (black entries count as unset).
    The background class, if any, is named ``background``.

    Returns:
        Classes sorted by value, 0 (unlabelled) excluded.
    """
    found = _vector_classes(src) if src.kind == "vector" else _raster_classes(src, values)
    if src.background_class is not None:
        bg = src.background_class
        found = [dataclasses.replace(c, name=BACKGROUND_NAME) if c.value == bg else c for c in found]
    warn_single_class(src, found)
    return found


def _extents(src: LabelSource) -> list[tuple[CRS | None, tuple[float, ...]]]:
    """The CRS and bounds of each layer the labels read (the raster's own for a raster)."""
    if src.kind == "raster":
        with gdal_env(src.path), rasterio.open(gdal_path(src.path)) as ds:
            return [(ds.crs, tuple(ds.bounds))]
    out = []
    for layer in src.layers or (src.layer,):
        info = pyogrio.read_info(vector_path(src.path), layer=layer, force_total_bounds=True)
        if info["features"]:
            out.append((_crs(info["crs"]), tuple(float(b) for b in info["total_bounds"])))
    if not out:
        raise _no_polygons(src.path)
    return out


def check_overlap(src: LabelSource, grid: Grid) -> None:
    """Refuse labels that lie entirely outside the image.

    Labels without a CRS are taken to be in the grid's CRS.

    Raises:
        LabelsError: The labels' bounds, reprojected to the grid's CRS, do not
            intersect the grid (or the labels hold no polygon).
    """
    grid_crs = _crs(grid.crs_wkt)
    spans = []
    for crs, bounds in _extents(src):
        if crs is not None and grid_crs is not None and crs != grid_crs:
            try:
                bounds = transform_bounds(crs, grid_crs, *bounds, densify_pts=21)
            except Exception as exc:  # projection failure: the areas cannot meet
                raise LabelsError(f"labels {src.path} cannot be projected to the image CRS: {exc}") from exc
        spans.append(bounds)
    lx0, ly0 = min(b[0] for b in spans), min(b[1] for b in spans)
    lx1, ly1 = max(b[2] for b in spans), max(b[3] for b in spans)
    gx0, gy0, gx1, gy1 = _bounds(Affine(*grid.transform), grid.height, grid.width)
    if not (lx0 < gx1 and gx0 < lx1 and ly0 < gy1 and gy0 < ly1):
        raise LabelsError(
            f"labels {src.path} do not overlap the image: labels span {_fmt((lx0, ly0, lx1, ly1))}, "
            f"the image spans {_fmt((gx0, gy0, gx1, gy1))} (in the image CRS); check both CRSs"
        )


def _fmt(b: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in b) + ")"
