"""Train the classical baseline: a per-pixel random forest on the band values.

With ``forest_context`` K > 1 the trees also see each band's mean and standard
deviation over the K x K window around the pixel (still one decision per pixel, the
texture features classical land-cover work adds).

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
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np

from segpipe.errors import LabelsError, StoreError
from segpipe.io.fingerprint import store_inputs
from segpipe.io.store import open_layer, read_region_info, valid_mask
from segpipe.models import ModelSpec, normalise
from segpipe.models.forest import (
    FOREST_ARCH,
    ForestNet,
    context_features,
    feature_names,
    features_per_band,
    from_sklearn,
)
from segpipe.stages.evaluate import metrics
from segpipe.stages.train.config import ForestConfig
from segpipe.stages.train.outputs import final_metrics, validation_scores, write_package
from segpipe.stages.train.progress import TrainProgress
from segpipe.stages.train.sampling import PER_BLOCK, Candidates, find_candidates, label_classes
from segpipe.stages.train.split import Split, plan_split
from segpipe.stages.train.stats import package_spec

__all__ = ["forest_features", "labelled_features", "train_forest"]


# In-sample loss and accuracy are reported on at most this many training pixels: they
# only show how closely the trees fit, which a sample shows as well as all pixels.
_TRAIN_SCORE_PIXELS = 20_000
_STEPS = 3  # progress reports: pixels read, forest fitted, validated
_BALANCED = "balanced_subsample"  # scikit-learn's name for per-bootstrap class weights


def _block_features(
    image: Any, spec: ModelSpec, context: int, box: tuple[int, int, int, int], ys: np.ndarray, xs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Features (feature, n) and data mask (n,) at positions inside one store block.

    The block is read with a halo of ``context // 2`` pixels (clipped to the raster)
    and goes through :func:`segpipe.models.normalise` and
    :func:`segpipe.models.forest.context_features`, as a prediction window does, so
    the trees see bit for bit the values they will be asked about.
    """
    import torch

    y0, x0, h, w = box
    height, width = image.shape[-2:]
    pad = context // 2
    top, left = max(0, y0 - pad), max(0, x0 - pad)
    raw = np.asarray(image[:, top : min(height, y0 + h + pad), left : min(width, x0 + w + pad)])
    valid = valid_mask(raw, spec.nodata)
    pixels = torch.from_numpy(normalise(raw, spec, valid)[None])
    with torch.inference_mode():
        features = context_features(pixels, context)[0].numpy()
    return features[:, ys - top, xs - left], valid[ys - top, xs - left]


