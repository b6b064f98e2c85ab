"""The whole-raster sieve, decided from per-block facts: the same result as ``rasterio.features.sieve``.

GDAL's sieve (``GDALSieveFilter``, 4-connectivity, with a mask) works on the graph of
connected components ("polygons"), never on pixels once they are enumerated:

1. every component gets its whole size in pixels (masked pixels belong to none);
2. every component's *biggest neighbour* is the adjacent component of largest size; of
   equal sizes, the one met first in GDAL's raster scan (row by row, pixel by pixel, the
   pair with the pixel above before the pair with the pixel to the left);
3. a component smaller than the threshold follows biggest neighbours until it reaches one
   at least as large as the threshold and takes that one's value; a walk that cycles
   among small components (or a small component without neighbours) leaves it unchanged.

So the plan needs only the components, their sizes, and for each adjacent pair its first
encounter time. Blocks give those for their inside (:func:`~.vector_blocks.sieve_facts`);
this module joins the parts of components cut by block borders (same class across a border),
adds the pairs across borders, and decides every component's new value. Memory is
proportional to the number of components and adjacent pairs, as GDAL's own sieve, not to
the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from segpipe.stages.export.vector_blocks import BlockFacts, horizontal_time, vertical_time

__all__ = ["sieve_plan"]


def _offsets(facts: Sequence[BlockFacts]) -> np.ndarray:
    """Global id of label 1 of each block (label l of block i is ``offsets[i] + l - 1``)."""
    counts = [len(f.classes) - 1 for f in facts]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _border(a: np.ndarray, b: np.ndarray, base_a: int, base_b: int, times: np.ndarray) -> np.ndarray:
    """(k, 3) rows (global a, global b, time) of the labelled pixel pairs facing across a border."""
    both = (a > 0) & (b > 0)
    return np.stack([a[both] + base_a - 1, b[both] + base_b - 1, times[both]], axis=1).astype(np.int64)


def _cross_pairs(facts: Sequence[BlockFacts], cols: int, offsets: np.ndarray, width: int) -> np.ndarray:
    """Pixel pairs facing across every block border, in global ids, with their encounter times."""
    found = [np.zeros((0, 3), np.int64)]
    for i, f in enumerate(facts):
        box = f.box
        if i % cols:  # the block to the left
            left = facts[i - 1]
            ys = np.arange(box.y0, box.y1)
            times = horizontal_time(ys, np.full_like(ys, box.x0), width)
            found.append(_border(left.strips.right, f.strips.left, offsets[i - 1], offsets[i], times))
        if i >= cols:  # the block above
            above = facts[i - cols]
            xs = np.arange(box.x0, box.x1)
            times = vertical_time(np.full_like(xs, box.y0), xs, width)
            found.append(_border(above.strips.bottom, f.strips.top, offsets[i - cols], offsets[i], times))
    return np.concatenate(found)


def _biggest_neighbour(pairs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Each component's biggest neighbour (largest size, then earliest met), or -1 without neighbours."""
    big = np.full(len(sizes), -1, np.int64)
    if not len(pairs):
        return big
    # Both directions: a pair makes each side a candidate neighbour of the other.
    me = np.concatenate([pairs[:, 0], pairs[:, 1]])
    other = np.concatenate([pairs[:, 1], pairs[:, 0]])
    time = np.concatenate([pairs[:, 2], pairs[:, 2]])
    order = np.lexsort((time, -sizes[other], me))
    first = np.ones(len(order), bool)
    first[1:] = me[order][1:] != me[order][:-1]
    big[me[order][first]] = other[order][first]
    return big


def _targets(big: np.ndarray, sizes: np.ndarray, threshold: int) -> np.ndarray:
    """The component whose value each component takes (itself when it stays as it is).

    Follows biggest neighbours by pointer doubling: after k rounds every component points
    2**k steps down its walk, and large components point to themselves, so a walk that
    reaches a large component within ``n`` steps ends there; one that cycles among small
    components (GDAL stops it) never does and leaves its component unchanged.
    """
    n = len(sizes)
    ids = np.arange(n)
    small = sizes < threshold
    step = np.where(small & (big >= 0), big, ids)
    for _ in range(max(1, int(np.ceil(np.log2(max(n, 2)))) + 1)):
        step = step[step]
    return np.where(small & ~small[step], step, ids)


def sieve_plan(facts: Sequence[BlockFacts], cols: int, width: int, threshold: int) -> list[np.ndarray]:
    """Decide the whole-raster sieve from every block's facts.

    Args:
        facts: One per block, row-major.
        cols: Blocks per row.
        width: Columns of the whole raster.
        threshold: Components of fewer pixels are merged (``rasterio.features.sieve``'s ``size``).

    Returns:
        Per block, the new class value of each of its labels (index 0 unused), for
        :func:`~.vector_blocks.apply_sieve`.
    """
    offsets = _offsets(facts)
    n = int(offsets[-1])
    values = np.concatenate([f.classes[1:] for f in facts]).astype(np.int64)
    sizes_part = np.concatenate([f.sizes[1:] for f in facts])
    inner = [f.pairs[:, :2] + offsets[i] - 1 for i, f in enumerate(facts)]
    inner_pairs = np.concatenate([np.zeros((0, 3), np.int64)] + [
        np.column_stack([ab, f.pairs[:, 2]]) for ab, f in zip(inner, facts, strict=True)
    ])
    cross = _cross_pairs(facts, cols, offsets, width)
    same = values[cross[:, 0]] == values[cross[:, 1]]
    # Parts of one component cut by block borders: joined by same-class pixels facing across.
    graph = coo_matrix((np.ones(int(same.sum())), (cross[same, 0], cross[same, 1])), shape=(n, n))
    _, root = connected_components(graph, directed=False)
    sizes = np.bincount(root, weights=sizes_part).astype(np.int64)
    root_value = np.zeros(len(sizes), np.int64)
    root_value[root] = values
    pairs = np.concatenate([inner_pairs, cross[~same]])
    pairs = np.column_stack([root[pairs[:, 0]], root[pairs[:, 1]], pairs[:, 2]])
    target = _targets(_biggest_neighbour(pairs, sizes), sizes, threshold)
    new_value = root_value[target[root]].astype(np.uint8)
    return [
        np.concatenate([[0], new_value[offsets[i] : offsets[i + 1]]]).astype(np.uint8)
        for i in range(len(facts))
    ]
