"""Per-class decision offsets for a trained network, tuned on its held-out pixels.

Cross-entropy's argmax is not what maximises mean IoU: a network that learnt a rare class
(buildings at 4 % of the pixels) rarely lets it win the argmax at its edges, so the class is
under-predicted (on the building scene, test IoU 0.30 at the argmax against 0.34 where a
building wins from probability 0.2). One additive offset per class on the log
probabilities, chosen to maximise the held-out mean IoU, moves each class's decision
boundary where the validation pixels say it belongs.

Tuned on the very pixels that score it, an offset can fit their noise where they are few, so
offsets are kept only when they help out of fold: the held-out pixels are cut into two
spatial folds (alternate 64 px squares), and offsets tuned on one fold must raise the
other's mean IoU, averaged over both directions, by at least :data:`MIN_GAIN`. The offsets
tuned on every held-out pixel are then added to the bias of the network's last layer, so
prediction, the ONNX export and the MLM metadata need nothing new.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Calibration", "MIN_GAIN", "bake", "calibrate", "logit_bias", "mean_iou", "tune"]

# Offsets on natural-log probabilities, 0.25 apart: +2 lets a class win from about 1/8 of
# its rival's probability, which covers what the probes needed (a threshold of 0.2).
GRID = np.linspace(-2.0, 2.0, 17)
MIN_GAIN = 0.005  # mean IoU out of fold; below it, no offset is kept
_ROUNDS = 2  # coordinate ascent over the classes: a second round settles their interplay
_FOLD_SQUARE = 64  # px: each fold holds alternate squares, so the folds are spatially apart
_MAX_PIXELS = 200_000  # a regular subset beyond this: tuning stays a few seconds


@dataclass(frozen=True)
class Calibration:
    """What calibration found and did, as ``model.json`` records it under ``training.calibration``.

    Attributes:
        offsets: Per class (in the package's class order), added to its logit; zeros when
            not applied.
        applied: Whether the offsets went into the network.
        pixels: Held-out pixels the offsets were tuned on.
        miou_before: Held-out mean IoU at the plain argmax.
        miou_after: Held-out mean IoU with the offsets tuned on every held-out pixel.
        fold_gain: Mean IoU the offsets added out of fold (None: too few pixels for folds).
        reason: Why the offsets were or were not applied, in words.
    """

    offsets: tuple[float, ...]
    applied: bool
    pixels: int
    miou_before: float
    miou_after: float
    fold_gain: float | None
    reason: str

    def record(self) -> dict[str, Any]:
        """The JSON-ready record."""
        return asdict(self) | {"offsets": list(self.offsets)}


def mean_iou(scores: np.ndarray, target: np.ndarray, offsets: np.ndarray) -> float:
    """Mean IoU, over the classes present in ``target``, of the argmax of ``scores + offsets``."""
    n = scores.shape[1]
    pred = np.argmax(scores + offsets, axis=1)
    cm = np.bincount(target * n + pred, minlength=n * n).reshape(n, n)
    present = cm.sum(axis=1) > 0
    inter = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - inter
    return float(np.mean(inter[present] / union[present])) if present.any() else float("nan")


def tune(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Offsets maximising the mean IoU of ``scores`` (pixel, class) against ``target``.

    Coordinate ascent over :data:`GRID`, class by class; a tie keeps the smaller offset,
    so a class the held-out pixels say nothing about keeps 0.
    """
    offsets = np.zeros(scores.shape[1])
    best = mean_iou(scores, target, offsets)
    for _ in range(_ROUNDS):
        for c in np.unique(target):
            for value in GRID:
                trial = offsets.copy()
                trial[c] = value
                score = mean_iou(scores, target, trial)
                if score > best + 1e-12 or (score >= best - 1e-12 and abs(value) < abs(offsets[c])):
                    best, offsets = max(score, best), trial
    return offsets


def _fold_gain(scores: np.ndarray, target: np.ndarray, fold: np.ndarray) -> float | None:
    """Mean IoU added on each fold by offsets tuned on the other, averaged (None: a fold is empty)."""
    gains = []
    for side in (False, True):
        fit, test = fold == side, fold != side
        if not fit.any() or not test.any():
            return None
        offsets = tune(scores[fit], target[fit])
        there, truth = scores[test], target[test]
        gains.append(mean_iou(there, truth, offsets) - mean_iou(there, truth, np.zeros_like(offsets)))
    return float(np.mean(gains))


def calibrate(probs: np.ndarray, target: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> Calibration:
    """Decide the offsets from held-out probabilities (pixel, class) and their places.

    Args:
        probs: Class probabilities of the held-out pixels.
        target: Their class indices.
        rows: Their rows in the region (the spatial folds follow them).
        cols: Their columns.

    Returns:
        The offsets, whether they should be applied, and the scores behind the decision.
    """
    step = max(1, -(-target.size // _MAX_PIXELS))
    scores = np.log(np.clip(probs[::step], 1e-7, None))
    target = target[::step].astype(np.int64)
    fold = ((rows[::step] // _FOLD_SQUARE + cols[::step] // _FOLD_SQUARE) % 2).astype(bool)
    plain = np.zeros(probs.shape[1])
    before = mean_iou(scores, target, plain) if target.size else float("nan")
    offsets = tune(scores, target) if target.size else plain
    after = mean_iou(scores, target, offsets) if target.size else float("nan")
    gain = _fold_gain(scores, target, fold) if target.size else None
    if not offsets.any():
        reason = "the plain argmax is best on the held-out pixels"
    elif gain is None:
        reason = "the held-out pixels lie in one fold: no out-of-fold check, no offsets"
    elif gain < MIN_GAIN:
        reason = f"out of fold the offsets added {gain:+.3f} mean IoU (< {MIN_GAIN}): not kept"
    else:
        reason = f"out of fold the offsets added {gain:+.3f} mean IoU"
    applied = bool(offsets.any()) and gain is not None and gain >= MIN_GAIN
    kept = offsets if applied else plain
    return Calibration(
        tuple(float(v) for v in kept), applied, int(target.size), before,
        after if applied else before, gain, reason,
    )


def logit_bias(net: Any) -> Any:
    """The bias of the layer that makes the network's logits (None: no such layer to shift).

    A constant added to it reaches every logit unchanged: smp's heads follow their last
    convolution only with bilinear upsampling (weights summing to one) and no activation,
    and a :class:`segpipe.models.networks.PixelHead` adds its path's logits to the network's.
    """
    from torch import nn

    from segpipe.models.networks import PixelHead

    if isinstance(net, PixelHead):
        return logit_bias(net.network)
    if isinstance(net, nn.Conv2d):
        return net.bias
    head = getattr(net, "segmentation_head", None)
    first = head[0] if isinstance(head, nn.Sequential) and len(head) else None
    return first.bias if isinstance(first, nn.Conv2d) else None


def bake(net: Any, offsets: np.ndarray) -> bool:
    """Add ``offsets`` to the network's logits through its last bias; False when it has none."""
    import torch

    bias = logit_bias(net)
    if bias is None:
        return False
    with torch.no_grad():
        bias += torch.as_tensor(offsets, dtype=bias.dtype, device=bias.device)
    return True
