"""Confusion matrices and accuracy scores for class rasters (plain numpy).

Conventions shared by every function here:

- Rows are the **reference** class, columns the **prediction**.
- A pixel counts only where the reference holds one of the evaluated class values
  (so 0 = unlabelled, 255 = nodata and unknown reference values are skipped) and the
  prediction is not 255 (nodata: the image had no data there, nothing was predicted).
- A prediction value that is none of the evaluated classes (0, or a class the
  reference does not know) is still an error. It is counted in an extra last column,
  "other": a K-class matrix has shape ``(K, K + 1)``. Dropping those pixels would
  inflate the overall accuracy; folding them into a real class would invent false
  positives for it. The "other" column lowers recall, overall accuracy, IoU and kappa
  of the reference class, and gives no class a false positive.

Counting goes through a 256 x 256 joint histogram of (reference, prediction) byte
values: it is cheap to compute per block, sums exactly across blocks, and any
class selection can be taken from it afterwards, so blockwise evaluation needs one
pass over the pixels.

Scores are computed from exact integers (Python ints, no overflow) with a single
rounding at the final division; a division by zero gives NaN, which
:func:`json_ready` turns into ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from segpipe.errors import InputError

__all__ = [
    "NODATA",
    "OTHER",
    "add",
    "confusion_from_histogram",
    "confusion_matrix",
    "evaluable",
    "joint_histogram",
    "json_ready",
    "scores",
]

NODATA = 255
OTHER = "other"  # name of the extra prediction column
_N = 256


def _check_values(values: Sequence[int]) -> list[int]:
    out = [int(v) for v in values]
    if not out:
        raise InputError("no class values to evaluate: give at least one class (1-254)")
    if len(set(out)) != len(out):
        raise InputError(f"class values repeat: {sorted(out)}")
    bad = [v for v in out if not 1 <= v <= 254]
    if bad:
        raise InputError(f"class values {bad} are out of range: use 1-254 (0 = unlabelled, 255 = nodata)")
    return out


def _as_bytes(a: np.ndarray, out_of_range: int) -> np.ndarray:
    """Values as int64 in 0..255; anything outside becomes ``out_of_range``."""
    arr = np.asarray(a)
    if arr.dtype == np.uint8:
        return arr.astype(np.int64, copy=False).ravel()
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"class rasters must hold integers, got {arr.dtype}")
    flat = arr.astype(np.int64, copy=False).ravel()
    return np.where((flat < 0) | (flat > 255), out_of_range, flat)


def evaluable(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Pixels that count whatever the classes: reference labelled (1-254), prediction not nodata (255)."""
    return (ref >= 1) & (ref <= 254) & (pred != NODATA)  # type: ignore[no-any-return]


