"""Accuracy of a class prediction against a reference, out of core.

The prediction is a region store's ``classes`` layer or a class GeoTIFF (e.g. the
exported COG); the reference is a label raster (any grid or CRS, warped with nearest
resampling) or polygons (rasterized), brought onto the prediction's grid window by
window through :mod:`segpipe.io.labels`.

Pixels count where the reference is labelled (not 0) and the prediction has data (not
255); a prediction outside the evaluated classes counts as an error ("other", see
:mod:`segpipe.stages.evaluate.metrics`). On the active dask scheduler (a distributed
client if one is set up), one task per window counts (reference, prediction) value
pairs into a 256 x 256 joint histogram; the histograms are summed in a tree, so memory
stays at a few windows whatever the region size, and the classes to evaluate are chosen
after the single pass (the reference's values are only known once it has been read).
With ``points``, a second pass reads only the windows holding a drawn point
(:mod:`segpipe.stages.evaluate.points`).

Prediction and reference may be ``s3://`` URLs (a store prefix, or a raster or polygons
read through ``/vsis3/``); an ``s3://`` report folder is written locally and uploaded
when complete, ``metrics.json`` last. A local report folder is written beside ``out``
and swapped in whole (:mod:`segpipe.stages.evaluate.swap`): a kill leaves the earlier
report or the new one, never a mix of both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from affine import Affine
from dask.base import compute
from dask.delayed import Delayed, delayed

from segpipe.errors import InputError, LabelsError
from segpipe.grid.box import Box, iter_boxes
from segpipe.io.labels import LabelSource, check_overlap, label_classes, labels_window, open_labels
from segpipe.io.remote import as_url, check_bucket, is_remote, staged_dir, storage_errors
from segpipe.io.store import NODATA_U8
from segpipe.plots import plot_confusion_matrix, plot_preview
from segpipe.stages.evaluate.metrics import confusion_from_histogram, joint_histogram, json_ready, scores
from segpipe.stages.evaluate.points import (
    ALL,
    allocate,
    area_weighted_accuracy,
    draw_ranks,
    points_in_window,
    strata_counts,
)
from segpipe.stages.evaluate.prediction import (
    PredictionSource,
    describe_prediction,
    open_prediction,
    preview_rgb,
    read_prediction,
)
from segpipe.stages.evaluate.report import (
    PreviewPiece,
    assemble_preview,
    decimate,
    evaluated_name,
    preview_step,
    write_report,
)
from segpipe.stages.evaluate.swap import REPORT_FILES, recover, staged_report
from segpipe.types import ClassInfo, Grid, default_colour
from segpipe.waves import waves

__all__ = ["EVAL_WINDOW", "PredictionSource", "evaluate", "open_prediction"]

EVAL_WINDOW = 1024  # pixels per side of one task's window

_PassResult = tuple[np.ndarray, list[np.ndarray], list[PreviewPiece | None]]
"""A run of windows' summed joint histogram, and per window its stratum counts and preview piece."""


class PointRequest(NamedTuple):
    """The point assessment asked for: how many points, the design and the seed."""

    n: int
    sampling: str
    seed: int


