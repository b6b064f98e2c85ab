"""Accuracy assessment points: N random pixels drawn out of core, deterministic given a seed.

ArcGIS's "Create Accuracy Assessment Points" offers three designs, and so does this module:

- ``random``: every evaluable pixel equally likely;
- ``stratified`` (stratified random): points per predicted class proportional to its area;
- ``equalized`` (equalized stratified random): the same number of points per predicted class.

Strata are the prediction's (map) classes, as in good-practice accuracy assessment
(Olofsson et al. 2014), and only evaluable pixels are drawn: the reference holds a label
(1-254) and the prediction has data (not 255); sparse references would otherwise waste
most points on unlabelled ground.

Drawing needs no pixel in memory: a first pass counts the evaluable pixels of each stratum
in each window (the windows' joint histograms already hold these counts); the stratum's
points are drawn as ranks among its pixels in (window, row, column) order with one
seeded generator; each window then finds its own ranked pixels. The same seed, windows
and data always give the same points, on any scheduler.
"""

from __future__ import annotations

import math

import numpy as np

from segpipe.errors import InputError
from segpipe.stages.evaluate.metrics import evaluable

__all__ = [
    "ALL",
    "MAX_POINTS",
    "SAMPLING_METHODS",
    "allocate",
    "area_weighted_accuracy",
    "draw_ranks",
    "points_in_window",
    "strata_counts",
]

SAMPLING_METHODS = ("stratified", "equalized", "random")
ALL = 256  # stratum index of "every evaluable pixel" (random sampling)
MAX_POINTS = 10_000_000  # points are held in memory and written to a CSV file


def strata_counts(hist: np.ndarray) -> np.ndarray:
    """Evaluable pixels per predicted value, from a window's (256, 256) joint histogram.

    Returns:
        int64 (257,): entry ``v`` counts pixels predicted ``v`` (0-254) whose reference is
        labelled; entry :data:`ALL` is their total.
    """
    counts = np.zeros(ALL + 1, np.int64)
    counts[:255] = np.asarray(hist, np.int64)[1:255, :255].sum(axis=0)
    counts[ALL] = counts[:255].sum()
    return counts


def _largest_remainder(weights: np.ndarray, n: int) -> np.ndarray:
    """Integers proportional to ``weights`` summing to ``n`` (ties to the lower index)."""
    total = int(weights.sum())
    exact = [n * int(w) / total for w in weights]
    out = np.array([math.floor(x) for x in exact], np.int64)
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: n - int(out.sum())]:
        out[i] += 1
    return out


def allocate(totals: np.ndarray, n: int, sampling: str) -> np.ndarray:
    """Points per stratum.

    Args:
        totals: (257,) evaluable pixels per stratum from :func:`strata_counts`, summed.
        n: Points wanted; capped at the number of evaluable pixels.
        sampling: ``stratified``, ``equalized`` or ``random``.

    Returns:
        int64 (257,) points per stratum (only :data:`ALL` for ``random``).

    Raises:
        InputError: Bad ``n`` or ``sampling``.
    """
    if sampling not in SAMPLING_METHODS:
        raise InputError(f"sampling {sampling!r} is unknown: choose one of {', '.join(SAMPLING_METHODS)}")
    if not 1 <= n <= MAX_POINTS:
        raise InputError(f"--points {n} is out of range: give 1 to {MAX_POINTS:,} points")
    totals = np.asarray(totals, np.int64)
    out = np.zeros(ALL + 1, np.int64)
    available = int(totals[ALL])
    n = min(n, available)
    if n == 0:
        return out
    if sampling == "random":
        out[ALL] = n
        return out
    caps = totals[:255]
    if sampling == "stratified":
        out[:255] = _largest_remainder(caps, n)  # never above a stratum's size, as n <= total
        return out
    # equalized: equal shares, a small stratum gives its unused share to the others
    strata = [int(v) for v in np.flatnonzero(caps)]
    left = n
    while left and strata:
        share, extra = divmod(left, len(strata))
        for i, s in enumerate(strata):
            out[s] += min(share + (1 if i < extra else 0), int(caps[s] - out[s]))
        left = n - int(out[:255].sum())
        strata = [s for s in strata if out[s] < caps[s]]
    return out


def draw_ranks(per_window: np.ndarray, targets: np.ndarray, seed: int) -> dict[int, dict[int, np.ndarray]]:
    """Draw each stratum's points as ranks among its pixels, and split them by window.

    Args:
        per_window: (windows, 257) :func:`strata_counts` of each window, in window order.
        targets: (257,) points per stratum from :func:`allocate`.
        seed: Seed of the generator (strata drawn in increasing order).

    Returns:
        ``{window index: {stratum: sorted ranks within that window's pixels of the stratum}}``,
        only for windows that hold a point.
    """
    rng = np.random.default_rng(seed)
    picks: dict[int, dict[int, np.ndarray]] = {}
    for stratum in (int(s) for s in np.flatnonzero(targets)):
        counts = per_window[:, stratum]
        chosen = np.sort(rng.choice(int(counts.sum()), size=int(targets[stratum]), replace=False))
        ends = np.cumsum(counts)
        windows = np.searchsorted(ends, chosen, side="right")
        local = chosen - (ends[windows] - counts[windows])
        for w in np.unique(windows):
            picks.setdefault(int(w), {})[stratum] = local[windows == w]
    return picks


def points_in_window(pred: np.ndarray, ref: np.ndarray, picks: dict[int, np.ndarray]) -> np.ndarray:
    """Rows and columns (within the window) of the drawn points.

    Args:
        pred: The window's prediction (255 = nodata).
        ref: The window's reference (0 = unlabelled).
        picks: ``{stratum: ranks}`` for this window from :func:`draw_ranks`.

    Returns:
        int64 (n, 2) of (row, col), in stratum then raster order.
    """
    countable = evaluable(pred, ref)
    w = pred.shape[1]
    found = []
    for stratum, ranks in sorted(picks.items()):
        mask = countable if stratum == ALL else countable & (pred == stratum)
        flat = np.flatnonzero(mask)
        if len(flat) <= int(ranks.max(initial=-1)):
            raise InputError("the prediction or reference changed between the two passes of point sampling")
        found.append(flat[ranks])
    flat_all = np.concatenate(found) if found else np.zeros(0, np.int64)
    return np.stack([flat_all // w, flat_all % w], axis=1).astype(np.int64)


def area_weighted_accuracy(pred: np.ndarray, ref: np.ndarray, totals: np.ndarray) -> float:
    """Overall accuracy estimated from stratified points, each stratum weighted by its area.

    Olofsson et al. (2014), eq. 1: OA = sum over strata of W_h * (correct_h / n_h), with
    W_h the stratum's share of the evaluable pixels. Unbiased for every design here
    (with one stratum it is the plain point accuracy); the plain share of correct points
    is biased when strata are sampled unequally (equalized).

    Args:
        pred: Predicted value of each point.
        ref: Reference value of each point.
        totals: (257,) evaluable pixels per stratum.

    Returns:
        The estimate, NaN without points.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.size == 0:
        return math.nan
    total = int(totals[ALL])
    estimate = 0.0
    for stratum in np.unique(pred):
        here = pred == stratum
        estimate += int(totals[int(stratum)]) / total * float(np.mean(ref[here] == pred[here]))
    return estimate