def joint_histogram(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Count every (reference, prediction) pair of byte values.

    Args:
        pred: Predicted class raster (any integer dtype; values outside 0-255 are
            counted as 0, which no evaluation treats as a class).
        ref: Reference raster of the same shape (values outside 0-255 count as 0,
            i.e. unlabelled).

    Returns:
        int64 array of shape (256, 256): ``h[r, p]`` = pixels with reference ``r``
        and prediction ``p``.

    Raises:
        InputError: The shapes differ or the dtypes are not integers.
    """
    if np.shape(pred) != np.shape(ref):
        raise InputError(f"prediction shape {np.shape(pred)} differs from reference shape {np.shape(ref)}")
    p = _as_bytes(pred, 0)
    r = _as_bytes(ref, 0)
    counts = np.bincount(r * _N + p, minlength=_N * _N)
    return counts.astype(np.int64, copy=False).reshape(_N, _N)


def confusion_from_histogram(hist: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Take the (K, K + 1) confusion matrix for ``values`` out of a joint histogram.

    Args:
        hist: (256, 256) histogram from :func:`joint_histogram` (or a sum of them).
        values: The K evaluated class values (1-254), in matrix order.

    Returns:
        int64 array (K, K + 1); column K counts predictions outside ``values``
        (excluding 255, which is not counted at all).
    """
    vals = _check_values(values)
    if hist.shape != (_N, _N):
        raise InputError(f"joint histogram must be 256x256, got {hist.shape}")
    rows = np.asarray(hist, dtype=np.int64)[vals, :]
    cm = np.zeros((len(vals), len(vals) + 1), dtype=np.int64)
    cm[:, : len(vals)] = rows[:, vals]
    other = np.ones(_N, dtype=bool)
    other[vals] = False
    other[NODATA] = False
    cm[:, len(vals)] = rows[:, other].sum(axis=1)
    return cm


def confusion_matrix(pred: np.ndarray, ref: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Confusion matrix of a prediction against a reference.

    Args:
        pred: Predicted classes; 255 = nodata (not counted).
        ref: Reference classes of the same shape; 0 = unlabelled (not counted).
        values: The K evaluated class values (1-254), in matrix order.

    Returns:
        int64 array (K, K + 1): rows = reference class, columns = predicted class,
        then "other" (a prediction outside ``values``; see the module docstring).

    Raises:
        InputError: Shapes differ, dtypes are not integers, or ``values`` are invalid.
    """
    return confusion_from_histogram(joint_histogram(pred, ref), values)


def add(total: np.ndarray, pred: np.ndarray, ref: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Accumulate one block's confusion matrix into ``total`` in place.

    Args:
        total: (K, K + 1) int64 running matrix, modified in place.
        pred: Predicted block.
        ref: Reference block.
        values: The class values ``total`` was made for.

    Returns:
        ``total`` (for chaining).
    """
    block = confusion_matrix(pred, ref, values)
    if total.shape != block.shape:
        raise InputError(f"running matrix has shape {total.shape}, expected {block.shape}")
    total += block
    return total


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def scores(cm: np.ndarray, values: Sequence[int], names: Sequence[str] | None = None) -> dict[str, Any]:
    """Overall and per-class scores of a confusion matrix.

    Args:
        cm: (K, K + 1) matrix from :func:`confusion_matrix` or a square (K, K) one.
        values: The K class values, in matrix order.
        names: One name per class (default ``"class <value>"``).

    Returns:
        A dict with ``pixels`` (counted pixels), ``correct``, ``overall_accuracy``,
        ``kappa`` (Cohen's; "other" is a prediction category no reference pixel holds),
        ``miou`` (mean IoU over classes present in the reference or the prediction:
        a class absent from both has no IoU and does not pull the mean down),
        ``classes`` (``value`` and ``name`` of each class, in matrix order),
        ``per_class`` (one dict per class: ``value``, ``name``, ``support`` (reference
        pixels), ``predicted``, ``true_positive``, ``precision`` (user's accuracy),
        ``recall`` (producer's accuracy), ``f1``, ``iou``),
        ``confusion_matrix`` (K x K) and ``other_predictions`` (K counts of the
        "other" column). Undefined ratios are NaN.
    """
    vals = _check_values(values)
    k = len(vals)
    cm = np.asarray(cm)
    if cm.shape not in ((k, k), (k, k + 1)):
        raise InputError(f"confusion matrix shape {cm.shape} does not fit {k} classes")
    labels = list(names) if names is not None else [f"class {v}" for v in vals]
    if len(labels) != k:
        raise InputError(f"{len(labels)} class names for {k} classes")
    m = [[int(x) for x in row] for row in cm]  # Python ints: exact, no overflow
    other = [row[k] if cm.shape[1] == k + 1 else 0 for row in m]
    per_class = _per_class(m, vals, [str(n) for n in labels])
    support = [c["support"] for c in per_class]
    total = sum(support)
    correct = sum(c["true_positive"] for c in per_class)
    chance = sum(c["support"] * c["predicted"] for c in per_class)
    # a class absent from both reference and prediction has no IoU and does not pull the mean down
    ious = [c["iou"] for c in per_class if c["support"] + c["predicted"] - c["true_positive"]]
    return {
        "pixels": total,
        "correct": correct,
        "overall_accuracy": _ratio(correct, total),
        # kappa = (po - pe) / (1 - pe), multiplied through by N^2 to stay in integers
        "kappa": _ratio(total * correct - chance, total * total - chance),
        "miou": math.fsum(ious) / len(ious) if ious else math.nan,
        "classes": [{"value": c["value"], "name": c["name"]} for c in per_class],
        "per_class": per_class,
        "confusion_matrix": [row[:k] for row in m],
        "other_predictions": other,
    }


def _per_class(m: list[list[int]], values: list[int], names: list[str]) -> list[dict[str, Any]]:
    """Per-class counts and ratios of an exact (K, K) or (K, K + 1) matrix (see :func:`scores`)."""
    k = len(values)
    per_class = []
    for i in range(k):
        support = sum(m[i])
        predicted = sum(m[r][i] for r in range(k))
        tp = m[i][i]
        per_class.append(
            {
                "value": values[i],
                "name": names[i],
                "support": support,
                "predicted": predicted,
                "true_positive": tp,
                "precision": _ratio(tp, predicted),
                "recall": _ratio(tp, support),
                "f1": _ratio(2 * tp, support + predicted),
                "iou": _ratio(tp, support + predicted - tp),
            }
        )
    return per_class


def json_ready(obj: Any) -> Any:
    """Copy of ``obj`` that :func:`json.dumps` accepts: NaN/inf become None, numpy becomes Python."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj
