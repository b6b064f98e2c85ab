"""Window geometry and blending for overlap-and-blend prediction: numpy only, no IO.

Windows are ``tile`` x ``tile`` squares on a grid anchored at global pixel (0, 0)
with step ``stride = tile - overlap``; the last window of each axis is shifted back
so it ends at the raster's edge. Because the grid depends only on the raster size,
tile and stride, every output block (of any size) sees the same windows, and the
blended result does not depend on how the raster is cut into blocks.
:func:`blend_windows` runs any network callable over those windows and blends them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from segpipe.errors import InputError

__all__ = [
    "Bounds",
    "Forward",
    "blend_weights",
    "blend_windows",
    "block_windows",
    "halo_bounds",
    "pad_to_multiple",
    "window_starts",
    "window_weights",
]


Forward = Callable[[np.ndarray], np.ndarray]
"""A network call: (N, band, t, t) float32 windows -> (N, C, t, t) float32 probabilities."""


class Bounds(NamedTuple):
    """A half-open pixel box ``[y0:y1, x0:x1]`` in global raster coordinates."""

    y0: int
    x0: int
    y1: int
    x1: int


def window_starts(length: int, tile: int, stride: int) -> np.ndarray:
    """Starts of the windows along one axis.

    Starts are ``0, stride, 2 * stride, ...`` for as long as a window ends before
    ``length``, then one last window ending exactly at ``length``. When ``length``
    is at most ``tile`` there is a single window at 0 that runs past the edge (the
    caller pads it).

    Args:
        length: Raster size along the axis (pixels, > 0).
        tile: Window size (> 0).
        stride: Step between windows (1 to ``tile``).

    Returns:
        Sorted, unique int64 starts.

    Raises:
        ValueError: Non-positive sizes or a stride larger than the tile (gaps).
    """
    if length <= 0 or tile <= 0 or not 0 < stride <= tile:
        raise ValueError(f"bad window grid: length={length}, tile={tile}, stride={stride}")
    if length <= tile:
        return np.zeros(1, dtype=np.int64)
    last = length - tile
    starts = np.arange(0, last, stride, dtype=np.int64)
    # arange stops before `last`, so appending it never duplicates a start.
    return np.append(starts, np.int64(last))


def blend_weights(tile: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """1-D blending profile of a window: raised-cosine ramps over the overlaps.

    The ramp ``0.5 - 0.5 * cos(pi * (i + 0.5) / overlap)`` rises from ~0 to ~1 over
    the first ``overlap`` pixels (and mirrors at the end). Samples sit at pixel
    centres, so the weight is strictly positive everywhere, and the falling ramp of
    one window plus the rising ramp of the next (``stride = tile - overlap``) sum to
    exactly 1. A side that touches the raster border stays flat at 1, because no
    other window covers those pixels.

    Args:
        tile: Window size.
        overlap: Ramp length in pixels (0 = flat window).
        at_start: The window starts at the raster's first pixel.
        at_end: The window ends at (or past) the raster's last pixel.

    Returns:
        float32 array of length ``tile``.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    w = np.ones(tile, dtype=np.float64)
    if overlap == 0:
        return w.astype(np.float32)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)
    # Multiplying (not assigning) keeps a sane profile when 2 * overlap > tile and the
    # ramps meet; normalisation by summed weights handles the rest.
    if not at_start:
        w[:overlap] *= ramp
    if not at_end:
        w[tile - overlap :] *= ramp[::-1]
    return w.astype(np.float32)


def window_weights(
    wy: int, wx: int, height: int, width: int, tile: int, overlap: int
) -> np.ndarray:
    """2-D weights of the window starting at (wy, wx): outer product of its profiles.

    Args:
        wy: Window start row (global).
        wx: Window start column (global).
        height: Raster rows.
        width: Raster columns.
        tile: Window size.
        overlap: Ramp length.

    Returns:
        float32 array (tile, tile).
    """
    wy_ = blend_weights(tile, overlap, wy == 0, wy + tile >= height)
    wx_ = blend_weights(tile, overlap, wx == 0, wx + tile >= width)
    return np.outer(wy_, wx_)


