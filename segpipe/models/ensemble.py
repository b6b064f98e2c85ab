"""Ensembles: several trained packages combined into one package that averages them.

Models of different families err differently (on nc-landsat7, a U-Net, a PSPNet and the
per-pixel random forest disagree on forest, water and shrubland), and the mean of their
class probabilities is more accurate than any one of them. An ensemble package is an
ordinary package: ``model.json`` (``arch`` = ``ensemble``, each member's architecture,
encoder and options under ``options["members"]``) and one ``weights.safetensors``
holding every member's weights (``members.<i>.`` prefixes), so it predicts, resumes and
evaluates through the same commands, and nothing outside it is read.

Members must have been trained on the same bands, classes and normalisation (the same
region store and clipping settings); anything else is refused with the member named.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from segpipe.errors import ModelPackageError
from segpipe.models.catalog import ENSEMBLE_ARCH

__all__ = ["ENSEMBLE_ARCH", "EnsembleNet", "MemberBuilder", "build_ensemble"]

MemberBuilder = Callable[[str, str, int, int, Mapping[str, Any] | None], nn.Module]
"""Builds a member network: (arch, encoder, bands, classes, options) -> module."""
# Probabilities below this are clamped before the log; the softmax that every caller
# applies to logits then gives back the members' mean probabilities.
_TINY = 1e-12


class EnsembleNet(nn.Module):
    """Mean class probabilities of member networks, returned as log-probabilities.

    Every member's output goes through a softmax (networks return logits, the forest
    log-probabilities: both come out as probabilities), the probabilities are averaged
    with the members' weights, and their log is returned, so that ``softmax(output)`` is
    the weighted mean.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not members:
            raise ModelPackageError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        w = [1.0] * len(members) if weights is None else [float(v) for v in weights]
        if len(w) != len(members) or any(v < 0 or not math.isfinite(v) for v in w) or sum(w) <= 0:
            raise ModelPackageError(
                f"ensemble weights {w} must be {len(members)} non-negative numbers, not all 0"
            )
        self.weights = [v / sum(w) for v in w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the weighted mean probabilities (N, classes, H, W)."""
        total: torch.Tensor | None = None
        for weight, member in zip(self.weights, self.members, strict=True):
            probs = torch.softmax(member(x).float(), dim=1) * weight
            total = probs if total is None else total + probs
        assert total is not None
        return total.clamp_min(_TINY).log()


def build_ensemble(
    in_channels: int, num_classes: int, options: Mapping[str, Any] | None, build_network: MemberBuilder
) -> EnsembleNet:
    """An untrained ensemble from its package options (each member's arch, encoder, options).

    Args:
        in_channels: Bands.
        num_classes: Classes.
        options: The package options: ``members``, each with arch, encoder, options, weight.
        build_network: Builds one member (:func:`segpipe.models.networks.build_network`,
            passed in so this module does not import the one that imports it).

    Returns:
        The ensemble, members untrained.

    Raises:
        ModelPackageError: No members, or a member without an ``arch``.
    """
    members = list((options or {}).get("members", []))
    if not members:
        raise ModelPackageError("ensemble options list no members")
    nets = []
    for m in members:
        try:
            nets.append(build_network(str(m["arch"]), str(m.get("encoder", "")), in_channels, num_classes,
                                      m.get("options") or {}))
        except KeyError as exc:
            raise ModelPackageError(f"an ensemble member lacks the field {exc}") from exc
    return EnsembleNet(nets, [float(m.get("weight", 1.0)) for m in members])

