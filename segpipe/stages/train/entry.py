"""The one way in to training: the settings' family chooses the trainer.

A :class:`NetworkConfig` trains a network (:mod:`segpipe.stages.train.loop`; ``linear``
is fitted by :mod:`segpipe.stages.train.linear`), a
:class:`ForestConfig` the per-pixel random forest (:mod:`segpipe.stages.train.forest`),
and an :class:`AutoConfig` both, keeping the better (:mod:`segpipe.stages.train.select`);
a network with ``members`` above 1 (given, or chosen from the split's held-out cells by
:mod:`segpipe.stages.train.adapt`) is several networks averaged
(:mod:`segpipe.stages.train.members`).
The command line, the Python API, the flows and a dask worker all train through here,
so every family runs wherever training runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from segpipe.errors import InputError, StorageError
from segpipe.models.catalog import LINEAR_ARCH
from segpipe.stages.train.config import AutoConfig, ForestConfig, NetworkConfig, TrainConfig
from segpipe.stages.train.progress import TrainProgress

if TYPE_CHECKING:
    from segpipe.models import ModelSpec
    from segpipe.stages.train.loop import TrainPlan

__all__ = ["check_destination", "train"]


def train(
    store: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    resume: bool = False,
    plan: TrainPlan | None = None,
    announce: Callable[[str], None] | None = None,
) -> ModelSpec:
    """Train the model ``config`` describes on the store's labels; write its package to ``out``.

    Args:
        store: Region store with ``image`` and ``labels`` layers.
        out: Model package directory to write.
        config: Training settings (a U-Net's defaults when None).
        progress: Called with the training's progress.
        resume: Continue a network's run from the checkpoint in ``out`` (refused for
            ``--arch auto``; a forest trains in one pass and has nothing to resume).
        plan: A network's training already planned
            (:func:`segpipe.stages.train.loop.plan_training`); its settings replace ``config``.
        announce: Receives the lines worth showing beside the progress (``--arch auto``'s
            comparison, each member of ``members`` as it starts).

    Returns:
        The written model's description.

    Raises:
        SegpipeError: As the family's trainer raises it: no labels, a store that is
            missing or damaged, nothing to resume, a setting that does not fit.
    """
    check_destination(out)
    cfg = plan.requested if plan is not None else config or NetworkConfig()
    if isinstance(cfg, ForestConfig):
        from segpipe.stages.train.forest import train_forest

        return train_forest(store, out, cfg, progress)
    if isinstance(cfg, AutoConfig):
        from segpipe.stages.train.select import train_auto

        return train_auto(store, out, cfg, progress, announce, resume=resume)
    if cfg.arch == LINEAR_ARCH:  # a network's plan and package, fitted by a convex solver
        from segpipe.stages.train.linear import train_linear

        return train_linear(store, out, cfg, progress, resume, plan)
    from segpipe.stages.train.loop import train_network

    if cfg.members is None:  # auto members follow the split: the plan decides
        plan = plan or _plan(store, out, cfg, resume)
    if (plan.cfg.members if plan is not None else cfg.members or 1) > 1:
        from segpipe.stages.train.members import train_members

        return train_members(store, out, cfg, progress, announce, resume, plan)
    return train_network(store, out, cfg, progress, resume, plan)


def check_destination(out: str | Path) -> None:
    """Refuse a package folder that cannot be written, before any training time is spent.

    Without this, a file in the way or a folder without write permission failed only when
    the finished package was written, minutes or hours in; and a region store named as the
    destination took the package's files among its layers.

    Raises:
        InputError: ``out`` is a file, or a region store (a folder with ``zarr.json``).
        StorageError: ``out``, or the nearest folder above it that exists, is not writable.
    """
    if "://" in str(out):  # object storage: its own errors, named where the package is written
        return
    path = Path(out)
    if path.is_file():
        raise InputError(f"model package folder {path} is a file: name a folder for the package")
    if (path / "zarr.json").is_file():
        raise InputError(f"{path} is a region store, not a model package folder: name another folder")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"cannot make model package folder {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write model package {path}: {existing} is not writable: choose a "
                           "writable destination or fix its permissions")


def _plan(store: str | Path, out: str | Path, cfg: NetworkConfig, resume: bool) -> TrainPlan:
    """The plan of a network with auto members; a ``resume`` with nothing to continue fails first."""
    from segpipe.stages.train import checkpoint as ckpt
    from segpipe.stages.train.loop import plan_training
    from segpipe.stages.train.members import PARTIAL

    if resume and not (Path(out) / PARTIAL).is_dir():
        ckpt.require_checkpoint(out, cfg.resume_key())
    return plan_training(store, cfg)
