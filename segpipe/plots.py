"""Figures written as PNG files: confusion matrix, training curves, class previews.

Matplotlib runs on the Agg backend (set before pyplot is imported) so plotting works on
headless workers; every figure is closed after saving so long runs do not leak memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display on workers

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from segpipe.types import ClassInfo

__all__ = [
    "class_colour_table",
    "display_bands",
    "plot_confusion_matrix",
    "plot_loss_curve",
    "plot_preview",
    "plot_quicklook",
    "plot_samples",
    "stretch",
]


def class_colour_table(classes: Sequence[ClassInfo]) -> np.ndarray:
    """RGBA lookup table (256, 4) float in 0-1: class colours, everything else transparent."""
    lut = np.zeros((256, 4), dtype=np.float64)
    for c in classes:
        lut[c.value, :3] = np.asarray(c.rgb, dtype=np.float64) / 255.0
        lut[c.value, 3] = 1.0
    return lut


def _coloured(lut: np.ndarray, classes_raster: np.ndarray) -> np.ndarray:
    """RGBA image of a class raster through ``lut``; values outside 0-255 are transparent (as 0)."""
    values = np.asarray(classes_raster)
    return lut[np.where((values < 0) | (values > 255), 0, values).astype(np.intp)]


def plot_confusion_matrix(cm: np.ndarray, names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Draw a row-normalised confusion matrix annotated with counts and row percentages.

    Args:
        cm: (K, K) or (K, K + 1) counts, rows = reference, columns = prediction; a
            K + 1-th column is labelled "other" (predictions outside the classes).
        names: The K class names.
        path: PNG file to write.
        title: Figure title.

    Returns:
        The written path.
    """
    counts = np.asarray(cm, dtype=np.int64)
    k = counts.shape[0]
    if len(names) != k or counts.shape[1] not in (k, k + 1):
        raise ValueError(f"confusion matrix {counts.shape} does not fit {len(names)} class names")
    col_names = [*names, "other"] if counts.shape[1] == k + 1 else list(names)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)
    size = 1.2 + 0.75 * max(k, 2)
    fig, ax = plt.subplots(figsize=(size + 2.0, size + 0.8))
    try:
        image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of reference row")
        font = 8 if k <= 8 else 6
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                text = f"{counts[i, j]:,}\n{100.0 * share[i, j]:.1f}%"
                colour = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=font)
        ax.set_xticks(range(len(col_names)), col_names, rotation=45, ha="right")
        ax.set_yticks(range(k), list(names))
        ax.set_xlabel("prediction")
        ax.set_ylabel("reference")
        ax.set_title(title or "Confusion matrix (row-normalised)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for n, record in enumerate(history, start=1):
        value = record.get(key)
        if value is None or not math.isfinite(float(value)):
            continue
        xs.append(float(record.get("epoch", n)))
        ys.append(float(value))
    return xs, ys


def plot_loss_curve(
    history: Sequence[Mapping[str, Any]], path: str | Path, kept_epoch: int | None = None
) -> Path:
    """Plot training and validation loss, and validation mIoU, per epoch.

    Args:
        history: One record per epoch, e.g. ``{"epoch": 1, "train_loss": .., "valid_loss": ..,
            "valid_miou": ..}``; missing or None values are skipped.
        path: PNG file to write.
        kept_epoch: The epoch whose weights the package kept, marked by a dashed line.

    Returns:
        The written path.
    """
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        for key, label in (("train_loss", "train"), ("valid_loss", "validation")):
            xs, ys = _series(history, key)
            if xs:
                ax_loss.plot(xs, ys, marker="o", markersize=3, label=label)
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss")
        ax_loss.set_title("Loss")
        xs, ys = _series(history, "valid_miou")
        if xs:
            ax_miou.plot(xs, ys, marker="o", markersize=3, color="tab:green")
        ax_miou.set_ylim(0.0, 1.0)
        ax_miou.set_xlabel("epoch")
        ax_miou.set_ylabel("mIoU")
        ax_miou.set_title("Validation mIoU")
        for ax in (ax_loss, ax_miou):
            if kept_epoch is not None:
                ax.axvline(kept_epoch, color="0.4", linestyle="--", linewidth=1, label="kept")
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax_loss.get_legend_handles_labels()[0]:
            ax_loss.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


def stretch(rgb: np.ndarray) -> np.ndarray:
    """Scale an (H, W, 3) image to 0-1 with a 2-98 percentile stretch per band."""
    img = np.asarray(rgb, dtype=np.float64)
    out = np.zeros_like(img)
    for b in range(img.shape[-1]):
        band = img[..., b]
        finite = band[np.isfinite(band)]
        if finite.size == 0:
            continue
        lo, hi = np.percentile(finite, [2, 98])
        out[..., b] = np.clip((band - lo) / (hi - lo), 0.0, 1.0) if hi > lo else 0.0
    return np.nan_to_num(out)


_AGREE = (0.72, 0.72, 0.72, 1.0)
_DISAGREE = (1.0, 0.0, 1.0, 1.0)  # magenta: no class palette colour (default_colour) is close


def _disagreement(prediction: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """RGBA: grey where the classes agree, magenta where not, transparent where not evaluated."""
    pred, ref = np.asarray(prediction), np.asarray(reference)
    # the rule of segpipe.stages.evaluate.metrics.evaluable, which plots cannot import (a cycle)
    evaluated = (ref >= 1) & (ref <= 254) & (pred != 255)
    img = np.zeros((*pred.shape, 4))
    img[evaluated & (pred == ref)] = _AGREE
    img[evaluated & (pred != ref)] = _DISAGREE
    return img


def plot_preview(
    rgb: np.ndarray | None,
    prediction: np.ndarray,
    reference: np.ndarray | None,
    classes: Sequence[ClassInfo],
    path: str | Path,
    disagreement: bool = False,
    title: str = "",
) -> Path:
    """Draw image, prediction and reference side by side in class colours, with a legend.

    Args:
        rgb: Optional (H, W, 3) image (any numeric dtype; stretched for display).
        prediction: (H, W) class raster; values without a class (0, 255) are transparent.
        reference: Optional (H, W) reference raster, same convention.
        classes: Classes giving colours and legend names.
        path: PNG file to write.
        disagreement: Add a panel where prediction and reference agree (grey) or not
            (magenta), on pixels where the reference is labelled and the prediction has data.
        title: Figure title.

    Returns:
        The written path.
    """
    lut = class_colour_table(classes)
    panels: list[tuple[str, np.ndarray]] = []
    if rgb is not None:
        panels.append(("image", stretch(rgb)))
    panels.append(("prediction", _coloured(lut, prediction)))
    if reference is not None:
        panels.append(("reference", _coloured(lut, reference)))
        if disagreement:
            panels.append(("disagreement", _disagreement(prediction, reference)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.5, 4.6), squeeze=False)
    try:
        for ax, (name, img) in zip(axes[0], panels, strict=True):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(name)
            ax.set_xticks([])
            ax.set_yticks([])
        handles = [Patch(facecolor=c.colour, edgecolor="black", label=f"{c.value} {c.name}") for c in classes]
        # Transparent pixels mean nothing to compare: say so rather than leave white unexplained.
        blank = "no prediction (255)" + (" / unlabelled (0)" if reference is not None else "")
        handles.append(Patch(facecolor="white", edgecolor="black", label=blank))
        if disagreement and reference is not None:
            handles += [
                Patch(facecolor=_AGREE[:3], edgecolor="black", label="agree"),
                Patch(facecolor=_DISAGREE[:3], edgecolor="black", label="disagree"),
            ]
        _finish(fig, path, handles, title, right=0.82, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


def _finish(
    fig: Any, path: str | Path, handles: list[Any], title: str | None, right: float, dpi: int
) -> None:
    """Title, a class legend on the right (when there are classes) and the PNG."""
    if title:
        fig.suptitle(title)
    if handles:
        fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
        fig.tight_layout(rect=(0.0, 0.0, right, 1.0))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def plot_quicklook(
    path: str | Path,
    title: str,
    *,
    classes: np.ndarray | None = None,
    legend: Sequence[tuple[tuple[float, float, float, float], str]] = (),
    rgb: np.ndarray | None = None,
    values: np.ndarray | None = None,
    label: str = "",
    nodata: np.ndarray | None = None,
) -> Path:
    """One map with its legend beside it: a class map, a colour composite, or values with a colour bar.

    Pixels without data show a grey checkerboard (no class colour can be mistaken for it),
    named in the legend.

    Args:
        path: PNG to write.
        title: Figure title (what the map is, its size and CRS).
        classes: (H, W, 4) RGBA class map, drawn with ``legend`` (colour, text) beside it.
        legend: The class map's legend entries.
        rgb: (H, W, 3) image in 0-1.
        values: (H, W) values, drawn with a colour bar labelled ``label``.
        label: The colour bar's label.
        nodata: (H, W) True where the pixel holds no data.

    Returns:
        The written path.
    """
    shown = next(a for a in (classes, rgb, values) if a is not None)
    height, width = shown.shape[:2]
    fig, ax = plt.subplots(figsize=(7.0 * min(width / height, 2.0), 7.0))
    try:
        handles = [Patch(facecolor=colour, edgecolor="black", label=text) for colour, text in legend]
        if nodata is not None and nodata.any():
            ax.imshow(_checkerboard(height, width), interpolation="nearest")
            handles.append(Patch(facecolor="white", edgecolor="black", hatch="xx", label="no data"))
            shown = _without(shown, nodata)
        image = ax.imshow(shown, interpolation="nearest", cmap="viridis")
        ax.set_xticks([])
        ax.set_yticks([])
        if values is not None:
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=label)
        if handles:
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9,
                      frameon=False)
        fig.suptitle(title)
        fig.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def _checkerboard(height: int, width: int) -> np.ndarray:
    """Light and lighter grey squares, about 48 to the longer side."""
    cell = max(1, max(height, width) // 48)
    ys, xs = np.indices((height, width)) // cell
    return np.where(((ys + xs) % 2 == 0)[..., None], 0.78, 0.93) * np.ones(3)


def _without(shown: np.ndarray, nodata: np.ndarray) -> np.ndarray:
    """``shown`` transparent (or NaN, for values) where there is no data, so the checkerboard shows."""
    if shown.ndim == 2:
        return np.where(nodata, np.nan, shown.astype(np.float64))
    rgba = shown if shown.shape[-1] == 4 else np.concatenate([shown, np.ones((*shown.shape[:2], 1))], axis=-1)
    rgba = rgba.astype(np.float64).copy()
    rgba[nodata, 3] = 0.0
    return rgba


def display_bands(band_names: Sequence[str]) -> list[int]:
    """Band indices to show as an image: red, green, blue when named so, else the first three.

    One or two bands give one index (shown grey).
    """
    lower = [b.lower() for b in band_names]
    if all(name in lower for name in ("red", "green", "blue")):
        return [lower.index("red"), lower.index("green"), lower.index("blue")]
    return [0, 1, 2] if len(lower) >= 3 else [0]


def plot_samples(
    images: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    band_names: Sequence[str],
    classes: Sequence[ClassInfo],
    path: str | Path,
    title: str = "",
) -> Path:
    """One row per chip: image (RGB, or grey for fewer than 3 bands), reference, prediction.

    Args:
        images: (band, H, W) raw chips (stretched for display, band by band).
        references: (H, W) reference class values (0 = unlabelled, transparent).
        predictions: (H, W) predicted class values.
        band_names: Names of the image bands (to find red, green and blue).
        classes: Classes giving colours and legend names.
        path: PNG file to write.
        title: Figure title.

    Returns:
        The written path.
    """
    if not (len(images) == len(references) == len(predictions)) or not images:
        raise ValueError("plot_samples needs the same, non-zero number of images, references and predictions")
    lut = class_colour_table(classes)
    bands = display_bands(band_names)
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(9.5, 3.0 * rows + 0.6), squeeze=False)
    try:
        for r, (image, ref, pred) in enumerate(zip(images, references, predictions, strict=True)):
            shown = stretch(np.moveaxis(np.asarray(image)[bands], 0, -1))
            panels = [
                ("image", shown if shown.shape[-1] == 3 else shown[..., 0]),
                ("reference", _coloured(lut, ref)),
                ("prediction", _coloured(lut, pred)),
            ]
            for ax, (name, img) in zip(axes[r], panels, strict=True):
                ax.imshow(img, interpolation="nearest", cmap="gray" if img.ndim == 2 else None)
                if r == 0:
                    ax.set_title(name)
                ax.set_xticks([])
                ax.set_yticks([])
        handles = [Patch(facecolor=c.colour, edgecolor="black", label=f"{c.value} {c.name}") for c in classes]
        _finish(fig, path, handles, title, right=0.8, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)
