"""Polygons of the classes (segpipe.stages.export.vector) against whole-raster rasterio."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import geopandas as gpd
import jsonschema
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyogrio
import pyproj
import pytest
import rasterio.features
import rioxarray  # noqa: F401  (registers the .rio accessor)
import shapely
import zarr
from affine import Affine
from rasterio.crs import CRS
from referencing import Registry, Resource
from scipy import ndimage
from test_cog import fill_layer
from test_cog import make_store as make_cog_store

import segpipe.stages.export.vector_blocks as vector_blocks
import segpipe.stages.export.vector_parquet as vector_parquet
from segpipe.errors import InputError, MissingLayerError
from segpipe.io.store import read_region_info
from segpipe.stages.export.vector import VectorFormatError, sieve_threshold, write_vector
from segpipe.types import ClassInfo

if TYPE_CHECKING:
    from distributed import Client

CLASSES = (
    ClassInfo(1, "forest", "#1f7a1f"),
    ClassInfo(3, "water", "#1f77b4"),
    ClassInfo(5, "urban", "#d62728"),
)
TRANSFORM = Affine(30.0, 0.0, 500000.0, 0.0, -30.0, 4000000.0)
PIXEL_AREA = 900.0


def make_store(
    path: Path, classes: np.ndarray, block: int, confidence: np.ndarray | None = None,
    transform: Affine = TRANSFORM,
) -> Path:
    """A region store (test_cog's) holding ``classes`` (and ``confidence``), sharded by ``block``."""
    height, width = classes.shape
    make_cog_store(path, height, width, block, transform=transform, classes=CLASSES)
    fill_layer(path, "classes", classes)
    if confidence is not None:
        fill_layer(path, "confidence", confidence)
    return path


def scene(seed: int = 0, size: int = 300) -> np.ndarray:
    """Patches of 3 classes crossing 64-px block borders, speckle, nodata and unlabelled areas,
    a U that leaves and re-enters blocks, and patches that touch only diagonally."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(np.array([1, 3, 5], np.uint8), size=(size // 10 + 1, size // 10 + 1))
    classes = np.repeat(np.repeat(cells, 10, 0), 10, 1)[:size, :size].copy()
    speckle = rng.random((size, size)) < 0.02
    classes[speckle] = rng.choice(np.array([1, 3, 5], np.uint8), size=int(speckle.sum()))
    classes[200:260, 10:50] = 255
    classes[270:280, 100:190] = 0
    # A U of class 3 on class 1: down across the border at row 64, along row 150, back up across it.
    classes[30:170, 40:200] = 1
    classes[30:160, 50:60] = 3
    classes[150:160, 50:180] = 3
    classes[30:160, 170:180] = 3
    # Diagonal-only touches (separate patches under 4-connectivity), one at a block corner.
    classes[60:64, 60:64] = 5
    classes[64:68, 64:68] = 5
    classes[100, 100] = classes[101, 101] = classes[100, 102] = 5
    # A checkerboard straddling the corner of four blocks.
    yy, xx = np.mgrid[120:136, 120:136]
    classes[120:136, 120:136] = np.where((yy + xx) % 2 == 0, 1, 5)
    return classes


def whole_raster(classes: np.ndarray, transform: Affine = TRANSFORM) -> list[tuple[int, shapely.Geometry]]:
    """What rasterio gives on the whole raster at once: (class, polygon) per patch, 0 and 255 skipped."""
    valid = (classes != 0) & (classes != 255)
    return [
        (int(value), shapely.geometry.shape(geom))
        for geom, value in rasterio.features.shapes(classes, mask=valid, connectivity=4, transform=transform)
    ]


Polygons = list[tuple[int, shapely.Geometry]]
Region = tuple[Path, np.ndarray, np.ndarray]  # store, classes, confidence


def assert_same_polygons(ours: Polygons, theirs: Polygons) -> None:
    """One of ours equal (shapely.equals, same class) to each of theirs, and nothing else."""
    assert len(ours) == len(theirs)
    geoms = np.array([g for _, g in ours], dtype=object)
    tree = shapely.STRtree(geoms)
    matched: set[int] = set()
    for value, geom in theirs:
        near = [int(i) for i in tree.query(geom, predicate="covers")]
        hits = [i for i in near if ours[i][0] == value and shapely.equals(ours[i][1], geom)]
        assert len(hits) == 1, f"class {value} polygon at {geom.representative_point()}: {len(hits)} matches"
        matched.add(hits[0])
    assert len(matched) == len(ours)


def read_back(path: Path) -> list[tuple[int, shapely.Geometry]]:
    frame = pyogrio.read_dataframe(path, layer="classes")
    return list(zip(frame["class"].astype(int), frame.geometry, strict=True))


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Region:
    """A 300 x 300 store in 64-px blocks (5 x 5 blocks), with a confidence layer."""
    classes = scene()
    rng = np.random.default_rng(1)
    confidence = rng.integers(30, 101, classes.shape).astype(np.uint8)
    confidence[rng.random(classes.shape) < 0.05] = 255
    store = make_store(tmp_path_factory.mktemp("vec") / "region.zarr", classes, 64, confidence)
    return store, classes, confidence


def test_polygons_equal_whole_raster_shapes(region: Region, tmp_path: Path) -> None:
    store, classes, _ = region
    assert read_region_info(store).blocks == (5, 5)
    out = write_vector(store, tmp_path / "classes.gpkg")
    assert out == tmp_path / "classes.gpkg"
    ours, theirs = read_back(out), whole_raster(classes)
    assert len(theirs) > 500  # speckle: many patches, many cut by block borders
    assert_same_polygons(ours, theirs)
    assert all(g.geom_type == "Polygon" and g.is_valid for _, g in ours)
    # The U (one patch crossing the row-64 border twice) and the diagonal touches (separate).
    u_shape = [g for v, g in ours if v == 3 and g.contains(shapely.Point(TRANSFORM * (55, 100)))]
    assert len(u_shape) == 1 and u_shape[0].contains(shapely.Point(TRANSFORM * (175, 100)))
    corner = [g for v, g in ours if v == 5 and g.intersects(shapely.Point(TRANSFORM * (64, 64)))]
    assert len(corner) == 2 and all(g.area == 16 * PIXEL_AREA for g in corner)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.gpkg"]


def test_attributes_names_area_and_mean_confidence(
    region: Region, tmp_path: Path
) -> None:
    store, classes, confidence = region
    frame = pyogrio.read_dataframe(write_vector(store, tmp_path / "c.gpkg"), layer="classes")
    names = {c.value: c.name for c in CLASSES}
    assert (frame["class_name"] == frame["class"].map(names)).all()
    np.testing.assert_allclose(frame["area"], frame.geometry.area)
    # Each patch's mean confidence, from a whole-raster labelling of its pixels.
    inverse = ~TRANSFORM
    for row in frame.sample(200, random_state=0).itertuples():
        col, line = (int(v) for v in inverse * row.geometry.representative_point().coords[0])
        labels, _ = ndimage.label(classes == classes[line, col])
        inside = (labels == labels[line, col]) & (confidence != 255)
        assert row.area == (labels == labels[line, col]).sum() * PIXEL_AREA
        assert row.mean_confidence == pytest.approx(confidence[inside].mean() if inside.any() else np.nan,
                                                    nan_ok=True)


def test_geoparquet_holds_the_same_features_and_valid_metadata(
    region: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, classes, _ = region
    gpkg = pyogrio.read_dataframe(write_vector(store, tmp_path / "c.gpkg"), layer="classes")
    # Small row groups: the file is streamed in several, as a large region's would be.
    monkeypatch.setattr(vector_parquet, "ROW_GROUP", 100)
    out = write_vector(store, tmp_path / "c.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gpkg", "c.parquet"]
    frame = gpd.read_parquet(out)  # geopandas checks the GeoParquet metadata as it reads
    assert frame.crs.to_epsg() == 32617 and list(frame.columns) == list(gpkg.columns)
    assert len(frame) == len(gpkg) == len(whole_raster(classes))
    pd.testing.assert_frame_equal(pd.DataFrame(frame.drop(columns="geometry")),
                                  pd.DataFrame(gpkg.drop(columns="geometry")))
    assert shapely.equals(frame.geometry.values, gpkg.geometry.values).all()
    meta = pq.ParquetFile(out)
    assert meta.metadata.num_row_groups > 1
    geo = json.loads(meta.metadata.metadata[b"geo"])  # the file's key-value metadata, as the spec puts it
    column = geo["columns"]["geometry"]
    assert (geo["version"], geo["primary_column"], column["encoding"]) == ("1.1.0", "geometry", "WKB")
    assert column["geometry_types"] == ["Polygon"]
    assert pyproj.CRS.from_json_dict(column["crs"]).to_epsg() == 32617
    np.testing.assert_allclose(column["bbox"], frame.total_bounds)
    _validate_geoparquet(geo)


def _validate_geoparquet(geo: dict[str, Any]) -> None:
    """The metadata against the GeoParquet 1.1.0 JSON schema bundled in tests/data (offline)."""
    data = Path(__file__).parent / "data"
    schema = json.loads((data / "geoparquet-1.1.0.schema.json").read_text())
    projjson = json.loads((data / "stac-schemas/proj.org/schemas/v0.7/projjson.schema.json").read_text())
    registry = Registry().with_resource(  # the CRS's PROJJSON schema, bundled: never fetched
        "https://proj.org/schemas/v0.7/projjson.schema.json", Resource.from_contents(projjson))
    validator = jsonschema.Draft7Validator(schema, registry=registry)
    validator.validate(geo)
    column = geo["columns"]["geometry"]
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**geo, "columns": {"geometry": {**column, "encoding": "SVG"}}})
    with pytest.raises(jsonschema.ValidationError):  # the PROJJSON of the CRS is checked too
        validator.validate({**geo, "columns": {"geometry": {**column, "crs": {"type": "x"}}}})


def test_crs_fields_and_layer_read_back(region: Region, tmp_path: Path) -> None:
    store, _, _ = region
    out = write_vector(store, tmp_path / "c.gpkg")
    info = pyogrio.read_info(out, layer="classes")
    assert pyogrio.list_layers(out)[:, 0].tolist() == ["classes"]
    assert CRS.from_user_input(info["crs"]) == CRS.from_epsg(32617)
    assert info["geometry_type"] == "Polygon"
    assert dict(zip(info["fields"], info["dtypes"], strict=True)) == {
        "class": "int32", "class_name": "object", "area": "float64", "mean_confidence": "float64"
    }


def test_min_area_equals_whole_raster_sieve(
    region: Region, tmp_path: Path, client: Client
) -> None:
    store, classes, _ = region
    valid = (classes != 0) & (classes != 255)
    for pixels in (2, 7, 40, 150):
        sieved = rasterio.features.sieve(classes, pixels, mask=valid, connectivity=4)
        # Sieving each 64-px block on its own gives another raster (patches cut small by borders).
        per_block = classes.copy()
        for y0 in range(0, 300, 64):
            for x0 in range(0, 300, 64):
                window = np.s_[y0 : y0 + 64, x0 : x0 + 64]
                per_block[window] = rasterio.features.sieve(classes[window], pixels, mask=valid[window])
        assert (per_block != sieved).any()
        out = tmp_path / f"s{pixels}.gpkg"
        write_vector(store, out, min_area=pixels * PIXEL_AREA - 1, client=client)
        assert_same_polygons(read_back(out), whole_raster(sieved))


@pytest.mark.parametrize("seed", range(4))
def test_tiny_blocks_random_rasters(seed: int, tmp_path: Path) -> None:
    """Blocks of 8 px on noisy 45 x 37 rasters: most patches are cut, many several times.

    Odd seeds use a grid of 1/3-unit pixels at an odd origin: vertices still equal GDAL's to the bit.
    """
    transform = TRANSFORM if seed % 2 == 0 else Affine(1 / 3, 0.0, -71.123456789, 0.0, -1 / 3, 45.987654321)
    rng = np.random.default_rng(seed)
    classes = rng.choice(np.array([1, 3, 5, 255], np.uint8), p=[0.4, 0.3, 0.25, 0.05], size=(45, 37))
    classes = np.where(rng.random(classes.shape) < 0.6, np.repeat(classes[::3], 3, 0)[:45], classes)
    store = make_store(tmp_path / "r.zarr", classes, 8, transform=transform)
    ours = read_back(write_vector(store, tmp_path / "r.gpkg"))
    assert_same_polygons(ours, whole_raster(classes, transform))
    valid = classes != 255
    sieved = rasterio.features.sieve(classes, 6, mask=valid, connectivity=4)
    out = write_vector(store, tmp_path / "s.gpkg", min_area=6 * abs(transform.determinant))
    assert_same_polygons(read_back(out), whole_raster(sieved, transform))
    assert pyogrio.read_dataframe(out)["mean_confidence"].isna().all()  # no confidence layer


def test_simplify_keeps_one_valid_polygon_per_patch(
    region: Region, tmp_path: Path
) -> None:
    store, classes, _ = region
    exact = pyogrio.read_dataframe(write_vector(store, tmp_path / "e.gpkg"))
    simple = pyogrio.read_dataframe(write_vector(store, tmp_path / "s.gpkg", simplify=45.0))
    assert len(simple) == len(exact) == len(whole_raster(classes))
    assert simple.geometry.is_valid.all() and (simple.geometry.geom_type == "Polygon").all()
    assert shapely.get_num_coordinates(simple.geometry.values).sum() < shapely.get_num_coordinates(
        exact.geometry.values
    ).sum()
    assert (simple["area"] == exact["area"]).all()  # the patch's pixel area, not the outline's


def test_sieve_threshold_in_pixels(region: Region) -> None:
    info = read_region_info(region[0])
    assert sieve_threshold(None, info) == 0
    assert sieve_threshold(900.0, info) == 1
    assert sieve_threshold(901.0, info) == 2
    assert sieve_threshold(4500.0, info) == 5
    with pytest.raises(InputError, match="--min-area -1"):
        sieve_threshold(-1.0, info)


def test_bad_destinations_are_refused_with_one_line(
    region: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, _ = region
    with pytest.raises(VectorFormatError) as caught:
        write_vector(store, tmp_path / "classes.shp")
    message = str(caught.value)
    assert "\n" not in message and "classes.shp" in message and ".gpkg" in message and ".parquet" in message
    assert isinstance(caught.value, InputError)
    with pytest.raises(InputError, match="is a folder"):
        write_vector(store, tmp_path)
    with pytest.raises(InputError, match="--simplify -2"):
        write_vector(store, tmp_path / "x.gpkg", simplify=-2.0)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_the_earlier_file(
    region: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, _ = region
    out = write_vector(store, tmp_path / "classes.gpkg")
    before = out.read_bytes()
    calls = {"n": 0}
    real = vector_blocks.polygonize_block

    def fail_on_the_ninth(*args: object) -> object:
        calls["n"] += 1
        if calls["n"] == 9:
            raise OSError("disk went away")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr("segpipe.stages.export.vector.polygonize_block", fail_on_the_ninth)
    with pytest.raises(OSError, match="disk went away"):
        write_vector(store, out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["classes.gpkg"]


def test_nothing_classified_and_missing_layer(tmp_path: Path) -> None:
    store = make_store(tmp_path / "empty.zarr", np.full((70, 90), 255, np.uint8), 64)
    out = write_vector(store, tmp_path / "empty.gpkg")
    assert pyogrio.read_info(out, layer="classes")["features"] == 0
    empty = gpd.read_parquet(write_vector(store, tmp_path / "empty.parquet"))
    assert len(empty) == 0 and empty.crs.to_epsg() == 32617
    bare = make_store(tmp_path / "bare.zarr", np.ones((10, 10), np.uint8), 64)
    zarr.open_group(str(bare), mode="r+").__delitem__("classes")
    with pytest.raises(MissingLayerError, match="no 'classes' layer: run 'segpipe predict' first"):
        write_vector(bare, tmp_path / "bare.gpkg")
    assert not (tmp_path / "bare.gpkg").exists()


def test_the_export_command_writes_polygons_on_a_cluster_and_refuses_in_one_line(
    region: Region, tmp_path: Path, client: Client
) -> None:
    import subprocess
    import sys

    import segpipe

    store, classes, _ = region
    segpipe_cli = str(Path(sys.executable).parent / "segpipe")
    out = tmp_path / "p.gpkg"
    command = [segpipe_cli, "export", str(store), "--vector", str(out)]
    done = subprocess.run([*command, "--scheduler", client.scheduler.address], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout + done.stderr and not (tmp_path / "p.tif").exists()  # no COG asked
    assert_same_polygons(read_back(out), whole_raster(classes))
    api = segpipe.polygons(store, tmp_path / "api.gpkg", min_area=7 * PIXEL_AREA)
    assert 0 < len(read_back(api)) < len(read_back(out))  # the sieve merged small patches away
    for extra, needle in ((["--min-area", "5"], "apply to --vector"), ([], "give --out OUT.tif")):
        refused = subprocess.run([segpipe_cli, "export", str(store), *extra], capture_output=True, text=True,
                                 timeout=120)
        errors = [line for line in refused.stderr.splitlines() if line.strip()]
        assert refused.returncode != 0 and len(errors) == 1 and needle in errors[0], refused.stderr
