"""Window grid, blend weights, padding and task plans: invariants checked with hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segpipe.errors import InputError
from segpipe.grid.box import Box
from segpipe.grid.plan import plan_superblocks
from segpipe.grid.tiling import (
    BLEND_MODES,
    axis_windows,
    blend_weights,
    check_blend,
    halo_bounds,
    pad_to_multiple,
    window_starts,
)
from segpipe.stages.predict.blend import BlendStats, RowAccumulator, blend_rows, window_rows


@st.composite
def grids(draw: st.DrawFn) -> tuple[int, int, int]:
    """(length, tile, stride) with 0 <= overlap < tile."""
    tile = draw(st.integers(1, 64))
    overlap = draw(st.integers(0, tile - 1))
    length = draw(st.integers(1, 400))
    return length, tile, tile - overlap


@given(grids())
def test_window_starts_cover_every_pixel_inside_the_raster(grid: tuple[int, int, int]) -> None:
    length, tile, stride = grid
    starts = window_starts(length, tile, stride)
    assert starts[0] == 0
    assert np.all(np.diff(starts) > 0)  # sorted, no duplicates
    if length <= tile:
        assert starts.tolist() == [0]
        return
    assert np.all(starts + tile <= length)
    assert starts[-1] + tile == length
    covered = np.zeros(length, dtype=bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    # Anchored at global pixel 0: every start but the last is a multiple of the stride.
    assert np.all(starts[:-1] % stride == 0)
    assert np.all(np.diff(starts) <= stride)


def test_window_starts_examples() -> None:
    assert window_starts(10, 4, 3).tolist() == [0, 3, 6]
    assert window_starts(11, 4, 3).tolist() == [0, 3, 6, 7]
    assert window_starts(3, 8, 6).tolist() == [0]
    assert window_starts(8, 8, 6).tolist() == [0]


def test_window_starts_rejects_gaps() -> None:
    with pytest.raises(ValueError):
        window_starts(100, 10, 11)


@given(st.integers(2, 64), st.data())
def test_blend_weights_shape_and_range(tile: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, tile - 1))
    at_start, at_end = data.draw(st.booleans()), data.draw(st.booleans())
    w = blend_weights(tile, overlap, at_start, at_end)
    assert w.dtype == np.float32 and w.shape == (tile,)
    assert np.all(w > 0) and np.all(w <= 1)
    if 2 * overlap <= tile:
        assert np.all(w[overlap : tile - overlap] == 1)
    if at_start:
        assert w[0] == 1
    if at_end:
        assert w[-1] == 1


def test_blend_weights_taper_to_nearly_zero() -> None:
    w = blend_weights(64, 16, False, False)
    assert w[0] < 0.01 and w[-1] < 0.01
    assert np.all(np.diff(w[:16]) > 0) and np.all(np.diff(w[-16:]) < 0)
    np.testing.assert_allclose(w, w[::-1])


@given(st.integers(2, 48), st.integers(0, 6), st.data())
def test_cosine_ramps_are_a_partition_of_unity(tile: int, k: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, tile // 2))
    stride = tile - overlap
    length = tile + k * stride  # a regular grid: the last window needs no shift
    total = np.zeros(length)
    for s in window_starts(length, tile, stride):
        total[s : s + tile] += blend_weights(tile, overlap, s == 0, s + tile >= length)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_window_weights_partition_of_unity_in_2d() -> None:
    tile, overlap = 32, 8
    stride = tile - overlap
    height, width = tile + 3 * stride, tile + 2 * stride
    box = Box(0, 0, height, width)
    grid = window_rows((height, width), box, tile, overlap, "cosine", [box])
    acc = RowAccumulator(box)
    ones = np.ones((1, tile, tile), dtype=np.float32)
    for wy, row in grid.rows:
        for wx in row:
            acc.add(wy, wx, ones, grid.prof_y[wy], grid.prof_x[wx])
    # The summed weights (of the 2-D window weights, the outer products of the profiles).
    np.testing.assert_allclose(acc.weights, 1.0, atol=1e-6)
    band = acc.finish(height)
    assert band is not None and band.probs is not None and not band.probs.any()  # no pixel marked valid


@st.composite
def rasters(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    """(height, width, tile, stride, block)."""
    tile = draw(st.integers(4, 40))
    overlap = draw(st.integers(0, tile - 1))
    return (
        draw(st.integers(1, 150)),
        draw(st.integers(1, 150)),
        tile,
        tile - overlap,
        draw(st.integers(1, 70)),
    )


def _blocks(height: int, width: int, block: int) -> list[Box]:
    return [
        Box.sized(y, x, min(block, height - y), min(block, width - x))
        for y in range(0, height, block)
        for x in range(0, width, block)
    ]


def _windows(block: Box, height: int, width: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """The windows of a block: those of its rows times those of its columns, row-major."""
    ys = axis_windows(block.y0, block.h, height, tile, stride)
    xs = axis_windows(block.x0, block.w, width, tile, stride)
    return [(int(wy), int(wx)) for wy in ys for wx in xs]


@settings(max_examples=60, deadline=None)
@given(rasters())
def test_block_windows_do_not_depend_on_the_partition(r: tuple[int, int, int, int, int]) -> None:
    height, width, tile, stride, block = r
    everything = {(int(wy), int(wx)) for wy in window_starts(height, tile, stride)
                  for wx in window_starts(width, tile, stride)}
    assert set(_windows(Box(0, 0, height, width), height, width, tile, stride)) == everything
    union: set[tuple[int, int]] = set()
    for b in _blocks(height, width, block):
        wins = _windows(b, height, width, tile, stride)
        assert wins == sorted(wins)
        # Exactly the windows of the global grid that intersect the block.
        expected = {
            (wy, wx) for wy, wx in everything
            if wy < b.y1 and wy + tile > b.y0 and wx < b.x1 and wx + tile > b.x0
        }
        assert set(wins) == expected
        union |= expected
    assert union == everything


def _recorded_windows(height: int, width: int, tile: int, overlap: int, block: Box) -> list[tuple[int, int]]:
    """The windows blend_rows runs for a block, in call order, read back from coordinate bands."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([yy, xx])
    valid = np.ones((height, width), dtype=bool)
    seen: list[tuple[int, int]] = []

    def read(b: Box) -> tuple[np.ndarray, np.ndarray]:
        return image[(slice(None), *b.slices)], valid[b.slices]

    def record(batch: np.ndarray) -> np.ndarray:
        seen.extend((int(w[0, 0, 0]), int(w[1, 0, 0])) for w in batch)
        return batch

    stats = BlendStats()
    for _ in blend_rows(read, record, tile, overlap, (height, width), block, 1, stats=stats):
        pass
    assert stats.windows == len(seen)
    return seen


