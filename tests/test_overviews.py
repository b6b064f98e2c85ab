"""Mode overviews built while a class raster streams."""

from __future__ import annotations

import math
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling

from segpipe.grid.box import Box, iter_boxes
from segpipe.stages.export import overviews
from segpipe.stages.export.geotiff import open_overview_level
from segpipe.stages.export.overviews import (
    BandFeed,
    ModePyramid,
    level_paths,
    mode2x2,
    overview_shapes,
    source_spans,
)


def _spans(src: int, dst: int) -> list[tuple[int, int]]:
    """GDAL's source span of each overview pixel, written out as overview.cpp does it."""
    ratio = src / dst
    spans = []
    for i in range(dst):
        start = int(i * ratio + 1e-8)
        end = max(math.ceil((i + 1) * ratio - 1e-8), start + 1)
        spans.append((start, min(end, src)))
    return spans


def brute_mode(a: np.ndarray) -> np.ndarray:
    """GDAL's byte MODE, pixel by pixel: a value wins when its running count beats the best so far."""
    h, w = -(-a.shape[0] // 2), -(-a.shape[1] // 2)
    out = np.zeros((h, w), np.uint8)
    for i, (y0, y1) in enumerate(_spans(a.shape[0], h)):
        for j, (x0, x1) in enumerate(_spans(a.shape[1], w)):
            counts: Counter[int] = Counter()
            best, winner = 0, 255
            for v in a[y0:y1, x0:x1].ravel():
                if v != 255:
                    counts[int(v)] += 1
                    if counts[int(v)] > best:
                        best, winner = counts[int(v)], int(v)
            out[i, j] = winner
    return out


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (1, 5), (13, 1), (5, 3)])
def test_mode2x2_against_brute_force(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        a = rng.choice(np.array([1, 2, 3, 255], np.uint8), size=shape)
        np.testing.assert_array_equal(mode2x2(a, 255), brute_mode(a))


@pytest.mark.parametrize("shape", [(9, 23), (6, 16), (5, 7)])
def test_mode_in_strips_equals_the_whole_band(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int]
) -> None:
    # Bands are computed STRIP output columns at a time (memory); strips of 1-3 columns,
    # odd widths included (GDAL's spans overlap there), give the same pixels.
    rng = np.random.default_rng(shape[1])
    a = rng.choice(np.array([1, 2, 3, 255], np.uint8), size=shape)
    expected = brute_mode(a)
    for strip in (1, 2, 3):
        monkeypatch.setattr(overviews, "STRIP", strip)
        np.testing.assert_array_equal(mode2x2(a, 255), expected)


def test_ties_go_to_the_value_that_reached_the_top_count_first() -> None:
    # cells, row-major: 5 3 / 3 5 -> 3 reaches 2 first; 7 7 / 7 2 -> 7; 255 255 / 255 9 -> 9;
    # 1 2 / 2 1 -> 2 (not the smallest); 4 9 / 255 255 -> 4 (the first of a 1-1 tie)
    a = np.array([[5, 3, 7, 7, 255, 255, 1, 2, 4, 9], [3, 5, 7, 2, 255, 9, 2, 1, 255, 255]], np.uint8)
    np.testing.assert_array_equal(mode2x2(a, 255), [[3, 7, 9, 2, 4]])


def test_odd_axes_use_gdal_overlapping_spans() -> None:
    assert [tuple(map(int, s)) for s in zip(*source_spans(7, 4), strict=True)] == [
        (0, 2),
        (1, 4),
        (3, 6),
        (5, 7),
    ]
    assert [tuple(map(int, s)) for s in zip(*source_spans(8, 4), strict=True)] == [
        (0, 2),
        (2, 4),
        (4, 6),
        (6, 8),
    ]


def _gdal_levels(path: Path, data: np.ndarray, levels: int) -> list[np.ndarray]:
    """GDAL's own MODE overviews of ``data`` (GDALBuildOverviews, the code behind gdaladdo)."""
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=data.shape[0],
        width=data.shape[1],
        count=1,
        dtype="uint8",
        nodata=255,
    ) as dst:
        dst.write(data, 1)
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews([2**k for k in range(1, levels + 1)], Resampling.mode)
    out = []
    for level in range(levels):
        with rasterio.open(path, overview_level=level) as src:
            out.append(src.read(1))
    return out


