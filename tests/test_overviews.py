"""Mode overviews built while a class raster streams."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio

from segpipe.grid.box import Box, iter_boxes
from segpipe.stages.export.geotiff import open_overview_level
from segpipe.stages.export.overviews import BandFeed, ModePyramid, level_paths, mode2x2, overview_shapes


def brute_mode(a: np.ndarray) -> np.ndarray:
    h, w = -(-a.shape[0] // 2), -(-a.shape[1] // 2)
    out = np.zeros((h, w), np.uint8)
    for i in range(h):
        for j in range(w):
            values = [int(v) for v in a[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].ravel() if v != 255]
            if not values:
                out[i, j] = 255
                continue
            counts = Counter(values)
            best = max(counts.values())
            out[i, j] = min(v for v, c in counts.items() if c == best)
    return out


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (1, 5), (13, 1)])
def test_mode2x2_against_brute_force(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        a = rng.choice(np.array([1, 2, 3, 255], np.uint8), size=shape)
        np.testing.assert_array_equal(mode2x2(a, 255), brute_mode(a))


def test_ties_nodata_and_majorities() -> None:
    a = np.array([[5, 3, 7, 7, 255, 255], [3, 5, 7, 2, 255, 9]], np.uint8)
    np.testing.assert_array_equal(mode2x2(a, 255), [[3, 7, 9]])


def test_overview_shapes_follow_gdal_halving() -> None:
    assert overview_shapes(1500, 1300, 512) == [(750, 650), (375, 325)]
    assert overview_shapes(512, 100, 512) == []
    assert overview_shapes(32768, 32768, 512) == [(32768 >> k, 32768 >> k) for k in range(1, 7)]


def test_pyramid_from_bands_equals_iterated_mode(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.choice(np.array([1, 2, 3, 4, 255], np.uint8), size=(1203, 1111), p=[0.4, 0.3, 0.1, 0.1, 0.1])
    shapes = overview_shapes(*base.shape, 128)
    paths = [tmp_path / f"l{i}.tif" for i in range(len(shapes))]
    pyramid = ModePyramid(paths, shapes, 255, open_overview_level)
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
    fed = ModePyramid(level_paths(tmp_path / "fed.tif", len(shapes)), shapes, 255, open_overview_level)
    feed = BandFeed(fed, height, width, rows=256)
    for box in iter_boxes(height, width, 256):  # row-major windows, cut short at the edges
        feed.add(box, base[box.slices])
    feed.finish()
    feed.close()
    whole = ModePyramid(level_paths(tmp_path / "whole.tif", len(shapes)), shapes, 255, open_overview_level)
    for y0 in range(0, height, 256):
        whole.push(base[y0 : y0 + 256], last=y0 + 256 >= height)
    whole.close()
    for a, b in zip(fed.paths, whole.paths, strict=True):
        with rasterio.open(a) as fa, rasterio.open(b) as fb:
            np.testing.assert_array_equal(fa.read(1), fb.read(1))


def test_band_feed_close_waits_for_the_band_in_flight(tmp_path: Path) -> None:
    class Slow(ModePyramid):
        def push(self, rows: np.ndarray, last: bool, level: int = 0) -> None:
            import time

            time.sleep(0.2)
            raise OSError("disk full")

        def close(self) -> None:
            closed.append(True)

    closed: list[bool] = []
    feed = BandFeed(Slow([], [], 255, open_overview_level), 10, 10, rows=10)
    feed.add(Box(0, 0, 10, 10), np.ones((10, 10), np.uint8))
    feed.close()  # waits, keeps the band's error for finish, closes the levels
    assert closed == [True]
    with pytest.raises(OSError, match="disk full"):
        feed.finish()
