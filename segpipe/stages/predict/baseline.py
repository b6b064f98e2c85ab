"""The classical per-pixel baseline as a store layer: a random forest on band values.

Users know this method; segpipe reports it beside the network so the gain from
spatial context is measured, not claimed. The forest is trained by
:func:`segpipe.stages.train.forest.train_forest` (the same code as ``segpipe train --arch
random_forest``: same split, normalisation and package), and its package is predicted
by :func:`segpipe.stages.predict.driver.predict` like any other, in this process, into
layers of their own (``classes_rf``, ``confidence_rf``...), so the network's
``classes`` stay untouched.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from segpipe.io.store import read_region_info
from segpipe.stages.predict.driver import MAX_TASK_PIXELS, MAX_TILE, predict
from segpipe.stages.predict.outputs import output_layers

__all__ = ["random_forest_baseline"]


def _window(store: str | Path) -> int:
    """Window size for a per-pixel forest (no overlap needed): as few pixels computed twice as can be.

    A raster that fits one task gets windows as large as its shorter side (the fewest
    windows, none padded: a square raster is one window); a larger one a window per
    block, so windows line up with the tasks' borders and only each axis's last window,
    shifted back to end at the raster's edge, overlaps another.
    """
    info = read_region_info(store)
    if info.height * info.width <= MAX_TASK_PIXELS:
        return min(info.height, info.width, MAX_TILE)
    return min(info.block_size, info.height, info.width, MAX_TILE)


def random_forest_baseline(
    store: str | Path,
    layer: str = "classes_rf",
    trees: int = 100,
    max_samples: int = 50_000,
    seed: int = 0,
    model_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train a per-pixel random forest on the store's labels and classify every pixel.

    Args:
        store: Region store with ``image`` and ``labels``.
        layer: Output layer name (uint8 class values, 255 = nodata): ``classes_<name>``;
            its confidence and progress layers get the same suffix (see
            :func:`segpipe.stages.predict.outputs.output_layers`).
        trees: Number of trees.
        max_samples: Labelled training pixels used at most.
        seed: Random seed.
        model_dir: Keep the forest's model package here (default: a temporary folder,
            removed afterwards); ``segpipe predict`` accepts it like a network's.

    Returns:
        ``{"layer", "trees", "train_pixels", "pixels", "valid_miou", "model"}``: ``pixels``
        counts the classified pixels, ``valid_miou`` is the held-out mIoU of training
        (None without validation pixels), ``model`` the package path or None.

    Raises:
        StoreError: The store has no labels.
        LabelsError: No labelled pixel with data.
        InputError: A layer name that is not ``classes_<name>`` (before any training).
        StoreBusyError: A predict run holds the store.
    """
    from segpipe.stages.train.config import ForestConfig
    from segpipe.stages.train.forest import train_forest

    output_layers(layer)  # a bad name fails before the forest is trained
    tile = _window(store)
    cfg = ForestConfig(trees=trees, max_train_pixels=max_samples, seed=seed)
    with tempfile.TemporaryDirectory(prefix="segpipe-rf-") as tmp:
        package = Path(model_dir) if model_dir is not None else Path(tmp) / "model"
        trained = train_forest(store, package, cfg)
        # A new forest every time: every block is classified again (force), in this
        # process (the baseline runs inside a flow's task, beside the other stages).
        summary = predict(store, package, tile_size=tile, batch_size=1, force=True, scheduler="threads",
                          output=layer)
    return {
        "layer": layer,
        "trees": trees,
        "train_pixels": int(trained.training["train_pixels_sampled"]),
        "pixels": summary.valid_pixels,
        "valid_miou": trained.metrics.get("miou"),
        "model": None if model_dir is None else str(model_dir),
    }
