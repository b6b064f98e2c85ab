"""Accuracy of a class prediction against a reference, out of core.

The prediction is a region store's ``classes`` layer or a class GeoTIFF (e.g. the
exported COG); the reference is a label raster (any grid or CRS, warped with nearest
resampling) or polygons (rasterized), brought onto the prediction's grid window by
window through :mod:`segpipe.io.labels`.

One dask task per window counts (reference, prediction) value pairs into a 256 x 256
joint histogram; the histograms are summed in a tree, so memory stays at a few
windows whatever the region size, and the classes to evaluate are chosen after the
single pass (the reference's values are only known once it has been read).

Prediction and reference may be ``s3://`` URLs (a store prefix, or a raster or polygons
read through ``/vsis3/``); an ``s3://`` report folder is written locally and uploaded
when complete, ``metrics.json`` last.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
from affine import Affine
from dask.base import compute
from dask.delayed import Delayed, delayed

from segpipe.errors import InputError, LabelsError, MissingInputError, StoreError
from segpipe.io.labels import LabelSource, check_overlap, label_classes, labels_window, open_labels
from segpipe.io.remote import (
    as_url,
    check_bucket,
    gdal_env,
    gdal_path,
    is_remote,
    join,
    remote_exists,
    staged_dir,
    storage_errors,
)
from segpipe.io.store import NODATA_U8, open_layer, read_region_info
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
from segpipe.stages.evaluate.report import (
    PreviewPiece,
    assemble_preview,
    decimate,
    preview_step,
    write_report,
)
from segpipe.stages.export.layers import classes_from_tags
from segpipe.types import ClassInfo, Grid, default_colour

__all__ = ["EVAL_WINDOW", "PredictionSource", "evaluate", "open_prediction"]

EVAL_WINDOW = 1024  # pixels per side of one task's window
_RGB_NAMES = ("red", "green", "blue")


@dataclass(frozen=True)
class PredictionSource:
    """A class prediction to evaluate, small enough to ship inside dask graphs.

    Attributes:
        path: Region store or GeoTIFF.
        kind: ``"store"`` or ``"raster"``.
        layer: Store layer holding the classes (stores only).
        nodata: The raster's nodata value, read as 255 (rasters only).
    """

    path: str
    kind: Literal["store", "raster"]
    layer: str = "classes"
    nodata: float | None = None


def open_prediction(
    prediction: str | Path, layer: str = "classes"
) -> tuple[PredictionSource, Grid, list[ClassInfo], int]:
    """Describe a prediction: where its pixels are, its grid, its classes and a window alignment.

    Args:
        prediction: Region store (Zarr directory) or single-band class GeoTIFF.
        layer: Store layer to evaluate.

    Returns:
        The source, its grid, the classes its metadata names (band tags of a GeoTIFF,
        the store's classes; possibly empty) and the block size windows should align to.

    Raises:
        MissingInputError: The prediction or its layer does not exist.
        InputError: A GeoTIFF is multi-band or not of integers.
    """
    p: Path | str
    if is_remote(prediction):
        p = as_url(prediction)
        is_store = remote_exists(join(p, "zarr.json"))
        if not is_store and not remote_exists(p):
            raise MissingInputError(f"prediction {p} does not exist")
    else:
        p = Path(prediction)
        if not p.exists():
            raise MissingInputError(f"prediction {p} does not exist")
        is_store = p.is_dir()
    if is_store:
        info = read_region_info(p)
        try:
            array = open_layer(p, layer)
        except StoreError as exc:
            raise MissingInputError(
                f"region store {p} has no '{layer}' layer to evaluate: run 'segpipe predict' first"
            ) from exc
        if tuple(array.shape) != (info.height, info.width):
            raise StoreError(f"layer '{layer}' of {p} is not a (y, x) layer of the region grid")
        return PredictionSource(str(p), "store", layer), info.grid, list(info.classes), info.block_size
    try:
        with gdal_env(p), rasterio.open(gdal_path(p)) as src:
            if src.count != 1 or not np.issubdtype(np.dtype(src.dtypes[0]), np.integer):
                raise InputError(
                    f"prediction {p} has {src.count} band(s) of {src.dtypes[0]}: "
                    "give a single-band integer class raster"
                )
            grid = Grid(src.crs.to_wkt() if src.crs else "", tuple(src.transform)[:6], src.height, src.width)
            classes = classes_from_tags(src.tags(1))
            return PredictionSource(str(p), "raster", nodata=src.nodata), grid, classes, 1
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"prediction {p} is neither a region store nor a raster GDAL can read") from exc


def _read_prediction(pred: PredictionSource, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Prediction pixels of one window, nodata as 255."""
    if pred.kind == "store":
        return np.asarray(open_layer(pred.path, pred.layer)[y0 : y0 + h, x0 : x0 + w])
    with gdal_env(pred.path), rasterio.open(gdal_path(pred.path)) as src:
        data: np.ndarray = src.read(1, window=rasterio.windows.Window(x0, y0, w, h))
    if pred.nodata is not None and pred.nodata != NODATA_U8:
        data = np.where(data == pred.nodata, NODATA_U8, data)
    return data


def _window_pass(
    pred: PredictionSource, labels: LabelSource, grid: Grid, y0: int, x0: int, h: int, w: int, step: int
) -> _PassResult:
    """One window's joint histogram, [evaluable pixels per stratum] and [decimated preview piece]."""
    p = _read_prediction(pred, y0, x0, h, w)
    r = labels_window(labels, grid, y0, x0, h, w)
    hist = joint_histogram(p, r)
    piece = None
    if step:
        piece = (y0, x0, decimate(p, y0, x0, step), decimate(r, y0, x0, step), _rgb(pred, y0, x0, h, w, step))
    return hist, [strata_counts(hist)], [piece]


def _window_points(
    pred: PredictionSource,
    labels: LabelSource,
    grid: Grid,
    y0: int,
    x0: int,
    h: int,
    w: int,
    picks: dict[int, np.ndarray],
) -> np.ndarray:
    """(n, 4) int64 rows of (row, col, reference, prediction) of the window's drawn points."""
    p = _read_prediction(pred, y0, x0, h, w)
    r = labels_window(labels, grid, y0, x0, h, w)
    rc = points_in_window(p, r, picks)
    rows, cols = rc[:, 0], rc[:, 1]
    return np.stack([rows + y0, cols + x0, r[rows, cols], p[rows, cols]], axis=1).astype(np.int64)


_PassResult = tuple[np.ndarray, list[np.ndarray], list[PreviewPiece | None]]


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


def _windows(grid: Grid, size: int) -> list[tuple[int, int, int, int]]:
    return [
        (y0, x0, min(size, grid.height - y0), min(size, grid.width - x0))
        for y0 in range(0, grid.height, size)
        for x0 in range(0, grid.width, size)
    ]


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


def _rgb(pred: PredictionSource, y0: int, x0: int, h: int, w: int, step: int) -> np.ndarray | None:
    """Decimated (h', w', 3) image of a store whose bands are named red/green/blue, else None."""
    if pred.kind != "store":
        return None
    info = read_region_info(pred.path)
    names = [n.lower() for n in info.band_names]
    if not all(n in names for n in _RGB_NAMES):
        return None
    image = open_layer(pred.path, "image")
    rows = slice(y0 + (-y0) % step, y0 + h, step)
    cols = slice(x0 + (-x0) % step, x0 + w, step)
    bands = [np.asarray(image[names.index(n), rows, cols], np.float64) for n in _RGB_NAMES]
    rgb = np.stack(bands, axis=-1)
    return np.where(rgb == info.nodata, np.nan, rgb) if info.nodata is not None else rgb


def _sample_points(
    pred: PredictionSource,
    labels: LabelSource,
    grid: Grid,
    windows: list[tuple[int, int, int, int]],
    per_window: np.ndarray,
    n: int,
    sampling: str,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the points and read their values: ((n, 4) row/col/reference/prediction, per-stratum counts)."""
    targets = allocate(per_window.sum(axis=0), n, sampling)
    picks = draw_ranks(per_window, targets, seed)
    tasks = [delayed(_window_points)(pred, labels, grid, *windows[i], picks[i]) for i in sorted(picks)]
    found = compute(*tasks)
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
    points: np.ndarray, targets: np.ndarray, totals: np.ndarray, classes: list[ClassInfo], request: tuple
) -> dict[str, Any]:
    n, sampling, seed = request
    names = {c.value: c.name for c in classes}
    strata = range(ALL, ALL + 1) if sampling == "random" else np.flatnonzero(totals[:255])
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
        "sampling": sampling,
        "requested": n,
        "points": len(points),
        "seed": seed,
        "per_stratum": per_stratum,
        "overall_accuracy_area_weighted": area_weighted_accuracy(points[:, 3], points[:, 2], totals),
        "points_file": "points.csv",
    }


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
    """Compare a prediction with a reference and write metrics, a report and figures.

    Pixels count where the reference is labelled (not 0) and the prediction has data
    (not 255); a prediction outside the evaluated classes counts as an error ("other",
    see :mod:`segpipe.stages.evaluate.metrics`). Runs on the active dask scheduler (a distributed
    client if one is set up), one task per window; with ``points``, a second pass
    reads only the windows holding a drawn point (see :mod:`segpipe.stages.evaluate.points`).

    Args:
        prediction: Region store (its ``layer``) or class GeoTIFF on the grid to evaluate.
        reference: Label raster (any grid or CRS) or polygons (Shapefile, GeoPackage...).
        out_dir: Folder (or ``s3://`` prefix) for ``metrics.json``, ``report.md``,
            ``confusion_matrix.png``, ``preview.png`` and, with ``points``, ``points.csv``.
        reference_field: Integer class field of reference polygons (default: guessed).
        layer: Store layer holding the classes.
        window: Pixels per side of one task's window (aligned to the store's blocks).
        preview: Also draw image / prediction / reference / disagreement of the whole
            region, decimated, to ``preview.png``.
        points: Evaluate on this many random points instead of every pixel.
        sampling: ``stratified`` (by predicted class, proportional to area),
            ``equalized`` (same count per predicted class) or ``random``.
        seed: Seed of the point draw; the same seed gives the same points.

    Returns:
        The metrics written to ``metrics.json`` (undefined ratios as None).

    Raises:
        MissingInputError: The prediction or the reference does not exist.
        LabelsError: The reference does not overlap the prediction, or holds no labelled
            pixel where the prediction has data.
        InputError: Bad ``points`` or ``sampling``, or ``out_dir`` is a file.
        StorageError: The report cannot be written (full disk, read-only, no permission).
    """
    if points is not None:
        allocate(np.ones(ALL + 1, np.int64), points, sampling)  # validate before the long pass
    if is_remote(out_dir):
        check_bucket(as_url(out_dir))
    elif Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"--out {out_dir} is a file: name a folder for the report")
    pred, grid, pred_classes, block = open_prediction(prediction, layer)
    labels = open_labels(reference, reference_field)
    check_overlap(labels, grid)
    size = max(block, window // block * block)
    windows = _windows(grid, size)
    step = preview_step(grid.height, grid.width) if preview else 0
    parts = [delayed(_window_pass)(pred, labels, grid, *win, step) for win in windows]
    ((hist, per_window, pieces),) = compute(_tree_sum(parts))
    labelled = int(hist[1:, :].sum())
    if labelled == 0:
        raise LabelsError(
            f"reference {reference} has no labelled pixel (class > 0) where it overlaps {prediction}"
        )
    classes = _evaluated_classes(pred_classes, labels, hist)
    values = [c.value for c in classes]
    cm = confusion_from_histogram(hist, values)
    if int(cm.sum()) == 0:
        raise LabelsError(
            f"the prediction {prediction} has no data (all 255) where reference {reference} is labelled: "
            "run 'segpipe predict' over the labelled area"
        )
    # A local folder is written in place; an s3:// one is uploaded once complete,
    # metrics.json last (its presence is what marks a finished report).
    with storage_errors(out_dir, "evaluation report"), staged_dir(out_dir, last=("metrics.json",)) as out:
        assessment: dict[str, Any] = {"mode": "pixels"}
        if points is not None:
            per_window_arr = np.asarray(per_window, np.int64)
            drawn, targets = _sample_points(
                pred, labels, grid, windows, per_window_arr, points, sampling, seed
            )
            cm = confusion_from_histogram(joint_histogram(drawn[:, 3], drawn[:, 2]), values)
            assessment = _points_summary(
                drawn, targets, per_window_arr.sum(axis=0), classes, (points, sampling, seed)
            )
            _write_points(out / "points.csv", drawn, grid)
        result = scores(cm, values, [c.name for c in classes])
        result["classes"] = [{"value": c.value, "name": c.name, "colour": c.colour} for c in classes]
        metrics: dict[str, Any] = {
            "prediction": str(prediction),
            "reference": str(reference),
            **result,
            "assessment": assessment,
            "pixel_counts": {
                "grid": int(hist.sum()),
                "reference_labelled": labelled,
                "evaluated": int(confusion_from_histogram(hist, values).sum()),
                "labelled_without_prediction": int(hist[values, NODATA_U8].sum()),
                "other_predictions": int(confusion_from_histogram(hist, values)[:, -1].sum()),
            },
        }
        metrics = json_ready(metrics)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        title = f"{Path(str(prediction)).name} vs {Path(str(reference)).name}"
        if points is not None:
            title += f" ({len(drawn):,} {sampling} points)"
        shown = cm if cm[:, -1].any() else cm[:, :-1]  # an all-zero "other" column is clutter
        plot_confusion_matrix(shown, [c.name for c in classes], out / "confusion_matrix.png", title)
        figures = ["confusion_matrix.png"]
        if preview:
            view_pred, view_ref, view_rgb = assemble_preview(pieces, grid.height, grid.width, step)
            plot_preview(
                view_rgb,
                view_pred,
                view_ref,
                classes,
                out / "preview.png",
                disagreement=True,
                title=f"whole region, 1 pixel in {step} along each axis" if step > 1 else "whole region",
            )
            figures.append("preview.png")
        write_report(out / "report.md", metrics, figures)
    return metrics