def _axis_windows(start: int, size: int, length: int, tile: int, stride: int) -> np.ndarray:
    starts = window_starts(length, tile, stride)
    return starts[(starts < start + size) & (starts + tile > start)]


def block_windows(
    y0: int, x0: int, h: int, w: int, height: int, width: int, tile: int, stride: int
) -> list[tuple[int, int]]:
    """Windows of the global grid that intersect the block ``[y0:y0+h, x0:x0+w]``.

    Args:
        y0: Block start row.
        x0: Block start column.
        h: Block rows.
        w: Block columns.
        height: Raster rows.
        width: Raster columns.
        tile: Window size.
        stride: Window step.

    Returns:
        (wy, wx) global window starts, row-major sorted.
    """
    ys = _axis_windows(y0, h, height, tile, stride)
    xs = _axis_windows(x0, w, width, tile, stride)
    return [(int(wy), int(wx)) for wy in ys for wx in xs]


def halo_bounds(
    y0: int, x0: int, h: int, w: int, height: int, width: int, tile: int, stride: int
) -> Bounds:
    """Region to read for a block: the union of its windows, clamped to the raster.

    Args:
        y0: Block start row.
        x0: Block start column.
        h: Block rows.
        w: Block columns.
        height: Raster rows.
        width: Raster columns.
        tile: Window size.
        stride: Window step.

    Returns:
        The read region in global pixels.
    """
    ys = _axis_windows(y0, h, height, tile, stride)
    xs = _axis_windows(x0, w, width, tile, stride)
    if ys.size == 0 or xs.size == 0:
        raise ValueError(f"block ({y0}, {x0}, {h}, {w}) lies outside the {height}x{width} raster")
    return Bounds(
        int(ys[0]), int(xs[0]), min(int(ys[-1]) + tile, height), min(int(xs[-1]) + tile, width)
    )


