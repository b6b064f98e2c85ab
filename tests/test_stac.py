"""STAC Items written beside exported COGs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
import zarr
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform as transform_points
from stac_schemas import COLLECTION_SCHEMA, ITEM_SCHEMA, check_item, validate_offline
from test_cog import CLASSES, TRANSFORM, fill_layer, make_store

from segpipe.errors import InputError, MissingInputError
from segpipe.stages.export.cog import write_cog
from segpipe.stages.export.collection import write_collection
from segpipe.stages.export.lineage import Lineage
from segpipe.stages.export.stac import (
    CLASSIFICATION_EXTENSION,
    COG_MEDIA_TYPE,
    FILE_EXTENSION,
    PROJECTION_EXTENSION,
    RASTER_EXTENSION,
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
    data = np.full((300, 200), 3, np.uint8)
    data[:100, :50], data[-1, -7:] = 1, 255  # 5000 forest, 7 nodata
    fill_layer(store, "classes", data)
    out = write_cog(store, tmp_path / "classes.tif")
    path = stac_item_path(out)
    assert path == tmp_path / "classes.stac.json"
    item = json.loads(path.read_text())
    extensions = [PROJECTION_EXTENSION, CLASSIFICATION_EXTENSION, RASTER_EXTENSION, FILE_EXTENSION]
    assert validate_offline(item) == [ITEM_SCHEMA, *extensions]  # the official schemas, offline
    assert item["type"] == "Feature" and item["stac_version"] == "1.1.0"
    assert item["id"] == "region-classes"
    props = item["properties"]
    assert props["proj:code"] == "EPSG:32617"
    assert props["proj:shape"] == [300, 200]
    assert props["proj:transform"] == list(TRANSFORM)[:6]
    assert props["proj:bbox"] == [500000.0, 4000000.0 - 30 * 300, 500000.0 + 30 * 200, 4000000.0]
    # the store records no acquisition time: the export time, and the Item says so
    assert props["datetime"].endswith("Z") and props["datetime"] == props["created"]
    assert props["segpipe:datetime"].startswith("export time")
    assert [(link["rel"], link["href"]) for link in item["links"]] == [("derived_from", str(store.resolve()))]
    asset = item["assets"]["data"]
    assert asset["href"] == "./classes.tif" and asset["type"] == COG_MEDIA_TYPE and asset["roles"] == ["data"]
    assert asset["classification:classes"] == [
        {"value": 1, "name": "forest", "title": "forest", "description": "forest", "color_hint": "1F7A1F"},
        {"value": 3, "name": "water", "title": "water", "description": "water", "color_hint": "1F77B4"},
        {"value": 7, "name": "urban", "title": "urban", "description": "urban", "color_hint": "D62728"},
    ]
    (band,) = asset["bands"]
    assert {k: band[k] for k in ("name", "description", "data_type", "nodata")} == {
        "name": "classes", "description": "classes", "data_type": "uint8", "nodata": 255}
    valid = data[data != 255].astype(float)
    stats = band["statistics"]
    assert (stats["minimum"], stats["maximum"]) == (1, 3)
    assert stats["mean"] == pytest.approx(valid.mean()) and stats["stddev"] == pytest.approx(valid.std())
    assert stats["valid_percent"] == pytest.approx(100 * valid.size / data.size, abs=1e-4)
    histogram = band["raster:histogram"]
    assert (histogram["count"], histogram["min"], histogram["max"]) == (256, -0.5, 255.5)
    assert histogram["buckets"][1] == 5000 and histogram["buckets"][3] == valid.size - 5000
    assert sum(histogram["buckets"]) == valid.size  # nodata is not counted
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert asset["file:size"] == out.stat().st_size and asset["file:checksum"] == "1220" + digest
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


def _dict(item: pystac.Item) -> dict[str, Any]:
    return item.to_dict(include_self_link=False, transform_hrefs=False)


def test_class_names_become_machine_names() -> None:
    classes = [ClassInfo(2, "bare soil / rock", "#8c564b"), ClassInfo(4, "  ", "#000000")]
    assert [c["name"] for c in stac_classes(classes)] == ["bare_soil_rock", "class_4"]
    assert stac_classes(classes)[0]["title"] == "bare soil / rock"


def test_item_without_crs_and_with_a_custom_crs() -> None:
    grid = Grid("", (1.0, 0.0, 0.0, 0.0, -1.0, 10.0), 10, 10)
    item = _dict(stac_item("x.tif", grid, "confidence", []))
    assert item["geometry"] is None and "bbox" not in item
    assert item["properties"]["proj:code"] is None
    assert CLASSIFICATION_EXTENSION not in item["stac_extensions"]
    custom = CRS.from_proj4(
        "+proj=aea +lat_1=31.25 +lat_2=44.75 +lat_0=23.5 +lon_0=-95.5 +ellps=GRS80 +units=m"
    )
    grid = Grid(custom.to_wkt(), tuple(Affine(30, 0, 0, 0, -30, 1e6))[:6], 100, 100)  # type: ignore[arg-type]
    item = _dict(stac_item("x.tif", grid, "classes", [], classes=CLASSES))
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
    assert item.assets["data"].roles == ["data", "visual"]
    text = stac_json(item)
    assert text.endswith("}\n") and json.loads(text) == _dict(item) and text.startswith('{\n  "type"')


def test_write_stac_item_is_beside_the_cog(tmp_path: Path) -> None:
    item = {"type": "Feature", "id": "x"}
    path = write_stac_item(tmp_path / "x.tif", item)
    assert path == tmp_path / "x.stac.json" and json.loads(path.read_text()) == item
    assert [p.name for p in tmp_path.iterdir()] == ["x.stac.json"]


def _item_with(lineage: Lineage, layer: str = "classes") -> dict[str, Any]:
    grid = Grid(CRS.from_epsg(32617).to_wkt(), tuple(TRANSFORM)[:6], 10, 10)  # type: ignore[arg-type]
    bands = stac_bands(("classes",), "uint8", 255)
    return _dict(stac_item("x.tif", grid, layer, bands, CLASSES, lineage=lineage))


def test_item_dates_the_imagery_and_links_inputs_and_model(tmp_path: Path) -> None:
    scene = tmp_path / "scene.stac.json"
    lineage = Lineage(start="2021-06-01T10:00:00Z", end="2021-06-03T10:00:00Z", sources=(str(scene), "s3://b/x.tif"),
                      store=str(tmp_path / "r.zarr"), model=str(tmp_path / "model"))
    item = _item_with(lineage)
    props = item["properties"]
    assert props["datetime"] is None  # an interval: STAC's null datetime with start and end
    assert props["start_datetime"] == "2021-06-01T10:00:00Z"
    assert props["end_datetime"] == "2021-06-03T10:00:00Z"
    assert "segpipe:datetime" not in props and props["created"] > "2026"
    assert [(link["rel"], link["href"]) for link in item["links"]] == [
        ("derived_from", str(scene)), ("derived_from", "s3://b/x.tif"),
        ("derived_from", str(tmp_path / "r.zarr")), ("via", str(tmp_path / "model" / "mlm.json")),
    ]
    assert validate_offline(item)[0] == ITEM_SCHEMA
    one = _item_with(Lineage(start="2021-06-01T10:00:00+00:00", end="2021-06-01T10:00:00+00:00"))
    assert one["properties"]["datetime"] == "2021-06-01T10:00:00Z"
    assert "start_datetime" not in one["properties"]
    assert _item_with(Lineage(datetime="2020-01-02"))["properties"]["datetime"] == "2020-01-02T00:00:00Z"


def test_the_schemas_refuse_a_broken_item() -> None:
    """The offline validation can fail: a colour hint the classification schema forbids."""
    item = _item_with(Lineage())
    item["assets"]["data"]["classification:classes"][0]["color_hint"] = "#1F7A1F"
    with pytest.raises(pystac.STACValidationError, match="classification"):
        validate_offline(item)
    del item["properties"]["datetime"]
    with pytest.raises(pystac.STACValidationError):
        validate_offline(item)


def test_item_of_a_confidence_cog_states_its_unit(tmp_path: Path) -> None:
    store = tmp_path / "region.zarr"
    make_store(store, 260, 300, block=128)
    fill_layer(store, "confidence", np.random.default_rng(3).integers(30, 101, (260, 300), dtype=np.uint8))
    item = check_item(write_cog(store, tmp_path / "confidence.tif", layer="confidence"))
    (band,) = item["assets"]["data"]["bands"]
    assert (band["unit"], band["raster:scale"], band["raster:offset"]) == ("percent", 1.0, 0.0)
    assert band["raster:histogram"]["buckets"][:30] == [0] * 30


def test_collection_of_a_batch(tmp_path: Path) -> None:
    items = []
    for i, (start, end) in enumerate([("2021-06-01", "2021-06-03"), ("2020-01-05", "2020-01-05")]):
        store = tmp_path / f"r{i}.zarr"
        make_store(store, 200, 150, block=128, transform=Affine(30, 0, 500000 + 9000 * i, 0, -30, 4000000))
        zarr.open_group(str(store), mode="r+").attrs["segpipe"] = {
            **zarr.open_group(str(store)).attrs["segpipe"], "acquired": {"start": start, "end": end}}
        fill_layer(store, "classes", np.full((200, 150), 1 + 2 * i, np.uint8))
        items.append(stac_item_path(write_cog(store, tmp_path / f"region{i}" / "classes.tif")))
    out = write_collection(items, tmp_path / "collection.json")
    data = json.loads(out.read_text())
    assert validate_offline(data) == [COLLECTION_SCHEMA]
    assert data["type"] == "Collection" and data["id"] == tmp_path.name
    assert [(link["rel"], link["href"]) for link in data["links"]] == [
        ("item", "./region0/classes.stac.json"), ("item", "./region1/classes.stac.json")]
    ((west, south, east, _north),) = data["extent"]["spatial"]["bbox"]
    boxes = [json.loads(p.read_text())["bbox"] for p in items]
    assert (west, east) == (boxes[0][0], boxes[1][2]) and south == min(b[1] for b in boxes)
    assert data["extent"]["temporal"]["interval"] == [["2020-01-05T00:00:00Z", "2021-06-03T00:00:00Z"]]
    assert data["summaries"] == {"segpipe:layer": ["classes"], "proj:code": ["EPSG:32617"]}
    with pytest.raises(MissingInputError, match="export the layer first"):
        write_collection([tmp_path / "nope.stac.json"], tmp_path / "c2.json")
    with pytest.raises(InputError, match="no STAC Item"):
        write_collection([], tmp_path / "c2.json")
    assert not (tmp_path / "c2.json").exists()
    item_bytes = items[0].read_bytes()
    with pytest.raises(InputError, match="is one of the Items"):  # it would overwrite its own input
        write_collection(items, items[0])
    assert items[0].read_bytes() == item_bytes
    with pytest.raises(InputError, match="give a list"):  # iterated letter by letter before
        write_collection(str(items[0]), tmp_path / "c3.json")
    with pytest.raises(InputError, match=r"region0 is a folder: name the Collection file"):
        write_collection(items, tmp_path / "region0")
    with pytest.raises(InputError, match="is given twice"):
        write_collection([items[0], items[1], items[0]], tmp_path / "c4.json")
