"""Window rows read through a rolling slab, so each stored chunk is decoded once per task.

A task reads its windows a row at a time: bands ``tile`` px tall that overlap by
``overlap`` px and rarely start on a chunk edge, so a zarr chunk row under two or three
window rows would be decompressed (and normalised) two or three times. Profiled at
16384² px with a model that costs almost nothing, that decoding was the largest cost
after the model itself (``docs/benchmarks.md``). :class:`RowSlab` keeps the prepared
rows read so far (and not yet passed) and extends them to the next chunk edge, so
every chunk row is read once; the values are the reader's own, pixel for pixel.
"""

from __future__ import annotations

import numpy as np

from segpipe.grid.box import Box
from segpipe.stages.predict.blend import Reader

__all__ = ["RowSlab"]


class RowSlab:
    """A :data:`~segpipe.stages.predict.blend.Reader` that reads ``read``'s rows once, top to bottom.

    Boxes that start at or below the slab's first row, with the slab's columns, are
    served from it, and only the missing rows are read, down to the next multiple of
    ``align`` (the store's chunk rows); rows above the box are dropped, so the slab holds
    at most a window row and two chunk rows. Any other box (other columns, rows already
    dropped) starts a new slab. Returned arrays are never written afterwards: extending
    the slab builds new arrays.

    Args:
        read: Reads prepared pixels (band, y, x) and the valid mask (y, x) of a box.
        align: Rows of the stored chunks.
        height: Rows of the raster (reads stop there).
    """

    def __init__(self, read: Reader, align: int, height: int) -> None:
        self._read = read
        self._align = max(1, align)
        self._height = height
        self._box: Box | None = None
        self._pixels = np.zeros((0, 0, 0), dtype=np.float32)
        self._valid = np.zeros((0, 0), dtype=bool)

    def __call__(self, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """Prepared pixels and valid mask of ``box``, read once per row."""
        held = self._box
        if held is None or (box.x0, box.x1) != (held.x0, held.x1) or box.y0 < held.y0:
            self._start(box)
        else:  # boxes come top to bottom: rows above this one are not asked for again
            self._drop_above(box.y0)
        self._extend(box.y1)
        assert self._box is not None
        top, bottom = box.y0 - self._box.y0, box.y1 - self._box.y0
        return self._pixels[:, top:bottom], self._valid[top:bottom]

    def _start(self, box: Box) -> None:
        """An empty slab at ``box``'s first row and columns."""
        self._box = Box(box.y0, box.x0, box.y0, box.x1)
        self._pixels, self._valid = self._pixels[:, :0, :0], self._valid[:0, :0]

    def _extend(self, upto: int) -> None:
        """Read the rows from the slab's end to ``upto``, rounded up to a chunk edge."""
        held = self._box
        assert held is not None
        if upto <= held.y1:
            return
        end = min(self._height, -(-upto // self._align) * self._align)
        pixels, valid = self._read(Box(held.y1, held.x0, end, held.x1))
        if held.h:
            pixels = np.concatenate([self._pixels, pixels], axis=1)
            valid = np.concatenate([self._valid, valid], axis=0)
        self._pixels, self._valid = pixels, valid
        self._box = Box(held.y0, held.x0, end, held.x1)

    def _drop_above(self, row: int) -> None:
        """Forget the rows above ``row`` (they go with the next extension's copy)."""
        held = self._box
        assert held is not None
        if row <= held.y0:
            return
        cut = min(row, held.y1) - held.y0
        self._pixels, self._valid = self._pixels[:, cut:], self._valid[cut:]
        self._box = Box(held.y0 + cut, held.x0, held.y1, held.x1)
