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

from segpipe.errors import InputError, LabelsError
from segpipe.io.store import open_layer
from segpipe.models import ModelSpec, build_network
from segpipe.models.catalog import LINEAR_ARCH
from segpipe.stages.train import checkpoint as ckpt
from segpipe.stages.train.config import NetworkConfig
from segpipe.stages.train.outputs import validation_scores
from segpipe.stages.train.progress import TrainProgress
from segpipe.stages.train.sampling import find_candidates

if TYPE_CHECKING:
    from segpipe.stages.train.loop import TrainPlan

__all__ = ["MAX_PIXELS", "fit_linear", "linear_start", "solve_logistic", "start_state", "train_linear"]

# Labelled training pixels fitted at most: a model of bands x classes weights is settled
# long before this, and L-BFGS over it takes seconds.
MAX_PIXELS = 200_000
_MAX_ITERATIONS = 500
_TOLERANCE = 1e-10  # change of the loss (or of a weight) at which L-BFGS stops
_STEPS = 3  # progress reports: pixels read, fitted, validated
# Settings that steer a network's optimiser steps: the solver reads none of them.
_STEP_SETTINGS = (
    "epochs", "samples_per_epoch", "lr", "loss", "focal_gamma", "dice_weight", "patience", "monitor",
    "keep", "schedule", "color_jitter", "checkpoint_every", "checkpoint_seconds", "device", "devices",
    "members", "linear_start",
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

    x, y = _training_pixels(plan)
    report(1, float("nan"))
    weights = _class_weights(plan)
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


def _training_pixels(plan: TrainPlan) -> tuple[np.ndarray, np.ndarray]:
    """Normalised band values (pixel, band) and class indices of the training part's pixels.

    The plan's candidates are a network's sample (a few thousand per block): this takes
    as many per block as :data:`MAX_PIXELS` allows, assigned to the plan's split, so the
    held-out cells stay held out.
    """
    from segpipe.stages.train.forest import labelled_features
    from segpipe.stages.train.loop import IGNORE

    labels = open_layer(plan.store, "labels")
    n_blocks = -(-labels.shape[-2] // plan.block_size) * -(-labels.shape[-1] // plan.block_size)
    per_block = max(1, -(-2 * MAX_PIXELS // n_blocks))
    cand = find_candidates(labels, plan.block_size, max_per_block=per_block, seed=plan.cfg.seed)
    train = cand.subset(~plan.split.assign(cand, plan.valid_cells))
    train = train.subset(plan.lut[train.value] != IGNORE)  # a class the plan's sample never met
    train = train.at_most(MAX_PIXELS, np.random.default_rng(plan.cfg.seed))
    image = open_layer(plan.store, "image")
    x, y = labelled_features(image, plan.block_size, train, plan.spec, plan.lut, 1)
    if y.size:
        return x, y
    raise LabelsError(
        f"no labelled training pixel of {plan.store} holds image data (all nodata or all in "
        "validation cells): check the labels' extent or lower --valid-fraction"
    )


def _class_weights(plan: TrainPlan) -> np.ndarray | None:
    """Loss weight per class: the plan's (``class_balancing``), else none, as for the forest.

    A network's rare-class rule (balanced chips and Dice) is not carried over: weighting a
    4 % building class by its inverse share made the linear model on the 0.5 m SpaceNet
    scene call a third of the image building (building IoU 0.02, background 0.64 against
    0.97 unweighted), one band holding too little to tell roofs from ground.
    """
    return None if plan.class_weights is None else np.asarray(plan.class_weights, dtype=np.float32)


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


def solve_logistic(
    conv: Any, x: np.ndarray, y: np.ndarray, weights: np.ndarray | None, weight_decay: float
) -> dict[str, Any]:
    """Fit ``conv`` (a 1 x 1 convolution) as a logistic regression; what the solver did.

    Minimises the (weighted) mean cross-entropy plus ``weight_decay / 2`` times the
    squared weights (not the biases), as scikit-learn's ``LogisticRegression`` does
    with ``C = 1 / (n * weight_decay)``.

    Args:
        conv: The convolution whose weights and bias are overwritten.
        x: Normalised band values (pixel, band).
        y: Class indices (pixel,).
        weights: Loss weight per class, or None.
        weight_decay: L2 strength on the weights.
    """
    import torch

    n_classes = int(conv.out_channels)
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y)
    wt = None if weights is None else torch.from_numpy(weights).double()
    opt = torch.optim.LBFGS(
        [w, b], max_iter=_MAX_ITERATIONS, tolerance_change=_TOLERANCE, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(xt @ w.T + b, yt, weight=wt)
        return loss + 0.5 * weight_decay * (w * w).sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        final = float(objective())
        conv.weight.copy_(w.float()[:, :, None, None])
        assert conv.bias is not None  # nn.Conv2d has one unless bias=False
        conv.bias.copy_(b.float())
    iterations = int(opt.state[w].get("n_iter", 0))
    return {
        "method": "L-BFGS, full batch (convex: converges to the one optimum)",
        "pixels": int(y.size),
        "iterations": iterations,
        "loss": final,
        "l2": weight_decay,
        "class_weights": None if weights is None else [float(v) for v in weights],
    }


def linear_start(plan: TrainPlan) -> TrainPlan:
    """The plan with its initial network starting as the logistic regression (``linear_start``).

    The :class:`~segpipe.models.networks.LinearPath`'s convolution is fitted to the plan's
    training pixels, as ``--arch linear`` is, and the network's output layers are zeroed,
    so the first step starts from the per-pixel model's logits.
    """
    import dataclasses

    from segpipe.models.networks import LinearPath

    net = build_network(plan.cfg.arch, plan.cfg.encoder, len(plan.spec.band_names), len(plan.spec.classes),
                        plan.spec.options)
    assert isinstance(net, LinearPath)  # what the option linear_path builds
    net.load_state_dict(plan.initial)
    x, y = _training_pixels(plan)
    solver = solve_logistic(net.linear, x, y, _class_weights(plan), plan.cfg.weight_decay)
    log.info("linear start: logistic regression on %d pixels, loss %.4f", solver["pixels"], solver["loss"])
    return dataclasses.replace(plan, initial=start_state(net, net.state_dict()))


def start_state(net: Any, fitted: dict[str, Any]) -> dict[str, Any]:
    """``net``'s weights with the fitted linear path of ``fitted`` and its output layers at zero."""
    from segpipe.models.networks import zero_output_layers

    zero_output_layers(net.network)
    net.linear.load_state_dict({"weight": fitted["linear.weight"], "bias": fitted["linear.bias"]})
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