def _tied_classes(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random classes 1-4 with nodata: about a third of the 2 x 2 cells hold a tie."""
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([1, 2, 3, 4, 255], np.uint8), size=shape, p=[0.3, 0.3, 0.2, 0.1, 0.1])


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
@pytest.mark.parametrize("shape", [(600, 520), (603, 517), (37, 1), (1, 41), (70, 2)])
def test_streamed_levels_equal_gdal_mode_overviews(tmp_path: Path, shape: tuple[int, int]) -> None:
    data = _tied_classes(shape, sum(shape))
    shapes = overview_shapes(*shape, 8)[:2]
    gdal = _gdal_levels(tmp_path / "gdal.tif", data, len(shapes))
    pyramid = ModePyramid(level_paths(tmp_path / "ours.tif", 2), shapes, 255, open_overview_level, base=shape)
    for y0 in range(0, shape[0], 100):
        pyramid.push(data[y0 : y0 + 100], last=y0 + 100 >= shape[0])
    pyramid.close()
    smallest_rule = mode2x2_smallest(data)
    assert (smallest_rule != gdal[0]).mean() > 0.01  # the data does hold ties the rules break apart
    for level, (path, expected) in enumerate(zip(pyramid.paths, gdal, strict=True)):
        with rasterio.open(path) as src:
            ours = src.read(1)
        np.testing.assert_array_equal(ours, expected, err_msg=f"level {level + 1}")


def mode2x2_smallest(a: np.ndarray) -> np.ndarray:
    """The old rule (ties to the smallest value) on 2 x 2 cells, to show the test data has ties."""
    h, w = -(-a.shape[0] // 2), -(-a.shape[1] // 2)
    out = np.zeros((h, w), np.uint8)
    for i in range(h):
        for j in range(w):
            counts = Counter(int(v) for v in a[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].ravel() if v != 255)
            top = max(counts.values(), default=0)
            out[i, j] = min((v for v, c in counts.items() if c == top), default=255)
    return out


@pytest.mark.skipif(shutil.which("gdaladdo") is None, reason="gdal-bin (gdaladdo) is not installed")
def test_level_one_equals_the_gdaladdo_command(tmp_path: Path) -> None:
    data = _tied_classes((300, 260), 3)
    path = tmp_path / "cmd.tif"
    with rasterio.open(
        path, "w", driver="GTiff", height=300, width=260, count=1, dtype="uint8", nodata=255
    ) as dst:
        dst.write(data, 1)
    subprocess.run(["gdaladdo", "-q", "-r", "mode", str(path), "2", "4"], check=True)
    with rasterio.open(path, overview_level=0) as src:
        np.testing.assert_array_equal(mode2x2(data, 255), src.read(1))
    with rasterio.open(path, overview_level=1) as src:
        np.testing.assert_array_equal(mode2x2(mode2x2(data, 255), 255), src.read(1))


def test_overview_shapes_follow_gdal_halving() -> None:
    assert overview_shapes(1500, 1300, 512) == [(750, 650), (375, 325)]
    assert overview_shapes(512, 100, 512) == []
    assert overview_shapes(32768, 32768, 512) == [(32768 >> k, 32768 >> k) for k in range(1, 7)]


def test_pyramid_from_bands_equals_iterated_mode(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.choice(np.array([1, 2, 3, 4, 255], np.uint8), size=(1203, 1111), p=[0.4, 0.3, 0.1, 0.1, 0.1])
    shapes = overview_shapes(*base.shape, 128)
    paths = [tmp_path / f"l{i}.tif" for i in range(len(shapes))]
    pyramid = ModePyramid(paths, shapes, 255, open_overview_level, base=base.shape)
    for y0 in range(0, base.shape[0], 300):  # bands of 300 rows: even, then an odd last band
        pyramid.push(base[y0 : y0 + 300], last=y0 + 300 >= base.shape[0])
    pyramid.close()
    expected = base
    for path, shape in zip(paths, shapes, strict=True):
        expected = brute_mode(expected) if expected.size < 5000 else mode2x2(expected, 255)
        with rasterio.open(path) as src:
            assert src.shape == shape
            np.testing.assert_array_equal(src.read(1), expected)


def test_level_paths_sit_beside_the_base(tmp_path: Path) -> None:
    base = tmp_path / ".x.tif.1-abcdef12.stream.tif"
    assert level_paths(base, 2) == [
        tmp_path / ".x.tif.1-abcdef12.stream.ovr1.tif",
        tmp_path / ".x.tif.1-abcdef12.stream.ovr2.tif",
    ]
    assert level_paths(base, 0) == []


def test_band_feed_of_streamed_windows_equals_pushing_whole_bands(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    height, width = 700, 530
    base = rng.choice(np.array([1, 2, 3, 255], np.uint8), size=(height, width))
    shapes = overview_shapes(height, width, 128)
    fed = ModePyramid(
        level_paths(tmp_path / "fed.tif", len(shapes)), shapes, 255, open_overview_level, base=base.shape
    )
    feed = BandFeed(fed, height, width, rows=256)
    for box in iter_boxes(height, width, 256):  # row-major windows, cut short at the edges
        feed.add(box, base[box.slices])
    feed.close()
    whole = ModePyramid(
        level_paths(tmp_path / "whole.tif", len(shapes)), shapes, 255, open_overview_level, base=base.shape
    )
    for y0 in range(0, height, 256):
        whole.push(base[y0 : y0 + 256], last=y0 + 256 >= height)
    whole.close()
    for a, b in zip(fed.paths, whole.paths, strict=True):
        with rasterio.open(a) as fa, rasterio.open(b) as fb:
            np.testing.assert_array_equal(fa.read(1), fb.read(1))


def test_band_feed_raises_a_level_error_at_the_window_that_completes_the_band(tmp_path: Path) -> None:
    class Failing(ModePyramid):
        def push(self, rows: np.ndarray, last: bool, level: int = 0) -> None:
            raise OSError("disk full")

        def close(self) -> None:
            closed.append(True)

    closed: list[bool] = []
    feed = BandFeed(Failing([], [], 255, open_overview_level, base=(10, 20)), 10, 20, rows=10)
    feed.add(Box(0, 0, 10, 10), np.ones((10, 10), np.uint8))  # half a band: nothing pushed yet
    with pytest.raises(OSError, match="disk full"):
        feed.add(Box(0, 10, 10, 20), np.ones((10, 10), np.uint8))
    feed.close()
    assert closed == [True]
