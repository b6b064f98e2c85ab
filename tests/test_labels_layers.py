"""Labels as users have them: a layer per class, text class fields, a background value, one class."""

from __future__ import annotations

import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin
from test_labels import CRS, GRID, RES, SQUARES, X0, Y0, H, W, expected_squares, square, write_image

from segpipe.errors import LabelsError
from segpipe.io.labels import (
    SingleClassWarning,
    background_class,
    check_overlap,
    label_classes,
    labels_window,
    open_labels,
)
from segpipe.io.store import open_region
from segpipe.stages.ingest.driver import ingest

# The squares of test_labels, one class per layer, named as their classes are.
LAYERS = [s[1] for s in SQUARES]  # water, forest, urban: classes 1, 2, 3 in this order


def write_layers(path: Path, crs: str = "EPSG:4326") -> Path:
    """A GeoPackage with one layer per square, each named after its class, with a ``class`` field."""
    for value, name, *corners in SQUARES:
        # Densified so the squares stay squares after the round trip through degrees.
        gpd.GeoDataFrame(
            {"class": [value]}, geometry=[shapely.segmentize(square(*corners), RES / 4)], crs=CRS
        ).to_crs(crs).to_file(path, layer=name)
    return path


def by_layer_order() -> np.ndarray:
    """The expected squares with class values renumbered 1..N in layer order."""
    lut = np.zeros(256, np.uint8)
    for i, s in enumerate(SQUARES):
        lut[s[0]] = i + 1
    out: np.ndarray = lut[expected_squares()]
    return out


def write_mask(path: Path, data: np.ndarray, res: float = RES, nodata: float | None = None) -> Path:
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1, dtype="uint8",
        crs=CRS, transform=from_origin(X0, Y0, res, res), nodata=nodata,
    ) as ds:
        ds.write(data[None])
    return path


