"""The real nc-landsat7 scene as one COG per band with a STAC Item: ingested through STAC it
gives the single-file image's store and the same accuracy (issue 15, deliverable 6)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import rasterio.shutil
from rasterio.warp import transform_bounds

from segpipe.io.store import open_region
from segpipe.stages.ingest.driver import ingest
from segpipe.stages.train import train, train_config

DATA = Path(__file__).parent / "data" / "nc-landsat7"
FOREST = {"arch": "random_forest", "trees": 8, "seed": 0}


def _band_cogs(tmp: Path) -> pystac.Item:
    """Each band of image.tif as a COG, and a STAC Item with one asset per band."""
    with rasterio.open(DATA / "image.tif") as src:
        profile, names = src.profile, [d or f"band{i}" for i, d in enumerate(src.descriptions, start=1)]
        west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        for i in range(1, src.count + 1):
            band = tmp / f"{names[i - 1]}.tif"
            with rasterio.open(tmp / "one.tif", "w", **{**profile, "count": 1}) as one:
                one.write(src.read(i), 1)
            rasterio.shutil.copy(tmp / "one.tif", band, driver="COG")
    geometry = {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north],
                                                    [west, north], [west, south]]]}
    when = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    item = pystac.Item("nc-landsat7", geometry, [west, south, east, north], when, {})
    for name in names:
        item.add_asset(name, pystac.Asset(str(tmp / f"{name}.tif"), media_type=pystac.MediaType.COG,
                                          roles=["data"], extra_fields={"bands": [{"name": name}]}))
    item.save_object(dest_href=str(tmp / "item.json"), include_self_link=False)
    return item


def test_landsat_bands_through_stac_give_the_single_file_store_and_accuracy(tmp_path: Path) -> None:
    item = _band_cogs(tmp_path)
    labels = DATA / "labels_polygons_sparse.tif"
    single = ingest(DATA / "image.tif", tmp_path / "single.zarr", labels=labels, block_size=256)
    # Bilinear, the default: on the image's own grid GDAL's warper gives the pixels back as they are.
    stac = ingest(tmp_path / "item.json", tmp_path / "stac.zarr", labels=labels, block_size=256)
    assert stac.band_names == tuple(item.assets)
    assert (stac.height, stac.width, stac.transform) == (single.height, single.width, single.transform)
    a, b = open_region(tmp_path / "single.zarr"), open_region(tmp_path / "stac.zarr")
    np.testing.assert_array_equal(a.image.values, b.image.values)
    np.testing.assert_array_equal(a.labels.values, b.labels.values)
    scores = [train(store, tmp_path / f"rf-{name}", train_config(**FOREST)).metrics["miou"]
              for name, store in (("single", tmp_path / "single.zarr"), ("stac", tmp_path / "stac.zarr"))]
    assert scores[0] == pytest.approx(scores[1], abs=0.02)
