"""What an ingest reads and onto which grid: the fast path, or a warp of scenes.

Aligned tiles without grid options keep the fast path (a mosaic of the files as they are,
no resampling: :mod:`segpipe.io.mosaic`). STAC inputs, tiles whose CRS, pixel size or grid
differ, and any grid option (``crs``, ``resolution``, ``bounds``, ``aoi``) are warped onto
one target grid (:mod:`segpipe.io.warp`). :func:`plan_warp` decides; :func:`store_fingerprint`
names the inputs and settings a store is made from, the same way for ``segpipe ingest`` and
for a flow deciding whether its store is up to date.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rasterio
from rasterio.crs import CRS

from segpipe.errors import InputError
from segpipe.io.aoi import Aoi, aoi_geojson, read_aoi
from segpipe.io.fingerprint import ingest_fingerprint
from segpipe.io.mosaic import expand_inputs
from segpipe.io.remote import gdal_env, gdal_path
from segpipe.io.sources import SceneSet
from segpipe.io.stac_in import is_stac, read_stac
from segpipe.io.warp import scenes_from_files, target_grid
from segpipe.types import Grid

__all__ = [
    "GridRequest",
    "LabelRequest",
    "WarpPlan",
    "aoi_in_store_crs",
    "image_names",
    "plan_warp",
    "store_fingerprint",
    "warp_attrs",
]


@dataclass(frozen=True)
class GridRequest:
    """The grid options of an ingest (all None: the inputs' own grid, if they share one).

    Attributes:
        crs: Target CRS (EPSG code or WKT); None: the CRS covering most of the scenes.
        resolution: Target pixel size in CRS units; None: the finest band's.
        bounds: Target (left, bottom, right, top) in the target CRS; None: the footprints'
            union, or the AOI's bounding box.
        aoi: Vector file of the area of interest; pixels outside it become nodata.
        resampling: GDAL resampling of imagery (labels are always nearest).
        order: Where scenes overlap: ``given``, ``latest`` or ``least-cloudy``.
        assets: STAC asset keys to read as bands, in this order (STAC inputs only).
    """

    crs: str | None = None
    resolution: float | tuple[float, float] | None = None
    bounds: tuple[float, float, float, float] | None = None
    aoi: str | Path | None = None
    resampling: str = "bilinear"
    order: str = "given"
    assets: tuple[str, ...] = field(default=())

    @property
    def sets_grid(self) -> bool:
        """Whether an option asks for a grid of its own (so the inputs are warped)."""
        return any(v is not None for v in (self.crs, self.resolution, self.bounds, self.aoi))

    def settings(self) -> dict[str, Any]:
        """The options that shape a warped store, JSON-ready (for its fingerprint)."""
        return {"crs": self.crs, "resolution": self.resolution, "bounds": self.bounds,
                "resampling": self.resampling, "order": self.order, "assets": list(self.assets) or None}


@dataclass(frozen=True)
class LabelRequest:
    """How to read the labels (see :func:`segpipe.io.labels.open_labels`).

    Attributes:
        path: Label raster or polygons, or None.
        field: Polygon class field (integer, or text whose values become classes).
        layer: Layer of a multi-layer vector file; None: one class per layer when there are several.
        background_value: Label value meaning background (a class of its own), not unlabelled.
    """

    path: str | Path | None = None
    field: str | None = None
    layer: str | None = None
    background_value: int | None = None


def image_names(images: Sequence[str | Path] | str | Path) -> list[str]:
    """The image arguments as strings, in order."""
    return [str(i) for i in ([images] if isinstance(images, str | Path) else images)]


@dataclass(frozen=True)
class WarpPlan:
    """How a warped ingest makes its image: the scenes, the grid, the options.

    Attributes:
        scenes: The scenes (STAC items, or one per tile).
        grid: The target grid (:func:`segpipe.io.warp.target_grid`).
        aoi: The area of interest read from ``request.aoi``, or None.
        request: The options it was planned from (resampling, overlap order, the AOI's file).
    """

    scenes: SceneSet
    grid: Grid
    aoi: Aoi | None
    request: GridRequest


# Tiles whose origins lie closer than this fraction of a pixel to a common grid share it
# (as segpipe.io.mosaic judges them): float noise, not a real shift.
_ALIGN_TOL = 1e-3


def _stac_input(images: Sequence[str | Path] | str | Path) -> str | Path | None:
    """The STAC document ``images`` names (one file or URL), or None for rasters."""
    items = [images] if isinstance(images, str | Path) else list(images)
    if len(items) != 1:
        return None
    if is_stac(items[0]):
        return items[0]
    if str(items[0]).lower().endswith(".json") and os.path.isfile(items[0]):
        # No raster either: read_stac names what is wrong with it (JSON syntax, not STAC),
        # where GDAL would only say it cannot be read as a raster.
        read_stac(items[0])
    return None


def _one_grid(images: Sequence[str | Path] | str | Path) -> bool:
    """Whether the tiles share CRS, pixel size and pixel grid (the fast path can mosaic them).

    Unreadable inputs count as sharing it: the fast path refuses them by name.
    """
    try:
        files = expand_inputs(images)
        headers = []
        for f in files:
            with gdal_env(f), rasterio.open(gdal_path(f)) as ds:
                headers.append((ds.crs, tuple(ds.transform)[:6]))
    except Exception:  # the fast path's own checks name the culprit
        return True
    crs, ref = headers[0]
    for other_crs, t in headers[1:]:
        if other_crs != crs or t[0] != ref[0] or t[4] != ref[4] or t[1] != ref[1] or t[3] != ref[3]:
            return False
        for origin, ref_origin, res in ((t[2], ref[2], ref[0]), (t[5], ref[5], ref[4])):
            shift = (origin - ref_origin) / res
            if abs(shift - round(shift)) > _ALIGN_TOL:
                return False
    return True


def warp_attrs(warp: WarpPlan) -> dict[str, Any]:
    """What a warped store records beyond the fast path's attributes: scenes, dates, AOI."""
    starts = [s.start_datetime or s.datetime for s in warp.scenes.scenes]
    ends = [s.end_datetime or s.datetime for s in warp.scenes.scenes]
    known_starts, known_ends = [t for t in starts if t], [t for t in ends if t]
    attrs: dict[str, Any] = {
        "warp": {
            "resampling": warp.request.resampling,
            "order": warp.request.order,
            "scenes": [s.id for s in warp.scenes.scenes],
            "source": warp.scenes.source,
        }
    }
    if known_starts and known_ends:
        attrs["acquired"] = {"start": min(known_starts), "end": max(known_ends)}
    if warp.aoi is not None:
        attrs["aoi"] = {"source": str(warp.request.aoi), "geometry": aoi_in_store_crs(warp)}
    return attrs


def aoi_in_store_crs(warp: WarpPlan) -> dict[str, Any] | None:
    """The AOI as GeoJSON in the store's CRS (pixels outside it are nodata)."""
    return aoi_geojson(warp.aoi, CRS.from_wkt(warp.grid.crs_wkt))


def plan_warp(images: Sequence[str | Path] | str | Path, request: GridRequest) -> WarpPlan | None:
    """The warp an ingest needs, or None where the fast path applies unchanged.

    STAC inputs, tiles on different grids, or any grid option (``crs``, ``resolution``,
    ``bounds``, ``aoi``) take the warp path; aligned tiles without options do not.

    Raises:
        InputError: ``assets`` given for inputs that are not STAC, or a bad grid option.
        StacError: The STAC document is unusable.
        MissingInputError: An input or the AOI file does not exist.
    """
    stac = _stac_input(images)
    if stac is None and request.assets:
        raise InputError(
            "--assets chooses bands of STAC items: the inputs are not a STAC Item or ItemCollection"
        )
    if stac is None and not request.sets_grid and _one_grid(images):
        return None
    if stac is not None:
        scenes = read_stac(stac, assets=list(request.assets) or None)
    else:
        scenes = scenes_from_files(images)
    area = read_aoi(request.aoi) if request.aoi is not None else None
    grid = target_grid(scenes, crs=request.crs, resolution=request.resolution, bounds=request.bounds,
                       aoi=area)
    return WarpPlan(scenes, grid, area, request)


def store_fingerprint(
    images: Sequence[str | Path] | str | Path,
    labels: LabelRequest,
    classes: str | Path | None,
    block_size: int,
    request: GridRequest,
    warp: WarpPlan | None,
) -> str:
    """The fingerprint of everything a store is made from (``segpipe.inputs`` in its attributes).

    The fast path with plain labels gives the value earlier versions gave, so stores built
    before stay recognised; a warp adds its settings and every band file it reads.
    """
    options: dict[str, Any] = {}
    extra: list[str | Path] = []
    if warp is not None:
        options = request.settings()
        extra = [*sorted({b.href for s in warp.scenes.scenes for b in s.bands}),
                 *([request.aoi] if request.aoi is not None else [])]
    if labels.layer is not None or labels.background_value is not None:
        options = {**options, "label_layer": labels.layer, "background_value": labels.background_value}
    return ingest_fingerprint(image_names(images), labels.path, labels.field, classes, block_size,
                              options=options or None, extra_files=extra or None)
