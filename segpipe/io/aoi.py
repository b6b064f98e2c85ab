"""An area of interest: a polygon from any vector file, in any CRS.

``segpipe ingest --aoi FILE`` ingests the polygon's bounding box (in the target CRS) and
makes pixels outside the polygon nodata, which predict, export and evaluate then skip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import shapely
from rasterio.crs import CRS
from rasterio.warp import transform_geom
from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry

from segpipe.errors import InputError, MissingInputError
from segpipe.io.remote import is_remote, vector_path

__all__ = ["Aoi", "aoi_geojson", "read_aoi"]

Aoi = tuple[BaseGeometry, CRS]
"""An area of interest: a (multi)polygon and the CRS of its coordinates (see :func:`read_aoi`)."""


def read_aoi(path: str | Path) -> Aoi:
    """An area of interest from a vector file (any format and CRS GDAL reads).

    Returns:
        The union of the file's polygons and the CRS of its coordinates.

    Raises:
        MissingInputError: The file does not exist or is not a vector file.
        InputError: The file holds no feature, no polygon, or has no CRS.
    """
    import pyogrio

    if not is_remote(path) and not Path(path).exists():
        raise MissingInputError(f"area of interest {path} does not exist")
    try:
        df = pyogrio.read_dataframe(vector_path(path))
    except Exception as exc:  # pyogrio's DataSourceError and friends
        raise MissingInputError(f"area of interest {path} cannot be read as a vector file: {exc}") from exc
    geoms = [g for g in df.geometry if g is not None and not g.is_empty]
    if not geoms:
        raise InputError(f"area of interest {path} holds no geometry: draw the polygon of the region")
    polys = [g for g in geoms if g.geom_type in ("Polygon", "MultiPolygon")]
    if len(polys) != len(geoms):
        kinds = sorted({g.geom_type for g in geoms} - {"Polygon", "MultiPolygon"})
        raise InputError(
            f"area of interest {path} holds {', '.join(kinds)} geometries: it must hold polygons"
        )
    if df.crs is None:
        raise InputError(f"area of interest {path} has no CRS: save it with one (e.g. as GeoPackage)")
    return shapely.union_all(polys), CRS.from_user_input(df.crs)


def aoi_geojson(aoi: Aoi | None, crs: CRS) -> dict[str, Any] | None:
    """The AOI as a GeoJSON geometry in ``crs`` (what block tasks rasterize), None without AOI."""
    if aoi is None:
        return None
    geom, aoi_crs = aoi
    if aoi_crs == crs:
        return dict(mapping(geom))
    # Extra vertices first: a straight edge in one CRS is a curve in another.
    left, bottom, right, top = geom.bounds
    dense = shapely.segmentize(geom, max(right - left, top - bottom) / 64 or 1.0)
    out: dict[str, Any] = transform_geom(aoi_crs, crs, mapping(dense))
    return out