def pad_to_multiple(
    arr: np.ndarray, multiple: int, min_size: int = 0, mode: str = "reflect"
) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad the last two axes at the bottom/right up to a multiple of ``multiple``.

    Used for windows smaller than a tile (rasters smaller than a tile) and sizes the
    network cannot take (not a multiple of its output stride). Padding goes only
    after the data, so cropping ``[..., :h, :w]`` recovers the valid pixels; the
    padded pixels are cropped away before blending and never bias valid ones.

    Args:
        arr: Array (..., h, w).
        multiple: Target multiple (e.g. 32 or the tile size).
        min_size: Minimum padded size of each of the two axes.
        mode: ``reflect`` (mirror without repeating the edge) or ``edge``.

    Returns:
        The padded array and the original (h, w) to crop back to.
    """
    h, w = arr.shape[-2:]
    th = max(min_size, -(-h // multiple) * multiple)
    tw = max(min_size, -(-w // multiple) * multiple)
    if (th, tw) == (h, w):
        return arr, (h, w)
    if mode not in ("reflect", "edge"):
        raise ValueError(f"padding mode {mode!r} is not 'reflect' or 'edge'")
    # numpy reflects repeatedly when the pad exceeds the data, and repeats the single
    # pixel of a 1-pixel axis, so tiny rasters pad without special cases.
    pad = [(0, 0)] * (arr.ndim - 2) + [(0, th - h), (0, tw - w)]
    return np.pad(arr, pad, mode=mode), (h, w)  # type: ignore[call-overload]


def blend_windows(
    image: np.ndarray,
    valid: np.ndarray,
    forward: Forward,
    tile: int,
    overlap: int,
    origin: tuple[int, int],
    raster: tuple[int, int],
    out_box: tuple[int, int, int, int],
    batch_size: int,
    pad_batches: bool,
) -> tuple[np.ndarray, int]:
    """Run ``forward`` on the global-grid windows touching a block and blend them.

    Each window's output is weighted by :func:`window_weights` and the sum normalised
    by the summed weights. Windows past a small raster's edge are padded (reflect) and
    cropped back before blending; windows without a valid pixel are skipped, and
    invalid pixels get probability 0.

    Args:
        image: (band, y, x) float32 pixels covering the block's halo.
        valid: (y, x) bool mask of ``image``, False on nodata.
        forward: (N, band, tile, tile) windows -> (N, C, tile, tile) probabilities.
        tile: Window size.
        overlap: Window overlap (0 <= overlap < tile).
        origin: Global (row, column) of ``image[:, 0, 0]``.
        raster: Raster (height, width).
        out_box: Output block (y0, x0, h, w) in global pixels.
        batch_size: Windows per forward call.
        pad_batches: Pad short batches with zero windows to one fixed shape.

    Returns:
        (C, h, w) float32 probabilities ((0, h, w) when no valid pixel is in reach) and
        the number of windows computed.

    Raises:
        InputError: Arrays or forward outputs of the wrong shape, or an image that does
            not cover the halo.
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise InputError(f"overlap {overlap} must be at least 0 and smaller than the tile ({tile})")
    gy, gx = origin
    height, width = raster
    y0, x0, h, w = out_box
    stride = tile - overlap
    if image.ndim != 3 or valid.shape != image.shape[1:]:
        raise InputError(f"image {image.shape} and valid mask {valid.shape} do not fit (band, y, x)")
    need = halo_bounds(y0, x0, h, w, height, width, tile, stride)
    if need.y0 < gy or need.x0 < gx or need.y1 > gy + image.shape[1] or need.x1 > gx + image.shape[2]:
        raise InputError(f"the array at {origin} of shape {image.shape} does not cover the halo {need}")
    # A batch shape that depends only on the raster (never on the block) makes every
    # window's output bitwise identical whichever block computes it.
    n_global = len(window_starts(height, tile, stride)) * len(window_starts(width, tile, stride))
    bs = max(1, min(batch_size, n_global))
    acc: np.ndarray | None = None
    wsum = np.zeros((h, w), dtype=np.float32)
    computed = 0

    def flush(batch: list[tuple[int, int, np.ndarray]]) -> None:
        nonlocal acc, computed
        chips = [pad_to_multiple(chip, tile)[0] for _, _, chip in batch]
        if pad_batches and len(chips) < bs:
            chips += [np.zeros_like(chips[0])] * (bs - len(chips))
        out = np.asarray(forward(np.stack(chips)), dtype=np.float32)
        if out.ndim != 4 or out.shape[0] != len(chips) or out.shape[2:] != (tile, tile):
            raise InputError(f"forward returned {out.shape} for {len(chips)} windows of {tile} px")
        if acc is None:
            acc = np.zeros((out.shape[1], h, w), dtype=np.float32)
        for (wy, wx, chip), prob in zip(batch, out, strict=False):
            ch, cw = chip.shape[1:]
            wt = window_weights(wy, wx, height, width, tile, overlap)
            iy0, iy1 = max(wy, y0), min(wy + ch, y0 + h)
            ix0, ix1 = max(wx, x0), min(wx + cw, x0 + w)
            src = (slice(iy0 - wy, iy1 - wy), slice(ix0 - wx, ix1 - wx))
            dst = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
            acc[(slice(None), *dst)] += prob[(slice(None), *src)] * wt[src]
            wsum[dst] += wt[src]
        computed += len(batch)

    pending: list[tuple[int, int, np.ndarray]] = []
    for wy, wx in block_windows(y0, x0, h, w, height, width, tile, stride):
        ly, lx = wy - gy, wx - gx
        # Windows that hold no valid pixel only ever land on nodata: skip them (large
        # nodata areas of mosaics cost nothing).
        if not valid[ly : ly + tile, lx : lx + tile].any():
            continue
        pending.append((wy, wx, image[:, ly : ly + tile, lx : lx + tile]))
        if len(pending) == bs:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    if acc is None:  # nothing valid in reach: the caller writes nodata everywhere
        return np.zeros((0, h, w), dtype=np.float32), 0
    vy, vx = y0 - gy, x0 - gx
    covered = (wsum > 0) & valid[vy : vy + h, vx : vx + w]
    probs = np.divide(acc, wsum, out=np.zeros_like(acc), where=covered[None])
    return probs, computed
