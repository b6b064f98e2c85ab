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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segpipe.errors import ModelPackageError

__all__ = ["ENSEMBLE_ARCH", "EnsembleNet", "make_ensemble"]

ENSEMBLE_ARCH = "ensemble"
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


def build_ensemble(in_channels: int, num_classes: int, options: Mapping[str, Any] | None) -> EnsembleNet:
    """An untrained ensemble from its package options (each member's arch, encoder, options)."""
    from segpipe.models.networks import build_network

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


def _same(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b, strict=True)
    )


def make_ensemble(
    members: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None
) -> Path:
    """Combine trained packages into one ensemble package.

    Args:
        members: Model package directories (at least two), trained on the same bands,
            classes and normalisation.
        out: Directory of the new package (created; an existing package there is
            replaced atomically, file by file).
        weights: Relative weight of each member's probabilities (default: equal).

    Returns:
        The package directory.

    Raises:
        ModelPackageError: Fewer than two members, an unreadable member, or members that
            differ in bands, classes or normalisation (the message names the member and
            what differs), or bad weights.
    """
    from segpipe.models.package import ModelSpec, load_model, model_hash, save_model

    if len(members) < 2:
        raise ModelPackageError(f"an ensemble needs at least two member packages, got {len(members)}")
    loaded = [load_model(m) for m in members]
    first = loaded[0][1]
    for path, (_, spec) in zip(members[1:], loaded[1:], strict=True):
        problems = []
        if spec.band_names != first.band_names:
            problems.append(f"bands {list(spec.band_names)} instead of {list(first.band_names)}")
        if [(c.value, c.name) for c in spec.classes] != [(c.value, c.name) for c in first.classes]:
            problems.append(
                f"classes {[c.value for c in spec.classes]} instead of {[c.value for c in first.classes]}"
            )
        if not (_same(spec.mean, first.mean) and _same(spec.std, first.std)
                and _same(spec.clip_low, first.clip_low) and _same(spec.clip_high, first.clip_high)):
            problems.append("another normalisation (train every member on the same store with the same "
                            "--clip-percentiles)")
        if problems:
            raise ModelPackageError(f"member {path} does not fit {members[0]}: " + "; ".join(problems))
    net = EnsembleNet([n for n, _ in loaded], weights)
    described = [
        {"arch": s.arch, "encoder": s.encoder, "options": s.options, "weight": w}
        for (_, s), w in zip(loaded, net.weights, strict=True)
    ]
    spec = ModelSpec(
        arch=ENSEMBLE_ARCH,
        encoder="+".join(f"{s.arch}/{s.encoder}" for _, s in loaded),
        band_names=first.band_names,
        mean=first.mean,
        std=first.std,
        classes=first.classes,
        chip_size=max(s.chip_size for _, s in loaded),
        nodata=first.nodata,
        options={"members": described},
        metrics={},
        training={"members": [
            {"package": str(Path(m).resolve()), "hash": model_hash(m), "arch": s.arch, "encoder": s.encoder,
             "validation": s.metrics, "settings": s.training.get("config", {})}
            for m, (_, s) in zip(members, loaded, strict=True)
        ]},
        clip_low=first.clip_low,
        clip_high=first.clip_high,
        output_stride=max(s.output_stride for _, s in loaded),
    )
    return save_model(out, spec, net)
