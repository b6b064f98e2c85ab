"""What ``segpipe evaluate`` writes besides ``metrics.json``: the whole-region preview and report.md.

The preview shows the *whole* region at a reduced scale without ever reading it whole:
each evaluation window contributes every ``step``-th pixel of its rows and columns,
taken on the global pixel lattice (so windows tile the decimated view exactly), and
the pieces are placed into a small mosaic of at most :data:`PREVIEW_SIZE` pixels a side.

The Markdown report is for people: the headline scores, per-class user's and
producer's accuracies, the confusion matrix as a table, how pixels or points were
chosen, and the two figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PREVIEW_SIZE",
    "PreviewPiece",
    "assemble_preview",
    "decimate",
    "evaluated_name",
    "markdown_report",
    "preview_step",
    "write_report",
]

PREVIEW_SIZE = 1024  # longest side of preview.png's panels, in pixels

PreviewPiece = tuple[int, int, np.ndarray, np.ndarray, np.ndarray | None]
"""One window's decimated (y0, x0, prediction, reference, rgb or None)."""


def preview_step(height: int, width: int, size: int = PREVIEW_SIZE) -> int:
    """Decimation factor that fits the region into ``size`` pixels a side."""
    return max(1, math.ceil(max(height, width) / size))


def decimate(array: np.ndarray, y0: int, x0: int, step: int) -> np.ndarray:
    """Every ``step``-th pixel of a window at (y0, x0), on the global lattice (rows/cols % step == 0).

    A copy, not a view: a view would keep the whole window alive as long as the piece.
    """
    return np.ascontiguousarray(array[..., (-y0) % step :: step, (-x0) % step :: step])