@pytest.mark.parametrize(("height", "width", "tile", "overlap", "block"),
                         [(97, 61, 32, 8, 40), (50, 45, 64, 16, 16), (130, 75, 32, 31, 33), (1, 50, 8, 3, 7)])
def test_blend_rows_runs_exactly_the_block_windows(height: int, width: int, tile: int, overlap: int,
                                                  block: int) -> None:
    stride = tile - overlap
    for b in _blocks(height, width, block):
        # Cosine weights are positive everywhere: every window reaching the block runs, row-major.
        assert _recorded_windows(height, width, tile, overlap, b) == _windows(b, height, width, tile, stride)


@settings(max_examples=60, deadline=None)
@given(rasters())
def test_halo_holds_every_window_touching_the_block(r: tuple[int, int, int, int, int]) -> None:
    height, width, tile, stride, block = r
    for b in _blocks(height, width, block):
        box = halo_bounds(b, (height, width), tile, stride)
        assert 0 <= box.y0 <= b.y0 and 0 <= box.x0 <= b.x0
        assert b.y1 <= box.y1 <= height and b.x1 <= box.x1 <= width
        for wy, wx in _windows(b, height, width, tile, stride):
            assert box.y0 <= wy and min(wy + tile, height) <= box.y1
            assert box.x0 <= wx and min(wx + tile, width) <= box.x1


def test_halo_bounds_outside_the_raster() -> None:
    with pytest.raises(ValueError):
        halo_bounds(Box.sized(200, 0, 10, 10), (100, 100), 32, 24)


@given(st.integers(1, 70), st.integers(1, 70), st.sampled_from([8, 32]), st.integers(0, 64))
def test_pad_to_multiple_round_trips(h: int, w: int, multiple: int, min_size: int) -> None:
    arr = np.random.default_rng(h * 100 + w).random((2, h, w)).astype(np.float32)
    padded, (ch, cw) = pad_to_multiple(arr, multiple, min_size=min_size)
    assert (ch, cw) == (h, w)
    assert padded.shape[0] == 2
    for size, orig in zip(padded.shape[1:], (h, w), strict=True):
        assert size % multiple == 0 or size == min_size
        assert size >= max(orig, min_size)
    np.testing.assert_array_equal(padded[:, :h, :w], arr)


