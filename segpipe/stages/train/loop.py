"""Train a segmentation network from a region store and write a model package.

:func:`train_network` prepares what every rank shares (candidates, the spatial split,
normalisation statistics, the initial weights) once, then runs the loop: in this
process for one device, or in one spawned process per device for data-parallel
training (:mod:`segpipe.stages.train.distributed`). The loop is the same in both cases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.cores import usable_cores
from segpipe.errors import InputError, StoreError
from segpipe.io.fingerprint import store_inputs
from segpipe.io.store import has_layer, open_layer, read_region_info
from segpipe.models import ModelSpec, build_network, normalise, read_spec
from segpipe.models.catalog import has_encoder
from segpipe.stages.evaluate import metrics
from segpipe.stages.train import adapt, augment
from segpipe.stages.train import checkpoint as ckpt
from segpipe.stages.train import distributed as ddp
from segpipe.stages.train.averaging import WeightAverage
from segpipe.stages.train.config import NetworkConfig, ResolvedNetworkConfig
from segpipe.stages.train.losses import balanced_class_weights, make_loss
from segpipe.stages.train.outputs import final_metrics, validation_scores, write_package
from segpipe.stages.train.paste import ObjectBank, rarest_class
from segpipe.stages.train.pretrained import PretrainedReport, load_pretrained_encoder
from segpipe.stages.train.progress import TrainProgress
from segpipe.stages.train.sampling import (
    IGNORE,
    Candidates,
    CentreSampler,
    ChipSampler,
    find_candidates,
    label_classes,
)
from segpipe.stages.train.split import Split, plan_split
from segpipe.stages.train.stats import package_spec
from segpipe.stop import check_stop

__all__ = [
    "TrainPlan",
    "chip_batch",
    "initial_network",
    "plan_sampler",
    "plan_training",
    "score_every",
    "train_network",
]

_MAX_VALID_CHIPS = 192
# Held-out scorings in a run whose held-out cells choose nothing (``keep="last"``, no
# ``patience``): enough points for the loss curve, and the last epoch's. Scoring every epoch
# there cost s2-brandenburg's default network 35 % of its training CPU (64 epochs of 64 chips).
_CURVE_POINTS = 16
_SAMPLE_CHIPS = 4
# The object bank's random stream, apart from the ranks' ([seed, rank]): it changes none of theirs.
_BANK_STREAM = 1_000_003


@dataclass(frozen=True)
class TrainPlan:
    """What every rank shares, computed once before the loop (picklable for spawning)."""

    store: str
    cfg: ResolvedNetworkConfig
    requested: NetworkConfig
    auto: dict[str, dict[str, Any]]
    spec: ModelSpec
    lut: np.ndarray
    block_size: int
    split: Split
    valid_cells: frozenset[tuple[int, int]]
    train: Candidates
    valid_windows: tuple[tuple[int, int], ...]
    class_weights: np.ndarray | None
    initial: dict[str, Any]
    pretrained: dict[str, Any] | None
    valid_pixels: int
    warnings: tuple[str, ...] = ()
    # Wall-clock time (time.time()) after which no further epoch starts: a time budget.
    deadline: float | None = None


class _Pace:
    """When the next checkpoint is due: every ``every`` global steps, and ``seconds`` after the last.

    Steps are counted over the whole run, not per epoch, so a checkpoint interval longer
    than an epoch still comes; the clock makes sure a slow run (big chips, a busy CPU)
    leaves something to resume within minutes. Rank 0's clock decides for every rank,
    since saving gathers every rank's random state.
    """

    def __init__(self, every: int, seconds: float) -> None:
        self.every = every
        self.seconds = seconds
        self.last = time.monotonic()

    def due(self, global_step: int) -> bool:
        """Whether to checkpoint after ``global_step`` (1-based); the same answer on every rank."""
        by_steps = self.every > 0 and global_step % self.every == 0
        by_time = self.seconds > 0 and time.monotonic() - self.last >= self.seconds
        return bool(ddp.broadcast_object(by_steps or by_time)) if self.seconds > 0 else by_steps

    def saved(self) -> None:
        """Restart the clock (a checkpoint was just written)."""
        self.last = time.monotonic()


def _device(choice: str, rank: int = 0) -> Any:
    import torch

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", rank)
    return torch.device("cpu")


def chip_batch(
    sampler: ChipSampler,
    windows: list[tuple[int, int]],
    spec: ModelSpec,
    rng: np.random.Generator | None,
    jitter: float = 0.0,
    bank: ObjectBank | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image chips (N, band, c, c) and class-index chips (N, c, c) at ``windows``.

    With ``rng``, each chip may be given objects of ``bank``, is flipped or rotated at
    random (and jittered by ``jitter``).
    """
    images, labels = [], []
    for y0, x0 in windows:
        raw, lab = sampler.read(y0, x0)
        valid = None if spec.nodata is None else (raw != spec.nodata).all(axis=0)
        img = normalise(raw, spec, valid)
        if rng is not None:
            if bank is not None:
                img, lab = bank.maybe_paste(img, lab, rng)
            if jitter > 0:
                img = augment.jitter(img, valid, jitter, rng)
            img, lab = augment.dihedral((img, lab), int(rng.integers(8)))
        images.append(np.ascontiguousarray(img))
        labels.append(np.ascontiguousarray(lab))
    return np.stack(images), np.stack(labels)


