"""The classical per-pixel baseline as a store layer: a random forest on band values.

Users know this method; segpipe reports it beside the network so the gain from
spatial context is measured, not claimed. The forest is trained by
:func:`segpipe.stages.train.forest.train_forest` (the same code as ``segpipe train --arch
random_forest``: same split, normalisation and package), and its packaged module
classifies every pixel into another layer, block by block, so the network's
``classes`` stay untouched.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import dask
import numpy as np

from segpipe.io.store import NODATA_U8, create_layer, open_layer, read_region_info, valid_mask, write_block
from segpipe.models import ModelSpec, load_model, normalise
from segpipe.models.forest import ForestNet

__all__ = ["random_forest_baseline"]


def _predict_block(
    net: ForestNet, spec: ModelSpec, store: str, layer: str, y0: int, x0: int, h: int, w: int, block: int
) -> int:
    import torch

    raw = np.asarray(open_layer(store, "image")[:, y0 : y0 + h, x0 : x0 + w])
    valid = valid_mask(raw, spec.nodata)
    out = np.full((h, w), NODATA_U8, dtype=np.uint8)
    if valid.any():
        pixels = normalise(raw, spec)[:, valid].T
        with torch.inference_mode():
            index = net.probabilities(torch.from_numpy(np.ascontiguousarray(pixels))).argmax(dim=1).numpy()
        out[valid] = np.array([c.value for c in spec.classes], dtype=np.uint8)[index]
    write_block(open_layer(store, layer, mode="r+"), y0, x0, out, block)
    return int(valid.sum())


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
        layer: Output layer name (uint8 class values, 255 = nodata).
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
    """
    from segpipe.stages.train import TrainConfig
    from segpipe.stages.train.forest import train_forest

    cfg = TrainConfig(arch="random_forest", trees=trees, max_train_pixels=max_samples, seed=seed)
    with tempfile.TemporaryDirectory(prefix="segpipe-rf-") as tmp:
        package = Path(model_dir) if model_dir is not None else Path(tmp) / "model"
        trained = train_forest(store, package, cfg)
        net, spec = load_model(package)
    assert isinstance(net, ForestNet)  # a random_forest package always rebuilds a ForestNet
    info = read_region_info(store)
    b = info.block_size
    create_layer(store, layer, "uint8", NODATA_U8, overwrite=True)
    # pure=False: no hashing of the forest's tensors to name tasks.
    tasks = [
        dask.delayed(_predict_block, pure=False)(
            net, spec, str(store), layer, y0, x0, min(b, info.height - y0), min(b, info.width - x0), b
        )
        for y0 in range(0, info.height, b)
        for x0 in range(0, info.width, b)
    ]
    pixels = sum(dask.compute(*tasks, scheduler="threads"))
    return {
        "layer": layer,
        "trees": trees,
        "train_pixels": int(trained.training["train_pixels_sampled"]),
        "pixels": int(pixels),
        "valid_miou": trained.metrics.get("miou"),
        "model": None if model_dir is None else str(model_dir),
    }