def test_pad_reflects_without_repeating_the_edge() -> None:
    arr = np.arange(5.0)[None, :].repeat(3, axis=0)
    padded, _ = pad_to_multiple(arr, 8)
    assert padded.shape == (8, 8)
    assert padded[0, 5:].tolist() == [3.0, 2.0, 1.0]
    edge, _ = pad_to_multiple(arr, 8, mode="edge")
    assert edge[0, 5:].tolist() == [4.0, 4.0, 4.0]
    with pytest.raises(ValueError):
        pad_to_multiple(arr, 8, mode="wrap")


@pytest.mark.parametrize("mode", ["gaussian", "mean", "crop"])
def test_other_modes_are_flat_at_raster_borders(mode: str) -> None:
    both = blend_weights(32, 8, True, True, mode)
    np.testing.assert_array_equal(both, np.ones(32, dtype=np.float32))
    inner = blend_weights(32, 8, False, False, mode)
    assert 0.9 < inner.max() <= 1 and inner.min() >= 0
    np.testing.assert_allclose(inner, inner[::-1])
    with pytest.raises(ValueError, match="blend mode"):
        blend_weights(32, 8, False, False, "median")


@pytest.mark.parametrize(("tile", "overlap", "mode", "message"), [
    (32, 32, "cosine", r"overlap 32 must be at least 0 and smaller than the tile size \(32\)"),
    (32, -1, "cosine", "overlap -1"),
    (0, 0, "cosine", "overlap 0"),
    (32, 8, "median", r"blend mode 'median' is not one of cosine, gaussian, mean, crop"),
])
def test_one_check_of_overlap_and_blend_mode(tile: int, overlap: int, mode: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        check_blend(tile, overlap, mode)
    for mode_ok in BLEND_MODES:
        check_blend(32, 31, mode_ok)
    # The weights, the blend and the driver all use it: the same error everywhere.
    if tile > 0:
        with pytest.raises(InputError, match=message):
            blend_weights(tile, overlap, False, False, mode)


@given(st.integers(2, 48), st.integers(1, 6), st.data())
def test_crop_cores_tile_the_axis(tile: int, k: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, tile - 1))
    stride = tile - overlap
    length = tile + k * stride + data.draw(st.integers(0, stride - 1))  # irregular last window too
    owners = np.zeros(length)
    for s in window_starts(length, tile, stride):
        owners[s : s + tile] += blend_weights(tile, overlap, s == 0, s + tile >= length, "crop")
    assert np.all(owners >= 1)  # every pixel belongs to some window's core
    if (length - tile) % stride == 0:
        np.testing.assert_array_equal(owners, 1.0)  # regular grid: exactly one owner


def test_plan_superblocks_examples() -> None:
    # One block only: one task (its torch threads take both cores).
    assert plan_superblocks(1024, 1024, 1024, 256, 192, slots=2) == (1, 1)
    # 4 x 4 blocks on 2 slots: four 2048-px tasks duplicate one window row per border.
    assert plan_superblocks(4096, 4096, 1024, 256, 192, slots=2) == (2, 2)
    # Many slots and torch threads that do not speed a task up: a task for every slot.
    ny, nx = plan_superblocks(4096, 4096, 512, 256, 192, slots=16, speedup=0.0)
    assert (8 // ny) * (8 // nx) >= 16
    # Threads that scale perfectly: the largest tasks allowed, nothing duplicated.
    assert plan_superblocks(4096, 4096, 512, 256, 192, slots=16, speedup=1.0) == (4, 4)
    with pytest.raises(ValueError):
        plan_superblocks(0, 10, 10, 32, 24, 1)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000), st.sampled_from([128, 256, 512]), st.integers(1, 8))
def test_plan_superblocks_respects_the_task_area(height: int, width: int, block: int, slots: int) -> None:
    ny, nx = plan_superblocks(height, width, block, 64, 48, slots, max_pixels=1024 * 1024)
    assert 1 <= ny <= -(-height // block) and 1 <= nx <= -(-width // block)
    assert ny * nx * block * block <= max(1024 * 1024, block * block)
