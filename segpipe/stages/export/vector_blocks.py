"""Per-block work of the vector export: label, measure and polygonize one block of ``classes``.

Everything here sees one block only (a task on a dask worker, or a local call). Components
are 4-connected runs of one class value inside the block; values 0 (unlabelled) and 255
(nodata) belong to none. Geometries are in *global pixel coordinates* (column, row), so the
parts of a patch cut by block borders share exact integer vertices and union cleanly; the
driver (:mod:`segpipe.stages.export.vector`) maps them to the CRS at the very end.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from scipy import ndimage

from segpipe.grid.box import Box
from segpipe.io.store import NODATA_U8, open_layer

__all__ = [
    "BlockFacts",
    "BlockPolygons",
    "Strips",
    "label_block",
    "polygonize_block",
    "sieve_facts",
    "vertical_time",
    "horizontal_time",
]

SKIPPED = (0, NODATA_U8)  # unlabelled and nodata: never part of a patch


@dataclass(frozen=True)
class Strips:
    """Component labels along the four edges of a block (0 = no component)."""

    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray

    @classmethod
    def of(cls, labels: np.ndarray) -> Strips:
        """The edges of a label image (copies, so the block itself can be freed)."""
        return cls(labels[0].copy(), labels[-1].copy(), labels[:, 0].copy(), labels[:, -1].copy())


@dataclass(frozen=True)
class BlockFacts:
    """What the sieve needs from one block (see :mod:`segpipe.stages.export.vector_sieve`).

    Attributes:
        box: The block.
        classes: Class value per label (index 0 unused), uint8.
        sizes: Pixels per label (index 0 unused), int64.
        pairs: (k, 3) int64 rows (label a, label b, first encounter time) of 4-adjacent
            components of different classes inside the block, each pair once.
        strips: Labels along the block's edges.
    """

    box: Box
    classes: np.ndarray
    sizes: np.ndarray
    pairs: np.ndarray
    strips: Strips


@dataclass(frozen=True)
class BlockPolygons:
    """One block's components, polygonized.

    Attributes:
        box: The block.
        classes: Class value per label (index 0 unused).
        sizes: Pixels per label (index 0 unused).
        conf_sum: Sum of valid confidence values per label (zeros without a confidence layer).
        conf_count: Pixels with a valid confidence value per label.
        shapes: Polygon per label in global pixel coordinates (object array; index 0 is None).
        strips: Labels along the block's edges.
    """

    box: Box
    classes: np.ndarray
    sizes: np.ndarray
    conf_sum: np.ndarray
    conf_count: np.ndarray
    shapes: np.ndarray
    strips: Strips


def vertical_time(y: np.ndarray, x: np.ndarray, width: int) -> np.ndarray:
    """When GDAL's sieve meets the pair (y - 1, x)-(y, x): its scan visits (y, x), the pair above first."""
    time: np.ndarray = (y.astype(np.int64) * width + x) * 2
    return time


def horizontal_time(y: np.ndarray, x: np.ndarray, width: int) -> np.ndarray:
    """When GDAL's sieve meets the pair (y, x - 1)-(y, x): right after the pair above (y, x)."""
    time: np.ndarray = (y.astype(np.int64) * width + x) * 2 + 1
    return time


