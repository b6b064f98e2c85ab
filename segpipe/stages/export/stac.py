"""STAC Items describing exported Cloud-Optimized GeoTIFFs.

A STAC Item next to each export lets catalogues (stac-fastapi, pgSTAC), tile servers
(titiler) and QGIS's STAC browser pick the file up: its footprint and bbox in WGS 84,
its native grid through the projection extension, and, for class rasters, the class
list through the classification extension (titiler builds a categorical colour map
from ``color_hint``). Plain ``json``: pystac would be a dependency for one dict.

Classification extension v2.0.0 requires a machine-readable ``name`` (letters, digits,
``-`` and ``_``); the human name goes into ``title`` and ``description``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_bounds, transform_geom

from segpipe.types import ClassInfo, Grid

__all__ = [
    "CLASSIFICATION_EXTENSION",
    "COG_MEDIA_TYPE",
    "PROJECTION_EXTENSION",
    "STAC_VERSION",
    "stac_bands",
    "stac_classes",
    "stac_item",
    "stac_item_path",
    "stac_json",
    "write_stac_item",
]

STAC_VERSION = "1.1.0"
CLASSIFICATION_EXTENSION = "https://stac-extensions.github.io/classification/v2.0.0/schema.json"
PROJECTION_EXTENSION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
RASTER_EXTENSION = "https://stac-extensions.github.io/raster/v2.0.0/schema.json"
COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
_EDGE_POINTS = 21  # points per footprint edge: a projected edge is curved in lon/lat


def stac_item_path(cog: str | Path) -> Path:
    """Where the STAC Item of a COG lives: ``<name>.stac.json`` beside it.

    Not ``<stem>.json``: that would overwrite a ``classes.json`` class file next to it.
    """
    p = Path(cog)
    return p.with_name(f"{p.stem}.stac.json")


def _machine_name(name: str, value: int) -> str:
    slug = re.sub(r"[^0-9A-Za-z_-]+", "_", name.strip()).strip("_")
    return slug or f"class_{value}"


def stac_classes(classes: Sequence[ClassInfo]) -> list[dict[str, Any]]:
    """Class objects of the classification extension (v2.0.0) for ``classes``."""
    return [
        {
            "value": c.value,
            "name": _machine_name(c.name, c.value),
            "title": c.name,
            "description": c.name,
            "color_hint": c.colour[1:].upper(),
        }
        for c in classes
    ]


def _footprint(grid: Grid) -> tuple[dict[str, Any] | None, list[float] | None, list[float]]:
    """WGS 84 geometry and bbox of the grid (None without a CRS), and its native bbox."""
    t = Affine(*grid.transform)
    xs = [t.c, t.c + t.a * grid.width]
    ys = [t.f, t.f + t.e * grid.height]
    native = [min(xs), min(ys), max(xs), max(ys)]
    if not grid.crs_wkt:
        return None, None, native
    crs = CRS.from_wkt(grid.crs_wkt)
    west, south, east, north = native
    n = _EDGE_POINTS - 1
    ring = (
        [(west + (east - west) * i / n, north) for i in range(n)]
        + [(east, north - (north - south) * i / n) for i in range(n)]
        + [(east - (east - west) * i / n, south) for i in range(n)]
        + [(west, south + (north - south) * i / n) for i in range(n)]
    )
    ring.append(ring[0])
    geometry = transform_geom(crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
    bbox = transform_bounds(crs, "EPSG:4326", west, south, east, north, densify_pts=_EDGE_POINTS)
    return dict(geometry), [round(v, 9) for v in bbox], native


def _proj_code(grid: Grid) -> tuple[str | None, str | None]:
    """(``proj:code``, ``proj:wkt2``): an authority code when the CRS has one, else the WKT."""
    if not grid.crs_wkt:
        return None, None
    crs = CRS.from_wkt(grid.crs_wkt)
    epsg = crs.to_epsg()
    return (f"EPSG:{epsg}", None) if epsg else (None, crs.to_wkt(version="WKT2_2019"))


def stac_bands(
    names: Sequence[str], dtype: str, nodata: float | None, unit: str = ""
) -> list[dict[str, Any]]:
    """One STAC 1.1 band object per band: ``name``, ``description``, ``data_type``, ``nodata``.

    A NaN nodata is written as the string ``"nan"`` (JSON has no NaN), as STAC prescribes.
    With ``unit``, each band also says it (``unit``) and that its values are that unit as
    stored (the raster extension's ``scale`` 1 and ``offset`` 0).
    """
    bands = []
    for name in names:
        band: dict[str, Any] = {"name": name, "description": name, "data_type": dtype}
        if nodata is not None:
            band["nodata"] = "nan" if math.isnan(nodata) else nodata
        if unit:
            band.update({"unit": unit, "raster:scale": 1.0, "raster:offset": 0.0})
        bands.append(band)
    return bands


def stac_item(
    cog: str | Path,
    grid: Grid,
    layer: str,
    bands: Sequence[dict[str, Any]],
    classes: Sequence[ClassInfo] = (),
    item_id: str | None = None,
    created: dt.datetime | None = None,
) -> dict[str, Any]:
    """A STAC Item (as a dict) describing one exported COG.

    Args:
        cog: The COG; the asset's ``href`` is its file name, relative to the Item.
        grid: The COG's grid (CRS, transform, shape).
        layer: Store layer exported (``classes``, ``confidence``, ``probabilities``, ``image``).
        bands: One STAC 1.1 band object per band (:func:`stac_bands`).
        classes: Classes of a class raster, recorded as ``classification:classes``
            (ignored for other layers).
        item_id: Item id (default: the COG's file stem).
        created: Creation time (default: now, UTC).

    Returns:
        A JSON-ready dict.
    """
    when = (created or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    geometry, bbox, native = _footprint(grid)
    asset = _asset(cog, layer, bands)
    extensions = [PROJECTION_EXTENSION]
    if classes and layer == "classes":
        asset["classification:classes"] = stac_classes(classes)
        extensions.append(CLASSIFICATION_EXTENSION)
    if any(key.startswith("raster:") for band in bands for key in band):
        extensions.append(RASTER_EXTENSION)
    item: dict[str, Any] = {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": extensions,
        "id": item_id or Path(cog).stem,
        "geometry": geometry,
    }
    if bbox is not None:
        item["bbox"] = bbox
    properties = _properties(grid, layer, when, native)
    item.update({"properties": properties, "links": [], "assets": {"data": asset}})
    return item


def _asset(cog: str | Path, layer: str, bands: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The Item's ``data`` asset: the COG beside the Item, its media type, roles and bands."""
    return {
        "href": f"./{Path(cog).name}",
        "type": COG_MEDIA_TYPE,
        "title": f"segpipe {layer}",
        "roles": ["data"] if layer != "image" else ["data", "visual"],
        "bands": [dict(b) for b in bands],
    }


def _properties(grid: Grid, layer: str, when: str, native: list[float]) -> dict[str, Any]:
    """The Item's properties: times, the native grid (projection extension) and the layer."""
    code, wkt2 = _proj_code(grid)
    properties: dict[str, Any] = {
        "datetime": when,
        "created": when,
        "proj:code": code,
        "proj:shape": [grid.height, grid.width],
        "proj:transform": list(grid.transform),
        "proj:bbox": native,
        "segpipe:layer": layer,
    }
    if wkt2:
        properties["proj:wkt2"] = wkt2
    return properties


def stac_json(item: dict[str, Any]) -> str:
    """The text of an Item file: indented JSON ending with a newline."""
    return json.dumps(item, indent=2) + "\n"


def write_stac_item(cog: str | Path, item: dict[str, Any]) -> Path:
    """Write ``item`` beside ``cog`` atomically (temporary file, then rename).

    Returns:
        The Item's path (see :func:`stac_item_path`).
    """
    path = stac_item_path(cog)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(stac_json(item))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
