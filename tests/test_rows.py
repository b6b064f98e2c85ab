"""RowSlab: window rows served from a rolling slab, each stored row read once, values unchanged."""

from __future__ import annotations

import numpy as np

from segpipe.grid.box import Box
from segpipe.stages.predict.rows import RowSlab

RASTER = (700, 300)


def _reader(image: np.ndarray, reads: list[Box]):
    def read(box: Box) -> tuple[np.ndarray, np.ndarray]:
        reads.append(box)
        pixels = image[(slice(None), *box.slices)].astype(np.float32) / 7.0
        return pixels, pixels[0] > 0.5

    return read


def test_overlapping_window_rows_read_each_row_once_and_match_direct_reads() -> None:
    image = np.random.default_rng(0).random((3, *RASTER))
    reads: list[Box] = []
    direct = _reader(image, [])
    slab = RowSlab(_reader(image, reads), align=64, height=RASTER[0])
    for y0 in range(10, 600, 48):  # 96-px windows every 48 px, starting off the chunk grid
        box = Box(y0, 20, min(y0 + 96, RASTER[0]), 280)
        got, want = slab(box), direct(box)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    rows = [r for box in reads for r in range(box.y0, box.y1)]
    assert len(rows) == len(set(rows))  # no row read twice
    assert all(box.y1 % 64 == 0 or box.y1 == RASTER[0] for box in reads)  # reads end on chunk edges
    assert all(box.x0 == 20 and box.x1 == 280 for box in reads)
    # The slab holds at most the last window row and the chunk rows it reaches into.
    assert slab._pixels.shape[1] <= 96 + 64


def test_other_columns_or_rows_above_start_a_new_slab() -> None:
    image = np.random.default_rng(1).random((2, *RASTER))
    reads: list[Box] = []
    slab = RowSlab(_reader(image, reads), align=64, height=RASTER[0])
    slab(Box(100, 0, 200, 150))
    pixels, _ = slab(Box(120, 10, 220, 150))  # other columns
    assert reads[-1] == Box(120, 10, 256, 150)
    assert np.array_equal(pixels, image[:, 120:220, 10:150].astype(np.float32) / 7.0)
    pixels, _ = slab(Box(50, 10, 100, 150))  # above the slab: read again
    assert reads[-1] == Box(50, 10, 128, 150)
    assert np.array_equal(pixels, image[:, 50:100, 10:150].astype(np.float32) / 7.0)


def test_returned_rows_stay_valid_after_the_slab_moves_on() -> None:
    image = np.random.default_rng(2).random((1, *RASTER))
    slab = RowSlab(_reader(image, []), align=32, height=RASTER[0])
    first, _ = slab(Box(0, 0, 64, 300))
    kept = first.copy()
    for y0 in range(32, 640, 32):
        slab(Box(y0, 0, y0 + 64, 300))
    assert np.array_equal(first, kept)
