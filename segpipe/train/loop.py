"""Train a segmentation network from a region store and write a model package."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe import metrics
from segpipe.errors import LabelsError, StoreError
from segpipe.fingerprint import store_inputs
from segpipe.io.store import open_layer, open_region, read_region_info
from segpipe.models import ModelSpec, build_network, normalise, save_model
from segpipe.train.config import TrainConfig
from segpipe.train.losses import balanced_class_weights, make_loss
from segpipe.train.sampling import ChipSampler, find_candidates, split_cells
from segpipe.train.stats import band_statistics
from segpipe.types import ClassInfo, default_colour

__all__ = ["TrainProgress", "train"]

IGNORE = 255
_MAX_VALID_CHIPS = 192


@dataclass(frozen=True)
class TrainProgress:
    """One progress report.

    Attributes:
        epoch: Current epoch (1-based).
        epochs: Number of epochs.
        step: Step within the epoch (1-based).
        steps: Steps per epoch.
        loss: Running training loss of the epoch.
        record: The epoch's history record, on the last report of an epoch.
    """

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    record: dict[str, Any] | None = None


def _classes_for(present: np.ndarray, known: tuple[ClassInfo, ...]) -> tuple[ClassInfo, ...]:
    by_value = {c.value: c for c in known}
    return tuple(
        by_value.get(int(v), ClassInfo(int(v), f"class {int(v)}", default_colour(int(v)))) for v in present
    )


def _dihedral(image: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One of the 8 flips/rotations; land cover has no preferred orientation."""
    if k >= 4:
        image, labels = image[..., ::-1], labels[..., ::-1]
    return np.rot90(image, k % 4, axes=(-2, -1)), np.rot90(labels, k % 4, axes=(-2, -1))


