"""Resumable training: the whole training state in one file, written atomically.

A checkpoint lives in ``<package>/checkpoint/state.pt`` while a run is under way (the
first checkpoint creates the package folder) and is removed once the package is
complete. It holds everything needed to continue exactly where the run stopped:
weights, optimiser and schedule, the random generators of every rank, the history,
the best state so far and the position (epoch, step), and the settings twice: as given
and as chosen (every setting left at auto resolved). A resumed run must train with the
checkpoint's chosen settings, since a GPU node or a later segpipe may choose other ones
for the same given settings (a CPU checkpoint's schedule and optimiser do not fit a GPU's
batch); the refusal names each difference with the checkpoint's value. It is read with
``torch.load(weights_only=True)``: plain containers and tensors only, so a tampered
checkpoint cannot run code.
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

from segpipe.errors import InputError, MissingInputError, StorageError

__all__ = [
    "CHECKPOINT_DIR",
    "TrainState",
    "checkpoint_path",
    "load_checkpoint",
    "remove_checkpoint",
    "require_checkpoint",
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
        best_weights: Weights the package will keep (the best score's, or the final
            epoch's under ``keep="last"``), or None.
        best_cm: Validation confusion matrix of those weights, or None.
        stale: Epochs without improvement since the best.
        network: Current weights.
        optimizer: Optimiser state.
        scheduler: Learning-rate schedule state.
        rng: Per-rank random states: numpy Generator state and torch CPU RNG state.
        config: The training settings as given, as JSON.
        chosen: The settings as the run trained with them (every one left at auto chosen),
            as JSON: a resumed run must train with the same. Empty in checkpoints of an
            earlier segpipe, whose ``config`` is compared instead.
        averaged: The weight average's state (``ema``; see
            :class:`segpipe.stages.train.averaging.WeightAverage`), or None.
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
    chosen: str = ""
    averaged: dict[str, Any] | None = None


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
    """Write the checkpoint atomically: a killed write leaves the previous one intact.

    Raises:
        StorageError: The package folder cannot be created or written (full disk,
            no permission, a file in the way).
    """
    path = checkpoint_path(out)
    payload = {
        "format": _FORMAT,
        **{k: getattr(state, k) for k in TrainState.__dataclass_fields__},
        # numpy arrays are not allowed by weights_only loading; history goes as JSON
        # because records hold NaN and nested values that need no tensor form.
        "best_cm": None if state.best_cm is None else torch.from_numpy(state.best_cm),
        "history": json.dumps(state.history),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The temporary file sits beside the checkpoint so that os.replace stays on one
        # file system, where it is atomic.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{_FILE}.")
    except OSError as exc:
        raise StorageError(f"cannot write checkpoint {path} ({exc.strerror or exc})") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StorageError(f"cannot write checkpoint {path} ({exc.strerror or exc})") from exc
        raise
    return path


# Settings a checkpoint's chosen ones may lack, and the value its run trained with: before
# copy_paste was chosen (0.5 for a rare foreground), its default 0 was left out of the key.
_CHOSEN_BEFORE: dict[str, Any] = {"copy_paste": 0.0}


def _read(path: Path, config: str, chosen: str | None = None, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's payload, checked for format and settings.

    With ``chosen`` (the resumed run's settings with every auto one chosen) the checkpoint's
    own choices must equal it. Without, the settings given in both runs must agree: what can
    be checked before the settings left at auto are chosen (a chip given in both runs is
    compared as given, since the region may have clamped it).
    """
    try:
        # mmap leaves the tensors on disk: enough to check the settings cheaply.
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated or foreign file
        raise InputError(f"cannot read checkpoint {path} ({exc}): delete it to start afresh") from exc
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise InputError(f"checkpoint {path} has an unknown format: delete it to start afresh")
    if data.get("chosen") and chosen is not None:
        changed = _differences(data["chosen"], chosen, before=_CHOSEN_BEFORE)
    else:  # before planning, or a checkpoint of an earlier segpipe (it holds the given ones only)
        changed = _differences(data.get("config"), config, both_given=bool(data.get("chosen")))
    if changed:
        raise InputError(
            f"checkpoint {path} was written with other training settings ({changed}): "
            "resume with the same settings (give those segpipe now chooses otherwise as the "
            "checkpoint has them), or run without --resume to start afresh"
        )
    return data


def _differences(saved: Any, now: str, both_given: bool = False, before: dict[str, Any] | None = None) -> str:
    """The settings that differ, as ``name: saved there, now now`` (empty when none do).

    ``both_given`` compares only the settings neither run left at auto; ``before`` gives
    the value a setting missing from ``saved`` had.
    """
    if saved == now:
        return ""
    try:
        old, new = {**(before or {}), **json.loads(saved)}, json.loads(now)
    except (TypeError, ValueError):
        return "unreadable settings"
    names = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    if both_given:
        names = [k for k in names if old.get(k) is not None and new.get(k) is not None]
    return ", ".join(f"{k}: {_setting(old.get(k))} there, {_setting(new.get(k))} now" for k in names)


def _setting(value: Any) -> str:
    """A setting's value as the user gave it: None is a setting left at auto."""
    return "auto" if value is None else repr(value)


def require_checkpoint(out: str | Path, config: str) -> None:
    """Check, before any work, that ``out`` holds a checkpoint a run with ``config`` can resume.

    Args:
        out: Package directory.
        config: The resumed run's settings as JSON.

    Raises:
        MissingInputError: There is no checkpoint (none written yet, or the package is
            already complete and its checkpoint removed).
        InputError: The checkpoint is unreadable or was written with other settings.
    """
    path = checkpoint_path(out)
    if not path.is_file():
        if (Path(out) / "model.json").is_file():
            raise MissingInputError(
                f"--resume: the package in {out} is complete and has no checkpoint left: "
                "run without --resume to train it again"
            )
        raise MissingInputError(
            f"--resume: no checkpoint in {out} (a run writes {CHECKPOINT_DIR}/{_FILE} there after "
            "its first checkpoint interval): run without --resume to start afresh"
        )
    _read(path, config, mmap=True)


def load_checkpoint(out: str | Path, config: str, chosen: str | None = None) -> TrainState | None:
    """The checkpoint of ``out``, or None when there is none.

    Args:
        out: Package directory.
        config: The resumed run's settings as given, as JSON.
        chosen: The resumed run's settings with every auto one chosen, as JSON; they must
            equal the checkpoint's (its ``config`` must equal ``config`` where it has none).

    Raises:
        InputError: The checkpoint is unreadable or was written with other settings.
    """
    path = checkpoint_path(out)
    if not path.is_file():
        return None
    data = _read(path, config, chosen)
    fields = {k: data[k] for k in TrainState.__dataclass_fields__ if k in data}
    fields["history"] = json.loads(data["history"])
    fields["best_cm"] = None if data["best_cm"] is None else data["best_cm"].numpy()
    return TrainState(**fields)


def remove_checkpoint(out: str | Path) -> None:
    """Delete the checkpoint folder (the package is complete)."""
    shutil.rmtree(Path(out) / CHECKPOINT_DIR, ignore_errors=True)
