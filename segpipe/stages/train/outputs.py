"""What a network's and a forest's training both produce: validation scores and the package.

One definition of the scores a training records and of what its package folder holds
besides the weights (the loss curve, the validation confusion matrix), so the random
forest is packaged exactly as a network is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.models import ModelSpec, save_model
from segpipe.stages.evaluate import metrics
from segpipe.types import ClassInfo

__all__ = ["class_scores", "final_metrics", "validation_scores", "write_package"]


def class_scores(cm: np.ndarray, classes: Sequence[ClassInfo]) -> dict[str, Any]:
    """Overall and per-class scores of a (class, class + 1) validation confusion matrix."""
    return metrics.scores(cm, [c.value for c in classes], [c.name for c in classes])


def validation_scores(loss: float, cm: np.ndarray, classes: Sequence[ClassInfo]) -> dict[str, float]:
    """An epoch record's validation entries: ``valid_loss``, ``valid_miou``, ``valid_accuracy``."""
    score = class_scores(cm, classes)
    return {"valid_loss": loss, "valid_miou": score["miou"], "valid_accuracy": score["overall_accuracy"]}


def final_metrics(cm: np.ndarray | None, classes: Sequence[ClassInfo]) -> dict[str, Any]:
    """The package's ``metrics``: the kept model's validation scores ({} without validation)."""
    return {} if cm is None else metrics.json_ready(class_scores(cm, classes))


def write_package(
    out: str | Path, spec: ModelSpec, net: Any, history: list[dict[str, Any]], cm: np.ndarray | None
) -> Path:
    """Write the package: weights and ``model.json``, the loss curve and the confusion matrix.

    Args:
        out: Package directory.
        spec: The model's description, with its metrics and training record.
        net: The trained module (on the CPU).
        history: The epoch records.
        cm: The kept model's validation confusion matrix (None: no validation, no plot).

    Returns:
        The package directory.
    """
    from segpipe.plots import plot_confusion_matrix, plot_loss_curve

    out_dir = save_model(out, spec, net)
    plot_loss_curve(history, out_dir / "loss_curve.png", spec.training.get("kept_epoch"))
    if cm is not None:
        plot_confusion_matrix(
            cm[:, : len(spec.classes)],
            [c.name for c in spec.classes],
            out_dir / "confusion_matrix.png",
            title="validation (held-out cells)",
        )
    return out_dir
