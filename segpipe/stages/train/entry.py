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

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from segpipe.models.catalog import LINEAR_ARCH
from segpipe.stages.train.config import AutoConfig, ForestConfig, NetworkConfig, TrainConfig
from segpipe.stages.train.progress import TrainProgress

if TYPE_CHECKING:
    from segpipe.models import ModelSpec
    from segpipe.stages.train.loop import TrainPlan

__all__ = ["train"]


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


def _plan(store: str | Path, out: str | Path, cfg: NetworkConfig, resume: bool) -> TrainPlan:
    """The plan of a network with auto members; a ``resume`` with nothing to continue fails first."""
    from segpipe.stages.train import checkpoint as ckpt
    from segpipe.stages.train.loop import plan_training
    from segpipe.stages.train.members import PARTIAL

    if resume and not (Path(out) / PARTIAL).is_dir():
        ckpt.require_checkpoint(out, cfg.resume_key())
    return plan_training(store, cfg)
