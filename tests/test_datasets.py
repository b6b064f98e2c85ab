"""The real labelled scenes under tests/data: one grid, documented classes, licence, and a fair split.

Each folder's README.md is the contract the benchmarks read: the class values in its
``labels.tif`` row, the split column in "Train on image columns `x < N`", and (where given)
a per-side pixel count table. These tests hold the files to it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import rasterio

DATA = Path(__file__).parent / "data"
FOLDERS = sorted(p for p in DATA.iterdir() if (p / "labels.tif").exists())
LICENCE_NAMES = ("CC BY-SA", "CC BY", "CC0", "ODbL", "Apache", "MIT", "GPL", "public domain")


def readme(folder: Path) -> str:
    return (folder / "README.md").read_text(encoding="utf-8")


def split_x(folder: Path) -> int:
    found = re.search(r"Train on image columns `x < (\d+)`", readme(folder))
    assert found, f"{folder.name}: README states no split as 'Train on image columns `x < N`'"
    return int(found.group(1))


def documented_classes(folder: Path) -> set[int]:
    """Class values named in the README's labels.tif row (after its first colon), plus 0."""
    rows = [line for line in readme(folder).splitlines() if line.startswith("| `labels.tif`")]
    assert len(rows) == 1, f"{folder.name}: README needs one '| `labels.tif` |' row in its file table"
    text = rows[0].split(":", 1)[1]
    values = {int(v) for v in re.findall(r"(?<![\w.])(\d+) [a-z]", text)}
    assert values, f"{folder.name}: no 'value name' pairs in the labels.tif row"
    return values | {0}


def read_labels(folder: Path) -> np.ndarray:
    with rasterio.open(folder / "labels.tif") as ds:
        assert ds.count == 1 and ds.dtypes[0] == "uint8"
        labels: np.ndarray = ds.read(1)
        return labels


def test_every_known_scene_is_found() -> None:
    # The benchmarks name these three; a renamed folder would silently drop out of the checks.
    assert {"nc-landsat7", "spacenet4-atlanta", "s2-brandenburg"} <= {p.name for p in FOLDERS}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_image_and_labels_share_one_georeferenced_grid(folder: Path) -> None:
    with rasterio.open(folder / "image.tif") as image, rasterio.open(folder / "labels.tif") as labels:
        assert image.crs is not None and image.crs.is_projected
        assert image.crs == labels.crs
        assert image.transform == labels.transform
        assert (image.width, image.height) == (labels.width, labels.height)
        assert image.profile.get("tiled") and image.compression is not None


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_labels_hold_only_documented_values(folder: Path) -> None:
    present = set(np.unique(read_labels(folder)).tolist())
    documented = documented_classes(folder)
    assert present <= documented, f"undocumented label values {sorted(present - documented)}"
    # and every documented class is really there: a README must not promise a missing class
    assert documented - {0} <= present


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_readme_names_a_licence_and_a_source_package(folder: Path) -> None:
    text = readme(folder)
    assert re.search(r"licen[cs]e", text, re.IGNORECASE)
    assert any(name in text for name in LICENCE_NAMES), "no licence named"
    assert re.search(r"`[A-Za-z][\w.-]*==[\w.]+`", text), "no source package pinned as `name==version`"
    licence_files = [p for p in folder.iterdir() if re.search(r"licen[cs]e", p.name, re.IGNORECASE)]
    assert licence_files, "no licence text file beside the data"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_every_class_occurs_on_both_sides_of_the_split(folder: Path) -> None:
    labels = read_labels(folder)
    x = split_x(folder)
    assert 0 < x < labels.shape[1]
    left, right = labels[:, :x], labels[:, x:]
    for value in sorted(documented_classes(folder) - {0}):
        assert (left == value).any(), f"class {value} missing left of x = {x}"
        assert (right == value).any(), f"class {value} missing right of x = {x}"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_split_table_counts_match_the_labels(folder: Path) -> None:
    rows = re.findall(r"^\| (\d+) [^|]+\| ([\d,]+) \| ([\d,]+) \|$", readme(folder), re.MULTILINE)
    if not rows:
        pytest.skip("this README has no per-side count table")
    labels = read_labels(folder)
    x = split_x(folder)
    for value, left, right in rows:
        assert int(left.replace(",", "")) == int((labels[:, :x] == int(value)).sum())
        assert int(right.replace(",", "")) == int((labels[:, x:] == int(value)).sum())


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_scene_stays_small(folder: Path) -> None:
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 10 * 2**20
