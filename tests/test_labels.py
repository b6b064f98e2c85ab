"""Labels onto a region grid: rasters warped with nearest, polygons reprojected and burnt in."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize
from rasterio.transform import from_origin
from shapely.geometry import box

from segpipe.errors import LabelsError, MissingInputError
from segpipe.io.labels import check_overlap, label_classes, labels_window, open_labels
from segpipe.io.store import open_region
from segpipe.stages.ingest.driver import ingest
from segpipe.types import ClassInfo, Grid, default_colour

CRS = "EPSG:32617"
RES = 10.0
X0, Y0 = 500_000.0, 4_000_000.0
H, W = 60, 80
GRID = Grid(
    rasterio.crs.CRS.from_string(CRS).to_wkt(), (RES, 0.0, X0, 0.0, -RES, Y0), H, W
)
NC = Path(__file__).parent / "data" / "nc-landsat7"

# Squares in the image CRS, as (class, name, left col, top row, right col, bottom row).
SQUARES = [(1, "water", 5, 5, 25, 20), (4, "forest", 30, 10, 70, 50), (7, "urban", 2, 40, 20, 58)]


def square(c0: int, r0: int, c1: int, r1: int) -> object:
    return box(X0 + c0 * RES, Y0 - r1 * RES, X0 + c1 * RES, Y0 - r0 * RES)


def expected_squares() -> np.ndarray:
    return rasterize(
        [(square(*s[2:]), s[0]) for s in SQUARES],
        out_shape=(H, W), transform=from_origin(X0, Y0, RES, RES), dtype="uint8",
    )


def write_polygons(path: Path, crs: str = "EPSG:4326", **extra: list) -> Path:
    gdf = gpd.GeoDataFrame(
        {"class": [s[0] for s in SQUARES], "label": [s[1] for s in SQUARES], **extra},
        # Densified so the squares stay squares after the round trip through degrees.
        geometry=[square(*s[2:]).segmentize(RES / 4) for s in SQUARES],
        crs=CRS,
    ).to_crs(crs)
    gdf.to_file(path)
    return path


def write_image(path: Path) -> Path:
    data = np.random.default_rng(1).integers(1, 255, (2, H, W), dtype=np.uint8)
    with rasterio.open(
        path, "w", driver="GTiff", width=W, height=H, count=2, dtype="uint8",
        crs=CRS, transform=from_origin(X0, Y0, RES, RES), nodata=0,
    ) as ds:
        ds.write(data)
    return path


def test_polygons_in_other_crs_land_in_place(tmp_path: Path) -> None:
    src = open_labels(write_polygons(tmp_path / "labels.gpkg"))
    assert (src.kind, src.field) == ("vector", "class")
    got = labels_window(src, GRID, 0, 0, H, W)
    assert got.dtype == np.uint8 and got.shape == (H, W)
    assert (got == expected_squares()).mean() > 0.995
    # Windows reproduce the whole-grid result exactly, including edge windows.
    tiled = np.zeros_like(got)
    for y0 in range(0, H, 25):
        for x0 in range(0, W, 25):
            h, w = min(25, H - y0), min(25, W - x0)
            tiled[y0 : y0 + h, x0 : x0 + w] = labels_window(src, GRID, y0, x0, h, w)
    np.testing.assert_array_equal(tiled, got)


def test_polygon_classes_from_attributes(tmp_path: Path) -> None:
    path = write_polygons(tmp_path / "labels.geojson", colour=["#112233", None, "bad"])
    classes = label_classes(open_labels(path))
    assert classes == [
        ClassInfo(1, "water", "#112233"),
        ClassInfo(4, "forest", default_colour(4)),
        ClassInfo(7, "urban", default_colour(7)),
    ]


def test_ingest_polygons(tmp_path: Path) -> None:
    image = write_image(tmp_path / "image.tif")
    labels = write_polygons(tmp_path / "labels.gpkg", crs="EPSG:3857")
    info = ingest([image], tmp_path / "r.zarr", labels=labels, block_size=32)
    assert [(c.value, c.name) for c in info.classes] == [(1, "water"), (4, "forest"), (7, "urban")]
    stored = open_region(info.path)["labels"].values
    assert (stored == expected_squares()).mean() > 0.995


def test_field_selection_and_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="missing"):
        open_labels(tmp_path / "missing.shp")

    path = write_polygons(tmp_path / "a.gpkg", code=[1.0, 2.0, 3.0], frac=[0.5, 1.0, 2.0])
    assert open_labels(path).field == "class"
    assert open_labels(path, field="CODE").field == "code"  # float but integral
    with pytest.raises(LabelsError, match="available fields: class, label, code, frac"):
        open_labels(path, field="kind")
    # A text field: its distinct values, sorted, are the classes 1..N, named by the text.
    assert open_labels(path, field="label").names == ("forest", "urban", "water")
    with pytest.raises(LabelsError, match="'frac'"):
        open_labels(path, field="frac")

    gdf = gpd.GeoDataFrame({"kind": ["a"]}, geometry=[square(0, 0, 5, 5)], crs=CRS)
    gdf.to_file(tmp_path / "b.gpkg")
    with pytest.raises(LabelsError, match="label-field"):
        open_labels(tmp_path / "b.gpkg")


def test_polygon_values_checked_up_front(tmp_path: Path) -> None:
    geoms = [square(0, 0, 5, 5), square(10, 10, 20, 20)]
    gpd.GeoDataFrame({"value": [3, 255]}, geometry=geoms, crs=CRS).to_file(tmp_path / "bad.gpkg")
    with pytest.raises(LabelsError, match="255"):
        open_labels(tmp_path / "bad.gpkg")
    gpd.GeoDataFrame({"value": [3.0, None]}, geometry=geoms, crs=CRS).to_file(tmp_path / "null.gpkg")
    with pytest.raises(LabelsError, match="1 features have no 'value'"):
        open_labels(tmp_path / "null.gpkg")


def test_raster_same_grid_is_read_exactly(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(0, 6, (H + 10, W + 10), dtype=np.uint8)
    data[0, 0] = 200  # nodata -> unlabelled
    path = tmp_path / "lab.tif"
    # One pixel up and left of the grid: same lattice, shifted origin, larger extent.
    with rasterio.open(
        path, "w", driver="GTiff", width=W + 10, height=H + 10, count=1, dtype="uint8",
        crs=CRS, transform=from_origin(X0 - RES, Y0 + RES, RES, RES), nodata=200,
    ) as ds:
        ds.write(data[None])
        ds.write_colormap(1, {3: (10, 20, 30, 255)})
    src = open_labels(path)
    assert src.kind == "raster"
    np.testing.assert_array_equal(labels_window(src, GRID, 0, 0, H, W), data[1 : H + 1, 1 : W + 1])
    # Past the raster's edge: unlabelled.
    edge = labels_window(src, GRID, H - 5, W - 5, 20, 20)
    np.testing.assert_array_equal(edge[:14, :14], data[H - 4 : H + 10, W - 4 : W + 10])
    assert (edge[14:] == 0).all() and (edge[:, 14:] == 0).all()

    classes = label_classes(src)
    assert [c.value for c in classes] == [1, 2, 3, 4, 5]
    assert classes[2] == ClassInfo(3, "class 3", "#0a141e")
    assert label_classes(src, values=[0, 2]) == [ClassInfo(2, "class 2", default_colour(2))]


def test_raster_errors(tmp_path: Path) -> None:
    path = tmp_path / "two.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=4, height=4, count=2, dtype="uint8",
        crs=CRS, transform=from_origin(X0, Y0, RES, RES),
    ) as ds:
        ds.write(np.ones((2, 4, 4), np.uint8))
    with pytest.raises(LabelsError, match="2 bands"):
        open_labels(path)


def test_check_overlap(tmp_path: Path) -> None:
    near = write_polygons(tmp_path / "near.gpkg")
    check_overlap(open_labels(near), GRID)
    gdf = gpd.GeoDataFrame({"id": [1]}, geometry=[box(10, 50, 11, 51)], crs="EPSG:4326")  # Europe
    gdf.to_file(tmp_path / "far.gpkg")
    with pytest.raises(LabelsError, match="do not overlap the image"):
        check_overlap(open_labels(tmp_path / "far.gpkg"), GRID)


def test_nc_training_polygons_match_reference() -> None:
    with rasterio.open(NC / "image.tif") as ds:
        grid = Grid(ds.crs.to_wkt(), tuple(ds.transform)[:6], ds.height, ds.width)  # type: ignore[arg-type]
    with rasterio.open(NC / "labels_polygons_sparse.tif") as ds:
        reference = ds.read(1)
    src = open_labels(NC / "training_polygons.shp")
    assert src.field == "id"
    check_overlap(src, grid)
    got = labels_window(src, grid, 0, 0, grid.height, grid.width)
    assert (got == reference).mean() >= 0.99
    assert set(np.unique(got)) == set(range(8))
    assert [c.name for c in label_classes(src)] == [
        "developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment",
    ]
