"""The per-pixel logistic regression: its training pixels, its convex fit, and a network's start.

``--arch linear`` (:mod:`segpipe.stages.train.linear`) packages the fit alone; under
``linear_start`` the same fit becomes a network's :class:`~segpipe.models.networks.LinearPath`
before its first step (:func:`linear_start`, called when the loop plans a training).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np

from segpipe.errors import LabelsError
from segpipe.io.store import open_layer
from segpipe.models import ModelSpec
from segpipe.stages.train.config import ResolvedNetworkConfig
from segpipe.stages.train.sampling import IGNORE, find_candidates
from segpipe.stages.train.split import Split

__all__ = ["MAX_PIXELS", "class_weights", "linear_start", "solve_logistic", "start_state", "training_pixels"]

# Labelled training pixels fitted at most: a model of bands x classes weights is settled
# long before this, and L-BFGS over it takes seconds.
MAX_PIXELS = 200_000
_MAX_ITERATIONS = 500
_TOLERANCE = 1e-10  # change of the loss (or of a weight) at which L-BFGS stops
log = logging.getLogger(__name__)


class Planned(Protocol):
    """What the fit reads of a training's plan (:class:`segpipe.stages.train.loop.TrainPlan`)."""

    @property
    def store(self) -> str: ...
    @property
    def cfg(self) -> ResolvedNetworkConfig: ...
    @property
    def spec(self) -> ModelSpec: ...
    @property
    def lut(self) -> np.ndarray: ...
    @property
    def block_size(self) -> int: ...
    @property
    def split(self) -> Split: ...
    @property
    def valid_cells(self) -> frozenset[tuple[int, int]]: ...
    @property
    def class_weights(self) -> np.ndarray | None: ...


def training_pixels(plan: Planned) -> tuple[np.ndarray, np.ndarray]:
    """Normalised band values (pixel, band) and class indices of the training part's pixels.

    The plan's candidates are a network's sample (a few thousand per block): this takes
    as many per block as :data:`MAX_PIXELS` allows, assigned to the plan's split, so the
    held-out cells stay held out.
    """
    from segpipe.stages.train.forest import labelled_features

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


def class_weights(plan: Planned) -> np.ndarray | None:
    """Loss weight per class: the plan's (``class_balancing``), else none, as for the forest.

    A network's rare-class rule (balanced chips and Dice) is not carried over: weighting a
    4 % building class by its inverse share made the linear model on the 0.5 m SpaceNet
    scene call a third of the image building (building IoU 0.02, background 0.64 against
    0.97 unweighted), one band holding too little to tell roofs from ground.
    """
    return None if plan.class_weights is None else np.asarray(plan.class_weights, dtype=np.float32)


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


def linear_start(plan: Planned, net: Any) -> dict[str, Any]:
    """Initial weights of ``net`` (a :class:`~segpipe.models.networks.LinearPath`) starting as the regression.

    Its convolution is fitted to the plan's training pixels, as ``--arch linear`` is, and
    the network's output layers are zeroed, so the first step starts from the per-pixel
    model's logits.
    """
    from segpipe.models.networks import LinearPath

    assert isinstance(net, LinearPath)  # what the option linear_path builds
    x, y = training_pixels(plan)
    solver = solve_logistic(net.linear, x, y, class_weights(plan), plan.cfg.weight_decay)
    log.info("linear start: logistic regression on %d pixels, loss %.4f", solver["pixels"], solver["loss"])
    return start_state(net, net.state_dict())


def start_state(net: Any, fitted: dict[str, Any]) -> dict[str, Any]:
    """``net``'s weights with the fitted linear path of ``fitted`` and its output layers at zero."""
    from segpipe.models.networks import zero_output_layers

    zero_output_layers(net.network)
    net.linear.load_state_dict({"weight": fitted["linear.weight"], "bias": fitted["linear.bias"]})
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
