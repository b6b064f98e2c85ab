"""STAC Items describing exported Cloud-Optimized GeoTIFFs, made with pystac.

A STAC Item next to each export lets catalogues (stac-fastapi, pgSTAC), tile servers
(titiler) and QGIS's STAC browser pick the file up:
- its footprint and bbox in WGS 84, its native grid (projection extension);
- the imagery's acquisition time (``datetime``, or ``start_datetime``/``end_datetime``)
  from the store, not the export's (which is ``created``);
- ``derived_from`` links to the inputs and the region store, a ``via`` link to the model
  package's MLM Item (``mlm.json``);
- per band: ``statistics`` and the raster extension's ``raster:histogram``; the file
  extension's ``file:size`` and ``file:checksum`` (a sha2-256 multihash);
- for class rasters the class list (classification extension; titiler builds a
  categorical colour map from ``color_hint``).

Every extension is named at a version whose official schema the tests validate the Item
against, offline: classification v1.1.0 (its machine ``name`` kept to letters, digits,
``-`` and ``_``, the human name in ``title`` and ``description``), projection v2.0.0,
raster v2.0.0, file v2.1.0.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pystac
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_bounds, transform_geom

from segpipe.stages.export.lineage import Lineage
from segpipe.types import ClassInfo, Grid

__all__ = [
    "CLASSIFICATION_EXTENSION",
    "COG_MEDIA_TYPE",
    "FILE_EXTENSION",
    "PROJECTION_EXTENSION",
    "STAC_VERSION",
    "stac_bands",
    "stac_classes",
    "stac_item",
    "file_fields",
    "stac_item_path",
    "stac_json",
    "write_stac_item",
]

STAC_VERSION = "1.1.0"
CLASSIFICATION_EXTENSION = "https://stac-extensions.github.io/classification/v1.1.0/schema.json"
FILE_EXTENSION = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
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
    """Class objects of the classification extension for ``classes``."""
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
    names: Sequence[str],
    dtype: str,
    nodata: float | None,
    unit: str = "",
    statistics: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """One STAC 1.1 band object per band: ``name``, ``description``, ``data_type``, ``nodata``.

    A NaN nodata is written as the string ``"nan"`` (JSON has no NaN), as STAC prescribes.
    With ``unit``, each band also says it (``unit``) and that its values are that unit as
    stored (the raster extension's ``scale`` 1 and ``offset`` 0). ``statistics`` (from
    :func:`segpipe.stages.export.band_stats.band_statistics`, one per band) adds each band's
    ``statistics`` and ``raster:histogram``.
    """
    bands = []
    for i, name in enumerate(names):
        band: dict[str, Any] = {"name": name, "description": name, "data_type": dtype}
        if i < len(statistics):
            band.update(statistics[i])
        if nodata is not None:
            band["nodata"] = "nan" if math.isnan(nodata) else nodata
        if unit:
            band.update({"unit": unit, "raster:scale": 1.0, "raster:offset": 0.0})
        bands.append(band)
    return bands


def file_fields(path: str | Path) -> dict[str, Any]:
    """The file extension's ``file:size`` and ``file:checksum`` (sha2-256 multihash) of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    # Multihash: 0x12 = sha2-256, 0x20 = 32 bytes, then the digest.
    return {"file:size": Path(path).stat().st_size, "file:checksum": f"1220{digest.hexdigest()}"}


def _when(lineage: Lineage, created: str) -> tuple[dt.datetime | None, dict[str, Any]]:
    """The Item's ``datetime`` and the time properties that go with it.

    The imagery's own time when the store knows it: one instant, or an interval (then
    ``datetime`` is null, as STAC prescribes). Otherwise the export time, and
    ``segpipe:datetime`` says the acquisition time is unknown.
    """
    if lineage.start and lineage.end:
        if lineage.start == lineage.end:
            return _parse(lineage.start), {}
        # RFC 3339 in UTC, whatever ISO 8601 form the store holds ("2021-06-01" too).
        return None, {"start_datetime": _rfc3339(_parse(lineage.start)),
                      "end_datetime": _rfc3339(_parse(lineage.end))}
    if lineage.datetime:
        return _parse(lineage.datetime), {}
    unknown = "export time: the store does not record when the imagery was taken"
    return _parse(created), {"segpipe:datetime": unknown}


