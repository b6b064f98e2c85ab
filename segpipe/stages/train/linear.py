"""Fit ``--arch linear``, per-pixel multinomial logistic regression, by a convex solver.

The model is one 1 x 1 convolution on the normalised bands. Its loss is convex, so it is
fitted as statisticians fit it: full-batch L-BFGS on the labelled training pixels until
the loss stops falling, not by a network's few hundred noisy optimiser steps (with a
network's learning rate and chip budget those left nc-landsat7 at test mIoU 0.03-0.05,
far from converged). The seed then only chooses the split and the sample of pixels.

Everything else is a network's: the plan (split, settings, statistics), the validation
on the plan's held-out chips, and the package (:func:`segpipe.stages.train.loop.finish_package`),
so ``segpipe predict``, ``--arch auto`` and the forest baseline treat it like any network.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.errors import InputError
from segpipe.models import ModelSpec, build_network
from segpipe.models.catalog import LINEAR_ARCH
from segpipe.stages.train import checkpoint as ckpt
from segpipe.stages.train.config import NetworkConfig
from segpipe.stages.train.logistic import MAX_PIXELS, class_weights, solve_logistic, training_pixels
from segpipe.stages.train.outputs import validation_scores
from segpipe.stages.train.progress import TrainProgress

if TYPE_CHECKING:
    from segpipe.stages.train.loop import TrainPlan

__all__ = ["MAX_PIXELS", "fit_linear", "train_linear"]

_STEPS = 3  # progress reports: pixels read, fitted, validated
# Settings that steer a network's optimiser steps: the solver reads none of them.
_STEP_SETTINGS = (
    "epochs", "samples_per_epoch", "lr", "loss", "focal_gamma", "dice_weight", "overlap_loss", "patience",
    "monitor", "keep", "schedule", "color_jitter", "checkpoint_every", "checkpoint_seconds", "device",
    "devices", "members", "linear_start", "clip_grad_norm", "copy_paste", "ema", "refit",
)
log = logging.getLogger(__name__)


def train_linear(
    store: str | Path,
    out: str | Path,
    config: NetworkConfig,
    progress: Callable[[TrainProgress], None] | None = None,
    resume: bool = False,
    plan: TrainPlan | None = None,
) -> ModelSpec:
    """Plan ``arch: linear`` as a network (split, statistics, settings) and fit it.

    Args:
        store: Region store with ``image`` and ``labels`` layers.
        out: Model package directory to write.
        config: The settings (``arch`` linear).
        progress: As for :func:`fit_linear`.
        resume: Refused: the fit is one pass.
        plan: The training already planned by :func:`segpipe.stages.train.loop.plan_training`.

    Returns:
        The written model's description.

    Raises:
        InputError: ``resume`` given.
        SegpipeError: As planning raises it (no labels, a damaged store...).
    """
    from segpipe.stages.train.loop import plan_training

    if resume:
        raise InputError(f"--arch {LINEAR_ARCH} is fitted in one pass: leave out --resume")
    return fit_linear(plan or plan_training(store, config), out, progress)


def fit_linear(
    plan: TrainPlan, out: str | Path, progress: Callable[[TrainProgress], None] | None = None
) -> ModelSpec:
    """Fit the logistic regression on the plan's training pixels and write its package.

    Args:
        plan: The training planned for ``arch: linear`` (its split, statistics, settings).
        out: Model package directory to write.
        progress: Called after reading the pixels, after the fit and after validation.

    Returns:
        The written model's description (``training.solver`` says how it was fitted).

    Raises:
        LabelsError: No labelled training pixel holds image data.
    """
    import torch

    from segpipe.stages.train.loop import evaluate_chips, finish_package, plan_sampler

    started = time.perf_counter()

    def report(step: int, loss: float, record: dict[str, Any] | None = None) -> None:
        if progress:
            progress(TrainProgress(1, 1, step, _STEPS, loss, record))

    x, y = training_pixels(plan)
    report(1, float("nan"))
    weights = class_weights(plan)
    net, solver = _solve(plan, x, y, weights)
    seconds = time.perf_counter() - started
    record: dict[str, Any] = {"epoch": 1, "train_loss": solver["loss"], "seconds": seconds}
    report(2, solver["loss"])
    cm = None
    if plan.valid_windows:
        windows = list(plan.valid_windows)
        loss, cm = evaluate_chips(
            net, plan_sampler(plan, "valid"), windows, plan.spec, torch.device("cpu"), plan.cfg.batch_size
        )
        record.update(validation_scores(loss, cm, plan.spec.classes))
    report(3, solver["loss"], record)
    state = ckpt.TrainState(1, 0, 0.0, [record], None, None, cm, 0, {}, {}, {})
    extra = {"solver": solver, "warnings": [*plan.warnings, *_unused(plan.requested)]}
    return finish_package(net, plan, state, str(out), started, "cpu", None, extra)


def _unused(requested: NetworkConfig) -> list[str]:
    """A warning (logged, and returned for the package) naming step settings given for nothing."""
    defaults = NetworkConfig()
    given = [n for n in _STEP_SETTINGS if getattr(requested, n) != getattr(defaults, n)]
    if not given:
        return []
    note = (
        f"{', '.join(given)}: not used by --arch linear, which is fitted to convergence by L-BFGS "
        "(no optimiser steps, on the CPU)"
    )
    log.warning("%s", note)
    return [note]


def _solve(
    plan: TrainPlan, x: np.ndarray, y: np.ndarray, weights: np.ndarray | None
) -> tuple[Any, dict[str, Any]]:
    """The fitted 1 x 1 convolution and what the solver did (see :func:`solve_logistic`)."""
    import torch

    spec, cfg = plan.spec, plan.cfg
    net = build_network(cfg.arch, cfg.encoder, len(spec.band_names), len(spec.classes), spec.options)
    assert isinstance(net, torch.nn.Conv2d)  # what build_network makes of arch linear
    solver = solve_logistic(net, x, y, weights, cfg.weight_decay)
    return net, solver
