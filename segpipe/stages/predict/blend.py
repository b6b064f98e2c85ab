"""Overlap-and-blend: run a network over the global window grid and blend its outputs.

:func:`blend_rows` walks one task's box row of windows by row of windows with a
rolling accumulator: window outputs are weighted (:func:`segpipe.grid.tiling.window_weights`),
summed, and rows that no later window can touch are normalised by the summed weights
and handed back at once. Memory is a band of about one window's height, whatever the
box's size. :func:`blend_windows` does the same over an array already in memory.
Numpy only: the network is any :data:`segpipe.grid.tiling.Forward` callable.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from segpipe.errors import InputError
from segpipe.grid.tiling import (
    BLEND_MODES,
    Box,
    Forward,
    axis_windows,
    blend_weights,
    halo_bounds,
    pad_to_multiple,
    window_starts,
)

__all__ = ["BlendStats", "Reader", "RowBand", "blend_rows", "blend_windows", "tta_forward"]

Reader = Callable[[Box], tuple[np.ndarray, np.ndarray]]
"""Reads a global box: -> (band, y, x) float32 normalised pixels (nodata 0), (y, x) valid mask."""


@dataclass
class BlendStats:
    """Counters filled in by :func:`blend_rows`.

    Attributes:
        windows: Windows run through the network.
        slots: Window slots of the forward calls (windows plus the zero windows that pad
            short batches): the network's real work.
        calls: Forward calls.
    """

    windows: int = 0
    slots: int = 0
    calls: int = 0


@dataclass(frozen=True)
class RowBand:
    """Finished rows of a box: ``probs`` (C, n, w) or None when no window reached them."""

    y0: int
    probs: np.ndarray | None
    valid: np.ndarray


def _support(profile: np.ndarray) -> tuple[int, int]:
    nz = np.flatnonzero(profile)
    return int(nz[0]), int(nz[-1]) + 1


def tta_forward(forward: Forward) -> Forward:
    """Test-time augmentation: average ``forward`` over the 8 flips and rotations.

    Each view is transformed back before averaging, so the result is equivariant: a
    rotated input gives the rotated output. Windows are square, so every view has the
    batch's shape.
    """

    def run(batch: np.ndarray) -> np.ndarray:
        total: np.ndarray | None = None
        for k in range(4):
            for flip in (False, True):
                view = np.rot90(batch, k, axes=(2, 3))
                view = view[..., ::-1] if flip else view
                out = np.asarray(forward(np.ascontiguousarray(view)), dtype=np.float32)
                out = out[..., ::-1] if flip else out
                out = np.rot90(out, -k, axes=(2, 3))
                total = out.copy() if total is None else total + out
        assert total is not None
        return total / np.float32(8)

    return run


def blend_rows(
    read: Reader,
    forward: Forward,
    tile: int,
    overlap: int,
    raster: tuple[int, int],
    box: Box,
    batch_size: int,
    pad_batches: bool = True,
    mode: str = "cosine",
    targets: list[Box] | None = None,
    stats: BlendStats | None = None,
    streams: int = 1,
) -> Iterator[RowBand]:
    """Blend the global-grid windows over ``box``, yielding finished rows top to bottom.

    Windows whose weights are zero wherever they meet a target (``crop``), or that hold
    no valid pixel, are never run. Per pixel, contributions are summed in the same
    (row-major) window order whatever the box, and every forward call has the same
    shape (``pad_batches``), so outputs are bitwise independent of the blocking.

    Args:
        read: Reads input pixels of a global box (see :data:`Reader`).
        forward: (N, band, tile, tile) windows -> (N, C, tile, tile) probabilities.
        tile: Window size.
        overlap: Window overlap (0 <= overlap < tile).
        raster: Raster (height, width).
        box: Output box in global pixels.
        batch_size: Windows per forward call.
        pad_batches: Pad short batches with zero windows to one fixed shape.
        mode: Blend mode (:data:`segpipe.grid.tiling.BLEND_MODES`).
        targets: Parts of ``box`` that are needed (default: all of it); windows that
            reach none of them are skipped, and rows elsewhere may be incomplete.
        stats: Counters to fill in.
        streams: Forward calls in flight at once, in threads. Several single-threaded
            streams use a host's cores better than one multi-threaded call, whose
            threads wait on each other (badly so on a busy machine). Results are still
            added in window order.

    Yields:
        :class:`RowBand` s covering ``box`` from top to bottom. Invalid pixels and
        pixels no window reached have probability 0.

    Raises:
        InputError: Bad overlap or mode, or forward outputs of the wrong shape.
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise InputError(f"overlap {overlap} must be at least 0 and smaller than the tile ({tile})")
    if mode not in BLEND_MODES:
        raise InputError(f"blend mode {mode!r} is not one of {', '.join(BLEND_MODES)}")
    height, width = raster
    stride = tile - overlap
    stats = stats if stats is not None else BlendStats()
    targets = targets if targets is not None else [box]
    h, w = box.y1 - box.y0, box.x1 - box.x0
    ys = axis_windows(box.y0, h, height, tile, stride)
    xs = axis_windows(box.x0, w, width, tile, stride)
    prof_y = {int(s): blend_weights(tile, overlap, s == 0, s + tile >= height, mode) for s in ys}
    prof_x = {int(s): blend_weights(tile, overlap, s == 0, s + tile >= width, mode) for s in xs}

    def reaches(s: int, prof: np.ndarray, lo: int, hi: int) -> bool:
        a, b = _support(prof)
        return s + a < hi and s + b > lo

    rows: list[tuple[int, list[int]]] = []
    for wy in prof_y:
        hit = [t for t in targets if reaches(wy, prof_y[wy], t.y0, t.y1)]
        keep = [wx for wx in prof_x if any(reaches(wx, prof_x[wx], t.x0, t.x1) for t in hit)]
        rows.append((wy, keep))
    # The batch shape depends only on the raster, never on the box.
    n_global = len(window_starts(height, tile, stride)) * len(window_starts(width, tile, stride))
    bs = max(1, min(batch_size, n_global))
    valid_box = np.zeros((h, w), dtype=bool)
    acc: np.ndarray | None = None
    wsum = np.zeros((0, w), dtype=np.float32)
    base = box.y0  # global row of acc[:, 0] and wsum[0]
    pending: list[tuple[int, int, np.ndarray]] = []

    def grow(upto: int) -> None:
        nonlocal wsum, acc
        need = upto - base
        if need > wsum.shape[0]:
            new = np.zeros((need, w), dtype=np.float32)
            new[: wsum.shape[0]] = wsum
            wsum = new
            if acc is not None:
                grown = np.zeros((acc.shape[0], need, w), dtype=np.float32)
                grown[:, : acc.shape[1]] = acc
                acc = grown

    inflight: deque[tuple[list[tuple[int, int, np.ndarray]], Future[np.ndarray]]] = deque()
    pool = ThreadPoolExecutor(streams) if streams > 1 else None

    def call(chips: list[np.ndarray]) -> np.ndarray:
        return np.asarray(forward(np.stack(chips)), dtype=np.float32)

    def flush() -> None:
        """Send the pending windows to the network (in a stream when there are several)."""
        chips = [pad_to_multiple(chip, tile)[0] for _, _, chip in pending]
        if pad_batches and len(chips) < bs:
            chips += [np.zeros_like(chips[0])] * (bs - len(chips))
        future: Future[np.ndarray] = Future()
        if pool is None:
            future.set_result(call(chips))
        else:
            future = pool.submit(call, chips)
        inflight.append((list(pending), future))
        stats.windows += len(pending)
        stats.slots += len(chips)
        stats.calls += 1
        pending.clear()
        # Each stream keeps a second batch queued, so that it starts its next call at once
        # instead of waiting while this thread blends, reads the next window row and stacks.
        while len(inflight) > (2 * streams - 1 if streams > 1 else 0):
            settle()

    def settle() -> None:
        """Add the oldest batch in flight to the accumulator (always in window order)."""
        nonlocal acc
        batch, future = inflight.popleft()
        out = future.result()
        n = bs if pad_batches and len(batch) < bs else len(batch)
        if out.ndim != 4 or out.shape[0] != n or out.shape[2:] != (tile, tile):
            raise InputError(f"forward returned {out.shape} for {n} windows of {tile} px")
        if acc is None:
            acc = np.zeros((out.shape[1], wsum.shape[0], w), dtype=np.float32)
        for (wy, wx, chip), prob in zip(batch, out, strict=False):
            ch, cw = chip.shape[1:]
            iy0, iy1 = max(wy, box.y0), min(wy + ch, box.y1)
            ix0, ix1 = max(wx, box.x0), min(wx + cw, box.x1)
            wt = np.outer(prof_y[wy][iy0 - wy : iy1 - wy], prof_x[wx][ix0 - wx : ix1 - wx])
            dst = (slice(iy0 - base, iy1 - base), slice(ix0 - box.x0, ix1 - box.x0))
            acc[(slice(None), *dst)] += prob[:, iy0 - wy : iy1 - wy, ix0 - wx : ix1 - wx] * wt
            wsum[dst] += wt

    def finish(upto: int) -> Iterator[RowBand]:
        """Hand back rows [base, upto) and drop them from the accumulator."""
        nonlocal base, acc, wsum
        upto = min(upto, box.y1)
        if upto <= base:
            return
        grow(upto)
        n = upto - base
        valid = valid_box[base - box.y0 : upto - box.y0]
        if acc is None:
            yield RowBand(base, None, valid)
        else:
            covered = (wsum[:n] > 0) & valid
            probs = np.divide(acc[:, :n], wsum[:n], out=np.zeros((acc.shape[0], n, w), np.float32),
                              where=covered[None])
            yield RowBand(base, probs, valid)
            acc = acc[:, n:].copy()
        wsum = wsum[n:].copy()
        base = upto

    try:
        for i, (wy, keep) in enumerate(rows):
            if keep:
                c0, c1 = keep[0], min(keep[-1] + tile, width)
                r1 = min(wy + tile, height)
                image, valid = read(Box(wy, c0, r1, c1))
                # Valid pixels of the box, copied as the rows are read (rows no kept window
                # reads lie outside every target).
                vy0, vy1 = max(wy, box.y0), min(r1, box.y1)
                vx0, vx1 = max(c0, box.x0), min(c1, box.x1)
                valid_box[vy0 - box.y0 : vy1 - box.y0, vx0 - box.x0 : vx1 - box.x0] = valid[
                    vy0 - wy : vy1 - wy, vx0 - c0 : vx1 - c0]
                grow(min(r1, box.y1))
                for wx in keep:
                    # Windows that hold no valid pixel only ever land on nodata: skip them.
                    if not valid[:, wx - c0 : wx - c0 + tile].any():
                        continue
                    pending.append((wy, wx, image[:, :, wx - c0 : wx - c0 + tile]))
                    if len(pending) == bs:
                        flush()
            nxt = rows[i + 1][0] if i + 1 < len(rows) else box.y1
            done = min([nxt] + [p[0] for p in pending] + [b[0][0] for b, _ in inflight])
            yield from finish(done)
        if pending:
            flush()
        while inflight:
            settle()
    finally:  # also when the caller stops early or a forward call fails
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    yield from finish(box.y1)


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
    mode: str = "cosine",
) -> tuple[np.ndarray, int]:
    """Blend the windows touching a block, from an array in memory (see :func:`blend_rows`).

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
        mode: Blend mode.

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
    y0, x0, h, w = out_box
    if image.ndim != 3 or valid.shape != image.shape[1:]:
        raise InputError(f"image {image.shape} and valid mask {valid.shape} do not fit (band, y, x)")
    need = halo_bounds(y0, x0, h, w, raster[0], raster[1], tile, tile - overlap)
    if need.y0 < gy or need.x0 < gx or need.y1 > gy + image.shape[1] or need.x1 > gx + image.shape[2]:
        raise InputError(f"the array at {origin} of shape {image.shape} does not cover the halo {need}")

    def read(b: Box) -> tuple[np.ndarray, np.ndarray]:
        sl = (slice(b.y0 - gy, b.y1 - gy), slice(b.x0 - gx, b.x1 - gx))
        return image[(slice(None), *sl)], valid[sl]

    stats = BlendStats()
    bands = list(blend_rows(read, forward, tile, overlap, raster, Box(y0, x0, y0 + h, x0 + w),
                            batch_size, pad_batches, mode, stats=stats))
    channels = next((b.probs.shape[0] for b in bands if b.probs is not None), 0)
    out = np.zeros((channels, h, w), dtype=np.float32)
    for band in bands:
        if band.probs is not None and channels:
            out[:, band.y0 - y0 : band.y0 - y0 + band.probs.shape[1]] = band.probs
    return out, stats.windows
