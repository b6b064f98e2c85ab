"""Join the patches that block borders cut, one row of blocks at a time.

Blocks arrive row by row (:func:`~.vector_blocks.polygonize_block`, left to right). A
component that touches no border it shares with an unseen block is complete; the others
are joined with their neighbours across borders (same class on both sides of an edge:
4-connectivity) by connected components of a small graph, and a joined patch stays *open*
while it reaches the bottom edge of the current row. Open patches keep their parts and
are unioned once, when they close, so memory holds the current row and the open patches
only, never the whole raster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import shapely
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from segpipe.stages.export.vector_blocks import BlockPolygons

__all__ = ["Patches", "RowMerger"]


@dataclass
class Patches:
    """Complete patches, column-wise, in chunks: geometries in global pixel coordinates."""

    values: list[np.ndarray] = field(default_factory=list)
    pixels: list[np.ndarray] = field(default_factory=list)
    conf_sum: list[np.ndarray] = field(default_factory=list)
    conf_count: list[np.ndarray] = field(default_factory=list)
    geometry: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(v) for v in self.values)

    def add(
        self, values: np.ndarray, pixels: np.ndarray, conf_sum: np.ndarray, conf_count: np.ndarray,
        geometry: np.ndarray,
    ) -> None:
        """Append patches (equal-length arrays)."""
        self.values.append(np.asarray(values, np.int64))
        self.pixels.append(np.asarray(pixels, np.int64))
        self.conf_sum.append(np.asarray(conf_sum, np.float64))
        self.conf_count.append(np.asarray(conf_count, np.int64))
        self.geometry.append(np.asarray(geometry, dtype=object))

    def column(self, name: str) -> np.ndarray:
        """One attribute of every patch, in order."""
        chunks: list[np.ndarray] = getattr(self, name)
        return np.concatenate(chunks) if chunks else np.zeros(0, object if name == "geometry" else np.int64)


@dataclass
class _Open:
    """A patch that may continue below: its class, totals and parts (WKB) so far."""

    value: int
    pixels: int
    conf_sum: float
    conf_count: int
    parts: list[shapely.Geometry]

    def absorb(self, other: _Open) -> None:
        self.pixels += other.pixels
        self.conf_sum += other.conf_sum
        self.conf_count += other.conf_count
        self.parts.extend(other.parts)


def _same_class_pairs(
    a: np.ndarray, b: np.ndarray, base_a: int, base_b: int, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Node pairs facing across a border with the same class (``a``/``b`` local ids, 0 or -1 = none)."""
    ok = (a > 0) & (b > 0)
    na, nb = a[ok] + base_a, b[ok] + base_b
    same = values[na] == values[nb]
    return na[same], nb[same]


class RowMerger:
    """Feed rows of polygonized blocks in order; get back the patches each row completes."""

    def __init__(self, width: int) -> None:
        """Start above the first row.

        Args:
            width: Columns of the whole raster.
        """
        self.width = width
        self.open: list[_Open] = []
        # Open patch id of each pixel of the previous row's last line (-1: none).
        self.bottom = np.full(width, -1, np.int64)

    def add_row(self, row: Sequence[BlockPolygons], last: bool) -> Patches:
        """Join one row of blocks with the open patches above it.

        Args:
            row: The row's blocks, left to right.
            last: Whether this is the last row (every patch then completes).

        Returns:
            The patches that are complete after this row.
        """
        k = len(self.open)
        # Node ids: open patches 0..k-1, then label l (1..n) of block c is bases[c] + l.
        bases = np.concatenate([[k], k + np.cumsum([len(bp.classes) - 1 for bp in row])]).astype(np.int64) - 1
        values = np.concatenate(
            [[p.value for p in self.open]] + [bp.classes[1:] for bp in row]
        ).astype(np.int64)
        ends: list[tuple[np.ndarray, np.ndarray]] = []
        for c, bp in enumerate(row):
            above = self.bottom[bp.box.x0 : bp.box.x1]
            ends.append(_same_class_pairs(above + 1, bp.strips.top, -1, int(bases[c]), values))
            if c:
                ends.append(_same_class_pairs(row[c - 1].strips.right, bp.strips.left, int(bases[c - 1]),
                                              int(bases[c]), values))
        n = int(bases[-1]) + 1
        a = np.concatenate([e[0] for e in ends]) if ends else np.zeros(0, np.int64)
        b = np.concatenate([e[1] for e in ends]) if ends else np.zeros(0, np.int64)
        _, group = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
        going_on = np.zeros(group.max(initial=-1) + 1, bool)
        if not last:
            for c, bp in enumerate(row):
                labels = bp.strips.bottom
                going_on[group[labels[labels > 0] + bases[c]]] = True
        return self._close(row, bases, group, going_on)

    def _close(
        self, row: Sequence[BlockPolygons], bases: np.ndarray, group: np.ndarray, going_on: np.ndarray
    ) -> Patches:
        """Emit the groups that end here; keep the others open, with the new bottom line."""
        members = np.bincount(group)
        done = Patches()
        gathered: dict[int, _Open] = {}
        for node, patch in enumerate(self.open):
            self._gather(gathered, int(group[node]), patch)
        for c, bp in enumerate(row):
            nodes = np.arange(1, len(bp.classes)) + bases[c]
            g = group[nodes]
            alone = (members[g] == 1) & ~going_on[g]
            single = np.nonzero(alone)[0] + 1  # complete in its block: no union needed
            done.add(bp.classes[single], bp.sizes[single], bp.conf_sum[single], bp.conf_count[single],
                     bp.shapes[single])
            for label in np.nonzero(~alone)[0] + 1:
                part = _Open(int(bp.classes[label]), int(bp.sizes[label]), float(bp.conf_sum[label]),
                             int(bp.conf_count[label]), [bp.shapes[label]])
                self._gather(gathered, int(g[label - 1]), part)
        opened: dict[int, int] = {}
        closed: list[_Open] = []
        self.open = []
        for gid, patch in gathered.items():
            if going_on[gid]:
                opened[gid] = len(self.open)
                self.open.append(patch)
            else:
                closed.append(patch)
        if closed:
            done.add(np.array([p.value for p in closed]), np.array([p.pixels for p in closed]),
                     np.array([p.conf_sum for p in closed]), np.array([p.conf_count for p in closed]),
                     np.array([shapely.union_all(p.parts) for p in closed], dtype=object))
        self.bottom = np.full(self.width, -1, np.int64)
        for c, bp in enumerate(row):
            labels = bp.strips.bottom
            ok = labels > 0
            if going_on.any():
                ids = [opened.get(int(gid), -1) for gid in group[labels[ok] + bases[c]]]
                self.bottom[bp.box.x0 : bp.box.x1][ok] = ids
        return done

    @staticmethod
    def _gather(gathered: dict[int, _Open], gid: int, part: _Open) -> None:
        if gid in gathered:
            gathered[gid].absorb(part)
        else:
            gathered[gid] = _Open(part.value, part.pixels, part.conf_sum, part.conf_count, list(part.parts))
