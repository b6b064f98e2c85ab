"""Sparse training labels for synthetic scenes: small polygons inside uniform patches.

Users label imagery by drawing a few polygons well inside areas they are sure
of. This module imitates that: one candidate disc per 64 px cell of a global
lattice, kept only where the truth under it is a single class. Polygons are in
pixel coordinates (x = column, y = row) and never leave their cell, so any
cell-aligned window can be labelled on its own.
"""

from __future__ import annotations

import numpy as np
from rasterio.features import rasterize
from rasterio.transform import Affine
from shapely.geometry import Point, Polygon

from segpipe.synth.scene import SceneSpec, class_block, hash_uniform

__all__ = ["LABEL_CELL", "label_polygons", "rasterize_polygons"]

LABEL_CELL = 64
_R_MIN, _R_MAX = 5.0, 10.0


def label_polygons(
    spec: SceneSpec, y0: int, x0: int, h: int, w: int, truth: np.ndarray | None = None
) -> list[tuple[Polygon, int]]:
    """Label polygons of the cells whose origin lies in the window.

    Args:
        spec: The scene.
        y0: Window top row (a multiple of :data:`LABEL_CELL`).
        x0: Window left column (a multiple of :data:`LABEL_CELL`).
        h: Window height.
        w: Window width.
        truth: The window's :func:`class_block`, when the caller has it already.

    Returns:
        (polygon in pixel coordinates, class value) pairs.
    """
    if truth is None:
        truth = class_block(spec, y0, x0, h, w)
    cy = np.arange(y0, y0 + h, LABEL_CELL)
    cx = np.arange(x0, x0 + w, LABEL_CELL)
    iy, ix = np.meshgrid(cy // LABEL_CELL, cx // LABEL_CELL, indexing="ij")
    radius = _R_MIN + (_R_MAX - _R_MIN) * hash_uniform(iy, ix, spec.seed, 700)
    margin = _R_MAX + 1
    jitter_y = margin + (LABEL_CELL - 2 * margin) * hash_uniform(iy, ix, spec.seed, 701)
    jitter_x = margin + (LABEL_CELL - 2 * margin) * hash_uniform(iy, ix, spec.seed, 702)
    out: list[tuple[Polygon, int]] = []
    for (j, i), r in np.ndenumerate(radius):
        py = iy[j, i] * LABEL_CELL + jitter_y[j, i]
        px = ix[j, i] * LABEL_CELL + jitter_x[j, i]
        top, left = int(py - r) - y0, int(px - r) - x0
        bottom, right = int(np.ceil(py + r)) - y0 + 1, int(np.ceil(px + r)) - x0 + 1
        if top < 0 or left < 0 or bottom > h or right > w:
            continue  # a cell cut by the scene edge
        patch = truth[top:bottom, left:right]
        value = int(patch[0, 0])
        if value == 0 or not (patch == value).all():
            continue  # an annotator labels only patches they are sure of
        out.append((Point(px, py).buffer(float(r), quad_segs=8), value))
    return out


def rasterize_polygons(polys: list[tuple[Polygon, int]], y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Burn pixel-coordinate polygons into a (h, w) uint8 window at (y0, x0); 0 elsewhere."""
    if not polys:
        return np.zeros((h, w), dtype=np.uint8)
    burnt: np.ndarray = rasterize(
        polys,
        out_shape=(h, w),
        transform=Affine.translation(x0, y0),
        fill=0,
        dtype="uint8",
    )
    return burnt