def evaluate_chips(
    net: Any,
    sampler: ChipSampler,
    windows: list[tuple[int, int]],
    spec: ModelSpec,
    device: Any,
    batch_size: int,
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy over the labelled pixels of ``windows`` and their confusion matrix."""
    import torch

    values = [c.value for c in spec.classes]
    to_value = np.array([*values, IGNORE], dtype=np.uint8)
    cm = np.zeros((len(values), len(values) + 1), dtype=np.int64)
    loss_sum, count = 0.0, 0
    net.eval()
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            x, y = chip_batch(sampler, windows[i : i + batch_size], spec, None)
            logits = net(torch.from_numpy(x).to(device))
            target = torch.from_numpy(y.astype(np.int64)).to(device)
            n = int((target != IGNORE).sum())
            if n:
                loss = torch.nn.functional.cross_entropy(
                    logits.float(), target, ignore_index=IGNORE, reduction="sum"
                )
                loss_sum += float(loss)
                count += n
            pred = logits.argmax(1).cpu().numpy()
            ref = np.where(y == IGNORE, 0, to_value[np.minimum(y, len(values))])
            metrics.add(cm, to_value[pred], ref, values)
    net.train()
    return (loss_sum / count if count else float("nan")), cm


def network_options(cfg: NetworkConfig) -> dict[str, Any]:
    """Constructor options recorded in the package, so prediction rebuilds the same network."""
    options: dict[str, Any] = {"pixel_head": cfg.pixel_head} if cfg.pixel_head else {}
    return options | ({"linear_path": True} if cfg.linear_start and has_encoder(cfg.arch) else {})


def initial_network(
    cfg: NetworkConfig, in_channels: int, num_classes: int
) -> tuple[Any, PretrainedReport | None]:
    """The untrained network of a run: seeded initialisation, then pretrained encoder weights.

    Args:
        cfg: Training settings (``arch``, ``encoder``, ``seed``, ``pretrained``).
        in_channels: Image bands.
        num_classes: Output classes.

    Returns:
        The network and, with ``cfg.pretrained``, what the weights file contributed.

    Raises:
        ArchitectureError: Unknown architecture or encoder.
        MissingInputError: The pretrained file does not exist.
        PretrainedWeightsError: The pretrained file fits nothing in the encoder.
    """
    import torch

    torch.manual_seed(cfg.seed)
    net = build_network(cfg.arch, cfg.encoder, in_channels, num_classes, network_options(cfg))
    report = None
    if cfg.pretrained:
        encoder = getattr(net, "encoder", None)
        if not isinstance(encoder, torch.nn.Module):
            raise InputError(f"--pretrained: the {cfg.arch} network has no encoder to load weights into")
        report = load_pretrained_encoder(encoder, cfg.pretrained)
    return net, report


def plan_training(store: str | Path, requested: NetworkConfig) -> TrainPlan:
    """Candidates, split, settings, statistics and initial weights: everything ranks share."""
    info = read_region_info(store)
    if not has_layer(store, "labels"):
        raise StoreError(f"region store {store} has no labels: ingest it with --labels")
    cand = find_candidates(open_layer(store, "labels"), info.block_size, seed=requested.seed)
    present = np.unique(cand.value)
    classes, lut = label_classes(present, info.classes, IGNORE, str(store))
    gpu = _device(requested.device).type == "cuda"
    # Drawn first: how many cells it holds out is one of the facts the settings follow.
    split = plan_split(cand, requested.valid_cell, requested.valid_fraction, requested.seed)
    split.log_warnings()
    resolved, auto = adapt.resolve(requested, adapt.facts_of(info, cand, gpu, split.held_units))
    cfg, chip_note = resolved.fit_region(info.height, info.width)
    # A model without an encoder records none, as the forest does (its --encoder is unused).
    encoder = cfg.encoder if has_encoder(cfg.arch) else "none"
    spec = package_spec(store, info, cfg, cfg.arch, encoder, classes, network_options(cfg))
    valid_cells = split.valid_cells(cand)
    train_c, valid_c = cand.subset(~split.in_valid), cand.subset(split.in_valid)
    valid_s = _sampler(store, info.block_size, cfg, lut, split.cell, valid_cells, "valid")
    # Validation runs every epoch: more chips than an epoch trains on would double its cost.
    n_valid = min(_MAX_VALID_CHIPS, cfg.samples_per_epoch, valid_c.y.size)
    pick = np.linspace(0, valid_c.y.size - 1, n_valid).astype(int)
    valid_windows = tuple(valid_s.window_for(int(valid_c.y[i]), int(valid_c.x[i]), None) for i in pick)
    weights = None
    if cfg.class_balancing and cand.counts is not None:
        weights = balanced_class_weights(cand.counts[present])
    net, report = initial_network(cfg, len(info.band_names), len(classes))
    plan = TrainPlan(
        store=str(store),
        cfg=cfg,
        requested=requested,
        auto=auto,
        spec=spec,
        lut=lut,
        block_size=info.block_size,
        split=split,
        valid_cells=valid_cells,
        train=train_c,
        valid_windows=valid_windows,
        class_weights=weights,
        initial={k: v.detach().clone() for k, v in net.state_dict().items()},
        pretrained=None if report is None else report.summary(),
        valid_pixels=int(valid_c.y.size),
        warnings=(*((chip_note,) if chip_note else ()), *split.warnings),
    )
    if "linear_path" not in spec.options:
        return plan
    from segpipe.stages.train.logistic import linear_start

    return dataclasses.replace(plan, initial=linear_start(plan, net))


def _sampler(
    store: str | Path,
    block: int,
    cfg: ResolvedNetworkConfig,
    lut: np.ndarray,
    cell: int,
    valid_cells: frozenset[tuple[int, int]],
    part: str,
) -> ChipSampler:
    return ChipSampler(
        open_layer(store, "image"),
        open_layer(store, "labels"),
        block,
        cfg.chip_size,
        lut,
        cell,
        set(valid_cells),
        part,
    )


def score_every(cfg: ResolvedNetworkConfig) -> int:
    """Every how many epochs a run scores its held-out chips (its last epoch is always scored).

    Every epoch when the scores choose the weights (``keep="best"``) or stop the run
    (``patience``); else at :data:`_CURVE_POINTS` epochs spread over the run.
    """
    if cfg.keep != "last" or cfg.patience is not None:
        return 1
    return math.ceil(cfg.epochs / _CURVE_POINTS)


def plan_sampler(plan: TrainPlan, part: str) -> ChipSampler:
    """The chip sampler of one part (``train`` or ``valid``) of the plan's split."""
    return _sampler(plan.store, plan.block_size, plan.cfg, plan.lut, plan.split.cell, plan.valid_cells, part)


def _object_bank(plan: TrainPlan, sampler: ChipSampler) -> ObjectBank | None:
    """The objects to paste into training chips (None under ``copy_paste`` 0 or without a class).

    Cut from a generator of its own, so that every rank, and a resumed run, cuts the same.
    """
    if plan.cfg.copy_paste <= 0:
        return None
    target = rarest_class(plan.train, plan.lut)
    if target is None:
        return None
    rng = np.random.default_rng([plan.cfg.seed, _BANK_STREAM])
    return ObjectBank.cut(sampler, plan.train, plan.lut, target, plan.spec, plan.cfg.copy_paste, rng)


def _schedule(opt: Any, cfg: ResolvedNetworkConfig, total: int) -> Any:
    import torch

    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=cfg.lr * 1e-3)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.2)


