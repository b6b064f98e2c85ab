"""Overlap-and-blend: run a network over the global window grid and blend its outputs.

:func:`blend_rows` composes three pieces: the window rows over a box (which windows
reach its targets, and their blend profiles: :func:`window_rows`), a :class:`BatchQueue`
that turns windows into fixed-shape forward calls, and a :class:`RowAccumulator` that
sums weighted window outputs and hands back the rows no later window can touch,
normalised by the summed weights. With an edge margin the grid covers the raster grown
by mirrored pixels (:func:`segpipe.grid.tiling.mirror_index`), read through
:func:`mirrored`, so the raster's outermost pixels lie inside windows rather than on
their borders. Memory is a band of about one window's height,
whatever the box's size. :func:`blend_windows` does the same over an array already in
memory. Numpy only: the network is any :data:`segpipe.grid.tiling.Forward` callable.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from segpipe.errors import InputError
from segpipe.grid.box import Box
from segpipe.grid.tiling import (
    Forward,
    axis_windows,
    blend_weights,
    check_blend,
    grown,
    halo_bounds,
    mirror_index,
    pad_to_multiple,
    take_runs,
    window_count,
)

__all__ = [
    "BatchQueue",
    "BlendStats",
    "Reader",
    "RowAccumulator",
    "RowBand",
    "WindowRows",
    "blend_rows",
    "blend_windows",
    "call_size",
    "mirrored",
    "tta_forward",
    "window_rows",
]

Reader = Callable[[Box], tuple[np.ndarray, np.ndarray]]
"""Reads a global box: -> (band, y, x) float32 normalised pixels (nodata 0), (y, x) valid mask."""

K = TypeVar("K", bound=Hashable)


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


# --- which windows run -------------------------------------------------------------------


@dataclass(frozen=True)
class WindowRows:
    """The global grid's windows over a box, row by row, with their blend profiles.

    Attributes:
        rows: (window start row, start columns of the windows of that row to run), top
            to bottom; a row may run no window.
        prof_y: Vertical blend profile of every window row reaching the box, by start.
        prof_x: Horizontal blend profile of every window column reaching the box, by start.
    """

    rows: tuple[tuple[int, tuple[int, ...]], ...]
    prof_y: dict[int, np.ndarray]
    prof_x: dict[int, np.ndarray]


def _reaches(start: int, profile: np.ndarray, lo: int, hi: int) -> bool:
    """Whether a window at ``start`` has a non-zero weight somewhere in ``[lo, hi)``."""
    nz = np.flatnonzero(profile)
    return start + int(nz[0]) < hi and start + int(nz[-1]) + 1 > lo


def window_rows(
    raster: tuple[int, int], box: Box, tile: int, overlap: int, mode: str, targets: Sequence[Box]
) -> WindowRows:
    """The windows to run over ``box``: those whose weights are non-zero somewhere in a target.

    Args:
        raster: Raster (height, width).
        box: Output box in global pixels.
        tile: Window size.
        overlap: Window overlap.
        mode: Blend mode (``crop`` zeroes window borders, so fewer windows reach a target).
        targets: Parts of ``box`` that are needed.

    Returns:
        The window rows and profiles.
    """
    height, width = raster
    stride = tile - overlap
    ys = axis_windows(box.y0, box.h, height, tile, stride)
    xs = axis_windows(box.x0, box.w, width, tile, stride)
    prof_y = {int(s): blend_weights(tile, overlap, s == 0, s + tile >= height, mode) for s in ys}
    prof_x = {int(s): blend_weights(tile, overlap, s == 0, s + tile >= width, mode) for s in xs}
    rows = []
    for wy, py in prof_y.items():
        hit = [t for t in targets if _reaches(wy, py, t.y0, t.y1)]
        keep = tuple(wx for wx, px in prof_x.items() if any(_reaches(wx, px, t.x0, t.x1) for t in hit))
        rows.append((wy, keep))
    return WindowRows(tuple(rows), prof_y, prof_x)


def call_size(raster: tuple[int, int], tile: int, overlap: int, batch_size: int) -> int:
    """Windows per forward call: ``batch_size``, but no more than the raster has.

    It depends only on the raster, never on the box, so every box's calls have one shape.
    """
    return max(1, min(batch_size, window_count(raster, tile, tile - overlap)))


# --- the network calls ---------------------------------------------------------------------


class BatchQueue(Generic[K]):
    """Windows in, fixed-shape forward calls out, outputs handed back in window order.

    Windows are padded to the tile (rasters smaller than a tile), batched, and with
    ``pad_batches`` short batches are filled with zero windows, so every call has the
    shape (``batch_size``, band, tile, tile) and outputs do not depend on which box a
    window was run for. With ``streams`` > 1 calls run in threads, several at once:
    several single-threaded streams use a host's cores better than one multi-threaded
    call, whose threads wait on each other (badly so on a busy machine).

    Use it as a context manager: leaving it stops the threads (also on an error or
    when the consumer stops early).
    """

    def __init__(
        self,
        forward: Forward,
        tile: int,
        batch_size: int,
        pad_batches: bool = True,
        streams: int = 1,
        stats: BlendStats | None = None,
    ) -> None:
        """Set up the queue.

        Args:
            forward: (N, band, tile, tile) windows -> (N, C, tile, tile) probabilities.
            tile: Window size.
            batch_size: Windows per forward call.
            pad_batches: Pad short batches with zero windows to one fixed shape.
            streams: Forward calls in flight at once, in threads.
            stats: Counters to fill in.
        """
        self.forward = forward
        self.tile = tile
        self.batch_size = batch_size
        self.pad_batches = pad_batches
        self.stats = stats if stats is not None else BlendStats()
        self._pending: list[tuple[K, np.ndarray]] = []
        self._inflight: deque[tuple[list[tuple[K, tuple[int, int]]], Future[np.ndarray]]] = deque()
        self._pool = ThreadPoolExecutor(streams) if streams > 1 else None
        # Each stream keeps a second batch queued, so that it starts its next call at once
        # instead of waiting while the caller blends, reads the next window row and stacks.
        self._ahead = 2 * streams - 1 if streams > 1 else 0

    def __enter__(self) -> BatchQueue[K]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the stream threads; calls not yet started are dropped."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def oldest(self) -> K | None:
        """Key of the oldest window whose output has not been handed back (None: none)."""
        if self._inflight:
            return self._inflight[0][0][0][0]
        return self._pending[0][0] if self._pending else None

    def put(self, key: K, chip: np.ndarray) -> list[tuple[K, np.ndarray]]:
        """Queue a (band, h, w) window (h, w at most the tile); return the outputs now settled.

        Returns:
            (key, (C, h, w) probabilities) of the windows whose calls finished, in the
            order they were put.
        """
        self._pending.append((key, chip))
        return self._flush() if len(self._pending) == self.batch_size else []

    def drain(self) -> list[tuple[K, np.ndarray]]:
        """Run what is queued and hand back every output still outstanding, in order."""
        settled = self._flush() if self._pending else []
        while self._inflight:
            settled += self._settle()
        return settled

    def _call(self, chips: list[np.ndarray]) -> np.ndarray:
        return np.asarray(self.forward(np.stack(chips)), dtype=np.float32)

    def _flush(self) -> list[tuple[K, np.ndarray]]:
        """Send the pending windows to the network (in a stream when there are several)."""
        chips = [pad_to_multiple(chip, self.tile)[0] for _, chip in self._pending]
        if self.pad_batches and len(chips) < self.batch_size:
            chips += [np.zeros_like(chips[0])] * (self.batch_size - len(chips))
        future: Future[np.ndarray] = Future()
        if self._pool is None:
            future.set_result(self._call(chips))
        else:
            future = self._pool.submit(self._call, chips)
        batch = [(key, (chip.shape[1], chip.shape[2])) for key, chip in self._pending]
        self._inflight.append((batch, future))
        self.stats.windows += len(batch)
        self.stats.slots += len(chips)
        self.stats.calls += 1
        self._pending = []
        settled: list[tuple[K, np.ndarray]] = []
        while len(self._inflight) > self._ahead:
            settled += self._settle()
        return settled

    def _settle(self) -> list[tuple[K, np.ndarray]]:
        """The outputs of the oldest call in flight, cropped back to their windows."""
        batch, future = self._inflight.popleft()
        out = future.result()
        n = self.batch_size if self.pad_batches and len(batch) < self.batch_size else len(batch)
        if out.ndim != 4 or out.shape[0] != n or out.shape[2:] != (self.tile, self.tile):
            raise InputError(f"forward returned {out.shape} for {n} windows of {self.tile} px")
        return [(key, prob[:, :h, :w]) for (key, (h, w)), prob in zip(batch, out, strict=False)]


# --- the blend -----------------------------------------------------------------------------


class RowAccumulator:
    """Weighted sums of window outputs over a box; finished rows come back normalised.

    Windows are added anywhere at or below the first row not yet handed back; rows are
    handed back top to bottom (:meth:`finish`), divided by their summed weights, and
    dropped, so only the rows between the two are held.
    """

    def __init__(self, box: Box) -> None:
        """Start with nothing added over ``box`` (global pixels) and no pixel valid."""
        self.box = box
        self._base = box.y0  # global row of _acc[:, 0] and _wsum[0]
        self._acc: np.ndarray | None = None
        self._wsum = np.zeros((0, box.w), dtype=np.float32)
        self._valid = np.zeros((box.h, box.w), dtype=bool)

    @property
    def weights(self) -> np.ndarray:
        """Summed weights of the rows held, from the first row not yet handed back."""
        return self._wsum

    def _grow(self, upto: int) -> None:
        """Hold rows up to global row ``upto`` (exclusive)."""
        need = upto - self._base
        if need <= self._wsum.shape[0]:
            return
        wsum = np.zeros((need, self.box.w), dtype=np.float32)
        wsum[: self._wsum.shape[0]] = self._wsum
        self._wsum = wsum
        if self._acc is not None:
            acc = np.zeros((self._acc.shape[0], need, self.box.w), dtype=np.float32)
            acc[:, : self._acc.shape[1]] = self._acc
            self._acc = acc

    def mark_valid(self, region: Box, valid: np.ndarray) -> None:
        """Record which pixels of ``region`` (its (y, x) ``valid`` mask) have data, inside the box."""
        box = self.box
        part = Box(max(region.y0, box.y0), max(region.x0, box.x0),
                   min(region.y1, box.y1), min(region.x1, box.x1))
        if part.h > 0 and part.w > 0:
            self._valid[part.within(box)] = valid[part.within(region)]

    def add(self, y0: int, x0: int, probs: np.ndarray, prof_y: np.ndarray, prof_x: np.ndarray) -> None:
        """Add a window's output, weighted by the outer product of its profiles.

        Args:
            y0: Global row of the window's first pixel.
            x0: Global column of the window's first pixel.
            probs: (C, h, w) output of the window (what lies outside the box is ignored).
            prof_y: Vertical weights of the window (at least ``h`` long).
            prof_x: Horizontal weights of the window (at least ``w`` long).

        Raises:
            ValueError: The window reaches rows already handed back.
        """
        box = self.box
        iy0, iy1 = max(y0, box.y0), min(y0 + probs.shape[1], box.y1)
        ix0, ix1 = max(x0, box.x0), min(x0 + probs.shape[2], box.x1)
        if iy0 < self._base and iy1 > iy0:
            raise ValueError(f"a window at row {y0} reaches rows before {self._base}, already handed back")
        self._grow(iy1)
        if self._acc is None:
            self._acc = np.zeros((probs.shape[0], self._wsum.shape[0], box.w), dtype=np.float32)
        wt = np.outer(prof_y[iy0 - y0 : iy1 - y0], prof_x[ix0 - x0 : ix1 - x0])
        dst = (slice(iy0 - self._base, iy1 - self._base), slice(ix0 - box.x0, ix1 - box.x0))
        self._acc[(slice(None), *dst)] += probs[:, iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] * wt
        self._wsum[dst] += wt

    def finish(self, upto: int) -> RowBand | None:
        """Hand back the rows before global row ``upto`` (within the box) and drop them.

        Pixels that are not valid, or that no window reached, get probability 0.

        Returns:
            The rows, or None when there are none left before ``upto``.
        """
        box = self.box
        upto = min(upto, box.y1)
        if upto <= self._base:
            return None
        self._grow(upto)
        n = upto - self._base
        valid = self._valid[self._base - box.y0 : upto - box.y0]
        if self._acc is None:
            band = RowBand(self._base, None, valid)
        else:
            covered = (self._wsum[:n] > 0) & valid
            # Dividing by infinity zeroes the rest: an unmasked division, twice as fast as
            # one with ``where=`` and bitwise the same where a window reached.
            weights = np.where(covered, self._wsum[:n], np.float32(np.inf))
            out = np.empty((self._acc.shape[0], n, box.w), np.float32)
            probs = np.divide(self._acc[:, :n], weights, out=out)
            band = RowBand(self._base, probs, valid)
            self._acc = self._acc[:, n:].copy()
        self._wsum = self._wsum[n:].copy()
        self._base = upto
        return band


_Outputs = list[tuple[tuple[int, int], np.ndarray]]
"""Window outputs handed back by a :class:`BatchQueue` keyed by window start (row, column)."""


def _queue_row(
    read: Reader,
    queue: BatchQueue[tuple[int, int]],
    acc: RowAccumulator,
    wy: int,
    keep: tuple[int, ...],
    tile: int,
    raster: tuple[int, int],
) -> _Outputs:
    """Read one window row, record its valid pixels and queue its windows; return settled outputs."""
    if not keep:
        return []
    c0 = keep[0]
    region = Box(wy, c0, min(wy + tile, raster[0]), min(keep[-1] + tile, raster[1]))
    image, valid = read(region)
    # Valid pixels of the box, copied as the rows are read (rows no kept window reads lie
    # outside every target).
    acc.mark_valid(region, valid)
    settled = []
    for wx in keep:
        # Windows that hold no valid pixel only ever land on nodata: skip them.
        if not valid[:, wx - c0 : wx - c0 + tile].any():
            continue
        settled += queue.put((wy, wx), image[:, :, wx - c0 : wx - c0 + tile])
    return settled


def _add_all(acc: RowAccumulator, grid: WindowRows, outputs: _Outputs) -> None:
    """Add settled window outputs to the accumulator, with their windows' profiles."""
    for (wy, wx), probs in outputs:
        acc.add(wy, wx, probs, grid.prof_y[wy], grid.prof_x[wx])


