"""The cheapest model package segpipe can run, for measuring the pipeline's own cost.

The scale benchmark wants a network whose forward pass costs nothing, so that what
prediction spends is the pipeline's: reading, normalising, stacking, blending, argmax,
writing, scheduling. segpipe's ``linear`` architecture is one 1 x 1 convolution (bands
-> classes, per-pixel logistic regression): :func:`free_package` writes one whose weights
split the pixels on the last band (NIR in a 4-band scene) at 0 in normalised units, with
segpipe's own writer, nothing patched. :func:`forward_rates` measures its forward pass, and
the one-split random forest that stood in for it before ``linear`` existed, so a run
records what the stand-in cost.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segpipe.models import ModelSpec, build_network, save_model
from segpipe.models.forest import ForestNet
from segpipe.types import ClassInfo

__all__ = ["free_network", "free_package", "forest_network", "forward_rates"]


def free_network(n_bands: int, n_classes: int) -> nn.Module:
    """segpipe's ``linear`` model set to one split: the last band at 0 in normalised units.

    Dark pixels (z <= 0) get the first class, the others the second (logits -z and +z;
    every other class a logit of -1, below both), so the class layer is not constant and
    evaluation scores something.
    """
    net = build_network("linear", "none", n_bands, n_classes)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        weight, bias = net.weight, net.bias  # type: ignore[union-attr]
        weight[0, n_bands - 1] = -1.0
        weight[1 % n_classes, n_bands - 1] = 1.0
        bias[2:] = -1.0
    return net


def forest_network(n_bands: int, n_classes: int) -> ForestNet:
    """The same split as a one-tree forest: the stand-in used before segpipe had ``linear``."""
    net = ForestNet(n_bands, n_classes, n_trees=1, max_nodes=3, depth=1, context=1)
    with torch.no_grad():
        net.feature[0, 0] = n_bands - 1
        net.threshold[0, 0] = 0.0
        net.child[0, 0] = torch.tensor([1, 2], dtype=torch.int32)
        net.value[0] = 0.0
        net.value[0, 0] = 1.0 / n_classes  # the root's own distribution: never a leaf here
        net.value[0, 1, 0] = 1.0
        net.value[0, 2, 1 % n_classes] = 1.0
    return net


def free_package(
    path: str | Path,
    band_names: Sequence[str],
    classes: Sequence[ClassInfo],
    mean: Sequence[float],
    std: Sequence[float],
    chip_size: int = 256,
) -> Path:
    """Write the one-split ``linear`` model as a package for a store with these bands and classes.

    Args:
        path: Package directory to write.
        band_names: The store's bands, in order.
        classes: The classes the package predicts (at least one).
        mean: Per-band mean for normalisation.
        std: Per-band standard deviation for normalisation.
        chip_size: The package's chip size (prediction's default window edge).

    Returns:
        The package directory.
    """
    net = free_network(len(band_names), len(classes))
    spec = ModelSpec("linear", "none", tuple(band_names), tuple(float(m) for m in mean),
                     tuple(float(s) for s in std), tuple(classes), chip_size, output_stride=1)
    return save_model(path, spec, net)


def _rate(net: nn.Module, x: torch.Tensor, seconds: float) -> float:
    """Mpx/s of ``net`` on ``x``, repeated for at least ``seconds`` after one warm-up call."""
    with torch.inference_mode():
        net(x)
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or calls < 3:
            net(x)
            calls += 1
    return calls * x.shape[0] * x.shape[2] * x.shape[3] / elapsed / 1e6


def forward_rates(
    n_bands: int, n_classes: int, tile: int, batch: int, seconds: float = 1.0
) -> dict[str, float]:
    """Forward Mpx/s on one torch thread: the free package's network, and the one-split forest.

    Returns:
        ``{"free_model_mpx_s": ..., "forest_stand_in_mpx_s": ...}``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per task, as a worker runs it
    try:
        shape = (batch, n_bands, tile, tile)
        x = torch.from_numpy(np.random.default_rng(0).normal(size=shape).astype(np.float32))
        return {"free_model_mpx_s": _rate(free_network(n_bands, n_classes).eval(), x, seconds),
                "forest_stand_in_mpx_s": _rate(forest_network(n_bands, n_classes).eval(), x, seconds)}
    finally:
        torch.set_num_threads(threads)