def evaluate(
    prediction: str | Path,
    reference: str | Path,
    out_dir: str | Path,
    reference_field: str | None = None,
    layer: str = "classes",
    window: int = EVAL_WINDOW,
    preview: bool = True,
    points: int | None = None,
    sampling: str = "stratified",
    seed: int = 0,
) -> dict[str, Any]:
    """Compare a prediction with a reference and write metrics, a report and figures (module docstring).

    Args:
        prediction: Region store (its ``layer``) or class GeoTIFF on the grid to evaluate.
        reference: Label raster (any grid or CRS) or polygons (Shapefile, GeoPackage...).
        out_dir: Folder (or ``s3://`` prefix) for ``metrics.json``, ``report.md``,
            ``confusion_matrix.png``, ``preview.png`` and, with ``points``, ``points.csv``.
        reference_field: Integer class field of reference polygons (default: guessed).
        layer: Store layer holding the classes.
        window: Pixels per side of one task's window (aligned to the store's blocks).
        preview: Also draw the whole region, decimated, to ``preview.png``.
        points: Evaluate on this many random points instead of every pixel.
        sampling: ``stratified``, ``equalized`` or ``random`` (see ``points``).
        seed: Seed of the point draw; the same seed gives the same points.

    Returns:
        The metrics written to ``metrics.json`` (undefined ratios as None).

    Raises:
        MissingInputError: The prediction, its layer or the reference does not exist.
        LabelsError: The reference does not overlap the prediction, or holds no labelled
            pixel where the prediction has data.
        InputError: Bad ``points`` or ``sampling``, or ``out_dir`` is a file or holds the
            current folder.
        StorageError: The report cannot be written (full disk, read-only, no permission).
    """
    request = PointRequest(points, sampling, seed) if points is not None else None
    _check_request(out_dir, request)
    pred, grid, pred_classes, block = open_prediction(prediction, layer)
    labels = open_labels(reference, reference_field)
    check_overlap(labels, grid)
    boxes = list(iter_boxes(grid.height, grid.width, max(block, window // block * block)))
    step = preview_step(grid.height, grid.width) if preview else 0
    hist, per_window, pieces = _full_pass(pred, labels, grid, boxes, step)
    _check_labelled(hist, prediction, reference)
    classes = _evaluated_classes(pred_classes, labels, hist)
    _check_predicted(hist, classes, prediction, reference)
    with storage_errors(out_dir, "evaluation report"), _report_folder(out_dir) as out:
        if request is None:
            cm, assessment = confusion_from_histogram(hist, [c.value for c in classes]), {"mode": "pixels"}
        else:
            window_counts = np.asarray(per_window, np.int64)
            cm, assessment = _assess_points(out, pred, labels, grid, boxes, window_counts, classes, request)
        metrics = _metrics(prediction, reference, hist, cm, classes, assessment)
        metrics.update(describe_prediction(pred))
        view = (assemble_preview(pieces, grid.height, grid.width, step), step) if preview else None
        _write_outputs(out, metrics, cm, classes, view)
    return metrics


def _check_request(out_dir: str | Path, request: PointRequest | None) -> None:
    """Refuse a bad point request or report folder, before the long pass; recover an interrupted swap.

    Raises:
        InputError: Bad ``points`` or ``sampling``, or ``out_dir`` is a file or holds the
            current folder.
        MissingInputError: The ``s3://`` bucket of ``out_dir`` does not exist.
    """
    if is_remote(out_dir):
        check_bucket(as_url(out_dir))
    elif Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"--out {out_dir} is a file: name a folder for the report")
    else:
        # Before the long pass: a run that fails on its inputs still restores a report
        # whose swap a kill interrupted.
        with storage_errors(out_dir, "evaluation report"):
            recover(out_dir)
    if request is not None:
        allocate(np.ones(ALL + 1, np.int64), request.n, request.sampling)


def _report_folder(out_dir: str | Path) -> AbstractContextManager[Path]:
    """The local folder the report is written into, published as ``out_dir`` when the block ends.

    A local report is staged beside ``out_dir`` and swapped in whole; an ``s3://`` one is
    uploaded once complete, ``metrics.json`` last (its presence marks a finished report),
    after the earlier report's ``metrics.json`` and its files this run does not write
    (a ``points.csv``) are removed.
    """
    if is_remote(out_dir):
        return staged_dir(out_dir, last=("metrics.json",), owned=REPORT_FILES)
    return staged_report(out_dir)


# ---- the window pass: one joint histogram per window, summed in a tree -----------------------


def _read_window(
    pred: PredictionSource, labels: LabelSource, grid: Grid, box: Box
) -> tuple[np.ndarray, np.ndarray]:
    """The prediction (255 = nodata) and the reference (0 = unlabelled) of one box."""
    return read_prediction(pred, box), labels_window(labels, grid, box.y0, box.x0, box.h, box.w)


def _window_pass(pred: PredictionSource, labels: LabelSource, grid: Grid, box: Box, step: int) -> _PassResult:
    """One window's joint histogram, [evaluable pixels per stratum] and [decimated preview piece]."""
    p, r = _read_window(pred, labels, grid, box)
    hist = joint_histogram(p, r)
    piece = None
    if step:
        y0, x0 = box.y0, box.x0
        piece = (y0, x0, decimate(p, y0, x0, step), decimate(r, y0, x0, step), preview_rgb(pred, box, step))
    return hist, [strata_counts(hist)], [piece]


def _merge(a: _PassResult, b: _PassResult) -> _PassResult:
    """Sum two histograms and concatenate the per-window lists (in window order)."""
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def _tree_sum(parts: list[Delayed]) -> Delayed:
    """Merge window results pairwise, in order, so no task holds more than two histograms.

    One tree for everything: separate consumers of each window's result would keep its
    histogram alive until the last of them ran (measured: +0.5 GB on 16,384^2).
    """
    add = delayed(_merge, pure=True)
    while len(parts) > 1:
        paired = [add(a, b) for a, b in zip(parts[::2], parts[1::2], strict=False)]
        parts = paired + parts[len(paired) * 2 :]
    return parts[0]


def _full_pass(
    pred: PredictionSource, labels: LabelSource, grid: Grid, boxes: list[Box], step: int
) -> _PassResult:
    """Every window's :func:`_window_pass` on the active dask scheduler, merged in window order.

    Computed one wave of windows at a time (:func:`segpipe.waves.waves`), so that neither
    the driver nor the scheduler holds a graph of the whole region.
    """
    result: _PassResult | None = None
    for wave in waves(boxes):
        (part,) = compute(_tree_sum([delayed(_window_pass)(pred, labels, grid, box, step) for box in wave]))
        result = part if result is None else _merge(result, part)
    assert result is not None  # a grid has at least one window
    return result


def _check_labelled(hist: np.ndarray, prediction: str | Path, reference: str | Path) -> None:
    """Refuse a reference without any labelled pixel on the grid.

    Raises:
        LabelsError: No reference pixel above 0.
    """
    if int(hist[1:, :].sum()) == 0:
        raise LabelsError(
            f"reference {reference} has no labelled pixel (class > 0) where it overlaps {prediction}"
        )


def _check_predicted(
    hist: np.ndarray, classes: Sequence[ClassInfo], prediction: str | Path, reference: str | Path
) -> None:
    """Refuse a prediction without data where the reference is labelled.

    Raises:
        LabelsError: No pixel is both labelled and predicted.
    """
    if int(confusion_from_histogram(hist, [c.value for c in classes]).sum()) == 0:
        raise LabelsError(
            f"the prediction {prediction} has no data (all 255) where reference {reference} is labelled: "
            "run 'segpipe predict' over the labelled area"
        )


def _evaluated_classes(
    predicted: Sequence[ClassInfo], labels: LabelSource, hist: np.ndarray
) -> list[ClassInfo]:
    """Classes of the prediction's metadata plus every class value the reference holds.

    Without metadata the prediction's own values count as classes. Names and colours
    come from the prediction first (the model's names), then from the reference.
    """
    ref_values = [int(v) for v in np.flatnonzero(hist.sum(axis=1)) if 1 <= v <= 254]
    known = {c.value: c for c in predicted}
    if not known:
        pred_values = [int(v) for v in np.flatnonzero(hist.sum(axis=0)) if 1 <= v <= 254]
        known = {v: ClassInfo(v, f"class {v}", default_colour(v)) for v in pred_values}
    from_ref = {c.value: c for c in label_classes(labels, ref_values if labels.kind == "raster" else None)}
    for v in ref_values:
        known.setdefault(v, from_ref.get(v) or ClassInfo(v, f"class {v}", default_colour(v)))
    return [known[v] for v in sorted(known)]


# ---- points: a second pass over the windows that hold a drawn point --------------------------


def _assess_points(
    out: Path,
    pred: PredictionSource,
    labels: LabelSource,
    grid: Grid,
    boxes: list[Box],
    window_counts: np.ndarray,
    classes: list[ClassInfo],
    request: PointRequest,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw the points, write ``points.csv`` and return their confusion matrix and summary.

    Args:
        out: Report folder.
        pred: The prediction.
        labels: The reference.
        grid: The prediction's grid.
        boxes: The windows of the first pass, in order.
        window_counts: (windows, 257) evaluable pixels per stratum of each window.
        classes: The evaluated classes.
        request: Points, design and seed.
    """
    drawn, targets = _sample_points(pred, labels, grid, boxes, window_counts, request)
    cm = confusion_from_histogram(joint_histogram(drawn[:, 3], drawn[:, 2]), [c.value for c in classes])
    _write_points(out / "points.csv", drawn, grid)
    return cm, _points_summary(drawn, targets, window_counts.sum(axis=0), classes, request)


def _window_points(
    pred: PredictionSource, labels: LabelSource, grid: Grid, box: Box, picks: dict[int, np.ndarray]
) -> np.ndarray:
    """(n, 4) int64 rows of (row, col, reference, prediction) of the window's drawn points."""
    p, r = _read_window(pred, labels, grid, box)
    rc = points_in_window(p, r, picks)
    rows, cols = rc[:, 0], rc[:, 1]
    return np.stack([rows + box.y0, cols + box.x0, r[rows, cols], p[rows, cols]], axis=1).astype(np.int64)


def _sample_points(
    pred: PredictionSource,
    labels: LabelSource,
    grid: Grid,
    boxes: list[Box],
    window_counts: np.ndarray,
    request: PointRequest,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the points and read their values: ((n, 4) row/col/reference/prediction, per-stratum counts)."""
    targets = allocate(window_counts.sum(axis=0), request.n, request.sampling)
    picks = draw_ranks(window_counts, targets, request.seed)
    read = delayed(_window_points)
    found = [
        points
        for wave in waves(sorted(picks))
        for points in compute(*[read(pred, labels, grid, boxes[i], picks[i]) for i in wave])
    ]
    points = np.concatenate(found) if found else np.zeros((0, 4), np.int64)
    return points, targets


def _write_points(path: Path, points: np.ndarray, grid: Grid) -> None:
    """CSV of the points: pixel row/col, map x/y of the pixel centre, reference and prediction."""
    t = Affine(*grid.transform) * Affine.translation(0.5, 0.5)
    cols, rows = points[:, 1].astype(np.float64), points[:, 0].astype(np.float64)
    xs = t.a * cols + t.b * rows + t.c
    ys = t.d * cols + t.e * rows + t.f
    with path.open("w") as f:
        f.write("row,col,x,y,reference,prediction\n")
        for (row, col, ref, prd), x, y in zip(points.tolist(), xs.tolist(), ys.tolist(), strict=True):
            f.write(f"{row},{col},{x!r},{y!r},{ref},{prd}\n")


def _points_summary(
    points: np.ndarray,
    targets: np.ndarray,
    totals: np.ndarray,
    classes: list[ClassInfo],
    request: PointRequest,
) -> dict[str, Any]:
    """The ``assessment`` of ``metrics.json`` for points: the design, and pixels and points per stratum."""
    names = {c.value: c.name for c in classes}
    strata = range(ALL, ALL + 1) if request.sampling == "random" else np.flatnonzero(totals[:255])
    per_stratum = [
        {
            "value": int(s) if s != ALL else None,
            "name": "all evaluable pixels" if s == ALL else names.get(int(s), f"other ({int(s)})"),
            "pixels": int(totals[s]),
            "points": int(targets[s]),
        }
        for s in strata
    ]
    return {
        "mode": "points",
        "sampling": request.sampling,
        "requested": request.n,
        "points": len(points),
        "seed": request.seed,
        "per_stratum": per_stratum,
        "overall_accuracy_area_weighted": area_weighted_accuracy(points[:, 3], points[:, 2], totals),
        "points_file": "points.csv",
    }


# ---- what is written --------------------------------------------------------------------------


def _pixel_counts(hist: np.ndarray, values: list[int]) -> dict[str, int]:
    """Pixels of the grid, labelled, evaluated, labelled without prediction, predicted "other"."""
    full = confusion_from_histogram(hist, values)
    return {
        "grid": int(hist.sum()),
        "reference_labelled": int(hist[1:, :].sum()),
        "evaluated": int(full.sum()),
        "labelled_without_prediction": int(hist[values, NODATA_U8].sum()),
        "other_predictions": int(full[:, -1].sum()),
    }


def _metrics(
    prediction: str | Path,
    reference: str | Path,
    hist: np.ndarray,
    cm: np.ndarray,
    classes: list[ClassInfo],
    assessment: dict[str, Any],
) -> dict[str, Any]:
    """What ``metrics.json`` holds: the inputs, the scores of ``cm``, the assessment and pixel counts."""
    values = [c.value for c in classes]
    result = scores(cm, values, [c.name for c in classes])
    result["classes"] = [{"value": c.value, "name": c.name, "colour": c.colour} for c in classes]
    metrics = {
        "prediction": str(prediction),
        "reference": str(reference),
        **result,
        "assessment": assessment,
        "pixel_counts": _pixel_counts(hist, values),
    }
    return json_ready(metrics)  # type: ignore[no-any-return]


def _write_outputs(
    out: Path,
    metrics: dict[str, Any],
    cm: np.ndarray,
    classes: list[ClassInfo],
    view: tuple[tuple[np.ndarray, np.ndarray, np.ndarray | None], int] | None,
) -> None:
    """Write ``metrics.json``, the confusion matrix and preview figures, and ``report.md``.

    Args:
        out: Report folder.
        metrics: From :func:`_metrics`.
        cm: The (K, K + 1) confusion matrix the metrics were computed from.
        classes: The evaluated classes.
        view: The whole region's decimated (prediction, reference, rgb) and the decimation
            step, or None for no preview.
    """
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    names = [c.name for c in classes]
    title = f"{evaluated_name(metrics)} vs {Path(metrics['reference']).name}"
    assessment = metrics["assessment"]
    if assessment["mode"] == "points":
        title += f" ({assessment['points']:,} {assessment['sampling']} points)"
    shown = cm if cm[:, -1].any() else cm[:, :-1]  # an all-zero "other" column is clutter
    plot_confusion_matrix(shown, names, out / "confusion_matrix.png", title)
    figures = ["confusion_matrix.png"]
    if view is not None:
        (view_pred, view_ref, view_rgb), step = view
        plot_preview(
            view_rgb,
            view_pred,
            view_ref,
            classes,
            out / "preview.png",
            disagreement=True,
            title=f"{evaluated_name(metrics)}: whole region"
            + (f", 1 pixel in {step} along each axis" if step > 1 else ""),
        )
        figures.append("preview.png")
    write_report(out / "report.md", metrics, figures)