def _shift(box: Box, by: int) -> Box:
    return Box(box.y0 + by, box.x0 + by, box.y1 + by, box.x1 + by)


def mirrored(read: Reader, raster: tuple[int, int], margin: int) -> Reader:
    """A reader of the raster grown by ``margin`` mirrored pixels on every side.

    Boxes are in the grown raster's pixels (global pixel (0, 0) is at (margin, margin)).
    Pixels outside the raster are its pixels reflected about the edge, normalised ones
    and the valid mask alike: the network sees plausible neighbours there, never a fill
    value that normalisation would turn into an outlier.

    Args:
        read: Reads boxes of the raster itself.
        raster: Raster (height, width).
        margin: Mirrored pixels on every side.
    """

    def read_grown(box: Box) -> tuple[np.ndarray, np.ndarray]:
        inside = _shift(box, -margin)
        if inside.y0 >= 0 and inside.x0 >= 0 and inside.y1 <= raster[0] and inside.x1 <= raster[1]:
            return read(inside)
        rows = mirror_index(inside.y0, inside.y1, raster[0])
        cols = mirror_index(inside.x0, inside.x1, raster[1])
        src = Box(int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
        image, valid = read(src)
        rows, cols = rows - src.y0, cols - src.x0
        return take_runs(take_runs(image, rows, 1), cols, 2), take_runs(take_runs(valid, rows, 0), cols, 1)

    return read_grown


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
    margin: int = 0,
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
        streams: Forward calls in flight at once, in threads (see :class:`BatchQueue`).
            Results are still added in window order.
        margin: Mirrored pixels around the raster that the window grid covers (see
            :func:`mirrored`); ``read`` still reads raster pixels only.

    Yields:
        :class:`RowBand` s covering ``box`` from top to bottom. Invalid pixels and
        pixels no window reached have probability 0.

    Raises:
        InputError: Bad overlap or mode, or forward outputs of the wrong shape.
    """
    check_blend(tile, overlap, mode)
    if margin > 0:
        # The same blend over the grown raster, its rows handed back in the raster's pixels.
        moved = [_shift(t, margin) for t in (targets if targets is not None else [box])]
        for row in blend_rows(mirrored(read, raster, margin), forward, tile, overlap, grown(raster, margin),
                               _shift(box, margin), batch_size, pad_batches, mode, moved, stats, streams):
            yield RowBand(row.y0 - margin, row.probs, row.valid)
        return
    grid = window_rows(raster, box, tile, overlap, mode, targets if targets is not None else [box])
    acc = RowAccumulator(box)
    bs = call_size(raster, tile, overlap, batch_size)
    with BatchQueue[tuple[int, int]](forward, tile, bs, pad_batches, streams, stats) as queue:
        for i, (wy, keep) in enumerate(grid.rows):
            _add_all(acc, grid, _queue_row(read, queue, acc, wy, keep, tile, raster))
            # Rows above the next window row, and above every window still queued, are final.
            upto = grid.rows[i + 1][0] if i + 1 < len(grid.rows) else box.y1
            oldest = queue.oldest()
            band = acc.finish(upto if oldest is None else min(upto, oldest[0]))
            if band is not None:
                yield band
        _add_all(acc, grid, queue.drain())
    band = acc.finish(box.y1)
    if band is not None:
        yield band


def blend_windows(
    image: np.ndarray,
    valid: np.ndarray,
    forward: Forward,
    tile: int,
    overlap: int,
    origin: tuple[int, int],
    raster: tuple[int, int],
    out_box: Box,
    batch_size: int,
    pad_batches: bool,
    mode: str = "cosine",
    margin: int = 0,
) -> tuple[np.ndarray, int]:
    """Blend the windows touching a block, from an array in memory (see :func:`blend_rows`).

    Args:
        image: (band, y, x) float32 pixels covering the block's halo
            (:func:`segpipe.grid.tiling.halo_bounds`).
        valid: (y, x) bool mask of ``image``, False on nodata.
        forward: (N, band, tile, tile) windows -> (N, C, tile, tile) probabilities.
        tile: Window size.
        overlap: Window overlap (0 <= overlap < tile).
        origin: Global (row, column) of ``image[:, 0, 0]``.
        raster: Raster (height, width).
        out_box: Output block in global pixels.
        batch_size: Windows per forward call.
        pad_batches: Pad short batches with zero windows to one fixed shape.
        mode: Blend mode.
        margin: Mirrored pixels around the raster that the window grid covers; ``image``
            must hold the raster pixels they mirror (:func:`segpipe.grid.tiling.halo_bounds`
            with the same margin).

    Returns:
        (C, h, w) float32 probabilities ((0, h, w) when no valid pixel is in reach) and
        the number of windows computed.

    Raises:
        InputError: Arrays or forward outputs of the wrong shape, bad window settings,
            or an image that does not cover the halo.
    """
    check_blend(tile, overlap, mode)
    if image.ndim != 3 or valid.shape != image.shape[1:]:
        raise InputError(f"image {image.shape} and valid mask {valid.shape} do not fit (band, y, x)")
    held = Box.sized(origin[0], origin[1], image.shape[1], image.shape[2])
    need = halo_bounds(out_box, raster, tile, tile - overlap, margin)
    if need.y0 < held.y0 or need.x0 < held.x0 or need.y1 > held.y1 or need.x1 > held.x1:
        raise InputError(f"the array at {origin} of shape {image.shape} does not cover the halo {need}")

    def read(b: Box) -> tuple[np.ndarray, np.ndarray]:
        sl = b.within(held)
        return image[(slice(None), *sl)], valid[sl]

    stats = BlendStats()
    bands = list(blend_rows(read, forward, tile, overlap, raster, out_box, batch_size, pad_batches, mode,
                            stats=stats, margin=margin))
    channels = next((b.probs.shape[0] for b in bands if b.probs is not None), 0)
    out = np.zeros((channels, out_box.h, out_box.w), dtype=np.float32)
    for band in bands:
        if band.probs is not None and channels:
            out[:, band.y0 - out_box.y0 : band.y0 - out_box.y0 + band.probs.shape[1]] = band.probs
    return out, stats.windows
