"""Chips for training, drawn straight from the region store where labels exist.

The region is never loaded whole: labelled positions are gathered block by block
(at most ``max_per_block`` per block), and chips are read through a small LRU
cache of store blocks. Validation is spatially disjoint from training: the
region is cut into square cells, each cell wholly train or wholly validation
(:mod:`segpipe.stages.train.split` decides which), and labels of the other part are
masked out of every chip.

Chip centres are drawn by :class:`CentreSampler`, uniformly over labelled positions or
class-balanced; training and ``export-chips`` share it, so both draw the same chips.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import dask
import numpy as np

from segpipe.errors import LabelsError
from segpipe.io.labels import SingleClassWarning
from segpipe.stages.train.config import CHIP_MULTIPLE
from segpipe.types import ClassInfo, default_colour

__all__ = [
    "IGNORE",
    "BlockReader",
    "Candidates",
    "CentreSampler",
    "ChipSampler",
    "PER_BLOCK",
    "find_candidates",
    "label_classes",
]


class _Sliceable(Protocol):
    shape: tuple[int, ...]

    def __getitem__(self, key: Any) -> Any: ...


class BlockReader:
    """Read arbitrary windows of a (…, y, x) array through an LRU cache of whole blocks.

    Chips overlap and repeat; decoding each block once keeps a streaming loader
    fast without holding more than ``max_blocks`` blocks in memory.
    """

    def __init__(self, array: _Sliceable, block: int, max_blocks: int = 64) -> None:
        self.array = array
        self.block = block
        self.max_blocks = max_blocks
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _get(self, by: int, bx: int) -> np.ndarray:
        key = (by, bx)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        b = self.block
        data = np.asarray(self.array[..., by * b : (by + 1) * b, bx * b : (bx + 1) * b])
        self._cache[key] = data
        if len(self._cache) > self.max_blocks:
            self._cache.popitem(last=False)
        return data

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """The window [y0:y0+h, x0:x0+w] (must lie inside the array)."""
        b = self.block
        lead = self.array.shape[:-2]
        out = np.empty((*lead, h, w), dtype=self._get(y0 // b, x0 // b).dtype)
        for by in range(y0 // b, (y0 + h - 1) // b + 1):
            for bx in range(x0 // b, (x0 + w - 1) // b + 1):
                data = self._get(by, bx)
                ys, ye = max(y0, by * b), min(y0 + h, (by + 1) * b)
                xs, xe = max(x0, bx * b), min(x0 + w, (bx + 1) * b)
                out[..., ys - y0 : ye - y0, xs - x0 : xe - x0] = data[
                    ..., ys - by * b : ye - by * b, xs - bx * b : xe - bx * b
                ]
        return out


@dataclass(frozen=True)
class Candidates:
    """Labelled positions to centre chips on.

    Attributes:
        y: Rows.
        x: Columns.
        value: Label value at (y, x).
        counts: Labelled pixels of each value 0-255 in the whole labels (all pixels,
            not only the sampled positions), when known.
    """

    y: np.ndarray
    x: np.ndarray
    value: np.ndarray
    counts: np.ndarray | None = None

    def subset(self, keep: np.ndarray) -> Candidates:
        """The candidates where ``keep`` is True."""
        return Candidates(self.y[keep], self.x[keep], self.value[keep], self.counts)

    def at_most(self, limit: int, rng: np.random.Generator) -> Candidates:
        """At most ``limit`` of the candidates, drawn without replacement (in their order)."""
        if self.y.size <= limit:
            return self
        keep = np.zeros(self.y.size, dtype=bool)
        keep[rng.choice(self.y.size, limit, replace=False)] = True
        return self.subset(keep)


def _block_candidates(
    labels: _Sliceable, y0: int, x0: int, h: int, w: int, limit: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    block = np.asarray(labels[y0 : y0 + h, x0 : x0 + w])
    counts = np.bincount(block.ravel(), minlength=256)
    ys, xs = np.nonzero(block)
    if ys.size > limit:
        pick = np.random.default_rng([seed, y0, x0]).choice(ys.size, limit, replace=False)
        ys, xs = ys[pick], xs[pick]
    return np.stack([ys + y0, xs + x0, block[ys, xs]]).astype(np.int64), counts


# Labelled positions a network samples per store block (a forest may take more).
PER_BLOCK = 4096
# Class index of a pixel no loss or score counts: unlabelled, in the other part, or of a
# class the sample never met.
IGNORE = 255


def find_candidates(
    labels: _Sliceable, block: int, max_per_block: int = PER_BLOCK, seed: int = 0
) -> Candidates:
    """Gather labelled positions block by block (in parallel with the active dask scheduler).

    Raises:
        LabelsError: The labels hold no labelled pixel.
    """
    height, width = labels.shape[-2:]
    tasks = [
        dask.delayed(_block_candidates)(
            labels, y0, x0, min(block, height - y0), min(block, width - x0), max_per_block, seed
        )
        for y0 in range(0, height, block)
        for x0 in range(0, width, block)
    ]
    parts = dask.compute(*tasks, scheduler="threads")
    found = np.concatenate([p for p, _ in parts], axis=1) if parts else np.zeros((3, 0), dtype=np.int64)
    counts = np.sum([c for _, c in parts], axis=0) if parts else np.zeros(256, dtype=np.int64)
    if found.shape[1] == 0:
        raise LabelsError("the store's labels hold no labelled pixel (all 0): nothing to train on")
    return Candidates(found[0], found[1], found[2], counts)


class CentreSampler:
    """Draw chip centres from labelled candidates.

    Args:
        cand: Candidate positions.
        balanced: Draw the centre's class uniformly among the classes present, then a
            position of that class: rare classes are seen as often as common ones.
            Otherwise every candidate is equally likely (classes in proportion).
    """

    def __init__(self, cand: Candidates, balanced: bool = False) -> None:
        if cand.y.size == 0:
            raise LabelsError("no labelled position to centre chips on")
        self.cand = cand
        self.balanced = balanced
        self._order = np.argsort(cand.value, kind="stable")
        values, self._counts = np.unique(cand.value, return_counts=True)
        self.values = values
        self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]])

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Indices into the candidates of ``n`` chip centres."""
        if not self.balanced:
            return rng.integers(0, self.cand.y.size, n)
        k = rng.integers(0, self.values.size, n)
        offset = rng.integers(0, self._counts[k])
        return self._order[self._starts[k] + offset]


