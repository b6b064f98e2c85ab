"""Several networks of one configuration, averaged: ``segpipe train --members N``.

Trained from different seeds, networks of one configuration disagree where a few labels
leave the answer open: on s2-brandenburg the default U-Net learns wetland on three seeds of
five and not on the other two, and its test mIoU spans 0.06 over the seeds. The mean of
several members' class probabilities keeps what any of them learnt and hinges less on one
seed (figures in ``docs/benchmarks.md``, "Session 19: several networks averaged"). Each
member costs a network's training and its share of every prediction, so one member is the
default, except where the split holds out few cells: there three members with ``refit``
(below) are (the rule in :mod:`segpipe.stages.train.adapt`).

Member ``i`` trains with the seed ``seed + 1000 * i`` (initialisation, chip sampling and
augmentation) on the split, statistics and settings that ``seed`` chose, so member 0 is the
network the seed alone trains, and every member and the ensemble are scored on the same
held-out pixels. Under ``refit`` every member after the first trains with those settings
on every labelled pixel, the held-out cells included (which seed holds out which cells
moves a small scene's scores as much as the network's seed does: docs/benchmarks.md,
session 30); only member 0 can then be scored on the held-out pixels, and its scores are
the package's. Members train into ``out/members.partial/<i>`` (an earlier package in
``out`` stays whole meanwhile; ``--resume`` continues there: finished members are kept, the
interrupted one resumes from its checkpoint); at the end ``out`` holds their ensemble, with
each member's held-out scores and the ensemble's under ``training.averaged``, and the
members in ``out/members/``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segpipe.errors import InputError, MissingInputError
from segpipe.stages.train.config import NetworkConfig
from segpipe.stages.train.keeping import keep_package
from segpipe.stages.train.progress import TrainProgress

if TYPE_CHECKING:
    from segpipe.models import ModelSpec
    from segpipe.stages.train.loop import TrainPlan

__all__ = ["MEMBERS", "PARTIAL", "member_seed", "train_members"]

MEMBERS = "members"
PARTIAL = "members.partial"
# Member seeds step by this much, so that the members of seed s and of seed s + 1 share none.
_SEED_STEP = 1000
ENSEMBLE = "ensemble"

Announce = Callable[[str], None]


def member_seed(seed: int, index: int) -> int:
    """The seed member ``index`` trains with (member 0: the run's own seed)."""
    return seed + _SEED_STEP * index


def train_members(
    store: str | Path,
    out: str | Path,
    config: NetworkConfig,
    progress: Callable[[TrainProgress], None] | None = None,
    announce: Announce | None = None,
    resume: bool = False,
    plan: TrainPlan | None = None,
) -> ModelSpec:
    """Train ``plan.cfg.members`` networks on one split and write their ensemble to ``out``.

    Args:
        store: Region store with ``image`` and ``labels`` layers.
        out: Package directory to write (the ensemble; ``out/members/`` holds the members).
        config: The network's settings (``members`` above 1, or auto and chosen so by ``plan``).
        progress: Called with each member's training progress.
        announce: Receives a line as each member starts and the scores at the end.
        resume: Continue the members run interrupted in ``out``.
        plan: The training already planned (:func:`segpipe.stages.train.loop.plan_training`).

    Returns:
        The ensemble package's description.

    Raises:
        MissingInputError: ``resume`` but ``out`` holds no interrupted members run.
        InputError: A finished member does not fit the settings asked for.
    """
    from segpipe.stages.train.loop import plan_training

    say = announce or (lambda line: None)
    partial = Path(out) / PARTIAL
    if resume and not partial.is_dir():
        raise MissingInputError(f"--resume: {out} holds no interrupted --members run ({partial} is missing)")
    plan = plan or plan_training(store, config)
    if not resume:
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        count = plan.cfg.members
        paths = [_train_member(store, partial, plan, i, progress, say, resume) for i in range(count)]
    except BaseException:
        if not _resumable(partial):  # nothing a --resume could continue: leave nothing behind
            shutil.rmtree(partial, ignore_errors=True)
        raise
    record, metrics = _scores(plan, paths)
    record["seconds"] = time.monotonic() - started
    spec = _keep(out, plan, paths, record, metrics)
    say(_summary_line(record))
    return spec


def _resumable(partial: Path) -> bool:
    """Whether an interrupted members run left a finished member or a checkpoint to continue from."""
    from segpipe.stages.train import checkpoint as ckpt

    members = [p for p in partial.iterdir() if p.is_dir()] if partial.is_dir() else []
    return any((p / "model.json").is_file() or ckpt.checkpoint_path(p).is_file() for p in members)


def _member_plan(plan: TrainPlan, index: int) -> TrainPlan:
    """The plan of member ``index``: the same split and settings, its own seed and initial weights.

    Under ``refit`` members after the first plan afresh on every labelled pixel, with the
    settings member 0 resolved (its held-out cells are then training cells).
    """
    from segpipe.stages.train.loop import initial_network, plan_training

    seed = member_seed(plan.cfg.seed, index)
    if plan.cfg.refit and index > 0:
        every = {"seed": seed, "members": 1, "refit": False, "valid_fraction": 0.0}
        return plan_training(plan.store, plan.cfg.model_copy(update=every))
    one = {"seed": seed, "members": 1, "refit": False}
    cfg, requested = plan.cfg.model_copy(update=one), plan.requested.model_copy(update=one)
    net, _ = initial_network(cfg, len(plan.spec.band_names), len(plan.spec.classes))
    initial = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if "linear_path" in plan.spec.options:  # every member starts from the one fitted logistic regression
        from segpipe.stages.train.logistic import start_state

        initial = start_state(net, plan.initial)
    return dataclasses.replace(plan, cfg=cfg, requested=requested, initial=initial)


def _train_member(
    store: str | Path,
    partial: Path,
    plan: TrainPlan,
    index: int,
    progress: Callable[[TrainProgress], None] | None,
    say: Announce,
    resume: bool,
) -> Path:
    """Member ``index``'s package: trained, resumed from its checkpoint, or kept when finished."""
    from segpipe.stages.train import checkpoint as ckpt
    from segpipe.stages.train.loop import train_network

    path, member = partial / str(index), _member_plan(plan, index)
    total, seed = plan.cfg.members, member.cfg.seed
    if resume and _finished(path):
        _check_finished(path, member)
        say(f"member {index + 1} of {total} (seed {seed}): finished before, kept")
        return path
    again = resume and ckpt.checkpoint_path(path).is_file()
    say(f"member {index + 1} of {total} (seed {seed}): {'resuming' if again else 'training'}")
    train_network(store, path, progress=progress, resume=again, plan=member)
    return path


def _finished(path: Path) -> bool:
    """Whether a member's package was written and its run left no checkpoint behind."""
    from segpipe.stages.train import checkpoint as ckpt

    return (path / "model.json").is_file() and not ckpt.checkpoint_path(path).is_file()


def _check_finished(path: Path, member: TrainPlan) -> None:
    """Refuse a finished member trained with other settings than the resumed run asks for."""
    from segpipe.models import read_spec

    recorded = read_spec(path).training.get("requested")
    if recorded != json.loads(member.requested.model_dump_json()):
        raise InputError(
            f"--resume: the finished member in {path} was trained with other settings; "
            "run again without --resume (or with the settings it had)"
        )


def _scores(plan: TrainPlan, paths: list[Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The members record (each member's and the ensemble's held-out scores) and the ensemble's metrics.

    Both are empty of scores without held-out chips.
    """
    from segpipe.models import load_model
    from segpipe.stages.evaluate.metrics import json_ready
    from segpipe.stages.train.heldout import held_out_scores
    from segpipe.stages.train.select import held_out_summary

    names = [str(i) for i in range(len(paths))]
    seeds = [member_seed(plan.cfg.seed, i) for i in range(len(paths))]
    record: dict[str, Any] = {"count": len(paths), "seeds": seeds, "scores": None, "refit": plan.cfg.refit}
    if not plan.valid_windows:
        return record, {}
    if plan.cfg.refit:  # the other members trained on the held-out pixels: member 0 alone is scored
        scores = held_out_scores(plan, {"0": load_model(paths[0])[0]})
        record["scores"] = {"0": held_out_summary(scores["0"])}
        return record, json_ready(scores["0"])
    nets = {name: load_model(path)[0] for name, path in zip(names, paths, strict=True)}
    scores = held_out_scores(plan, nets, {ENSEMBLE: names})
    record["scores"] = {name: held_out_summary(score) for name, score in scores.items()}
    return record, json_ready(scores[ENSEMBLE])


def _keep(
    out: str | Path, plan: TrainPlan, paths: list[Path], record: dict[str, Any], metrics: dict[str, Any]
) -> ModelSpec:
    """The members' ensemble written to ``out``, the members moved to ``out/members``."""
    from segpipe.models import read_spec
    from segpipe.models.combine import make_ensemble

    partial = paths[0].parent
    ensemble = make_ensemble(paths, partial / ENSEMBLE)
    first = read_spec(paths[0]).training
    training = {
        # Every member read the same store and split: the first's record of them stands for all.
        **{key: first.get(key) for key in ("store_inputs", "split", "auto", "warnings")},
        "config": json.loads(plan.cfg.model_dump_json()),
        "requested": json.loads(plan.requested.model_dump_json()),
        "averaged": record,
    }
    return keep_package(out, ensemble, training, partial, MEMBERS, metrics)


def _summary_line(record: dict[str, Any]) -> str:
    """One line: the held-out mIoU of each member and of their mean."""
    scores = record["scores"]
    if scores is None:
        return f"{record['count']} members averaged (no held-out chips to score them on)"
    if record.get("refit"):
        first, others = scores["0"]["valid_miou"], record["count"] - 1
        return (
            f"held-out mIoU of member 1 (trained without the held-out cells) {first:.3f}; the other "
            f"{others} member{'s' if others > 1 else ''} trained on every labelled pixel (--refit), "
            "so not scored there"
        )
    each = ", ".join(f"{scores[str(i)]['valid_miou']:.3f}" for i in range(record["count"]))
    return f"held-out mIoU of the members {each}; of their mean {scores[ENSEMBLE]['valid_miou']:.3f}"
