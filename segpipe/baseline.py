"""The classical per-pixel baseline: a random forest on band values.

Users know this method; segpipe reports it beside the network so the gain from
spatial context is measured, not claimed. It trains on the same store labels and
writes its classes into the store as another layer, block by block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import numpy as np

from segpipe.errors import LabelsError
from segpipe.io.store import NODATA_U8, create_layer, open_layer, read_region_info, write_block

__all__ = ["random_forest_baseline"]


def _block_samples(
    store: str, y0: int, x0: int, h: int, w: int, limit: int, seed: int, nodata: float | None
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(open_layer(store, "labels")[y0 : y0 + h, x0 : x0 + w])
    image = np.asarray(open_layer(store, "image")[:, y0 : y0 + h, x0 : x0 + w])
    keep = labels > 0
    if nodata is not None:
        keep &= (image != nodata).all(axis=0)
    ys, xs = np.nonzero(keep)
    if ys.size > limit:
        pick = np.random.default_rng([seed, y0, x0]).choice(ys.size, limit, replace=False)
        ys, xs = ys[pick], xs[pick]
    return image[:, ys, xs].T, labels[ys, xs]


def _predict_block(
    forest: Any,
    store: str,
    layer: str,
    y0: int,
    x0: int,
    h: int,
    w: int,
    nodata: float | None,
    values: np.ndarray,
    block: int,
) -> int:
    image = np.asarray(open_layer(store, "image")[:, y0 : y0 + h, x0 : x0 + w])
    valid = np.ones((h, w), bool) if nodata is None else (image != nodata).all(axis=0)
    out = np.full((h, w), NODATA_U8, dtype=np.uint8)
    if valid.any():
        pixels = image[:, valid].T.astype(np.float32)
        out[valid] = values[forest.predict(pixels)]
    write_block(open_layer(store, layer, mode="r+"), y0, x0, out, block)
    return int(valid.sum())


def random_forest_baseline(
    store: str | Path,
    layer: str = "classes_rf",
    trees: int = 100,
    max_samples: int = 50_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a per-pixel random forest on the store's labels and classify every pixel.

    Args:
        store: Region store with ``image`` and ``labels``.
        layer: Output layer name (uint8 class values, 255 = nodata).
        trees: Number of trees.
        max_samples: Labelled pixels used for training at most (sampled evenly per block).
        seed: Random seed.

    Returns:
        ``{"layer", "trees", "train_pixels", "pixels"}``.
    """
    from sklearn.ensemble import RandomForestClassifier

    info = read_region_info(store)
    b = info.block_size
    windows = [
        (y0, x0, min(b, info.height - y0), min(b, info.width - x0))
        for y0 in range(0, info.height, b)
        for x0 in range(0, info.width, b)
    ]
    per_block = max(1, max_samples // len(windows))
    parts = dask.compute(
        *[dask.delayed(_block_samples)(str(store), *win, per_block, seed, info.nodata) for win in windows],
        scheduler="threads",
    )
    features = np.concatenate([f for f, _ in parts])
    target = np.concatenate([t for _, t in parts])
    if target.size == 0:
        raise LabelsError(f"region store {store} has no labelled pixel with data: nothing to train on")
    values = np.unique(target).astype(np.uint8)
    index = np.searchsorted(values, target)
    forest = RandomForestClassifier(n_estimators=trees, n_jobs=-1, random_state=seed, min_samples_leaf=2)
    forest.fit(features.astype(np.float32), index)
    create_layer(store, layer, "uint8", NODATA_U8, overwrite=True)
    tasks = [
        dask.delayed(_predict_block)(forest, str(store), layer, *win, info.nodata, values, b)
        for win in windows
    ]
    pixels = sum(dask.compute(*tasks, scheduler="threads"))
    return {"layer": layer, "trees": trees, "train_pixels": int(target.size), "pixels": int(pixels)}