def forest_features(
    image: Any, block: int, spec: ModelSpec, context: int, ys: np.ndarray, xs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, feature) of the positions that hold data, and which positions do.

    One task per store block holding positions (in parallel with dask's threads), so
    the region is never read whole.
    """
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
        box = (y0, x0, min(block, height - y0), min(block, width - x0))
        tasks.append(dask.delayed(_block_features)(image, spec, context, box, ys[idx], xs[idx]))
    parts = dask.compute(*tasks, scheduler="threads")
    n_features = image.shape[0] * features_per_band(context)
    out = np.empty((n_features, ys.size), dtype=np.float32)
    valid = np.empty(ys.size, dtype=bool)
    for idx, (values, ok) in zip(groups, parts, strict=True):
        out[:, idx], valid[idx] = values, ok
    return np.ascontiguousarray(out[:, valid].T), valid


def labelled_features(
    image: Any, block: int, cand: Candidates, spec: ModelSpec, lut: np.ndarray, context: int
) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, feature) and class indices (``lut`` of the values) of the candidates holding data."""
    if cand.y.size == 0:
        n_features = len(spec.band_names) * features_per_band(context)
        return np.zeros((0, n_features), np.float32), np.zeros(0, np.int64)
    features, valid = forest_features(image, block, spec, context, cand.y, cand.x)
    return features, lut[cand.value[valid]].astype(np.int64)


def _score(net: ForestNet, x: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Cross-entropy of the packaged module's output (as for networks) and predicted indices."""
    import torch

    with torch.inference_mode():
        logp = net.log_probabilities(torch.from_numpy(x))
        loss = torch.nn.functional.cross_entropy(logp, torch.from_numpy(target))
    return float(loss), logp.argmax(dim=1).numpy()


@dataclass(frozen=True)
class _Pixels:
    """The training and validation pixels of a forest: features, class indices, classes."""

    spec: ModelSpec
    band_names: tuple[str, ...]
    split: Split
    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray


def train_forest(
    store: str | Path,
    out: str | Path,
    config: ForestConfig | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> ModelSpec:
    """Train a per-pixel random forest on the store's labels and write a model package.

    The pixels come from the same held-out-cell split as network training; validation
    metrics are computed on held-out pixels by the packaged module itself.

    Args:
        store: Region store with ``image`` and ``labels`` layers.
        out: Model package directory to write.
        config: The forest's settings (defaults when None).
        progress: Called after reading pixels, after fitting and after validating.

    Returns:
        The written model's description.

    Raises:
        StoreError: The store has no labels.
        LabelsError: No labelled pixel with data, or none left for training.
    """
    import torch

    cfg = config or ForestConfig()
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    def report(step: int, loss: float, record: dict[str, Any] | None = None) -> None:
        if progress:
            progress(TrainProgress(1, 1, step, _STEPS, loss, record))

    data = _read_pixels(store, cfg)
    report(1, float("nan"))
    forest = _fit(cfg, data.x_train, data.y_train, out_of_bag=not data.y_valid.size)
    net = from_sklearn(forest, len(data.spec.classes), cfg.forest_context)
    record = _fit_record(net, data, time.perf_counter() - started)
    report(2, record["train_loss"])
    cm = _validate(net, data, record) if data.y_valid.size else _out_of_bag(forest, data, record)
    report(3, record["train_loss"], record)
    training = _training_record(store, cfg, data, record, time.perf_counter() - started)
    training["forest"] = _forest_record(net, forest, cfg, data.band_names)
    spec = dataclasses.replace(
        data.spec, options=net.options(), metrics=final_metrics(cm, data.spec.classes), training=training
    )
    write_package(out, spec, net, [record], cm)
    return spec


def _training_record(
    store: str | Path, cfg: ForestConfig, data: _Pixels, record: dict[str, Any], seconds: float
) -> dict[str, Any]:
    """The package's ``training`` entry, as a network's: settings, the one epoch, samples, provenance."""
    return {
        "config": cfg.model_dump(),
        "history": metrics.json_ready([record]),
        "split": data.split.record(cfg.valid_fraction),
        "validation": "held-out cells" if data.y_valid.size else "out-of-bag",
        "warnings": list(data.split.warnings),
        "train_pixels_sampled": int(data.y_train.size),
        "valid_pixels_sampled": int(data.y_valid.size),
        "seconds": seconds,
        "store_inputs": store_inputs(store),
        "device": "cpu",
    }


def _read_pixels(store: str | Path, cfg: ForestConfig) -> _Pixels:
    """Candidates, classes, statistics, the held-out-cell split and the features of both parts.

    Raises:
        StoreError: The store has no labels.
        LabelsError: No labelled training pixel holds image data.
    """
    info = read_region_info(store)
    try:
        labels = open_layer(store, "labels")
    except StoreError as exc:
        raise StoreError(f"region store {store} has no labels: ingest it with --labels") from exc
    image = open_layer(store, "image")
    rng = np.random.default_rng(cfg.seed)
    # Enough candidates per block for the pixel budget, never fewer than networks draw.
    n_blocks = info.blocks[0] * info.blocks[1]
    per_block = max(PER_BLOCK, -(-2 * cfg.max_train_pixels // n_blocks))
    cand = find_candidates(labels, info.block_size, max_per_block=per_block, seed=cfg.seed)
    classes, lut = label_classes(np.unique(cand.value), info.classes, store=str(store))
    spec = package_spec(store, info, cfg, FOREST_ARCH, "none", classes)
    split, in_valid = _split(labels, info.block_size, cand if per_block == PER_BLOCK else None, cand, cfg)
    train_c = cand.subset(~in_valid).at_most(cfg.max_train_pixels, rng)
    valid_c = cand.subset(in_valid).at_most(cfg.max_train_pixels, rng)
    x_train, y_train = labelled_features(image, info.block_size, train_c, spec, lut, cfg.forest_context)
    x_valid, y_valid = labelled_features(image, info.block_size, valid_c, spec, lut, cfg.forest_context)
    if y_train.size == 0:
        raise LabelsError(
            "no labelled training pixel holds image data (all nodata or all in validation cells): "
            "check the labels' extent or lower --valid-fraction"
        )
    return _Pixels(spec, info.band_names, split, x_train, y_train, x_valid, y_valid)


def _split(
    labels: Any, block: int, sample: Candidates | None, cand: Candidates, cfg: ForestConfig
) -> tuple[Split, np.ndarray]:
    """The split a network trained with the same settings would use, and where ``cand`` falls in it.

    The cells are decided on the candidates a network samples (``sample``, or found
    again when the forest sampled more), so a forest and a network of the same seed hold
    out the same cells and ``segpipe train --arch auto`` compares them on the same pixels.
    """
    if sample is None:  # the forest sampled more than a network does: take the network's sample
        sample = find_candidates(labels, block, seed=cfg.seed)
    split = plan_split(sample, cfg.valid_cell, cfg.valid_fraction, cfg.seed)
    split.log_warnings()
    return split, split.assign(cand, split.valid_cells(sample))


def _class_weight(cfg: ForestConfig) -> str | None:
    """scikit-learn's ``class_weight`` for the settings.

    Class balancing weights each class's pixels in every tree's bootstrap sample by the
    inverse of its count there. Weights passed as sample_weight would be wrong here:
    scikit-learn also draws the bootstrap in proportion to them, so a class of 65
    pixels would be resampled a hundred times over and the trees would memorise those
    pixels (nc-landsat7, context 5: held-out mIoU 0.34 that way, 0.37 this way, 0.34
    unweighted).
    """
    return _BALANCED if cfg.class_balancing else None


def _fit(cfg: ForestConfig, x: np.ndarray, y: np.ndarray, out_of_bag: bool = False) -> Any:
    """The fitted scikit-learn forest (keeping out-of-bag votes when ``out_of_bag``)."""
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(
        n_estimators=cfg.trees,
        min_samples_leaf=cfg.min_samples_leaf,
        max_depth=cfg.max_depth,
        class_weight=_class_weight(cfg),
        n_jobs=cfg.threads or -1,
        random_state=cfg.seed,
        oob_score=out_of_bag,
    )
    with warnings.catch_warnings():
        # A pixel every tree drew has no out-of-bag vote; _out_of_bag leaves such pixels out.
        warnings.filterwarnings("ignore", "Some inputs do not have OOB scores", UserWarning)
        return forest.fit(x, y)


def _fit_record(net: ForestNet, data: _Pixels, fit_seconds: float) -> dict[str, Any]:
    """The single epoch's record: how closely the trees fit (a sample of) their training pixels."""
    pick = np.linspace(0, data.y_train.size - 1, min(_TRAIN_SCORE_PIXELS, data.y_train.size)).astype(int)
    train_loss, train_pred = _score(net, data.x_train[pick], data.y_train[pick])
    return {
        "epoch": 1,
        "train_loss": train_loss,
        "train_accuracy": float((train_pred == data.y_train[pick]).mean()),
        "seconds": fit_seconds,
    }


def _validate(net: ForestNet, data: _Pixels, record: dict[str, Any]) -> np.ndarray:
    """Score the held-out pixels into ``record``; their confusion matrix."""
    valid_loss, valid_pred = _score(net, data.x_valid, data.y_valid)
    return _record_scores(data, valid_pred, data.y_valid, valid_loss, record)


def _record_scores(
    data: _Pixels, pred: np.ndarray, target: np.ndarray, loss: float, record: dict[str, Any]
) -> np.ndarray:
    """The confusion matrix of predicted against target class indices; its scores into ``record``."""
    classes = data.spec.classes
    values = np.array([c.value for c in classes], dtype=np.uint8)
    cm = np.zeros((len(values), len(values) + 1), dtype=np.int64)
    metrics.add(cm, values[pred], values[target], values.tolist())
    record.update(validation_scores(loss, cm, classes))
    return cm


def _out_of_bag(forest: Any, data: _Pixels, record: dict[str, Any]) -> np.ndarray | None:
    """Scores of the training pixels by the trees that did not draw them (None: no such pixel).

    The fallback where no cell can be held out: out-of-bag pixels are not spatially
    disjoint from the trees' training pixels, so these scores are optimistic, but they
    still tell a useless forest from a good one.
    """
    votes = getattr(forest, "oob_decision_function_", None)
    if votes is None:
        return None
    proba = np.nan_to_num(np.asarray(votes, dtype=np.float64))
    seen = proba.sum(axis=1) > 0  # pixels every tree drew have no out-of-bag vote
    if not seen.any():
        return None
    target = data.y_train[seen]
    picked = np.clip(proba[seen][np.arange(target.size), target], 1e-12, 1.0)
    return _record_scores(data, proba[seen].argmax(axis=1), target, float(-np.log(picked).mean()), record)


def _forest_record(
    net: ForestNet, forest: Any, cfg: ForestConfig, band_names: tuple[str, ...]
) -> dict[str, Any]:
    """The package's ``training.forest`` entry: the trees' shape and the features' importance."""
    names = feature_names(band_names, cfg.forest_context)
    importance = (float(v) for v in forest.feature_importances_)
    return {
        "trees": net.n_trees,
        "max_nodes": net.max_nodes,
        "depth": net.depth,
        "context": cfg.forest_context,
        "class_weight": _class_weight(cfg),
        "feature_importance": dict(zip(names, importance, strict=True)),
    }