def train_network(
    store: str | Path,
    out: str | Path,
    config: NetworkConfig | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    resume: bool = False,
    plan: TrainPlan | None = None,
) -> ModelSpec:
    """Train a network on the store's labels and write a model package to ``out``.

    Chips are drawn where labels exist; class 0 is ignored by the loss. Validation
    uses spatially held-out cells; the package keeps the best monitored epoch's weights,
    or the final epoch's (``keep="last"``, unless the run stopped early). The run
    checkpoints into ``out/checkpoint/`` after every epoch and every
    ``checkpoint_every`` steps; the checkpoint is removed once the package is written.

    Args:
        store: Region store with ``image`` and ``labels`` layers.
        out: Model package directory to write.
        config: Training settings (the defaults when None).
        progress: Called after every step with a :class:`TrainProgress`.
        resume: Continue from the checkpoint in ``out`` (same settings required),
            bitwise as if the run had not stopped. False: any old checkpoint is discarded.
        plan: The training already planned by :func:`plan_training` (its settings
            replace ``config``): callers that also score the split, such as ``--arch
            auto``, plan once instead of reading the labels and image again.

    Returns:
        The written model's description.

    Raises:
        StoreError: The store has no labels.
        LabelsError: No labelled pixel.
        MissingInputError: ``resume`` but ``out`` holds no checkpoint.
        InputError: More CUDA devices asked for than present, or a checkpoint that
            does not fit the settings.
    """
    cfg = plan.requested if plan is not None else config or NetworkConfig()
    if resume:  # before the costly preparation, so a wrong --resume fails at once
        ckpt.require_checkpoint(out, cfg.resume_key())
    plan = plan or plan_training(store, cfg)
    device = _device(cfg.device)
    if cfg.devices == 1:
        spec = _run(0, 1, plan, str(out), resume, progress)
        assert spec is not None  # rank 0 always writes the package
        return spec
    if device.type == "cuda":
        import torch

        if torch.cuda.device_count() < cfg.devices:
            raise InputError(
                f"--devices {cfg.devices} but only {torch.cuda.device_count()} CUDA devices are visible"
            )
    ddp.run_ranks(_run, cfg.devices, (plan, str(out), resume), progress, cuda=device.type == "cuda")
    return read_spec(out)


