"""Training losses for sparse labels: ignored pixels never count.

Cross-entropy or focal loss (which down-weights easy pixels so rare, hard classes get
more of the gradient), optional per-class weights from label statistics, and an
optional overlap fraction that rewards overlap per class rather than per pixel: soft
Dice, or the Lovasz-softmax loss (Berman, Rannen Triki and Blaschko, CVPR 2018), the
convex surrogate of the Jaccard index itself, i.e. of the IoU the maps are scored by.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["balanced_class_weights", "make_loss"]


def balanced_class_weights(counts: np.ndarray) -> np.ndarray:
    """Median-frequency weights: ``median(count) / count`` for every class.

    A class with half the median's labelled pixels weighs twice as much; classes are
    never weighted by more than 10x, so a handful of pixels cannot dominate.

    Args:
        counts: Labelled pixels per class (all > 0).

    Returns:
        float32 weights, one per class.
    """
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.median(counts) / np.maximum(counts, 1.0)
    return np.clip(weights, 0.1, 10.0).astype(np.float32)  # type: ignore[no-any-return]


def make_loss(
    kind: str = "ce",
    ignore_index: int = 255,
    class_weights: np.ndarray | None = None,
    focal_gamma: float = 2.0,
    dice_weight: float = 0.0,
    overlap: str = "dice",
) -> Callable[[Any, Any], Any]:
    """Build ``loss(logits, target)`` for (N, C, H, W) logits and (N, H, W) class indices.

    Args:
        kind: ``ce`` (cross-entropy) or ``focal``.
        ignore_index: Target value that contributes nothing (unlabelled pixels).
        class_weights: Optional per-class weights (see :func:`balanced_class_weights`).
        focal_gamma: Focusing exponent of the focal loss (0 gives cross-entropy).
        dice_weight: Fraction of the overlap loss mixed in (0 = none, 1 = overlap only).
        overlap: The overlap loss: ``dice`` (soft Dice) or ``lovasz`` (Lovasz-softmax).

    Returns:
        The loss function (a scalar tensor per call).
    """
    if kind not in ("ce", "focal"):
        raise ValueError(f"unknown loss {kind!r}: use ce or focal")
    if overlap not in _OVERLAP:
        raise ValueError(f"unknown overlap loss {overlap!r}: use {' or '.join(_OVERLAP)}")
    gamma = None if kind == "ce" else focal_gamma
    overlap_term = _OVERLAP[overlap]

    def loss(logits: Any, target: Any) -> Any:
        logits = logits.float()
        value = _pixel_term(logits, target, ignore_index, class_weights, gamma)
        if dice_weight > 0:
            value = (1.0 - dice_weight) * value + dice_weight * overlap_term(logits, target, ignore_index)
        return value

    return loss


def _pixel_term(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    class_weights: np.ndarray | None,
    focal_gamma: float | None,
) -> torch.Tensor:
    """Cross-entropy (``focal_gamma`` None) or focal loss of the labelled pixels."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    weight = None if class_weights is None else torch.as_tensor(class_weights, device=logits.device)
    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    if focal_gamma is None:
        return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index)
    # Focal: per-pixel CE scaled by (1 - p_true)^gamma, averaged like weighted CE.
    ce = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none")
    safe = torch.where(valid, target, torch.zeros_like(target))
    p_true = torch.softmax(logits, 1).gather(1, safe[:, None])[:, 0]
    scaled = ce * (1.0 - p_true).clamp(min=0.0) ** focal_gamma
    norm = weight[safe][valid].sum() if weight is not None else valid.sum()
    return scaled[valid].sum() / norm


def _dice_term(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Soft-Dice loss over the classes present among the labelled pixels."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    valid = (target != ignore_index)[:, None].float()
    probs = torch.softmax(logits, 1) * valid
    onehot = F.one_hot(torch.where(target == ignore_index, 0, target), logits.shape[1])
    onehot = onehot.permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims) > 0  # classes absent from the batch say nothing
    if not present.any():
        return logits.sum() * 0.0
    return 1.0 - ((2 * inter + 1.0) / (denom + 1.0))[present].mean()


def _lovasz_term(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Lovasz-softmax loss over the classes present among the labelled pixels of the batch.

    For each class, the pixels' errors ``|onehot - p|`` sorted in decreasing order are
    weighted by the steps of the Jaccard loss as the pixels are added one by one (the
    Lovasz extension's gradient), so the loss is the tight convex surrogate of ``1 - IoU``
    of that class over the batch.
    """
    import torch

    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    probs = torch.softmax(logits, 1).permute(0, 2, 3, 1)[valid]  # (pixels, classes)
    labels = target[valid]
    losses = []
    for c in torch.unique(labels).tolist():
        truth = (labels == c).float()
        errors, order = torch.sort((truth - probs[:, c]).abs(), descending=True)
        losses.append(torch.dot(errors, _jaccard_steps(truth[order])))
    return torch.stack(losses).mean()


def _jaccard_steps(truth_sorted: torch.Tensor) -> torch.Tensor:
    """Increments of the Jaccard loss as the sorted pixels are predicted wrong one by one."""
    import torch

    positives = truth_sorted.sum()
    intersection = positives - truth_sorted.cumsum(0)
    union = positives + (1.0 - truth_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


_OVERLAP = {"dice": _dice_term, "lovasz": _lovasz_term}