def label_block(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-connected components of equal value (0 and 255 excluded).

    Args:
        values: (h, w) uint8 class values.

    Returns:
        int32 labels (0 = no component, else 1..n) and the class value of each label
        (uint8, length n + 1, index 0 unused).
    """
    labels = np.zeros(values.shape, np.int32)
    classes: list[np.ndarray] = [np.zeros(1, np.uint8)]
    count = 0
    for value in np.unique(values):
        if int(value) in SKIPPED:
            continue
        # ndimage's default structure is the cross: 4-connectivity, as GDAL's connectivity=4.
        found, n = ndimage.label(values == value)
        inside = found > 0
        labels[inside] = found[inside] + count
        classes.append(np.full(n, value, np.uint8))
        count += n
    return labels, np.concatenate(classes)


def _read(store: str | Path, layer: str, box: Box) -> np.ndarray:
    return np.asarray(open_layer(store, layer)[box.slices])


def _pairs(labels: np.ndarray, box: Box, width: int) -> np.ndarray:
    """Adjacent label pairs inside the block, each with its first encounter time in GDAL's scan."""
    rows, cols = np.nonzero((labels[1:] != labels[:-1]) & (labels[1:] > 0) & (labels[:-1] > 0))
    at = vertical_time(rows + 1 + box.y0, cols + box.x0, width)
    v = np.stack([labels[rows + 1, cols], labels[rows, cols], at])
    rows, cols = np.nonzero((labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0))
    at = horizontal_time(rows + box.y0, cols + 1 + box.x0, width)
    h = np.stack([labels[rows, cols + 1], labels[rows, cols], at])
    found = np.concatenate([v, h], axis=1).astype(np.int64)
    a, b = np.minimum(found[0], found[1]), np.maximum(found[0], found[1])
    # Keep each pair once, at its earliest time: sort by time, then the first of each pair.
    order = np.argsort(found[2], kind="stable")
    key = a[order] * (int(labels.max()) + 1) + b[order]
    _, first = np.unique(key, return_index=True)
    keep = order[first]
    return np.stack([a[keep], b[keep], found[2][keep]], axis=1)


def sieve_facts(store: str | Path, box: Box, width: int) -> BlockFacts:
    """Label one block of ``classes`` and list what the whole-raster sieve needs from it.

    Args:
        store: Region store.
        box: The block.
        width: Width of the whole raster (encounter times are global).
    """
    labels, classes = label_block(_read(store, "classes", box))
    sizes = np.bincount(labels.ravel(), minlength=len(classes)).astype(np.int64)
    return BlockFacts(box, classes, sizes, _pairs(labels, box, width), Strips.of(labels))


def apply_sieve(values: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
    """The block's values after the sieve: each component takes ``lut[label]``."""
    if lut is None:
        return values
    labels, _ = label_block(values)
    out = values.copy()
    inside = labels > 0
    out[inside] = lut[labels[inside]]
    return out


def _polygons(labels: np.ndarray, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """GDAL's polygons of each label (global pixel coordinates), built in bulk.

    Building each polygon from its GeoJSON on its own (``shapely.geometry.shape``) took
    five times as long as GDAL's polygonizing; one ``linearrings`` and one ``polygons``
    call for the whole block do not.
    """
    rings: list[list[tuple[float, float]]] = []
    per_polygon: list[int] = []
    found: list[int] = []
    offset = Affine.translation(box.x0, box.y0)
    for geom, label in rasterio.features.shapes(labels, mask=labels > 0, connectivity=4, transform=offset):
        rings.extend(geom["coordinates"])
        per_polygon.append(len(geom["coordinates"]))
        found.append(int(label))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, dtype=object)
    coords = np.array(list(itertools.chain.from_iterable(rings)), np.float64)
    ring_ids = np.repeat(np.arange(len(rings)), [len(r) for r in rings])
    polygons = shapely.polygons(
        shapely.linearrings(coords, indices=ring_ids), indices=np.repeat(np.arange(len(found)), per_polygon)
    )
    return np.asarray(found, np.int64), polygons


def polygonize_block(store: str | Path, box: Box, lut: np.ndarray | None, confidence: bool) -> BlockPolygons:
    """Polygonize one block of ``classes`` (sieved by ``lut`` when given), one polygon per component.

    Args:
        store: Region store.
        box: The block.
        lut: New class value per component label of the raw block (from the sieve plan), or None.
        confidence: Whether the store has a ``confidence`` layer to average per component.
    """
    labels, classes = label_block(apply_sieve(_read(store, "classes", box), lut))
    n = len(classes)
    sizes = np.bincount(labels.ravel(), minlength=n).astype(np.int64)
    conf_sum: np.ndarray = np.zeros(n)
    conf_count: np.ndarray = np.zeros(n, np.int64)
    if confidence:
        conf = _read(store, "confidence", box)
        ok = (labels > 0) & (conf != NODATA_U8)
        conf_sum = np.bincount(labels[ok], weights=conf[ok].astype(np.float64), minlength=n)
        conf_count = np.bincount(labels[ok], minlength=n).astype(np.int64)
    shapes = np.full(n, None, dtype=object)
    # Labels, not classes, are polygonized: one polygon per component, as connectivity=4 gives.
    found, polygons = _polygons(labels, box)
    shapes[found] = polygons
    return BlockPolygons(box, classes, sizes, conf_sum, conf_count, shapes, Strips.of(labels))
