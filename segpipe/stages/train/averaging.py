"""An exponential moving average of a network's weights, scored and kept in their place.

A short CPU run ends wherever its last few batches left the weights; which batches those
were depends on the seed. Averaging the weights over the last few hundred steps (Polyak
averaging, as an exponential moving average) smooths that out: validation scores the
average, and the package keeps it. BatchNorm's running statistics are averaged alike, so
the averaged network needs no extra pass over the data to re-estimate them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["WeightAverage"]

# The average starts by following the weights closely: its decay grows as (1 + n) / (10 + n)
# up to the asked one, so that the random initial weights do not linger in it for hundreds
# of steps of a run that has only a few hundred.
_WARMUP = 10


class WeightAverage:
    """The moving average of one network's weights and buffers.

    Attributes:
        decay: Weight of the average against each step's new weights (e.g. 0.99: an
            average over about the last 100 steps).
        steps: Updates so far.
        weights: The averaged state dict (integer buffers, such as BatchNorm's batch
            counter, are copied rather than averaged).
    """

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.decay = decay
        self.steps = 0
        self.weights: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def update(self, net: nn.Module) -> None:
        """Fold the network's current weights into the average (after an optimiser step)."""
        import torch

        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (_WARMUP + self.steps))
        with torch.no_grad():
            for name, value in net.state_dict().items():
                kept = self.weights[name]
                if kept.is_floating_point():
                    kept.mul_(d).add_(value.detach(), alpha=1.0 - d)
                else:
                    kept.copy_(value)

    @contextlib.contextmanager
    def applied(self, net: nn.Module) -> Iterator[None]:
        """The network with the averaged weights inside the block, its own ones after it."""
        own = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net.load_state_dict(self.weights)
        try:
            yield
        finally:
            net.load_state_dict(own)

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores: the tensors themselves, as for the network's (saving copies them)."""
        return {"steps": self.steps, "weights": self.weights}

    def load(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`'s output (a resumed run)."""
        self.steps = int(state["steps"])
        for name, value in state["weights"].items():
            self.weights[name].copy_(value)
