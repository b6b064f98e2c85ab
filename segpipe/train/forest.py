"""Train the classical baseline: a per-pixel random forest on the band values.

Users know this method, so segpipe trains it through the same command, on the same
spatially disjoint train/validation split, with the same normalisation and the same
validation metrics as its networks, and packages it the same way (a
:class:`segpipe.models.forest.ForestNet` in ``weights.safetensors``). ``segpipe
predict`` and ``segpipe evaluate`` then treat it like any network, so the gain from
spatial context is measured on equal terms.

Training pixels are the labelled positions that :func:`find_candidates` gathers block
by block; their band values are read one store block at a time, so the region is never
loaded whole.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import numpy as np

from segpipe import metrics
from segpipe.errors import LabelsError, StoreError
from segpipe.fingerprint import store_inputs
from segpipe.inference import valid_mask
from segpipe.io.store import open_layer, read_region_info
from segpipe.models import ModelSpec, normalise, save_model
from segpipe.models.forest import FOREST_ARCH, ForestNet, from_sklearn
from segpipe.train.config import TrainConfig
from segpipe.train.loop import TrainProgress
from segpipe.train.sampling import Candidates, find_candidates, label_classes, split_cells
from segpipe.train.stats import package_spec

__all__ = ["forest_features", "train_forest"]

# In-sample loss and accuracy are reported on at most this many training pixels: they
# only show how closely the trees fit, which a sample shows as well as all pixels.
_TRAIN_SCORE_PIXELS = 20_000
_STEPS = 3  # progress reports: pixels read, forest fitted, validated


def _block_pixels(image: Any, y0: int, x0: int, h: int, w: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    block = np.asarray(image[:, y0 : y0 + h, x0 : x0 + w])
    return block[:, ys - y0, xs - x0]  # type: ignore[no-any-return]


def _read_pixels(image: Any, block: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Raw band values (band, n) at the positions, one store block read per task."""
    height, width = image.shape[-2:]
    n_bx = -(-width // block)
    key = (ys // block) * n_bx + xs // block
    order = np.argsort(key, kind="stable")
    starts = np.flatnonzero(np.diff(key[order], prepend=-1))
    groups = np.split(order, starts[1:])
    tasks = []
    for idx in groups:
        by, bx = divmod(int(key[idx[0]]), n_bx)
        y0, x0 = by * block, bx * block
        tasks.append(
            dask.delayed(_block_pixels)(
                image, y0, x0, min(block, height - y0), min(block, width - x0), ys[idx], xs[idx]
            )
        )
    parts = dask.compute(*tasks, scheduler="threads")
    out = np.empty((image.shape[0], ys.size), dtype=image.dtype)
    for idx, values in zip(groups, parts, strict=True):
        out[:, idx] = values
    return out


def forest_features(raw: np.ndarray, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, band) of raw (band, n) pixel values, and which pixels hold data.

    Goes through :func:`segpipe.models.normalise`, as prediction does, so the trees see
    bit for bit the values they will be asked about.
    """
    valid = valid_mask(raw, spec.nodata)
    features = normalise(raw[:, :, None], spec)[:, :, 0].T
    return np.ascontiguousarray(features[valid]), valid


def _subsample(cand: Candidates, limit: int, rng: np.random.Generator) -> Candidates:
    if cand.y.size <= limit:
        return cand
    keep = np.zeros(cand.y.size, dtype=bool)
    keep[rng.choice(cand.y.size, limit, replace=False)] = True
    return cand.subset(keep)


def _pixels(
    image: Any, block: int, cand: Candidates, spec: ModelSpec, lut: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Features and class indices of the candidates that hold data."""
    if cand.y.size == 0:
        return np.zeros((0, len(spec.band_names)), np.float32), np.zeros(0, np.int64)
    features, valid = forest_features(_read_pixels(image, block, cand.y, cand.x), spec)
    return features, lut[cand.value[valid]].astype(np.int64)


def _score(net: ForestNet, x: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Cross-entropy of the packaged module's output (as for networks) and predicted indices."""
    import torch

    with torch.inference_mode():
        logp = net(torch.from_numpy(x.T.copy())[None, :, :, None])[0, :, :, 0].T
        loss = torch.nn.functional.cross_entropy(logp, torch.from_numpy(target))
    return float(loss), logp.argmax(dim=1).numpy()


def train_forest(
    store: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> ModelSpec:
    """Train a per-pixel random forest on the store's labels and write a model package.

    The pixels come from the same held-out-cell split as network training; validation
    metrics are computed on held-out pixels by the packaged module itself.

    Args:
        store: Region store with ``image`` and ``labels`` layers.
        out: Model package directory to write.
        config: Training settings (``arch`` should be ``random_forest``; see
            :class:`TrainConfig` for the settings that apply).
        progress: Called after reading pixels, after fitting and after validating.

    Returns:
        The written model's description.

    Raises:
        StoreError: The store has no labels.
        LabelsError: No labelled pixel with data, or none left for training.
    """
    import torch
    from sklearn.ensemble import RandomForestClassifier

    from segpipe.plots import plot_confusion_matrix, plot_loss_curve

    cfg = config or TrainConfig(arch=FOREST_ARCH)
    started = time.perf_counter()
    info = read_region_info(store)
    try:
        labels = open_layer(store, "labels")
    except StoreError as exc:
        raise StoreError(f"region store {store} has no labels: ingest it with --labels") from exc
    image = open_layer(store, "image")
    rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # Enough candidates per block for the pixel budget, never fewer than networks draw.
    n_blocks = info.blocks[0] * info.blocks[1]
    per_block = max(4096, -(-2 * cfg.max_train_pixels // n_blocks))
    cand = find_candidates(labels, info.block_size, max_per_block=per_block, seed=cfg.seed)
    present = np.unique(cand.value)
    classes, lut = label_classes(present, info.classes)

    spec = package_spec(store, info, cfg, FOREST_ARCH, "none", classes)

    in_valid = split_cells(cand, cfg.valid_cell, cfg.valid_fraction, cfg.seed)
    train_c = _subsample(cand.subset(~in_valid), cfg.max_train_pixels, rng)
    valid_c = _subsample(cand.subset(in_valid), cfg.max_train_pixels, rng)
    x_train, y_train = _pixels(image, info.block_size, train_c, spec, lut)
    x_valid, y_valid = _pixels(image, info.block_size, valid_c, spec, lut)
    if y_train.size == 0:
        raise LabelsError(
            "no labelled training pixel holds image data (all nodata or all in validation cells): "
            "check the labels' extent or lower --valid-fraction"
        )

    def report(step: int, loss: float, record: dict[str, Any] | None = None) -> None:
        if progress:
            progress(TrainProgress(1, 1, step, _STEPS, loss, record))

    report(1, float("nan"))
    forest = RandomForestClassifier(
        n_estimators=cfg.trees,
        min_samples_leaf=cfg.min_samples_leaf,
        max_depth=cfg.max_depth,
        n_jobs=cfg.threads or -1,
        random_state=cfg.seed,
    )
    forest.fit(x_train, y_train)
    net = from_sklearn(forest, len(classes))
    fit_seconds = time.perf_counter() - started
    pick = np.linspace(0, y_train.size - 1, min(_TRAIN_SCORE_PIXELS, y_train.size)).astype(int)
    train_loss, train_pred = _score(net, x_train[pick], y_train[pick])
    report(2, train_loss)

    values = np.array([c.value for c in classes], dtype=np.uint8)
    record: dict[str, Any] = {
        "epoch": 1,
        "train_loss": train_loss,
        "train_accuracy": float((train_pred == y_train[pick]).mean()),
        "seconds": fit_seconds,
    }
    cm: np.ndarray | None = None
    if y_valid.size:
        valid_loss, valid_pred = _score(net, x_valid, y_valid)
        cm = np.zeros((len(values), len(values) + 1), dtype=np.int64)
        metrics.add(cm, values[valid_pred], values[y_valid], values.tolist())
        score = metrics.scores(cm, values.tolist(), [c.name for c in classes])
        record.update(
            valid_loss=valid_loss, valid_miou=score["miou"], valid_accuracy=score["overall_accuracy"]
        )
    history = [record]
    report(3, train_loss, record)

    final_metrics: dict[str, Any] = {}
    if cm is not None:
        final_metrics = metrics.json_ready(metrics.scores(cm, values.tolist(), [c.name for c in classes]))
    spec = dataclasses.replace(
        spec,
        options=net.options(),
        metrics=final_metrics,
        training={
            "config": cfg.model_dump(),
            "history": metrics.json_ready(history),
            "train_pixels_sampled": int(y_train.size),
            "valid_pixels_sampled": int(y_valid.size),
            "seconds": time.perf_counter() - started,
            "store_inputs": store_inputs(store),
            "device": "cpu",
            "forest": {
                "trees": net.n_trees,
                "max_nodes": net.max_nodes,
                "depth": net.depth,
                "band_importance": dict(
                    zip(info.band_names, (float(v) for v in forest.feature_importances_), strict=True)
                ),
            },
        },
    )
    out_dir = save_model(out, spec, net)
    plot_loss_curve(history, out_dir / "loss_curve.png")
    if cm is not None:
        plot_confusion_matrix(
            cm[:, : len(classes)],
            [c.name for c in classes],
            out_dir / "confusion_matrix.png",
            title="validation (held-out cells)",
        )
    return spec