class ChipSampler:
    """Draw (image, label) chips centred near labelled candidates.

    Args:
        image: (band, y, x) array (a zarr array: read lazily through a block cache).
        labels: (y, x) label array.
        block: Block edge of the store (cache granularity).
        chip: Chip edge in pixels.
        lut: Maps label values (0-255) to class indices; 255 = ignore.
        cell: Validation cell edge.
        valid_cells: Set of (cy, cx) cells that are validation.
        part: ``train`` or ``valid``: labels of the other part are ignored.

    A ``chip`` larger than the region is clamped to the largest multiple of 32 that
    fits (``self.chip`` holds the edge used); regions under 32 px are padded.
    """

    def __init__(
        self,
        image: _Sliceable,
        labels: _Sliceable,
        block: int,
        chip: int,
        lut: np.ndarray,
        cell: int,
        valid_cells: set[tuple[int, int]],
        part: str,
    ) -> None:
        self.image = BlockReader(image, block)
        self.labels = BlockReader(labels, block)
        self.height, self.width = labels.shape[-2:]
        # Never pad without bound: a chip beyond the region shrinks to the largest multiple
        # of 32 that fits (training records the clamp: TrainConfig.fit_region).
        fits = min(self.height, self.width) // CHIP_MULTIPLE * CHIP_MULTIPLE
        self.chip = fits if chip > min(self.height, self.width) and fits >= CHIP_MULTIPLE else chip
        self.lut = lut
        self.cell = cell
        self.valid_cells = valid_cells
        self.part = part

    def _part_mask(self, y0: int, x0: int) -> np.ndarray:
        c = self.cell
        ys = (np.arange(y0, y0 + self.chip) // c)[:, None]
        xs = (np.arange(x0, x0 + self.chip) // c)[None, :]
        mask = np.zeros((self.chip, self.chip), dtype=bool)
        for cy in np.unique(ys):
            for cx in np.unique(xs):
                if ((int(cy), int(cx)) in self.valid_cells) == (self.part == "valid"):
                    mask |= (ys == cy) & (xs == cx)
        return mask

    def window_for(self, y: int, x: int, rng: np.random.Generator | None) -> tuple[int, int]:
        """Top-left of a chip containing (y, x), jittered when ``rng`` is given, clamped inside."""
        c = self.chip
        if rng is None:
            oy = ox = c // 2
        else:
            oy, ox = (int(v) for v in rng.integers(c // 8, c - c // 8, size=2))
        y0 = int(np.clip(y - oy, 0, max(0, self.height - c)))
        x0 = int(np.clip(x - ox, 0, max(0, self.width - c)))
        return y0, x0

    def read(self, y0: int, x0: int) -> tuple[np.ndarray, np.ndarray]:
        """Image chip (band, c, c) and class-index chip (c, c), 255 where ignored.

        Rasters smaller than a chip are padded (image reflected, labels ignored).
        """
        c = self.chip
        h, w = min(c, self.height - y0), min(c, self.width - x0)
        image = self.image.read(y0, x0, h, w)
        labels = self.lut[self.labels.read(y0, x0, h, w)]
        if (h, w) != (c, c):
            # Reflected, as prediction mirrors the raster's edge: raw zeros would become
            # -mean/std outliers after normalisation (or nodata where nodata is 0).
            image = np.pad(image, ((0, 0), (0, c - h), (0, c - w)), mode="reflect")
            labels = np.pad(labels, ((0, c - h), (0, c - w)), constant_values=IGNORE)
        labels = np.where(self._part_mask(y0, x0), labels, IGNORE).astype(np.uint8)
        return image, labels


def label_classes(
    present: np.ndarray, known: tuple[ClassInfo, ...], ignore: int = IGNORE, store: str | None = None
) -> tuple[tuple[ClassInfo, ...], np.ndarray]:
    """The classes a model learns (the label values present) and the label -> output-index table.

    Warns (:class:`~segpipe.io.labels.SingleClassWarning`) when a single class is present:
    ingest warned already, but a training on it ends with a perfect and meaningless score.

    Args:
        present: Sorted label values found in the labels (0 excluded).
        known: Classes the region store describes (names, colours); values it does not
            describe get a generic name and colour.
        ignore: Table entry of every value not present (ignored by losses and metrics).
        store: The store, named in the warning.

    Returns:
        The classes in output order and a 256-entry uint8 lookup table.
    """
    if len(present) == 1:
        warnings.warn(
            f"the labels of region store {store or '(given)'} hold a single class ({int(present[0])}): the "
            "model learns nothing and its scores of 1.0 mean nothing; label a second class (or ingest "
            "a 0/1 mask with --background-value 0)",
            SingleClassWarning,
            stacklevel=2,
        )
    by_value = {c.value: c for c in known}
    classes = tuple(
        by_value.get(int(v), ClassInfo(int(v), f"class {int(v)}", default_colour(int(v)))) for v in present
    )
    lut = np.full(256, ignore, dtype=np.uint8)
    lut[present] = np.arange(len(present), dtype=np.uint8)
    return classes, lut
