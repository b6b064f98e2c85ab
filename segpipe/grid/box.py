"""The one pixel box type, and the one way to cut a raster (or a box) into boxes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

__all__ = ["Box", "iter_boxes"]


class Box(NamedTuple):
    """A half-open pixel box ``[y0:y1, x0:x1]`` in global raster coordinates."""

    y0: int
    x0: int
    y1: int
    x1: int

    @classmethod
    def sized(cls, y0: int, x0: int, h: int, w: int) -> Box:
        """The box of ``h`` rows and ``w`` columns starting at (y0, x0)."""
        return cls(y0, x0, y0 + h, x0 + w)

    @property
    def h(self) -> int:
        """Rows."""
        return self.y1 - self.y0

    @property
    def w(self) -> int:
        """Columns."""
        return self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, columns) slices selecting this box from the whole raster."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def within(self, outer: Box) -> tuple[slice, slice]:
        """(rows, columns) slices selecting this box from an array that covers ``outer``."""
        return (
            slice(self.y0 - outer.y0, self.y1 - outer.y0),
            slice(self.x0 - outer.x0, self.x1 - outer.x0),
        )


def iter_boxes(height: int, width: int, step: int, origin: tuple[int, int] = (0, 0)) -> Iterator[Box]:
    """Cut a ``height`` x ``width`` area into ``step``-sized boxes, row-major; edge boxes are cut short.

    Args:
        height: Rows of the area.
        width: Columns of the area.
        step: Box edge.
        origin: Global (row, column) of the area's first pixel.

    Yields:
        The boxes, in global coordinates.

    Raises:
        ValueError: ``step`` is not positive.
    """
    if step <= 0:
        raise ValueError(f"box step {step} must be positive")
    oy, ox = origin
    for y0 in range(0, height, step):
        for x0 in range(0, width, step):
            yield Box(oy + y0, ox + x0, oy + min(y0 + step, height), ox + min(x0 + step, width))