def assemble_preview(
    pieces: Sequence[PreviewPiece | None], height: int, width: int, step: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Place decimated window pieces into the region's decimated view.

    Returns:
        (prediction, reference, rgb or None): prediction 255 and reference 0 where no
        piece covers; rgb (h, w, 3) float with NaN where missing.
    """
    h, w = -(-height // step), -(-width // step)
    pred = np.full((h, w), 255, np.uint8)
    ref = np.zeros((h, w), np.uint8)
    rgb: np.ndarray | None = None
    for piece in pieces:
        if piece is None:
            continue
        y0, x0, p, r, img = piece
        row, col = -(-y0 // step), -(-x0 // step)
        pred[row : row + p.shape[0], col : col + p.shape[1]] = p
        ref[row : row + r.shape[0], col : col + r.shape[1]] = r
        if img is not None:
            if rgb is None:
                rgb = np.full((h, w, 3), np.nan)
            rgb[row : row + img.shape[0], col : col + img.shape[1]] = img
    return pred, ref, rgb


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _assessment_lines(metrics: dict[str, Any]) -> list[str]:
    a = metrics.get("assessment", {})
    if a.get("mode") != "points":
        counts = metrics["pixel_counts"]
        return [
            "Every pixel of the region was compared: "
            f"{_fmt(counts['evaluated'])} pixels where the reference is labelled and the prediction has data "
            f"(of {_fmt(counts['grid'])} in the grid; {_fmt(counts['labelled_without_prediction'])} labelled "
            "pixels had no prediction and are not counted).",
        ]
    lines = [
        f"**{_fmt(a['points'])} points** ({_fmt(a['requested'])} requested), **{a['sampling']}** random "
        f"sampling, seed {a['seed']}, drawn among the {_fmt(metrics['pixel_counts']['evaluated'])} evaluable "
        "pixels (reference labelled, prediction has data); strata are the predicted classes. "
        f"Points with their coordinates: `{a['points_file']}`.",
        "",
        "Area-weighted overall accuracy (Olofsson et al. 2014): "
        f"**{_fmt(a['overall_accuracy_area_weighted'])}**; the estimate to report for `equalized` "
        "sampling, where the plain share of correct points over-weights rare classes.",
        "",
    ]
    rows = [[s["value"], s["name"], s["pixels"], s["points"]] for s in a["per_stratum"]]
    return lines + _table(["value", "predicted class", "evaluable pixels", "points"], rows, right_from=2)


def evaluated_name(metrics: dict[str, Any]) -> str:
    """What was evaluated, as titles name it: the layer, the prediction and the model that made it.

    The demo evaluates a network's ``classes`` and a forest's ``classes_rf`` of one store:
    without the layer and the model, their reports would carry the same title.
    """
    name = Path(str(metrics["prediction"])).name
    layer = metrics.get("layer")
    shown = f"{layer} of {name}" if layer and not name.endswith((".tif", ".tiff")) else name
    model = metrics.get("model") or {}
    if model.get("arch"):
        encoder = f" {model['encoder']}" if model.get("encoder") not in (None, "", "none") else ""
        shown += f" ({model['arch']}{encoder})"
    return shown


def _source_lines(metrics: dict[str, Any]) -> list[str]:
    """The report's first lines: what was evaluated, by which model, against what."""
    lines = [f"- prediction: `{metrics['prediction']}`"]
    if metrics.get("layer"):
        lines.append(f"- layer: `{metrics['layer']}`")
    model = metrics.get("model") or {}
    if model.get("package"):
        kind = ", ".join(str(model[k]) for k in ("arch", "encoder") if model.get(k))
        lines.append(f"- model: `{model['package']}` ({kind})")
    return [*lines, f"- reference: `{metrics['reference']}`"]


def markdown_report(metrics: dict[str, Any], figures: Sequence[str] = ()) -> str:
    """The accuracy report as Markdown.

    Args:
        metrics: What :func:`segpipe.stages.evaluate.assess.evaluate` writes to ``metrics.json``.
        figures: PNG file names (relative to the report) to show at the end.

    Returns:
        The report text.
    """
    unit = "points" if metrics.get("assessment", {}).get("mode") == "points" else "pixels"
    lines = [
        f"# Accuracy assessment: {evaluated_name(metrics)}",
        "",
        *_source_lines(metrics),
        "",
        "## Summary",
        "",
        *_table(
            ["score", "value"],
            [
                ["overall accuracy", metrics["overall_accuracy"]],
                ["Cohen's kappa", metrics["kappa"]],
                ["mean IoU", metrics["miou"]],
                [f"{unit} evaluated", metrics["pixels"]],
                [f"{unit} correct", metrics["correct"]],
            ],
        ),
        "",
        "## What was compared",
        "",
        *_assessment_lines(metrics),
        "",
        *_per_class_lines(metrics),
        "",
        *_confusion_lines(metrics, unit),
        "",
    ]
    for fig in figures:
        lines += [f"![{Path(fig).stem.replace('_', ' ')}]({fig})", ""]
    return "\n".join(lines)


def _per_class_lines(metrics: dict[str, Any]) -> list[str]:
    """The "Per class" section: user's and producer's accuracies, F1 and IoU of each class."""
    rows = [
        [c["value"], c["name"], c["support"], c["predicted"], c["precision"], c["recall"], c["f1"], c["iou"]]
        for c in metrics["per_class"]
    ]
    header = ["value", "class", "reference", "predicted", "user's acc.", "producer's acc.", "F1", "IoU"]
    return [
        "## Per class",
        "",
        "Precision is the user's accuracy (how often a mapped class is right on the ground), recall the "
        "producer's accuracy (how much of a class on the ground the map finds).",
        "",
        *_table(header, rows, right_from=2),
    ]


def _confusion_lines(metrics: dict[str, Any], unit: str) -> list[str]:
    """The confusion matrix section, with its "other" column."""
    names = [c["name"] for c in metrics["per_class"]]
    cm_rows = [
        [name, *row, other]
        for name, row, other in zip(
            names, metrics["confusion_matrix"], metrics["other_predictions"], strict=True
        )
    ]
    return [
        f"## Confusion matrix ({unit})",
        "",
        'Rows: reference; columns: prediction. "other" counts predictions outside the evaluated classes '
        "(an error for the reference class, a false positive for none).",
        "",
        *_table(["reference \\ prediction", *names, "other"], cm_rows),
    ]


def write_report(path: str | Path, metrics: dict[str, Any], figures: Sequence[str] = ()) -> Path:
    """Write :func:`markdown_report` to ``path``."""
    out = Path(path)
    out.write_text(markdown_report(metrics, figures))
    return out
