"""Window geometry and blending for overlap-and-blend prediction: numpy only, no IO.

Windows are ``tile`` x ``tile`` squares on a grid anchored at global pixel (0, 0)
with step ``stride = tile - overlap``; the last window of each axis is shifted back
so it ends at the raster's edge. Because the grid depends only on the raster size,
tile and stride, every output block (of any size) sees the same windows, and the
blended result does not depend on how the raster is cut into blocks.

With an edge ``margin`` the grid is laid over the raster grown by ``margin`` mirrored
pixels on every side (:func:`mirror_index`): a network is least reliable on the few
pixels along a window's border (its own zero padding, strided layers that do not
centre there), which the blend weights down everywhere except at the raster's edge,
where no other window covers them. The margin gives those pixels the context every
interior pixel has.
:mod:`segpipe.stages.predict.blend` runs a network over those windows and blends them;
:mod:`segpipe.grid.plan` groups store blocks into tasks that duplicate few windows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Literal

import numpy as np

from segpipe.errors import InputError
from segpipe.grid.box import Box

__all__ = [
    "BLEND_MODES",
    "BlendMode",
    "Forward",
    "axis_windows",
    "blend_weights",
    "check_blend",
    "grown",
    "halo_bounds",
    "mirror_index",
    "pad_to_multiple",
    "take_runs",
    "window_count",
    "window_starts",
]

BlendMode = Literal["cosine", "gaussian", "mean", "crop"]
BLEND_MODES: tuple[str, ...] = ("cosine", "gaussian", "mean", "crop")


Forward = Callable[[np.ndarray], np.ndarray]
"""A network call: (N, band, t, t) float32 windows -> (N, C, t, t) float32 probabilities."""


def check_blend(tile: int, overlap: int, mode: str = "cosine") -> None:
    """Refuse window settings no blend can use: the one check of overlap and blend mode.

    Args:
        tile: Window size.
        overlap: Overlap of neighbouring windows.
        mode: Blend mode.

    Raises:
        InputError: A tile that is not positive, an overlap outside ``[0, tile)``, or a
            mode that is not one of :data:`BLEND_MODES`.
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise InputError(f"overlap {overlap} must be at least 0 and smaller than the tile size ({tile})")
    if mode not in BLEND_MODES:
        raise InputError(f"blend mode {mode!r} is not one of {', '.join(BLEND_MODES)}")


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


def window_count(raster: tuple[int, int], tile: int, stride: int) -> int:
    """Windows of the whole raster's grid (rows of windows times columns of windows)."""
    return len(window_starts(raster[0], tile, stride)) * len(window_starts(raster[1], tile, stride))


def blend_weights(
    tile: int, overlap: int, at_start: bool, at_end: bool, mode: str = "cosine"
) -> np.ndarray:
    """1-D blending profile of a window.

    ``cosine`` (default): the ramp ``0.5 - 0.5 * cos(pi * (i + 0.5) / overlap)`` rises
    from ~0 to ~1 over the first ``overlap`` pixels (and mirrors at the end). Samples
    sit at pixel centres, so the weight is strictly positive everywhere, and the
    falling ramp of one window plus the rising ramp of the next (``stride = tile -
    overlap``) sum to exactly 1. ``gaussian``: MONAI's profile, ``exp(-d**2 / 2
    sigma**2)`` with ``sigma = tile / 8`` around the window centre. ``mean``: flat 1
    (Raster Vision's uniform average). ``crop``: 1 on the window's core, 0 on the
    outer half-overlap on each side (overlap-and-discard, as ArcGIS does).

    A side that touches the raster border stays flat at 1 in every mode, because no
    other window covers those pixels.

    Args:
        tile: Window size.
        overlap: Overlap in pixels (0 = flat window).
        at_start: The window starts at the raster's first pixel.
        at_end: The window ends at (or past) the raster's last pixel.
        mode: One of :data:`BLEND_MODES`.

    Returns:
        float32 array of length ``tile``.

    Raises:
        InputError: An overlap outside ``[0, tile)`` or an unknown mode (see :func:`check_blend`).
    """
    check_blend(tile, overlap, mode)
    w = np.ones(tile, dtype=np.float64)
    half = tile // 2
    if mode == "gaussian":
        sigma = tile / 8.0
        w = np.exp(-0.5 * ((np.arange(tile, dtype=np.float64) + 0.5 - tile / 2.0) / sigma) ** 2)
        w = np.maximum(w, 1e-6)  # strictly positive: every pixel of a window counts a little
        if at_start:
            w[:half] = 1.0
        if at_end:
            w[half:] = 1.0
        return w.astype(np.float32)
    if overlap == 0 or mode == "mean":
        return w.astype(np.float32)
    if mode == "crop":
        # Cores of consecutive windows (stride = tile - overlap) tile the axis exactly;
        # the last window, shifted back, overlaps its neighbour's core a little more.
        lead, trail = overlap // 2, overlap - overlap // 2
        if not at_start:
            w[:lead] = 0.0
        if not at_end:
            w[tile - trail :] = 0.0
        return w.astype(np.float32)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)
    # Multiplying (not assigning) keeps a sane profile when 2 * overlap > tile and the
    # ramps meet; normalisation by summed weights handles the rest.
    if not at_start:
        w[:overlap] *= ramp
    if not at_end:
        w[tile - overlap :] *= ramp[::-1]
    return w.astype(np.float32)