def _run(
    rank: int,
    world: int,
    plan: TrainPlan,
    out: str,
    resume: bool,
    report: Callable[[TrainProgress], None] | None,
) -> ModelSpec | None:
    """The training loop of one rank; rank 0 validates, checkpoints and writes the package.

    A module-level function, so :func:`segpipe.stages.train.distributed.run_ranks` can
    start it in spawned processes.
    """
    return _RankLoop(rank, world, plan, out).run(resume, report)


def _use_threads(device: Any, threads: int, world: int) -> None:
    """Put the rank on its GPU, or give it its share of the CPU threads."""
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif threads or world > 1 or torch.get_num_threads() > usable_cores():
        # Ranks on one CPU share its cores instead of oversubscribing them, and torch's
        # default (every visible core) is cut to a container's CPU quota.
        torch.set_num_threads(threads or max(1, usable_cores() // world))


def _parallel(net: Any, device: Any, world: int) -> Any:
    """The module the steps call: ``net`` itself, or wrapped to average gradients across ranks."""
    if world == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


class _RankLoop:
    """One rank's training: its network, optimiser, samplers, random state and checkpoints.

    The order of the random draws is part of the result: a resumed run is bitwise the
    same as an unbroken one only while every draw happens in the same order.
    """

    def __init__(self, rank: int, world: int, plan: TrainPlan, out: str) -> None:
        import torch

        cfg, spec = plan.cfg, plan.spec
        self.rank, self.world, self.plan, self.out, self.cfg = rank, world, plan, out, cfg
        self.device = _device(cfg.device, rank)
        _use_threads(self.device, cfg.threads, world)
        torch.manual_seed(cfg.seed + rank)
        self.rng = np.random.default_rng([cfg.seed, rank])
        self.net = build_network(cfg.arch, cfg.encoder, len(spec.band_names), len(spec.classes), spec.options)
        self.net.load_state_dict(plan.initial)
        self.net.to(self.device)
        self.model = _parallel(self.net, self.device, world)
        self.steps = max(1, cfg.samples_per_epoch // cfg.batch_size)
        self.per_rank = max(1, -(-cfg.batch_size // world))
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = _schedule(self.opt, cfg, self.steps * cfg.epochs)
        self.loss_fn = make_loss(
            cfg.loss, IGNORE, plan.class_weights, cfg.focal_gamma, cfg.dice_weight, cfg.overlap_loss
        )
        self.train_s = plan_sampler(plan, "train")
        self.valid_s = plan_sampler(plan, "valid")
        self.centres = CentreSampler(plan.train, cfg.balanced_sampling)
        self.bank = _object_bank(plan, self.train_s)
        # Rank 0 alone validates and writes, so only its network keeps an average.
        self.average = WeightAverage(self.net, cfg.ema) if cfg.ema > 0 and rank == 0 else None
        self.key = plan.requested.resume_key()
        self.chosen = cfg.resume_key()
        self.state = ckpt.TrainState(1, 0, 0.0, [], None, None, None, 0, {}, {}, {})
        self.pace: _Pace  # its clock starts with the loop, after a checkpoint is loaded

    def run(self, resume: bool, report: Callable[[TrainProgress], None] | None) -> ModelSpec | None:
        """Train every remaining epoch; rank 0 then writes the package and returns its description."""
        cfg = self.cfg
        resumed_from = self._start(resume)
        history = self.state.history
        started = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
        self.pace = _Pace(cfg.checkpoint_every, cfg.checkpoint_seconds)
        self.model.train()
        stopped = bool(history and history[-1].get("early_stop"))
        for epoch in range(self.state.epoch, cfg.epochs + 1):
            if stopped:
                break
            running = self._epoch(epoch, report)
            record: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": running,
                "seconds": time.perf_counter() - started,
            }
            out_of_time = self._out_of_time(epoch)
            if self.rank == 0 and self.plan.valid_windows and self._scored(epoch, out_of_time):
                self._validate(record)
            history.append(record)
            if report:
                report(TrainProgress(epoch, cfg.epochs, self.steps, self.steps, running, record))
            if cfg.patience is not None and self.state.stale >= cfg.patience:
                record["early_stop"] = True
            if out_of_time:
                record.update(early_stop=True, stopped_by="time budget")
            stopped = bool(ddp.broadcast_object(record.get("early_stop", False)))
            self._save(epoch + 1, 0, 0.0)
        if self.rank != 0:
            return None
        device = self.device.type
        if self.average is not None and self.state.best_weights is None:  # nothing held out: the average
            self.net.load_state_dict(self.average.weights)
        return finish_package(self.net, self.plan, self.state, self.out, started, device, resumed_from)

    def _out_of_time(self, epoch: int) -> bool:
        """Whether the time budget (``--arch auto``) ends the run after ``epoch``, before its last."""
        deadline = self.plan.deadline
        return deadline is not None and epoch < self.cfg.epochs and time.time() >= deadline

    def _scored(self, epoch: int, out_of_time: bool) -> bool:
        """Whether ``epoch`` is scored on the held-out chips (:func:`score_every`).

        The run's last epoch always is, also the one the time budget ends it at (a run
        stopped early keeps its best scored epoch).
        """
        return epoch % score_every(self.cfg) == 0 or epoch == self.cfg.epochs or out_of_time

    def _start(self, resume: bool) -> dict[str, int] | None:
        """Discard an old checkpoint, or continue from it; where the run resumed (None: afresh)."""
        if self.rank == 0 and not resume:
            ckpt.remove_checkpoint(self.out)
        state = ckpt.load_checkpoint(self.out, self.key, self.chosen) if resume else None
        if state is None:
            return None
        try:
            self.net.load_state_dict(state.network)
        except RuntimeError as exc:
            # The settings left at auto are not part of the key, and an earlier segpipe chose
            # them differently (no linear start at 10 m pixels before that became automatic).
            raise InputError(
                f"--resume: the checkpoint in {self.out} holds a network of other settings than this "
                f"segpipe chooses ({str(exc).splitlines()[0]}): run without --resume to start afresh"
            ) from exc
        self.opt.load_state_dict(state.optimizer)
        self.sched.load_state_dict(state.scheduler)
        if self.average is not None and state.averaged is not None:
            self.average.load(state.averaged)
        if len(state.rng) == self.world:
            ckpt.restore_rng(self.rng, state.rng[self.rank])
        self.state = state
        return {"epoch": state.epoch, "step": state.step}

    def _epoch(self, epoch: int, report: Callable[[TrainProgress], None] | None) -> float:
        """The steps of one epoch (those left of it when resuming); its running training loss."""
        state, steps = self.state, self.steps
        resuming = epoch == state.epoch
        running = state.running if resuming else 0.0
        for step in range((state.step if resuming else 0) + 1, steps + 1):
            check_stop()  # a signal stops a training in a flow's thread at its next step
            running += (self._step() - running) / step
            if report and step < steps:
                report(TrainProgress(epoch, self.cfg.epochs, step, steps, running))
            if step < steps and self.pace.due((epoch - 1) * steps + step):  # epoch ends always save
                self._save(epoch, step, running)
        return running

    def _step(self) -> float:
        """One optimisation step on a fresh batch; its loss averaged over the ranks."""
        import torch

        plan, rng, device = self.plan, self.rng, self.device
        idx = self.centres.draw(rng, self.per_rank)
        windows = [self.train_s.window_for(int(plan.train.y[i]), int(plan.train.x[i]), rng) for i in idx]
        x, y = chip_batch(self.train_s, windows, plan.spec, rng, self.cfg.color_jitter, self.bank)
        xt = torch.from_numpy(x).to(device)
        yt = torch.from_numpy(y.astype(np.int64)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = self.model(xt)
        loss = self.loss_fn(logits, yt)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.clip_grad_norm)
        self.opt.step()
        self.sched.step()
        if self.average is not None:
            self.average.update(self.net)
        return ddp.average(loss.item(), device)

    def _validate(self, record: dict[str, Any]) -> None:
        """Score the held-out chips into ``record``; keep the weights that ``keep`` asks for.

        The best monitored epoch's weights are kept as the run goes (what a run stopped early
        keeps); under ``keep="last"`` the final epoch's replace them, where the schedule
        has annealed (which of the two scores better depends on the held-out part's size:
        docs/benchmarks.md, session 18). With ``ema`` both are the weight average's.
        """
        with self._averaged():  # what the package would keep is what is scored
            self._score(record)

    def _averaged(self) -> contextlib.AbstractContextManager[None]:
        """The network with its weight average in place (``ema``), or as it is."""
        return self.average.applied(self.net) if self.average is not None else contextlib.nullcontext()

    def _score(self, record: dict[str, Any]) -> None:
        """:meth:`_validate` with the weights to score and keep in the network."""
        cfg, plan, state = self.cfg, self.plan, self.state
        windows = list(plan.valid_windows)
        v_loss, cm = evaluate_chips(self.net, self.valid_s, windows, plan.spec, self.device, cfg.batch_size)
        record.update(validation_scores(v_loss, cm, plan.spec.classes))
        sign = 1.0 if cfg.monitor == "valid_miou" else -1.0  # compared as "higher is better"
        value = sign * record[cfg.monitor]
        improved = state.best_score is None or value > state.best_score
        if improved:
            state.best_score, state.stale = value, 0
        else:
            state.stale += 1
        if improved or (cfg.keep == "last" and record["epoch"] == cfg.epochs):
            state.best_cm = cm
            state.best_weights = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
            for earlier in state.history:
                earlier.pop("kept", None)
            record["kept"] = True

    def _save(self, epoch: int, step: int, running: float) -> None:
        """Checkpoint the run at ``epoch``/``step`` (every rank's random state; rank 0 writes)."""
        self.pace.saved()
        rngs = ddp.gather_objects(ckpt.rng_state(self.rng))
        if self.rank == 0:
            ckpt.save_checkpoint(
                self.out,
                dataclasses.replace(
                    self.state,
                    epoch=epoch,
                    step=step,
                    running=running,
                    network=self.net.state_dict(),
                    optimizer=self.opt.state_dict(),
                    scheduler=self.sched.state_dict(),
                    rng=rngs,
                    config=self.key,
                    chosen=self.chosen,
                    averaged=None if self.average is None else self.average.state(),
                ),
            )


def finish_package(
    net: Any,
    plan: TrainPlan,
    state: ckpt.TrainState,
    out: str,
    started: float,
    device: str,
    resumed_from: dict[str, int] | None,
    extra: dict[str, Any] | None = None,
) -> ModelSpec:
    """Best weights, metrics and plots into the package; then the checkpoint goes.

    Also the end of :func:`segpipe.stages.train.linear.fit_linear`, whose one fit is its
    one epoch, so both packages are written alike; ``extra`` adds entries to ``training``.
    """
    if state.best_weights is not None:
        net.load_state_dict(state.best_weights)
    spec = dataclasses.replace(
        plan.spec,
        metrics=final_metrics(state.best_cm, plan.spec.classes),
        training=_training_record(plan, state.history, time.perf_counter() - started, device, resumed_from)
        | (extra or {}),
    )
    net = net.cpu().eval()
    out_dir = write_package(out, spec, net, state.history, state.best_cm)
    _plot_samples(net, plan, out_dir / "samples.png")
    ckpt.remove_checkpoint(out)
    return spec


def _training_record(
    plan: TrainPlan,
    history: list[dict[str, Any]],
    seconds: float,
    device: str,
    resumed_from: dict[str, int] | None,
) -> dict[str, Any]:
    """The package's ``training`` entry: settings, history, samples, provenance."""
    weights = plan.class_weights
    return {
        "config": plan.cfg.model_dump(),
        "requested": plan.requested.model_dump(),
        "auto": plan.auto,
        "class_weights": None if weights is None else [float(w) for w in weights],
        "history": metrics.json_ready(history),
        "kept_epoch": next((r["epoch"] for r in reversed(history) if r.get("kept")), None),
        "split": plan.split.record(plan.cfg.valid_fraction),
        "train_pixels_sampled": int(plan.train.y.size),
        "valid_pixels_sampled": plan.valid_pixels,
        "seconds": seconds,
        "store_inputs": store_inputs(plan.store),
        "device": device,
        "pretrained": plan.pretrained,
        "resumed_from": resumed_from,
        "warnings": list(plan.warnings),
    }


def _plot_samples(net: Any, plan: TrainPlan, path: Path) -> None:
    """A few chips with reference and prediction: validation chips when there are any."""
    import torch

    from segpipe.plots import plot_samples

    cfg, spec = plan.cfg, plan.spec
    part = "valid" if plan.valid_windows else "train"
    sampler = plan_sampler(plan, part)
    if plan.valid_windows:
        pick = np.linspace(0, len(plan.valid_windows) - 1, min(_SAMPLE_CHIPS, len(plan.valid_windows)))
        windows = [plan.valid_windows[int(i)] for i in pick]
    else:
        rng = np.random.default_rng(cfg.seed)
        windows = [
            sampler.window_for(int(plan.train.y[i]), int(plan.train.x[i]), None)
            for i in CentreSampler(plan.train).draw(rng, _SAMPLE_CHIPS)
        ]
    values = np.array([*(c.value for c in spec.classes), 0], dtype=np.uint8)
    images, refs, preds = [], [], []
    with torch.inference_mode():
        for y0, x0 in windows:
            raw, lab = sampler.read(y0, x0)
            x, _ = chip_batch(sampler, [(y0, x0)], spec, None)
            pred = net(torch.from_numpy(x)).argmax(1)[0].numpy()
            images.append(raw)
            refs.append(values[np.minimum(lab, len(spec.classes))])
            preds.append(values[pred])
    plot_samples(images, refs, preds, spec.band_names, spec.classes, path, title=f"{part} chips")
