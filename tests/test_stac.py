"""STAC Items written beside exported COGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform as transform_points
from test_cog import CLASSES, TRANSFORM, fill_layer, make_store

from segpipe.stages.export.cog import write_cog
from segpipe.stages.export.stac import (
    CLASSIFICATION_EXTENSION,
    COG_MEDIA_TYPE,
    PROJECTION_EXTENSION,
    stac_bands,
    stac_classes,
    stac_item,
    stac_item_path,
    stac_json,
    write_stac_item,
)
from segpipe.types import ClassInfo, Grid


def test_item_of_a_classes_cog(tmp_path: Path) -> None:
    store = tmp_path / "region.zarr"
    make_store(store, 300, 200, block=128)
    fill_layer(store, "classes", np.full((300, 200), 3, np.uint8))
    out = write_cog(store, tmp_path / "classes.tif")
    path = stac_item_path(out)
    assert path == tmp_path / "classes.stac.json"
    item = json.loads(path.read_text())
    assert item["type"] == "Feature" and item["stac_version"] == "1.1.0"
    assert set(item["stac_extensions"]) == {CLASSIFICATION_EXTENSION, PROJECTION_EXTENSION}
    assert item["id"] == "region-classes"
    props = item["properties"]
    assert props["proj:code"] == "EPSG:32617"
    assert props["proj:shape"] == [300, 200]
    assert props["proj:transform"] == list(TRANSFORM)[:6]
    assert props["proj:bbox"] == [500000.0, 4000000.0 - 30 * 300, 500000.0 + 30 * 200, 4000000.0]
    assert props["datetime"].endswith("Z")
    asset = item["assets"]["data"]
    assert asset["href"] == "./classes.tif" and asset["type"] == COG_MEDIA_TYPE and asset["roles"] == ["data"]
    assert asset["classification:classes"] == [
        {"value": 1, "name": "forest", "title": "forest", "description": "forest", "color_hint": "1F7A1F"},
        {"value": 3, "name": "water", "title": "water", "description": "water", "color_hint": "1F77B4"},
        {"value": 7, "name": "urban", "title": "urban", "description": "urban", "color_hint": "D62728"},
    ]
    assert asset["bands"] == [
        {"name": "classes", "description": "classes", "data_type": "uint8", "nodata": 255}
    ]
    # geometry and bbox in WGS 84: the corners of the grid, transformed
    xs = [500000.0, 506000.0, 506000.0, 500000.0]
    ys = [4000000.0, 4000000.0, 3991000.0, 3991000.0]
    lon, lat = transform_points("EPSG:32617", "EPSG:4326", xs, ys)
    ring = item["geometry"]["coordinates"][0]
    assert item["geometry"]["type"] == "Polygon" and ring[0] == ring[-1]
    for corner in zip(lon, lat, strict=True):
        assert min(np.hypot(p[0] - corner[0], p[1] - corner[1]) for p in ring) < 1e-9
    west, south, east, north = item["bbox"]
    assert west == pytest.approx(min(lon), abs=1e-6) and east == pytest.approx(max(lon), abs=1e-6)
    assert south == pytest.approx(min(lat), abs=1e-6) and north == pytest.approx(max(lat), abs=1e-6)
    assert all(west - 1e-9 <= p[0] <= east + 1e-9 and south - 1e-9 <= p[1] <= north + 1e-9 for p in ring)


def test_class_names_become_machine_names() -> None:
    classes = [ClassInfo(2, "bare soil / rock", "#8c564b"), ClassInfo(4, "  ", "#000000")]
    assert [c["name"] for c in stac_classes(classes)] == ["bare_soil_rock", "class_4"]
    assert stac_classes(classes)[0]["title"] == "bare soil / rock"


def test_item_without_crs_and_with_a_custom_crs() -> None:
    grid = Grid("", (1.0, 0.0, 0.0, 0.0, -1.0, 10.0), 10, 10)
    item = stac_item("x.tif", grid, "confidence", [])
    assert item["geometry"] is None and "bbox" not in item
    assert item["properties"]["proj:code"] is None
    assert CLASSIFICATION_EXTENSION not in item["stac_extensions"]
    custom = CRS.from_proj4(
        "+proj=aea +lat_1=31.25 +lat_2=44.75 +lat_0=23.5 +lon_0=-95.5 +ellps=GRS80 +units=m"
    )
    grid = Grid(custom.to_wkt(), tuple(Affine(30, 0, 0, 0, -30, 1e6))[:6], 100, 100)  # type: ignore[arg-type]
    item = stac_item("x.tif", grid, "classes", [], classes=CLASSES)
    assert item["properties"]["proj:code"] is None and "PROJCRS" in item["properties"]["proj:wkt2"]
    assert -97 < item["bbox"][0] < item["bbox"][2] < -95


def test_band_objects_and_item_text() -> None:
    assert stac_bands(("red", "nir"), "uint16", 0) == [
        {"name": "red", "description": "red", "data_type": "uint16", "nodata": 0},
        {"name": "nir", "description": "nir", "data_type": "uint16", "nodata": 0},
    ]
    assert stac_bands(("b1",), "float32", float("nan"))[0]["nodata"] == "nan"  # JSON has no NaN
    assert "nodata" not in stac_bands(("b1",), "float32", None)[0]
    grid = Grid("", (1.0, 0.0, 0.0, 0.0, -1.0, 10.0), 10, 10)
    item = stac_item("x.tif", grid, "image", stac_bands(("b1",), "uint8", 255))
    assert item["assets"]["data"]["roles"] == ["data", "visual"]
    text = stac_json(item)
    assert text.endswith("}\n") and json.loads(text) == item and text.startswith('{\n  "type"')


def test_write_stac_item_is_beside_the_cog(tmp_path: Path) -> None:
    item = {"type": "Feature", "id": "x"}
    path = write_stac_item(tmp_path / "x.tif", item)
    assert path == tmp_path / "x.stac.json" and json.loads(path.read_text()) == item
    assert [p.name for p in tmp_path.iterdir()] == ["x.stac.json"]