def axis_windows(start: int, size: int, length: int, tile: int, stride: int) -> np.ndarray:
    """Starts of the global grid's windows along one axis that overlap ``[start, start + size)``."""
    starts = window_starts(length, tile, stride)
    return starts[(starts < start + size) & (starts + tile > start)]


def mirror_index(start: int, stop: int, length: int) -> np.ndarray:
    """Raster index of each position in ``[start, stop)``, mirrored at the raster's edges.

    Positions outside ``[0, length)`` reflect about the edge pixel without repeating it
    (numpy's ``reflect``: -1 -> 1, ``length`` -> ``length - 2``), repeatedly when they
    lie further out than the raster is long; a 1-pixel axis maps everything to 0.

    Args:
        start: First position (may be negative).
        stop: Position after the last (may exceed ``length``).
        length: Raster size along the axis (> 0).

    Returns:
        int64 raster indices, ``stop - start`` of them.
    """
    pos = np.arange(start, stop, dtype=np.int64)
    if length <= 1:
        return np.zeros_like(pos)
    period = 2 * (length - 1)
    pos = np.mod(pos, period)
    return np.where(pos < length, pos, period - pos)


def take_runs(array: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """``np.take(array, index, axis)``, copied run by run where ``index`` steps by +-1.

    A mirrored index (:func:`mirror_index`) is a few such runs: forward inside the
    raster, backward in each margin. Copying each run as a slice is several times faster
    than a fancy-index gather, and prediction with an edge margin gathers every window
    row's columns this way (``docs/benchmarks.md``). An index that is the whole axis in
    order returns ``array`` itself.

    Args:
        array: Any array.
        index: Positions along ``axis`` (1-D, non-empty).
        axis: The axis to gather along.
    """
    step = np.diff(index)
    if index.size == array.shape[axis] and index[0] == 0 and (step == 1).all():
        return array
    # A run ends where the step changes or is not +-1 (then its pieces are gathered).
    cuts = np.flatnonzero((step[1:] != step[:-1]) | (np.abs(step[1:]) != 1)) + 2
    bounds = [0, *(int(c) for c in cuts if c < index.size), index.size]
    lead = (slice(None),) * axis
    out = np.empty((*array.shape[:axis], index.size, *array.shape[axis + 1 :]), dtype=array.dtype)
    for lo, hi in itertools.pairwise(bounds):
        first, last = int(index[lo]), int(index[hi - 1])
        if abs(last - first) != hi - lo - 1:  # steps of another size: not a run
            part = np.take(array, index[lo:hi], axis=axis)
        elif last >= first:
            part = array[(*lead, slice(first, last + 1))]
        else:
            part = array[(*lead, slice(first, last - 1 if last > 0 else None, -1))]
        out[(*lead, slice(lo, hi))] = part
    return out


def grown(raster: tuple[int, int], margin: int) -> tuple[int, int]:
    """The raster's size with ``margin`` mirrored pixels on every side: the extent its window grid covers."""
    return raster[0] + 2 * margin, raster[1] + 2 * margin


def halo_bounds(block: Box, raster: tuple[int, int], tile: int, stride: int, margin: int = 0) -> Box:
    """Region to read for a block: the raster pixels its windows see, mirrored ones included.

    Args:
        block: The block, in global pixels.
        raster: Raster (height, width).
        tile: Window size.
        stride: Window step.
        margin: Mirrored pixels around the raster that the window grid covers.

    Returns:
        The read region in global pixels (always inside the raster).

    Raises:
        ValueError: The block lies outside the raster.
    """
    height, width = grown(raster, margin)
    ys = axis_windows(block.y0 + margin, block.h, height, tile, stride)
    xs = axis_windows(block.x0 + margin, block.w, width, tile, stride)
    if ys.size == 0 or xs.size == 0 or not (0 <= block.y0 < raster[0] and 0 <= block.x0 < raster[1]):
        raise ValueError(f"block {block} lies outside the {raster[0]}x{raster[1]} raster")
    rows = mirror_index(int(ys[0]) - margin, min(int(ys[-1]) + tile, height) - margin, raster[0])
    cols = mirror_index(int(xs[0]) - margin, min(int(xs[-1]) + tile, width) - margin, raster[1])
    return Box(int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)


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
