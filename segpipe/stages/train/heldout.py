"""Scores of several models on exactly the same held-out pixels.

``--arch auto`` and the forest baseline compare a network, the forest and their ensemble
on the labelled pixels of the validation cells that the plan's validation chips cover.
Each pixel counts once: a network's probabilities are averaged over the chips that hold
the pixel (chips overlap, as prediction windows do), and the forest, which decides per
pixel, is asked about those pixels alone (running it over whole chips cost minutes on a
500 px scene). An ensemble's probabilities are the mean of its members', so they are
computed once per member.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.io.store import open_layer
from segpipe.stages.evaluate import metrics
from segpipe.stages.train.outputs import class_scores
from segpipe.stages.train.sampling import IGNORE

if TYPE_CHECKING:
    from segpipe.stages.train.loop import TrainPlan

__all__ = ["HeldOut", "held_out_pixels", "held_out_scores", "probabilities"]


@dataclass(frozen=True)
class HeldOut:
    """The held-out pixels: flat positions (row * width + column), sorted, and their class indices."""

    keys: np.ndarray
    target: np.ndarray
    width: int


def _windows(plan: TrainPlan) -> list[list[tuple[int, int]]]:
    """The plan's validation windows in batches."""
    windows, size = list(plan.valid_windows), plan.cfg.batch_size
    return [windows[i : i + size] for i in range(0, len(windows), size)]


def _chip_keys(y0: int, x0: int, labels: np.ndarray, width: int) -> tuple[np.ndarray, ...]:
    """Flat positions, in-chip rows and columns of a chip's labelled (validation) pixels."""
    rows, cols = np.nonzero(labels != IGNORE)
    return (rows + y0) * width + cols + x0, rows, cols


def held_out_pixels(plan: TrainPlan) -> HeldOut:
    """Every labelled pixel of the plan's validation chips, once."""
    from segpipe.stages.train.loop import plan_sampler

    sampler = plan_sampler(plan, "valid")
    width = sampler.width
    keys, target = [], []
    for batch in _windows(plan):
        for y0, x0 in batch:
            _, labels = sampler.read(y0, x0)
            flat, rows, cols = _chip_keys(y0, x0, labels, width)
            keys.append(flat)
            target.append(labels[rows, cols])
    if not keys:
        return HeldOut(np.zeros(0, np.int64), np.zeros(0, np.int64), width)
    unique, first = np.unique(np.concatenate(keys), return_index=True)
    return HeldOut(unique, np.concatenate(target)[first].astype(np.int64), width)


def probabilities(net: Any, plan: TrainPlan, held: HeldOut) -> np.ndarray:
    """Class probabilities (pixel, class) of one module at the held-out pixels."""
    from segpipe.models.forest import ForestNet

    if isinstance(net, ForestNet):
        return _forest_probabilities(net, plan, held)
    return _network_probabilities(net, plan, held)


def _network_probabilities(net: Any, plan: TrainPlan, held: HeldOut) -> np.ndarray:
    """A network's probabilities, averaged over the chips holding each pixel."""
    import torch

    from segpipe.stages.train.loop import chip_batch, plan_sampler

    sampler = plan_sampler(plan, "valid")
    total = np.zeros((held.keys.size, len(plan.spec.classes)), dtype=np.float64)
    count = np.zeros(held.keys.size, dtype=np.int64)
    net.eval()
    with torch.inference_mode():
        for batch in _windows(plan):
            x, y = chip_batch(sampler, batch, plan.spec, None)
            probs = torch.softmax(net(torch.from_numpy(x)).float(), dim=1).numpy()
            for (y0, x0), p, labels in zip(batch, probs, y, strict=True):
                flat, rows, cols = _chip_keys(y0, x0, labels, held.width)
                at = np.searchsorted(held.keys, flat)
                np.add.at(total, at, p[:, rows, cols].T)
                np.add.at(count, at, 1)
    return total / np.maximum(count, 1)[:, None]


def _forest_probabilities(net: Any, plan: TrainPlan, held: HeldOut) -> np.ndarray:
    """A forest's probabilities at the held-out pixels (0 where a pixel holds no data)."""
    import torch

    from segpipe.stages.train.forest import forest_features

    ys, xs = np.divmod(held.keys, held.width)
    image = open_layer(plan.store, "image")
    features, valid = forest_features(image, plan.block_size, plan.spec, net.context, ys, xs)
    out = np.zeros((held.keys.size, len(plan.spec.classes)), dtype=np.float64)
    with torch.inference_mode():
        out[valid] = net.probabilities(torch.from_numpy(features)).numpy()
    return out


def held_out_scores(
    plan: TrainPlan,
    nets: Mapping[str, Any],
    ensembles: Mapping[str, Sequence[str]] | None = None,
    held: HeldOut | None = None,
) -> dict[str, dict[str, Any]]:
    """Scores of each module, and of each named mean of members, on the same held-out pixels.

    Args:
        plan: The plan whose validation chips define the pixels.
        nets: Modules by name (networks and forests).
        ensembles: Name -> member names, scored on the members' mean probabilities.
        held: The plan's :func:`held_out_pixels`, when the caller read them already.

    Returns:
        By name: the scores of :func:`segpipe.stages.train.outputs.class_scores`.
    """
    held = held if held is not None else held_out_pixels(plan)
    probs = {name: probabilities(net, plan, held) for name, net in nets.items()}
    for name, members in (ensembles or {}).items():
        probs[name] = np.mean([probs[m] for m in members], axis=0)
    values = np.array([c.value for c in plan.spec.classes], dtype=np.uint8)
    scores = {}
    for name, p in probs.items():
        cm = np.zeros((values.size, values.size + 1), dtype=np.int64)
        metrics.add(cm, values[p.argmax(axis=1)], values[held.target], values.tolist())
        scores[name] = class_scores(cm, plan.spec.classes)
    return scores