def _device(choice: str) -> Any:
    import torch

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _batch(
    sampler: ChipSampler, windows: list[tuple[int, int]], spec: ModelSpec, rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for y0, x0 in windows:
        raw, lab = sampler.read(y0, x0)
        valid = None if spec.nodata is None else (raw != spec.nodata).all(axis=0)
        img = normalise(raw, spec, valid)
        if rng is not None:
            img, lab = _dihedral(img, lab, int(rng.integers(8)))
        images.append(np.ascontiguousarray(img))
        labels.append(np.ascontiguousarray(lab))
    return np.stack(images), np.stack(labels)


def _evaluate(
    net: Any,
    sampler: ChipSampler,
    windows: list[tuple[int, int]],
    spec: ModelSpec,
    device: Any,
    batch_size: int,
) -> tuple[float, np.ndarray]:
    import torch

    values = [c.value for c in spec.classes]
    to_value = np.array([*values, IGNORE], dtype=np.uint8)
    cm = np.zeros((len(values), len(values) + 1), dtype=np.int64)
    loss_sum, count = 0.0, 0
    net.eval()
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            x, y = _batch(sampler, windows[i : i + batch_size], spec, None)
            logits = net(torch.from_numpy(x).to(device))
            target = torch.from_numpy(y.astype(np.int64)).to(device)
            n = int((target != IGNORE).sum())
            if n:
                loss = torch.nn.functional.cross_entropy(
                    logits.float(), target, ignore_index=IGNORE, reduction="sum"
                )
                loss_sum += float(loss)
                count += n
            pred = logits.argmax(1).cpu().numpy()
            ref = np.where(y == IGNORE, 0, to_value[np.minimum(y, len(values))])
            metrics.add(cm, to_value[pred], ref, values)
    net.train()
    return (loss_sum / count if count else float("nan")), cm


def train(
    store: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> ModelSpec:
    """Train a network on the store's labels and write a model package to ``out``.

    Chips are drawn where labels exist; class 0 is ignored by the loss. Validation
    uses spatially held-out cells; the checkpoint with the best validation mIoU is
    kept.

    Args:
        store: Region store with ``image`` and ``labels`` layers.
        out: Model package directory to write.
        config: Training settings (defaults when None).
        progress: Called after every step with a :class:`TrainProgress`.

    Returns:
        The written model's description.

    Raises:
        StoreError: The store has no labels.
        LabelsError: No labelled pixel.
    """
    import torch

    from segpipe.plots import plot_confusion_matrix, plot_loss_curve

    cfg = config or TrainConfig()
    info = read_region_info(store)
    labels_arr = open_layer(store, "labels") if _has_layer(store, "labels") else None
    if labels_arr is None:
        raise StoreError(f"region store {store} has no labels: ingest it with --labels")
    image_arr = open_layer(store, "image")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)

    cand = find_candidates(labels_arr, info.block_size, seed=cfg.seed)
    present = np.unique(cand.value)
    classes = _classes_for(present, info.classes)
    lut = np.full(256, IGNORE, dtype=np.uint8)
    lut[present] = np.arange(len(present), dtype=np.uint8)

    mean, std = band_statistics(open_region(store)["image"].data, info.nodata)
    spec = ModelSpec(
        arch=cfg.arch,
        encoder=cfg.encoder,
        band_names=info.band_names,
        mean=mean,
        std=std,
        classes=classes,
        chip_size=cfg.chip_size,
        nodata=info.nodata,
    )
    in_valid = split_cells(cand, cfg.valid_cell, cfg.valid_fraction, cfg.seed)
    valid_cells = {
        (int(y) // cfg.valid_cell, int(x) // cfg.valid_cell)
        for y, x in zip(cand.y[in_valid], cand.x[in_valid], strict=True)
    }
    train_c, valid_c = cand.subset(~in_valid), cand.subset(in_valid)
    if train_c.y.size == 0:
        raise LabelsError("every labelled pixel fell into validation cells: lower --valid-fraction")

    def sampler(part: str) -> ChipSampler:
        return ChipSampler(
            image_arr, labels_arr, info.block_size, cfg.chip_size, lut, cfg.valid_cell, valid_cells, part
        )

    train_s, valid_s = sampler("train"), sampler("valid")
    pick = np.linspace(0, valid_c.y.size - 1, min(_MAX_VALID_CHIPS, valid_c.y.size)).astype(int)
    valid_windows = [valid_s.window_for(int(valid_c.y[i]), int(valid_c.x[i]), None) for i in pick]

    device = _device(cfg.device)
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    net = build_network(cfg.arch, cfg.encoder, len(info.band_names), len(classes)).to(device)
    steps = max(1, cfg.samples_per_epoch // cfg.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=steps * cfg.epochs, pct_start=0.2
    )
    use_amp = device.type == "cuda"
    weights = None
    if cfg.class_balancing and cand.counts is not None:
        weights = balanced_class_weights(cand.counts[present])
    loss_fn = make_loss(cfg.loss, IGNORE, weights, cfg.focal_gamma, cfg.dice_weight)
    # Checkpoints are compared on a "higher is better" score.
    sign = 1.0 if cfg.monitor == "valid_miou" else -1.0
    history: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Any], np.ndarray] | None = None
    stale = 0
    started = time.perf_counter()
    net.train()
    for epoch in range(1, cfg.epochs + 1):
        running = 0.0
        for step in range(1, steps + 1):
            idx = rng.integers(0, train_c.y.size, cfg.batch_size)
            windows = [train_s.window_for(int(train_c.y[i]), int(train_c.x[i]), rng) for i in idx]
            x, y = _batch(train_s, windows, spec, rng)
            xt = torch.from_numpy(x).to(device)
            yt = torch.from_numpy(y.astype(np.int64)).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = net(xt)
            loss = loss_fn(logits, yt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += (loss.item() - running) / step
            if progress and step < steps:
                progress(TrainProgress(epoch, cfg.epochs, step, steps, running))
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": running,
            "seconds": time.perf_counter() - started,
        }
        if valid_windows:
            v_loss, cm = _evaluate(net, valid_s, valid_windows, spec, device, cfg.batch_size)
            score = metrics.scores(cm, [c.value for c in classes], [c.name for c in classes])
            record.update(
                valid_loss=v_loss, valid_miou=score["miou"], valid_accuracy=score["overall_accuracy"]
            )
            value = sign * record[cfg.monitor]
            if best is None or value > best[0]:
                best, stale = (value, copy.deepcopy(net.state_dict()), cm), 0
            else:
                stale += 1
        history.append(record)
        if progress:
            progress(TrainProgress(epoch, cfg.epochs, steps, steps, running, record))
        if cfg.patience is not None and stale >= cfg.patience:
            record["early_stop"] = True
            break

    if best is not None:
        net.load_state_dict(best[1])
    final_metrics: dict[str, Any] = {}
    if best is not None:
        final_metrics = metrics.json_ready(
            metrics.scores(best[2], [c.value for c in classes], [c.name for c in classes])
        )
    spec = dataclasses.replace(
        spec,
        metrics=final_metrics,
        training={
            "config": cfg.model_dump(),
            "class_weights": None if weights is None else [float(w) for w in weights],
            "history": metrics.json_ready(history),
            "train_pixels_sampled": int(train_c.y.size),
            "valid_pixels_sampled": int(valid_c.y.size),
            "seconds": time.perf_counter() - started,
            "store_inputs": store_inputs(store),
            "device": device.type,
        },
    )
    out_dir = save_model(out, spec, net.cpu())
    plot_loss_curve(history, out_dir / "loss_curve.png")
    if best is not None:
        plot_confusion_matrix(
            best[2][:, : len(classes)],
            [c.name for c in classes],
            out_dir / "confusion_matrix.png",
            title="validation (held-out cells)",
        )
    return spec


def _has_layer(store: str | Path, name: str) -> bool:
    try:
        open_layer(store, name)
    except StoreError:
        return False
    return True
