"""Write a package chosen among several trained ones into ``out``, the others kept beside it.

``--arch auto`` (its candidates) and ``--members`` (the networks it averages) both train
several packages in a folder of their own and then make one of them, or their ensemble,
the package in ``out``. Until that last step an earlier package in ``out`` stays whole;
then each file is replaced atomically, and the folder of trained packages moves into
``out`` under a name of its own, so the result can be traced back to what it came from.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from segpipe.models import ModelSpec
from segpipe.models.files import remove_stale_plots

__all__ = ["keep_package"]


def keep_package(
    out: str | Path,
    chosen: Path,
    training: Mapping[str, Any],
    folder: Path,
    name: str,
    metrics: Mapping[str, Any] | None = None,
) -> ModelSpec:
    """Write the package in ``chosen`` to ``out``, then move ``folder`` to ``out/<name>``.

    Args:
        out: The package directory to write (an earlier package there is replaced file by file).
        chosen: The package to write (a model package directory, inside ``folder``).
        training: Entries added to the package's ``training`` record.
        folder: The trained packages, moved into ``out`` afterwards.
        name: Their folder's name inside ``out`` (an earlier one of that name is replaced).
        metrics: The package's ``metrics`` instead of the chosen package's own.

    Returns:
        The written package's description.
    """
    from segpipe.models import load_model, save_model

    target = Path(out)
    net, spec = load_model(chosen)
    scores = dict(metrics if metrics is not None else spec.metrics)
    record = _moved_members({**spec.training, **training}, folder, target / name)
    spec = dataclasses.replace(spec, training=record, metrics=scores)
    target.mkdir(parents=True, exist_ok=True)
    plots = {p.name: p for p in chosen.glob("*.png")}
    remove_stale_plots(target, plots)
    for plot_name, plot in plots.items():
        tmp = target / f".{plot_name}.tmp"
        shutil.copyfile(plot, tmp)
        tmp.replace(target / plot_name)
    save_model(target, spec, net)
    shutil.rmtree(target / name, ignore_errors=True)
    folder.replace(target / name)
    return spec


def _moved_members(training: dict[str, Any], folder: Path, moved_to: Path) -> dict[str, Any]:
    """``training`` with an ensemble's member packages named where they will lie, inside ``out``.

    An ensemble records each member's absolute path (``segpipe.models.combine``); the members
    were made inside ``folder``, which moves to ``moved_to``, so the recorded paths would
    otherwise name a folder that no longer exists.
    """
    members = training.get("members")
    if not isinstance(members, list):
        return training
    old, new = str(folder.resolve()), str(moved_to.resolve())
    renamed = [
        {**m, "package": new + m["package"][len(old):]}
        if isinstance(m, dict) and str(m.get("package", "")).startswith(old + "/") else m
        for m in members
    ]
    return {**training, "members": renamed}