def test_every_layer_is_a_class_named_after_it(tmp_path: Path) -> None:
    path = write_layers(tmp_path / "classes.gpkg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pyogrio "more than one layer" warning
        src = open_labels(path)
        classes = label_classes(src)
    assert src.layers == tuple(LAYERS) and src.field is None
    assert [(c.value, c.name) for c in classes] == [(1, "water"), (2, "forest"), (3, "urban")]
    check_overlap(src, GRID)
    got = labels_window(src, GRID, 0, 0, H, W)
    assert (got == by_layer_order()).mean() > 0.995
    np.testing.assert_array_equal(labels_window(src, GRID, 10, 20, 30, 40), got[10:40, 20:60])


def test_one_layer_chosen_by_name(tmp_path: Path) -> None:
    path = write_layers(tmp_path / "classes.gpkg", crs=CRS)
    src = open_labels(path, layer="forest")
    assert (src.layer, src.field) == ("forest", "class")
    got = labels_window(src, GRID, 0, 0, H, W)
    assert set(np.unique(got)) == {0, 4}
    np.testing.assert_array_equal(got == 4, expected_squares() == 4)
    with pytest.warns(SingleClassWarning, match="single class"):
        assert [c.value for c in label_classes(src)] == [4]


def test_layer_errors_name_the_file_and_its_layers(tmp_path: Path) -> None:
    path = write_layers(tmp_path / "classes.gpkg")
    with pytest.raises(LabelsError, match=r"no layer 'roads'.*layers: water, forest, urban") as err:
        open_labels(path, layer="roads")
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(LabelsError, match=r"3 layers \(water, forest, urban\).*--label-layer"):
        open_labels(path, field="class")
    with pytest.raises(LabelsError, match=r"layer 'forest'.*no field 'code'; available fields: class"):
        open_labels(path, layer="forest", field="code")
    gpd.GeoDataFrame(geometry=[square(0, 0, 5, 5)], crs=CRS).to_file(tmp_path / "bare.gpkg")
    with pytest.raises(LabelsError, match=r"bare\.gpkg have no attribute field.*a layer of its own"):
        open_labels(tmp_path / "bare.gpkg")


def test_attribute_table_beside_one_layer_is_ignored(tmp_path: Path) -> None:
    # One spatial layer and an attribute-only table, as GeoPackages from QGIS often have.
    gpd.GeoDataFrame({"class": [7]}, geometry=[square(2, 40, 20, 58)], crs=CRS).to_file(
        tmp_path / "mixed.gpkg", layer="urban"
    )
    pyogrio.write_dataframe(gpd.pd.DataFrame({"note": ["x"]}), tmp_path / "mixed.gpkg", layer="notes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src = open_labels(tmp_path / "mixed.gpkg")
        assert (src.layer, src.field, src.layers) == ("urban", "class", ())
        check_overlap(src, GRID)
    assert set(np.unique(labels_window(src, GRID, 0, 0, H, W))) == {0, 7}


def test_text_field_values_become_named_classes(tmp_path: Path) -> None:
    gdf = gpd.GeoDataFrame(
        {"kind": [s[1] for s in SQUARES]}, geometry=[square(*s[2:]) for s in SQUARES], crs=CRS
    )
    gdf.to_file(tmp_path / "text.gpkg")
    src = open_labels(tmp_path / "text.gpkg", field="kind")
    assert src.names == ("forest", "urban", "water")  # sorted
    assert [(c.value, c.name) for c in label_classes(src)] == [(1, "forest"), (2, "urban"), (3, "water")]
    lut = np.zeros(256, np.uint8)
    lut[[1, 4, 7]] = [3, 1, 2]  # water, forest, urban as their sorted text ranks
    np.testing.assert_array_equal(labels_window(src, GRID, 0, 0, H, W), lut[expected_squares()])
    # A text ``class`` field is picked by default when no integer candidate exists.
    gdf.rename(columns={"kind": "class"}).to_file(tmp_path / "auto.gpkg")
    assert open_labels(tmp_path / "auto.gpkg").names == ("forest", "urban", "water")


def test_integer_field_named_by_text_class_field(tmp_path: Path) -> None:
    gpd.GeoDataFrame(
        {"code": [s[0] for s in SQUARES], "class": [s[1] for s in SQUARES]},
        geometry=[square(*s[2:]) for s in SQUARES], crs=CRS,
    ).to_file(tmp_path / "coded.gpkg")
    src = open_labels(tmp_path / "coded.gpkg", field="code")
    assert src.names == ()
    assert [(c.value, c.name) for c in label_classes(src)] == [(1, "water"), (4, "forest"), (7, "urban")]
    # Without --label-field, ``code`` is no candidate: the text ``class`` gives the classes.
    assert open_labels(tmp_path / "coded.gpkg").names == ("forest", "urban", "water")
    gpd.GeoDataFrame(
        {"code": [1, 4, 7], "class": ["a", "b", "c"], "frac": [0.5, 1.5, 2.0]},
        geometry=[square(*s[2:]) for s in SQUARES], crs=CRS,
    ).to_file(tmp_path / "frac.gpkg")
    with pytest.raises(LabelsError, match=r"'frac'.*neither integer class values nor text.*: code, class$"):
        open_labels(tmp_path / "frac.gpkg", field="frac")


def test_background_value_of_a_mask(tmp_path: Path) -> None:
    mask = np.zeros((H, W), np.uint8)
    mask[10:30, 20:50] = 1
    path = write_mask(tmp_path / "mask.tif", mask)
    with pytest.warns(SingleClassWarning, match="--background-value"):
        assert [c.value for c in label_classes(open_labels(path))] == [1]

    src = open_labels(path, background_value=0)
    assert (src.background, src.background_class) == (0, 2)  # the lowest value the mask does not use
    got = labels_window(src, GRID, 0, 0, H, W)
    np.testing.assert_array_equal(got, np.where(mask == 1, 1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SingleClassWarning)
        classes = label_classes(src)
    assert [(c.value, c.name) for c in classes] == [(1, "class 1"), (2, "background")]
    assert background_class(src) == classes[1] and background_class(open_labels(path)) is None


def test_background_value_through_a_warp_and_as_nodata(tmp_path: Path) -> None:
    # A 5 m mask half the grid's size: warped (nearest); past its edge stays unlabelled,
    # and its 0s are background even though 0 is also its nodata value.
    mask = np.zeros((H, W), np.uint8)
    mask[:, W // 2 :] = 3
    path = write_mask(tmp_path / "fine.tif", mask, res=RES / 2, nodata=0)
    src = open_labels(path, background_value=0)
    assert src.background_class == 1
    got = labels_window(src, GRID, 0, 0, H, W)
    expected = np.zeros((H, W), np.uint8)
    expected[: H // 2, : W // 2] = np.where(np.arange(W // 2) < W // 4, 1, 3)[None, :]
    np.testing.assert_array_equal(got, expected)
    # A background value 1-254 keeps its value and is named.
    src = open_labels(path, background_value=3)
    assert src.background_class == 3
    with pytest.warns(SingleClassWarning, match="add labels of the other classes"):
        assert [(c.value, c.name) for c in label_classes(src, values=[3])] == [(3, "background")]


def test_background_value_of_polygons(tmp_path: Path) -> None:
    gpd.GeoDataFrame(
        {"value": [0, 5]}, geometry=[square(0, 0, 40, 60), square(40, 0, 80, 60)], crs=CRS
    ).to_file(tmp_path / "bg.gpkg")
    with pytest.warns(SingleClassWarning):
        label_classes(open_labels(tmp_path / "bg.gpkg"))
    src = open_labels(tmp_path / "bg.gpkg", background_value=0)
    assert src.background_class == 1
    got = labels_window(src, GRID, 0, 0, H, W)
    assert (got[:, :40] == 1).all() and (got[:, 40:] == 5).all()
    assert [(c.value, c.name) for c in label_classes(src)] == [(1, "background"), (5, "class 5")]
    gpd.GeoDataFrame({"class": ["a"]}, geometry=[square(0, 0, 5, 5)], crs=CRS).to_file(tmp_path / "t.gpkg")
    with pytest.raises(LabelsError, match="background value applies to integer class values"):
        open_labels(tmp_path / "t.gpkg", background_value=0)


def test_ingest_layers_and_single_class_warning(tmp_path: Path) -> None:
    image = write_image(tmp_path / "image.tif")
    info = ingest([image], tmp_path / "r.zarr", labels=write_layers(tmp_path / "l.gpkg"), block_size=32)
    assert [(c.value, c.name) for c in info.classes] == [(1, "water"), (2, "forest"), (3, "urban")]
    assert (open_region(info.path)["labels"].values == by_layer_order()).mean() > 0.995

    mask = np.zeros((H, W), np.uint8)
    mask[5:25, 5:25] = 1
    with pytest.warns(SingleClassWarning, match="single class"):
        one = ingest([image], tmp_path / "m.zarr", labels=write_mask(tmp_path / "m.tif", mask), block_size=32)
    assert [c.value for c in one.classes] == [1]


def test_training_on_a_single_class_warns_naming_the_store() -> None:
    from segpipe.stages.train.sampling import label_classes as training_classes

    with pytest.warns(SingleClassWarning, match=r"region store s\.zarr hold a single class \(4\)"):
        classes, _ = training_classes(np.array([4]), (), store="s.zarr")
    assert [c.value for c in classes] == [4]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SingleClassWarning)
        training_classes(np.array([1, 4]), (), store="s.zarr")
