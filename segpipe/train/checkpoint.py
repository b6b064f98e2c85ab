"""Resumable training: the whole training state in one file, written atomically.

A checkpoint lives in ``<package>/checkpoint/state.pt`` while a run is under way and
is removed once the package is complete. It holds everything needed to continue
exactly where the run stopped: weights, optimiser and schedule, the random
generators of every rank, the history, the best state so far and the position
(epoch, step). It is read with ``torch.load(weights_only=True)``: plain containers
and tensors only, so a tampered checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segpipe.errors import InputError

__all__ = [
    "CHECKPOINT_DIR",
    "TrainState",
    "checkpoint_path",
    "load_checkpoint",
    "remove_checkpoint",
    "restore_rng",
    "rng_state",
    "save_checkpoint",
]

CHECKPOINT_DIR = "checkpoint"
_FILE = "state.pt"
_FORMAT = 1


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint stores.

    Attributes:
        epoch: Current epoch (1-based).
        step: Steps finished in that epoch (0 = none yet; ``steps`` = epoch done).
        running: Running training loss of the epoch so far.
        history: Finished epochs' records.
        best_score: Best monitored score so far (higher is better), or None.
        best_weights: Weights at the best score, or None.
        best_cm: Validation confusion matrix at the best score, or None.
        stale: Epochs without improvement since the best.
        network: Current weights.
        optimizer: Optimiser state.
        scheduler: Learning-rate schedule state.
        rng: Per-rank random states: numpy Generator state and torch CPU RNG state.
        config: The training settings, as JSON (a resumed run must use the same).
    """

    epoch: int
    step: int
    running: float
    history: list[dict[str, Any]]
    best_score: float | None
    best_weights: dict[str, torch.Tensor] | None
    best_cm: np.ndarray | None
    stale: int
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]] = field(default_factory=list)
    config: str = ""


def checkpoint_path(out: str | Path) -> Path:
    """The checkpoint file of the package directory ``out``."""
    return Path(out) / CHECKPOINT_DIR / _FILE


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """A rank's random state as plain containers (numpy's state dict + torch's bytes)."""
    return {"numpy": json.dumps(rng.bit_generator.state), "torch": torch.get_rng_state()}


def restore_rng(rng: np.random.Generator, state: dict[str, Any]) -> None:
    """Put a rank's random state back (the inverse of :func:`rng_state`)."""
    rng.bit_generator.state = json.loads(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(out: str | Path, state: TrainState) -> Path:
    """Write the checkpoint atomically: a killed write leaves the previous one intact."""
    path = checkpoint_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": _FORMAT,
        **{k: getattr(state, k) for k in TrainState.__dataclass_fields__},
        # numpy arrays are not allowed by weights_only loading; history goes as JSON
        # because records hold NaN and nested values that need no tensor form.
        "best_cm": None if state.best_cm is None else torch.from_numpy(state.best_cm),
        "history": json.dumps(state.history),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{_FILE}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(out: str | Path, config: str) -> TrainState | None:
    """The checkpoint of ``out``, or None when there is none.

    Args:
        out: Package directory.
        config: The resumed run's settings as JSON; they must equal the checkpoint's.

    Raises:
        InputError: The checkpoint is unreadable or was written with other settings.
    """
    path = checkpoint_path(out)
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise InputError(f"cannot read checkpoint {path} ({exc}): delete it to start afresh") from exc
    if data.get("format") != _FORMAT:
        raise InputError(f"checkpoint {path} has an unknown format: delete it to start afresh")
    if data["config"] != config:
        raise InputError(
            f"checkpoint {path} was written with other training settings: resume with the same "
            "settings, or delete the checkpoint folder to start afresh"
        )
    fields = {k: data[k] for k in TrainState.__dataclass_fields__}
    fields["history"] = json.loads(data["history"])
    fields["best_cm"] = None if data["best_cm"] is None else data["best_cm"].numpy()
    return TrainState(**fields)


def remove_checkpoint(out: str | Path) -> None:
    """Delete the checkpoint folder (the package is complete)."""
    shutil.rmtree(Path(out) / CHECKPOINT_DIR, ignore_errors=True)
