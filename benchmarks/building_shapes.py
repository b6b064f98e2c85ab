"""What the shapes of a predicted building map are worth: clean-ups, and the side it trained on.

Issue 18 asks for building IoU 0.5 on ``tests/data/spacenet4-atlanta``. This script reads the
``classes`` layer a ``segpipe predict`` left in a store (for instance the store of
``benchmarks/accuracy.py``'s work folder) and scores the foreground against the scene's
reference on both sides of the agreed split:

- the test part (``x >= 540``): what the accuracy table reports;
- the left part: pixels the network trained on (and its held-out cells), so the IoU a
  from-scratch network reaches on buildings it has seen, an upper bound for unseen ones;

for the map as predicted and after the shape clean-ups a user might apply before vectorising:
small pieces dropped, holes filled, grown or shrunk by a few pixels, and each piece replaced by
its convex hull or by its smallest rotated rectangle (what ArcGIS's "Regularize Building
Footprint" does for right-angled roofs). Run:

    .venv/bin/python benchmarks/building_shapes.py WORK/spacenet4-atlanta/store.zarr

It prints one JSON line per variant: ``{"variant", "test_iou", "left_iou"}``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import rasterio
import rasterio.features
import shapely
import zarr
from scipy import ndimage
from shapely.geometry import shape

SCENE = Path(__file__).resolve().parents[1] / "tests" / "data" / "spacenet4-atlanta"
SPLIT_X = 540
EIGHT = np.ones((3, 3), dtype=bool)  # pieces are 8-connected, as segpipe's polygons are

Variant = Callable[[np.ndarray], np.ndarray]


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 where both are empty)."""
    union = int((pred | truth).sum())
    return float((pred & truth).sum() / union) if union else 0.0


def drop_small(mask: np.ndarray, area: int) -> np.ndarray:
    """The mask without its 8-connected pieces of fewer than ``area`` pixels."""
    labels, count = ndimage.label(mask, structure=EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= area
    keep[0] = False
    return keep[labels]


def per_piece(mask: np.ndarray, reshape: Callable[[shapely.Geometry], shapely.Geometry]) -> np.ndarray:
    """Each 8-connected piece replaced by ``reshape`` of its outline, burnt back at pixel centres."""
    pieces = [
        reshape(shape(geom))
        for geom, _ in rasterio.features.shapes(mask.astype(np.uint8), mask=mask, connectivity=8)
    ]
    if not pieces:
        return mask.copy()
    return rasterio.features.rasterize(pieces, out_shape=mask.shape).astype(bool)


def variants() -> Iterator[tuple[str, Variant]]:
    """The clean-ups scored, by name."""
    yield "as predicted", lambda m: m
    for area in (10, 30, 100):
        yield f"pieces under {area} px dropped", lambda m, a=area: drop_small(m, a)
    yield "holes filled", ndimage.binary_fill_holes
    for px in (1, 2, 3):
        yield f"grown {px} px", lambda m, n=px: ndimage.binary_dilation(m, EIGHT, iterations=n)
        yield f"shrunk {px} px", lambda m, n=px: ndimage.binary_erosion(m, EIGHT, iterations=n)
    yield "convex hulls", lambda m: per_piece(m, shapely.convex_hull)
    yield "rotated rectangles", lambda m: per_piece(m, shapely.oriented_envelope)
    yield "rotated rectangles, grown 1 px", lambda m: ndimage.binary_dilation(
        per_piece(m, shapely.oriented_envelope), EIGHT
    )


def score(
    classes: np.ndarray, reference: np.ndarray, foreground: int, split_x: int
) -> list[dict[str, object]]:
    """Foreground IoU of every variant on the test part (x >= split_x) and on the left part."""
    truth = reference == foreground
    rows: list[dict[str, object]] = []
    for name, variant in variants():
        pred = np.asarray(variant(classes == foreground), dtype=bool)
        rows.append(
            {
                "variant": name,
                "test_iou": round(iou(pred[:, split_x:], truth[:, split_x:]), 4),
                "left_iou": round(iou(pred[:, :split_x], truth[:, :split_x]), 4),
            }
        )
    return rows


def main() -> None:
    """Print the scores of a store's ``classes`` layer, one JSON line per variant."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("store", type=Path, help="a region store with a predicted classes layer")
    parser.add_argument("--reference", type=Path, default=SCENE / "labels.tif")
    parser.add_argument("--foreground", type=int, default=2, help="class value scored (2: building)")
    parser.add_argument("--split-x", type=int, default=SPLIT_X, help="first column of the test part")
    args = parser.parse_args()
    classes = np.asarray(zarr.open_group(str(args.store), mode="r")["classes"][...]).squeeze()
    with rasterio.open(args.reference) as ds:
        reference = ds.read(1)
    for row in score(classes, reference, args.foreground, args.split_x):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
