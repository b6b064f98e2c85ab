"""STAC test inputs as users have them: per-band COGs in two UTM zones and two resolutions.

:func:`write_stac_scenes` writes two scenes of segpipe's synthetic land cover
(:mod:`segpipe.synth.scene`) that straddle the 78 W meridian, the border of UTM zones 17
and 18: scene ``a`` in EPSG:32617 just west of it, scene ``b`` in EPSG:32618 just east of
it, overlapping by about 600 m. Each scene has three bands at 10 m (``B02``, ``B03``,
``B04``: 256 x 256 px) and one at 20 m (``B11``: 128 x 128 px), one COG per band,
uint16 with nodata 0 and a reflectance scale/offset in the STAC raster metadata, as
Sentinel-2 L2A publishes them. A pystac ItemCollection (a saved search) and, on
request, a self-contained Catalog describe them. :func:`write_stac_labels` writes the
land-cover classes of one scene in that scene's CRS.

Everything is a pure function of :data:`SCENES` and the seed, so another test can
rebuild the expected pixels of any band with :func:`scene_bands`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pystac
import rasterio
from affine import Affine
from pystac.extensions.projection import ProjectionExtension
from rasterio.warp import transform_bounds

from segpipe.synth.scene import SCENE_CLASSES, SceneSpec, class_block, image_block

__all__ = [
    "BANDS",
    "BANDS_10M",
    "BAND_20M",
    "EDGE",
    "NODATA",
    "OFFSET",
    "SCALE",
    "SCENES",
    "StacScene",
    "scene_bands",
    "scene_classes",
    "write_stac_label_polygons",
    "write_stac_labels",
    "write_stac_scenes",
]

EDGE = 256  # 10 m pixels per scene edge
BANDS_10M = ("B02", "B03", "B04")
BAND_20M = "B11"
BANDS = (*BANDS_10M, BAND_20M)
NODATA = 0
SCALE = 0.0001
OFFSET = -0.1
COG_TYPE = str(pystac.MediaType.COG)
# Columns of the synthetic ground two neighbouring scenes share (about 600 m at 10 m).
_OVERLAP_PX = 60
_SPEC = SceneSpec(size=2 * EDGE, bands=len(BANDS), seed=15, region_scale=48)


@dataclass(frozen=True)
class StacScene:
    """Where one synthetic scene lies.

    Attributes:
        id: The STAC Item id.
        crs: Its UTM zone.
        west: Easting of its left edge (m).
        north: Northing of its top edge (m).
        x0: Column of the synthetic ground where it starts (its pixels' source).
        datetime: The acquisition time.
        cloud_cover: ``eo:cloud_cover``.
    """

    id: str
    crs: str
    west: float
    north: float
    x0: int
    datetime: str
    cloud_cover: float

    def transform(self, resolution: float = 10.0) -> Affine:
        """The north-up geotransform of its bands at ``resolution`` metres."""
        return Affine(resolution, 0.0, self.west, 0.0, -resolution, self.north)


# 78 W lies at easting 773 798 in zone 17 and 226 202 in zone 18 at this latitude (35 N):
# scene a ends 300 m east of it, scene b starts 300 m west of it.
SCENES = (
    StacScene("scene-a", "EPSG:32617", 774100.0 - EDGE * 10, 3880000.0, 0, "2024-06-01T15:50:00Z", 12.5),
    StacScene("scene-b", "EPSG:32618", 225900.0, 3880000.0, EDGE - _OVERLAP_PX, "2024-06-03T15:40:00Z", 3.0),
)


def scene_bands(scene: StacScene) -> dict[str, np.ndarray]:
    """The stored (uint16 DN) pixels of each band of ``scene``, 10 m bands first.

    ``B11`` is the 2 x 2 mean of the synthetic 10 m values, nodata wherever one of the
    four is, as a sensor's coarser band sees the same ground.
    """
    image = image_block(_SPEC, 0, scene.x0, EDGE, EDGE)
    out = {name: image[i] for i, name in enumerate(BANDS_10M)}
    fine = image[len(BANDS_10M)].astype(np.float64).reshape(EDGE // 2, 2, EDGE // 2, 2)
    coarse = np.rint(fine.mean(axis=(1, 3))).astype(np.uint16)
    coarse[(fine == NODATA).any(axis=(1, 3))] = NODATA
    out[BAND_20M] = coarse
    return out


def scene_classes(scene: StacScene) -> np.ndarray:
    """The uint8 land-cover classes (1-6; 0 = no data) of ``scene`` on its 10 m grid."""
    return class_block(_SPEC, 0, scene.x0, EDGE, EDGE)


def _write_cog(path: Path, data: np.ndarray, crs: str, transform: Affine, nodata: int | None) -> None:
    """One COG (GDAL's COG driver) of a (y, x) or (band, y, x) array."""
    arr = data if data.ndim == 3 else data[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    profile: dict[str, Any] = {
        "driver": "COG", "width": arr.shape[2], "height": arr.shape[1], "count": arr.shape[0],
        "dtype": str(arr.dtype), "crs": crs, "transform": transform, "nodata": nodata,
        "blocksize": 128, "compress": "deflate",
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(arr)


def _band_fields(name: str, style: Literal["1.1", "1.0"]) -> dict[str, Any]:
    """An asset's band metadata: STAC 1.1 ``bands`` or the older ``raster:bands``/``eo:bands``."""
    raster = {"nodata": NODATA, "data_type": "uint16", "scale": SCALE, "offset": OFFSET}
    if style == "1.0":
        return {"raster:bands": [raster], "eo:bands": [{"name": name, "common_name": name.lower()}]}
    return {
        "bands": [
            {
                "name": name,
                "nodata": NODATA,
                "data_type": "uint16",
                "raster:scale": SCALE,
                "raster:offset": OFFSET,
            }
        ]
    }


def _multiband_fields(style: Literal["1.1", "1.0"]) -> dict[str, Any]:
    """Band metadata of one 3-band asset holding the 10 m bands."""
    per_band = [_band_fields(name, style) for name in BANDS_10M]
    keys = ("raster:bands", "eo:bands") if style == "1.0" else ("bands",)
    return {key: [f[key][0] for f in per_band] for key in keys}


def _asset(
    href: Path, title: str, extra: dict[str, Any], shape: tuple[int, int], transform: Affine
) -> pystac.Asset:
    asset = pystac.Asset(str(href), title=title, media_type=COG_TYPE, roles=["data"], extra_fields=extra)
    proj = ProjectionExtension.ext(asset)
    proj.shape = list(shape)
    proj.transform = list(transform)[:6]
    return asset


def _item(scene: StacScene, folder: Path, style: Literal["1.1", "1.0"], multiband: bool) -> pystac.Item:
    """Write ``scene``'s COGs under ``folder`` and describe them in a pystac Item."""
    bands = scene_bands(scene)
    t10, t20 = scene.transform(10.0), scene.transform(20.0)
    west, south, east, north = transform_bounds(
        scene.crs, "EPSG:4326", scene.west, scene.north - EDGE * 10, scene.west + EDGE * 10, scene.north
    )
    geometry = {
        "type": "Polygon",
        "coordinates": [[[west, south], [east, south], [east, north], [west, north], [west, south]]],
    }
    when = datetime.fromisoformat(scene.datetime)
    item = pystac.Item(
        scene.id, geometry, [west, south, east, north], when, {"eo:cloud_cover": scene.cloud_cover}
    )
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.code = scene.crs
    if multiband:
        path = folder / scene.id / "visual.tif"
        _write_cog(path, np.stack([bands[b] for b in BANDS_10M]), scene.crs, t10, NODATA)
        item.add_asset("visual", _asset(path, "B02, B03, B04", _multiband_fields(style), (EDGE, EDGE), t10))
    for name in BANDS_10M if not multiband else ():
        path = folder / scene.id / f"{name}.tif"
        _write_cog(path, bands[name], scene.crs, t10, NODATA)
        item.add_asset(name, _asset(path, name, _band_fields(name, style), (EDGE, EDGE), t10))
    path = folder / scene.id / f"{BAND_20M}.tif"
    _write_cog(path, bands[BAND_20M], scene.crs, t20, NODATA)
    item.add_asset(
        BAND_20M, _asset(path, BAND_20M, _band_fields(BAND_20M, style), (EDGE // 2, EDGE // 2), t20)
    )
    # A preview is an image too, but not data: the default asset choice must skip it.
    item.add_asset(
        "thumbnail",
        pystac.Asset(str(folder / scene.id / "thumb.png"), media_type="image/png", roles=["thumbnail"]),
    )
    if style == "1.0":
        item.stac_extensions += [
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
        ]
    return item


def write_stac_scenes(
    tmp: Path,
    *,
    relative: bool = False,
    catalog: bool = False,
    style: Literal["1.1", "1.0"] = "1.1",
    multiband: bool = False,
) -> Path:
    """Write both scenes' COGs and the STAC describing them under ``tmp``.

    Args:
        tmp: A folder; the COGs go to ``tmp/cogs/<scene id>/<band>.tif``.
        relative: Asset hrefs relative to the JSON that holds them (else absolute paths,
            as a saved search result has them).
        catalog: Also write a self-contained Catalog at ``tmp/catalog/catalog.json`` (one
            folder per item, asset hrefs relative to each item's own file).
        style: Band metadata as STAC 1.1 ``bands`` or as the 1.0 extensions'
            ``raster:bands`` + ``eo:bands``.
        multiband: The three 10 m bands in one 3-band asset ``visual`` (+ ``B11``).

    Returns:
        The ItemCollection ``tmp/items.json`` (the Catalog, if asked, is
        ``tmp/catalog/catalog.json``).
    """
    cogs = tmp / "cogs"
    items = [_item(scene, cogs, style, multiband) for scene in SCENES]
    out = tmp / "items.json"
    collection = pystac.ItemCollection([i.clone() for i in items])
    if relative:
        for item in collection:
            for asset in item.assets.values():
                asset.href = Path(asset.href).relative_to(tmp).as_posix()
    collection.save_object(dest_href=str(out))
    if catalog:
        cat = pystac.Catalog("stac-scenes", "Two synthetic scenes across UTM zones 17 and 18")
        cat.add_items(items)
        cat.normalize_hrefs(str(tmp / "catalog"))
        cat.make_all_asset_hrefs_relative()
        cat.save(pystac.CatalogType.SELF_CONTAINED)
    return out


def write_stac_labels(tmp: Path, scene: StacScene = SCENES[0], resolution: float = 10.0) -> Path:
    """The land-cover classes of ``scene`` as a GeoTIFF in the scene's own CRS.

    Args:
        tmp: The folder to write ``labels-<scene id>.tif`` into.
        scene: Whose ground (default: scene ``a``, EPSG:32617).
        resolution: 10 m (the scene's grid) or 20 m (every second pixel, as nearest
            resampling keeps classes).

    Returns:
        The file: uint8, 0 = unlabelled (the scene's no-data corner), no nodata value.
    """
    classes = scene_classes(scene)
    step = round(resolution / 10.0)
    if step not in (1, 2):
        raise ValueError(f"resolution must be 10 or 20 m, not {resolution}")
    out = tmp / f"labels-{scene.id}.tif"
    sub = np.ascontiguousarray(classes[step // 2 :: step, step // 2 :: step])
    _write_cog(out, sub, scene.crs, scene.transform(resolution), None)
    return out


def write_stac_label_polygons(tmp: Path, scene: StacScene = SCENES[0], crs: str | None = None) -> Path:
    """The land-cover classes of ``scene`` as polygons, the GeoPackage layer ``labels``.

    Args:
        tmp: The folder to write ``labels-<scene id>.gpkg`` into.
        scene: Whose ground (default: scene ``a``).
        crs: The CRS to store them in (default: the scene's own); rasterized back onto
            the scene's 10 m grid in its CRS they give :func:`scene_classes` exactly.

    Returns:
        The file: fields ``class`` (int, 1-6) and ``label`` (the class name); no polygon
        where the scene has no data.
    """
    import geopandas as gpd
    from rasterio.features import shapes
    from shapely.geometry import shape

    classes = scene_classes(scene)
    found = [(shape(g), int(v)) for g, v in shapes(classes, classes > 0, transform=scene.transform())]
    names = {c.value: c.name for c in SCENE_CLASSES}
    frame = gpd.GeoDataFrame(
        {"class": np.asarray([v for _, v in found], np.int32), "label": [names[v] for _, v in found]},
        geometry=[g for g, _ in found],
        crs=scene.crs,
    )
    out = tmp / f"labels-{scene.id}.gpkg"
    out.unlink(missing_ok=True)
    (frame if crs is None else frame.to_crs(crs)).to_file(out, driver="GPKG", layer="labels")
    return out
