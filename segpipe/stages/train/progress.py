"""What a training run reports while it runs (networks and forests alike)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TrainProgress"]


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
