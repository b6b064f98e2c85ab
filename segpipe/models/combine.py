"""Combine trained model packages into one ensemble package (``segpipe ensemble``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from segpipe.errors import ModelPackageError
from segpipe.models.ensemble import ENSEMBLE_ARCH, EnsembleNet
from segpipe.models.files import remove_stale_plots
from segpipe.models.package import ModelSpec, load_model, model_hash, save_model

__all__ = ["make_ensemble"]


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
            what differs), or bad weights, or ``out`` is one of the members.
    """
    if len(members) < 2:
        raise ModelPackageError(f"an ensemble needs at least two member packages, got {len(members)}")
    if any(Path(out).resolve() == Path(m).resolve() for m in members):  # an s3:// member never matches
        raise ModelPackageError(
            f"--out {out} is one of the members: the ensemble would replace that model; write it elsewhere"
        )
    loaded = [load_model(m) for m in members]
    first = loaded[0][1]
    for path, (_, spec) in zip(members[1:], loaded[1:], strict=True):
        problems = _misfits(spec, first)
        if problems:
            raise ModelPackageError(f"member {path} does not fit {members[0]}: " + "; ".join(problems))
    net = EnsembleNet([n for n, _ in loaded], weights)
    spec = _ensemble_spec(members, [s for _, s in loaded], net.weights)
    remove_stale_plots(Path(out))  # an ensemble has no plots of its own
    return save_model(out, spec, net)


def _misfits(spec: ModelSpec, first: ModelSpec) -> list[str]:
    """How a member's package differs from the first member's in what their outputs must share."""
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
    return problems


def _ensemble_spec(
    members: Sequence[str | Path], specs: Sequence[ModelSpec], weights: Sequence[float]
) -> ModelSpec:
    """The ensemble package's description: the members' shared inputs, each member as built and trained."""
    first = specs[0]
    described = [
        {"arch": s.arch, "encoder": s.encoder, "options": s.options, "weight": w}
        for s, w in zip(specs, weights, strict=True)
    ]
    return ModelSpec(
        arch=ENSEMBLE_ARCH,
        encoder="+".join(f"{s.arch}/{s.encoder}" for s in specs),
        band_names=first.band_names,
        mean=first.mean,
        std=first.std,
        classes=first.classes,
        chip_size=max(s.chip_size for s in specs),
        nodata=first.nodata,
        pixel_size=first.pixel_size,
        crs_units=first.crs_units,
        options={"members": described},
        metrics={},
        training={"members": [
            {"package": str(Path(m).resolve()), "hash": model_hash(m), "arch": s.arch, "encoder": s.encoder,
             "validation": s.metrics, "settings": s.training.get("config", {})}
            for m, s in zip(members, specs, strict=True)
        ]},
        clip_low=first.clip_low,
        clip_high=first.clip_high,
        output_stride=max(s.output_stride for s in specs),
    )
