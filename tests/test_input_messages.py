"""Malformed classes files and vector labels: a named error whose one line names the file and the fix.

Library calls check the error class and the message; a few cases run the ``segpipe``
command in-process to check exit code 2, one ``error:`` line and no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from cli_support import run_inprocess
from rasterio.transform import from_origin

from segpipe.errors import InputError, LabelsError
from segpipe.io.labels import open_labels
from segpipe.types import ClassInfo, read_classes_file

CRS = "EPSG:32617"
ORIGIN = (500000.0, 4000000.0)


def write_raster(path: Path, data: np.ndarray) -> Path:
    """A small GeoTIFF on a fixed UTM grid (10 m pixels)."""
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
        dtype=data.dtype, crs=CRS, transform=from_origin(*ORIGIN, 10, 10),
    ) as dst:
        dst.write(data)
    return path


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def assert_names(exc: pytest.ExceptionInfo[BaseException], path: Path, *words: str) -> None:
    """The message is one line naming the file and holding each of ``words``."""
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message, message


def run_cli(
    args: list[object], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str]:
    """Run ``segpipe`` in-process: its exit code and stderr."""
    outcome = run_inprocess([str(a) for a in args], capsys, monkeypatch)
    return outcome.code, outcome.stderr


def assert_one_error_line(code: int, stderr: str, culprit: str) -> str:
    """Exit code 2, exactly one ``error:`` line naming the culprit, no traceback."""
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert code == 2, stderr
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    assert culprit in errors[0]
    return errors[0]


# --- classes files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ([1, 2], ("class entry 1", "not an object", '"value": 1')),
        ({"classes": [{"value": "two", "name": "x"}]}, ("class entry 1", '"two"', "integers 1-254")),
        ({"classes": [{"name": "water"}]}, ("class entry 1", '{"name": "water"}', 'no "value"', "1-254")),
        ([{"value": 1, "name": "a"}, {"value": 1, "name": "b"}], ("entries 1 and 2", "value 1", "its own")),
        ([{"value": 1, "colour": "notacolour"}], ("class entry 1", '"notacolour"', "#rrggbb")),
        ([{"value": 1.5}], ("class entry 1", "value 1.5", "integers 1-254")),
        ([{"value": 2}, {"value": 300}], ("class entry 2", "value 300", "integers 1-254")),
        ([{"value": True}], ("class entry 1", "value true", "integers 1-254")),
        ({"value": 1.5}, ("holds no list of classes", '{"classes": [')),
    ],
    ids=["not-objects", "text-value", "no-value", "repeated", "bad-colour", "fraction", "too-large", "bool",
         "no-list"],
)
def test_malformed_classes_file(tmp_path: Path, content: object, words: tuple[str, ...]) -> None:
    path = write_json(tmp_path / "my_classes.json", content)
    with pytest.raises(InputError) as exc:
        read_classes_file(path)
    assert_names(exc, path, *words)


def test_classes_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "binary.json"
    path.write_bytes(b"\x8d\xff\x00{")
    with pytest.raises(InputError) as exc:
        read_classes_file(path)
    assert_names(exc, path, "not valid JSON")


def test_classes_file_shapes_still_read(tmp_path: Path) -> None:
    """Every shape accepted before: a list or ``{"classes": [...]}``, ``color``, no colour or name,
    integral numbers and decimal strings as values."""
    entries = [{"value": "3", "name": "c", "color": "#00ff00"}, {"value": 2.0, "colour": None}, {"value": 1}]
    expected = [
        ClassInfo(1, "class 1", "#d62728"), ClassInfo(2, "class 2", "#e8c547"), ClassInfo(3, "c", "#00ff00")
    ]
    assert read_classes_file(write_json(tmp_path / "list.json", entries)) == expected
    assert read_classes_file(write_json(tmp_path / "dict.json", {"classes": entries})) == expected


def test_cli_malformed_classes_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = write_raster(tmp_path / "image.tif", np.full((3, 32, 32), 100, np.uint16))
    two_classes = (np.arange(32 * 32) % 2 + 1).reshape(1, 32, 32).astype(np.uint8)
    labels = write_raster(tmp_path / "labels.tif", two_classes)
    classes = write_json(tmp_path / "bad_classes.json", {"classes": [{"value": "two", "name": "x"}]})
    args = ["ingest", image, "--out", tmp_path / "s.zarr", "--labels", labels, "--classes", classes]
    code, stderr = run_cli(args, capsys, monkeypatch)
    line = assert_one_error_line(code, stderr, str(classes))
    assert "integers 1-254" in line
    assert not (tmp_path / "s.zarr").exists()


# --- vector labels -------------------------------------------------------------------------------


@pytest.fixture
def truncated_geojson(tmp_path: Path) -> Path:
    path = tmp_path / "bad.geojson"
    path.write_text('{"type": "FeatureCollection", "features": [\n')
    return path


@pytest.fixture
def empty_geojson(tmp_path: Path) -> Path:
    return write_json(tmp_path / "empty.geojson", {"type": "FeatureCollection", "features": []})


def test_unreadable_geojson_names_the_file(truncated_geojson: Path) -> None:
    with pytest.raises(LabelsError) as exc:
        open_labels(truncated_geojson)
    assert_names(exc, truncated_geojson, "cannot be read as polygons", "GeoJSON")


@pytest.mark.parametrize("field", [None, "value"])
def test_empty_geojson_holds_no_polygons(empty_geojson: Path, field: str | None) -> None:
    with pytest.raises(LabelsError) as exc:
        open_labels(empty_geojson, field)
    assert_names(exc, empty_geojson, "hold no polygons")
    assert "field" not in str(exc.value)


def test_empty_geopackage_says_the_same(tmp_path: Path, empty_geojson: Path) -> None:
    """The GeoPackage and GeoJSON paths share one check: the same words, here already at open."""
    path = tmp_path / "empty.gpkg"
    frame = gpd.GeoDataFrame({"value": pd.Series([], dtype="int32")}, geometry=gpd.GeoSeries([], crs=CRS))
    frame.to_file(path, driver="GPKG")
    with pytest.raises(LabelsError) as gpkg:
        open_labels(path)
    assert_names(gpkg, path, "hold no polygons")
    with pytest.raises(LabelsError) as geojson:
        open_labels(empty_geojson)
    assert str(gpkg.value).replace(str(path), "X") == str(geojson.value).replace(str(empty_geojson), "X")


@pytest.mark.parametrize(
    ("reference", "words"),
    [("truncated_geojson", "cannot be read as polygons"), ("empty_geojson", "hold no polygons")],
)
def test_cli_evaluate_bad_reference(
    tmp_path: Path,
    reference: str,
    words: str,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path: Path = request.getfixturevalue(reference)
    prediction = write_raster(tmp_path / "pred.tif", np.ones((1, 32, 32), np.uint8))
    code, stderr = run_cli(
        ["evaluate", prediction, "--reference", path, "--out", tmp_path / "report"], capsys, monkeypatch
    )
    assert words in assert_one_error_line(code, stderr, str(path))
