"""Blend modes, the row accumulator, the batch queue and test-time augmentation, on numpy 'networks'."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segpipe.errors import InputError
from segpipe.grid.box import Box
from segpipe.grid.tiling import BLEND_MODES, halo_bounds, mirror_index, take_runs
from segpipe.stages.predict.blend import (
    BatchQueue,
    BlendStats,
    RowAccumulator,
    blend_rows,
    blend_windows,
    tta_forward,
)


def _identity(batch: np.ndarray) -> np.ndarray:
    return batch


def _blocked(image: np.ndarray, forward, tile: int, overlap: int, block: int,  # type: ignore[no-untyped-def]
             mode: str, batch_size: int = 3) -> np.ndarray:
    _, height, width = image.shape
    valid = np.ones((height, width), dtype=bool)
    out = np.zeros((0, height, width), dtype=np.float32)
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            block_box = Box.sized(y0, x0, min(block, height - y0), min(block, width - x0))
            box = halo_bounds(block_box, (height, width), tile, tile - overlap)
            probs, _ = blend_windows(image[(slice(None), *box.slices)], valid[box.slices], forward, tile,
                                     overlap, (box.y0, box.x0), (height, width), block_box, batch_size,
                                     True, mode)
            if out.shape[0] == 0:
                out = np.zeros((probs.shape[0], height, width), dtype=np.float32)
            out[(slice(None), *block_box.slices)] = probs
    return out


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 80), st.integers(1, 80), st.sampled_from([16, 32]), st.integers(0, 15),
       st.integers(5, 50), st.sampled_from(BLEND_MODES))
def test_identity_holds_in_every_mode(height: int, width: int, tile: int, overlap: int, block: int,
                                      mode: str) -> None:
    image = np.random.default_rng(5).random((2, height, width)).astype(np.float32)
    np.testing.assert_allclose(_blocked(image, _identity, tile, overlap, block, mode), image, atol=1e-5)


def _contextual(batch: np.ndarray) -> np.ndarray:
    mean = batch.mean(axis=(2, 3), keepdims=True)
    return np.tanh(batch - mean + 0.1 * np.roll(batch, 3, axis=3))


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_every_mode_is_bitwise_independent_of_the_blocking(mode: str) -> None:
    image = np.random.default_rng(3).random((2, 101, 77)).astype(np.float32)
    a = _blocked(image, _contextual, 32, 10, 17, mode)
    np.testing.assert_array_equal(a, _blocked(image, _contextual, 32, 10, 45, mode))
    np.testing.assert_array_equal(a, _blocked(image, _contextual, 32, 10, 200, mode))


def _coordinates(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.stack([yy, xx])


def _offset_per_window(batch: np.ndarray) -> np.ndarray:
    """A constant in [-10, 10] per window, keyed by its global position (coordinate bands)."""
    c = np.sin(batch[:, 0, 0, 0] * 12.9898 + batch[:, 1, 0, 0] * 78.233) * 10.0
    return np.broadcast_to(c[:, None, None, None], (batch.shape[0], 1, *batch.shape[2:])).copy()


def _largest_step(out: np.ndarray) -> float:
    return float(max(np.abs(np.diff(out, axis=0)).max(), np.abs(np.diff(out, axis=1)).max()))


def test_only_tapered_blends_hide_window_borders() -> None:
    height, width, tile, overlap = 120, 90, 32, 12
    coords = _coordinates(height, width)
    # A cosine ramp changes a pixel's weights by at most pi / overlap per pixel and axis,
    # so neighbours differ by at most (range of the constants) * pi / overlap.
    bound = 20.0 * np.pi / overlap
    steps = {mode: _largest_step(_blocked(coords, _offset_per_window, tile, overlap, 50, mode)[0])
             for mode in BLEND_MODES}
    assert steps["cosine"] <= bound
    # Uniform averaging and overlap-and-discard jump where a window starts or ends:
    # the same oracle fails them, so it can fail.
    assert steps["mean"] > bound
    assert steps["crop"] > 1.5 * bound


def test_rows_come_back_before_the_box_is_read() -> None:
    height, width, tile, overlap = 300, 40, 32, 8
    image = np.random.default_rng(0).random((1, height, width)).astype(np.float32)
    valid = np.ones((height, width), dtype=bool)
    reads: list[Box] = []

    def read(b: Box) -> tuple[np.ndarray, np.ndarray]:
        reads.append(b)
        return image[:, b.y0 : b.y1, b.x0 : b.x1], valid[b.y0 : b.y1, b.x0 : b.x1]

    bands = []
    for band in blend_rows(read, _identity, tile, overlap, (height, width), Box(0, 0, height, width), 2):
        bands.append((len(reads), band))
    # Rolling: the first rows are finished after 2 window rows of 13, and together the
    # bands cover the box once, top to bottom, reproducing the input.
    assert bands[0][0] <= 2 and len(bands) > 5
    assert [b.y0 for _, b in bands] == sorted(b.y0 for _, b in bands)
    out = np.concatenate([b.probs for _, b in bands if b.probs is not None], axis=1)
    np.testing.assert_allclose(out, image, atol=1e-5)
    assert max(r.y1 - r.y0 for r in reads) == tile


def test_targets_limit_the_windows_run() -> None:
    height = width = 96
    image = np.random.default_rng(1).random((1, height, width)).astype(np.float32)
    valid = np.ones((height, width), dtype=bool)

    def read(b: Box) -> tuple[np.ndarray, np.ndarray]:
        return image[:, b.y0 : b.y1, b.x0 : b.x1], valid[b.y0 : b.y1, b.x0 : b.x1]

    counts = {}
    for mode in ("cosine", "crop"):
        stats = BlendStats()
        bands = list(blend_rows(read, _identity, 32, 16, (height, width), Box(0, 0, 96, 96), 1,
                                mode=mode, targets=[Box(40, 40, 56, 56)], stats=stats))
        counts[mode] = stats.windows
        rows = np.zeros_like(image)
        for b in bands:
            if b.probs is not None:
                rows[:, b.y0 : b.y0 + b.probs.shape[1]] = b.probs
        np.testing.assert_allclose(rows[:, 40:56, 40:56], image[:, 40:56, 40:56], atol=1e-5)
    # Windows start at 0, 16, ..., 64: 3 per axis reach [40, 56) through their ramps,
    # but only the one at 32 through its core [40, 56).
    assert counts == {"cosine": 9, "crop": 1}


def _lopsided(batch: np.ndarray) -> np.ndarray:
    """Neither flip- nor rotation-equivariant: mixes in a shifted, column-weighted copy."""
    cols = np.linspace(0, 1, batch.shape[3], dtype=np.float32)
    return batch + np.roll(batch, 2, axis=2) * cols


def test_tta_is_equivariant_and_keeps_the_identity() -> None:
    x = np.random.default_rng(2).random((3, 2, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(tta_forward(_identity)(x), x, atol=1e-6)
    tta = tta_forward(_lopsided)
    for k in range(1, 4):
        rotated = np.ascontiguousarray(np.rot90(x, k, axes=(2, 3)))
        np.testing.assert_allclose(tta(rotated), np.rot90(tta(x), k, axes=(2, 3)), atol=1e-5)
        assert not np.allclose(_lopsided(rotated), np.rot90(_lopsided(x), k, axes=(2, 3)), atol=1e-3)
    flipped = np.ascontiguousarray(x[..., ::-1])
    np.testing.assert_allclose(tta(flipped), tta(x)[..., ::-1], atol=1e-5)


def test_concurrent_streams_give_bitwise_identical_rows() -> None:
    height, width = 150, 70
    image = np.random.default_rng(4).random((2, height, width)).astype(np.float32)
    valid = np.ones((height, width), dtype=bool)

    def read(b: Box) -> tuple[np.ndarray, np.ndarray]:
        return image[:, b.y0 : b.y1, b.x0 : b.x1], valid[b.y0 : b.y1, b.x0 : b.x1]

    def run(streams: int) -> np.ndarray:
        bands = blend_rows(read, _contextual, 32, 8, (height, width), Box(0, 0, height, width), 2,
                           streams=streams)
        return np.concatenate([b.probs for b in bands if b.probs is not None], axis=1)

    one = run(1)
    assert one.shape == (2, height, width)
    np.testing.assert_array_equal(run(3), one)


# --- the pieces of blend_rows ------------------------------------------------------------


def test_row_accumulator_normalises_by_the_summed_weights_and_drops_finished_rows() -> None:
    acc = RowAccumulator(Box(10, 20, 16, 24))  # 6 rows x 4 columns
    acc.mark_valid(Box(8, 18, 18, 26), np.ones((10, 8), dtype=bool))
    acc.mark_valid(Box(15, 23, 16, 24), np.zeros((1, 1), dtype=bool))  # one nodata pixel
    ones = np.ones(8, dtype=np.float32)
    # Two windows of 8 x 8 starting above and left of the box: only their overlap counts.
    acc.add(8, 18, np.full((2, 8, 8), 1.0, np.float32), ones, ones)
    acc.add(12, 18, np.full((2, 8, 8), 4.0, np.float32), ones * 3, ones)
    assert acc.weights.shape == (6, 4)
    np.testing.assert_array_equal(acc.weights[:, 0], [1, 1, 4, 4, 4, 4])  # the second from row 12
    first = acc.finish(12)
    assert first is not None and first.y0 == 10 and first.probs is not None
    np.testing.assert_array_equal(first.probs, np.ones((2, 2, 4)))
    assert acc.weights.shape == (4, 4) and np.all(acc.weights == 4)  # rows 12-15 are held: 1 + 3
    rest = acc.finish(100)  # clamped to the box
    assert rest is not None and rest.y0 == 12 and rest.probs is not None
    np.testing.assert_allclose(rest.probs[:, :, :3], (1 + 3 * 4) / 4)
    assert rest.probs[0, 3, 3] == 0 and not rest.valid[3, 3]  # nodata: probability 0
    assert acc.finish(100) is None
    with pytest.raises(ValueError, match="already handed back"):
        acc.add(12, 18, np.ones((2, 8, 8), np.float32), ones, ones)


def test_row_accumulator_hands_back_rows_no_window_reached() -> None:
    acc = RowAccumulator(Box(0, 0, 4, 3))
    acc.mark_valid(Box(0, 0, 4, 3), np.ones((4, 3), dtype=bool))
    band = acc.finish(2)
    assert band is not None and band.probs is None and band.valid.shape == (2, 3)
    acc.add(2, 0, np.ones((1, 2, 3), np.float32), np.ones(2, np.float32), np.ones(3, np.float32))
    band = acc.finish(4)
    assert band is not None and band.probs is not None and np.all(band.probs == 1)


def test_batch_queue_makes_fixed_shape_calls_and_hands_back_in_order() -> None:
    shapes: list[tuple[int, ...]] = []

    def forward(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        return batch * 2

    stats = BlendStats()
    chips = [np.full((1, 8, 8), i, np.float32) for i in range(4)] + [np.full((1, 5, 3), 4, np.float32)]
    with BatchQueue[int](forward, 8, 3, stats=stats) as queue:
        assert queue.oldest() is None
        out = queue.put(0, chips[0]) + queue.put(1, chips[1])
        assert out == [] and queue.oldest() == 0
        out = queue.put(2, chips[2])  # a full batch: run and handed back
        assert [k for k, _ in out] == [0, 1, 2] and queue.oldest() is None
        out += queue.put(3, chips[3]) + queue.put(4, chips[4]) + queue.drain()
    assert [k for k, _ in out] == [0, 1, 2, 3, 4]
    for (_, probs), chip in zip(out, chips, strict=True):
        assert probs.shape == chip.shape  # padded to the tile for the call, cropped back
        np.testing.assert_array_equal(probs, 2 * chip)
    # The short last batch was padded with a zero window to the same shape.
    assert shapes == [(3, 1, 8, 8), (3, 1, 8, 8)]
    assert (stats.windows, stats.slots, stats.calls) == (5, 6, 2)


def test_batch_queue_streams_keep_the_order_and_check_shapes() -> None:
    def slow_first(batch: np.ndarray) -> np.ndarray:
        if batch[0, 0, 0, 0] == 0:
            time.sleep(0.05)  # the first call finishes last
        return batch

    with BatchQueue[int](slow_first, 4, 1, streams=3) as queue:
        out = []
        for i in range(7):
            out += queue.put(i, np.full((1, 4, 4), i, np.float32))
        out += queue.drain()
    assert [k for k, _ in out] == list(range(7))
    assert [int(p[0, 0, 0]) for _, p in out] == list(range(7))
    cropped = BatchQueue[int](lambda b: b[:, :, :2], 4, 1)
    with cropped as queue, pytest.raises(InputError, match="forward returned"):
        queue.put(0, np.zeros((1, 4, 4), np.float32))


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 40), start=st.integers(-90, 40), size=st.integers(1, 120),
       axis=st.integers(0, 2))
def test_take_runs_gathers_a_mirrored_index_as_np_take(length: int, start: int, size: int, axis: int) -> None:
    shape = [3, 4, 5]
    shape[axis] = length
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    index = mirror_index(start, start + size, length)
    assert np.array_equal(take_runs(array, index, axis), np.take(array, index, axis=axis))


@settings(max_examples=200, deadline=None)
@given(index=st.lists(st.integers(0, 9), min_size=1, max_size=30))
def test_take_runs_gathers_any_index_as_np_take(index: list[int]) -> None:
    array = np.arange(2 * 10 * 3).reshape(2, 10, 3)
    assert np.array_equal(take_runs(array, np.array(index), 1), np.take(array, index, axis=1))