def _rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(text: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _href(path: str) -> str:
    """A link target: URLs as they are, local paths absolute."""
    return path if "://" in path else str(Path(path).resolve())


def _links(lineage: Lineage) -> list[pystac.Link]:
    """``derived_from`` the inputs and the store, ``via`` the model package's MLM Item."""
    links = [pystac.Link("derived_from", _href(s), title="segpipe input") for s in lineage.sources]
    if lineage.store:
        links.append(pystac.Link("derived_from", _href(lineage.store), title="segpipe region store"))
    if lineage.model:
        mlm = f"{lineage.model.rstrip('/')}/mlm.json"
        links.append(pystac.Link("via", _href(mlm), media_type="application/geo+json",
                                 title="model package (STAC MLM Item)"))
    return links


def stac_item(
    cog: str | Path,
    grid: Grid,
    layer: str,
    bands: Sequence[dict[str, Any]],
    classes: Sequence[ClassInfo] = (),
    item_id: str | None = None,
    created: dt.datetime | None = None,
    lineage: Lineage | None = None,
    file: dict[str, Any] | None = None,
) -> pystac.Item:
    """The STAC Item describing one exported COG.

    Args:
        cog: The COG; the asset's ``href`` is its file name, relative to the Item.
        grid: The COG's grid (CRS, transform, shape).
        layer: Store layer exported (``classes``, ``confidence``, ``probabilities``, ``image``).
        bands: One STAC 1.1 band object per band (:func:`stac_bands`).
        classes: Classes of a class raster, recorded as ``classification:classes``
            (ignored for other layers).
        item_id: Item id (default: the COG's file stem).
        created: Creation time (default: now, UTC).
        lineage: The imagery's time, the inputs and the model (default: none known).
        file: ``file:size`` and ``file:checksum`` of the COG (:func:`file_fields`), if known.

    Returns:
        The Item (``stac_json`` gives its text).
    """
    lineage = lineage or Lineage()
    made = _rfc3339(created or dt.datetime.now(dt.UTC))
    geometry, bbox, native = _footprint(grid)
    when, times = _when(lineage, made)
    item = pystac.Item(
        id=item_id or Path(cog).stem, geometry=geometry, bbox=bbox, datetime=when,
        properties={**times, "created": made, "segpipe:layer": layer},
    )
    _project(item, grid, native)
    item.add_asset("data", _asset(cog, layer, bands, file or {}))
    item.stac_extensions.extend(_extensions(item.assets["data"], layer, classes))
    for link in _links(lineage):
        item.add_link(link)
    return item


def _project(item: pystac.Item, grid: Grid, native: list[float]) -> None:
    """The projection extension: the native CRS, shape, transform and bbox."""
    code, wkt2 = _proj_code(grid)
    item.stac_extensions.append(PROJECTION_EXTENSION)
    item.properties.update({"proj:code": code, "proj:shape": [grid.height, grid.width],
                            "proj:transform": list(grid.transform), "proj:bbox": native})
    if wkt2:
        item.properties["proj:wkt2"] = wkt2


def _extensions(asset: pystac.Asset, layer: str, classes: Sequence[ClassInfo]) -> list[str]:
    """Put the class list on the asset; the schemas the asset's fields call for."""
    extensions = []
    if classes and layer == "classes":
        asset.extra_fields["classification:classes"] = stac_classes(classes)
        extensions.append(CLASSIFICATION_EXTENSION)
    if any(key.startswith("raster:") for band in asset.extra_fields["bands"] for key in band):
        extensions.append(RASTER_EXTENSION)
    if any(key.startswith("file:") for key in asset.extra_fields):
        extensions.append(FILE_EXTENSION)
    return extensions


def _asset(
    cog: str | Path, layer: str, bands: Sequence[dict[str, Any]], file: dict[str, Any]
) -> pystac.Asset:
    """The Item's ``data`` asset: the COG beside the Item, its media type, roles, bands and file fields."""
    return pystac.Asset(
        href=f"./{Path(cog).name}",
        media_type=COG_MEDIA_TYPE,
        title=f"segpipe {layer}",
        roles=["data"] if layer != "image" else ["data", "visual"],
        extra_fields={"bands": [dict(b) for b in bands], **file},
    )


def stac_json(item: pystac.STACObject | dict[str, Any]) -> str:
    """The text of an Item (or Collection) file: indented JSON ending with a newline.

    Hrefs are written as they are (relative ones stay relative to the file).
    """
    data = item if isinstance(item, dict) else item.to_dict(include_self_link=False, transform_hrefs=False)
    return json.dumps(data, indent=2) + "\n"


def write_stac_item(cog: str | Path, item: pystac.Item | dict[str, Any]) -> Path:
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
