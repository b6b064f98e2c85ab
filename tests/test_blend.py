"""Blend modes, the rolling accumulator and test-time augmentation, on numpy 'networks'."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segpipe.grid.tiling import BLEND_MODES, Box, halo_bounds
from segpipe.stages.predict.blend import BlendStats, blend_rows, blend_windows, tta_forward


def _identity(batch: np.ndarray) -> np.ndarray:
    return batch


def _blocked(image: np.ndarray, forward, tile: int, overlap: int, block: int,  # type: ignore[no-untyped-def]
             mode: str, batch_size: int = 3) -> np.ndarray:
    _, height, width = image.shape
    valid = np.ones((height, width), dtype=bool)
    out = np.zeros((0, height, width), dtype=np.float32)
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            h, w = min(block, height - y0), min(block, width - x0)
            box = halo_bounds(y0, x0, h, w, height, width, tile, tile - overlap)
            sl = (slice(box.y0, box.y1), slice(box.x0, box.x1))
            probs, _ = blend_windows(image[(slice(None), *sl)], valid[sl], forward, tile, overlap,
                                     (box.y0, box.x0), (height, width), (y0, x0, h, w), batch_size,
                                     True, mode)
            if out.shape[0] == 0:
                out = np.zeros((probs.shape[0], height, width), dtype=np.float32)
            out[:, y0 : y0 + h, x0 : x0 + w] = probs
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
