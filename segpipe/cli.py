"""The ``segpipe`` command: one sub-command per stage, plus the demo.

Heavy libraries (torch, prefect) are imported inside commands so ``--help`` is
fast. :func:`main` is the error boundary: every error ends the command with one
``error: ...`` line on stderr and an exit code (:mod:`segpipe.boundary`: 2 bad input
or usage, 3 environment fault, 4 store busy, 1 internal error, 130 interrupted);
``--debug`` or ``SEGPIPE_DEBUG=1`` also prints the traceback. Nothing half-written is
left behind (each stage publishes atomically).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from segpipe import __version__
from segpipe.boundary import INTERRUPTED, catch_sigterm, classify, one_line_warnings
from segpipe.stages.train.config import AutoConfig, ForestConfig, NetworkConfig, TrainConfig
from segpipe.stages.train.config_file import read_mapping

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from segpipe.models import ModelSpec
    from segpipe.stages.train.loop import TrainPlan
    from segpipe.stages.train.progress import TrainProgress

app = typer.Typer(
    help="Classify every pixel of very large raster mosaics with deep segmentation networks.",
    no_args_is_help=False,  # no command is a usage error (main() lists the commands)
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

ARCH_HELP = (
    "Network: unet, pspnet, deeplabv3 or deeplabv3plus; linear, one 1 x 1 convolution (per-pixel "
    "logistic regression on the bands, fitted to convergence by L-BFGS on the training pixels in "
    "seconds, --encoder unused); or random_forest, "
    "the classical per-pixel baseline (scikit-learn random forest on the band values, see --trees); "
    "or auto: the forest and a U-Net within --budget, scored with their ensemble on the same held-out "
    "cells; the ensemble kept unless one model beats it by 0.02 mIoU."
)


DEBUG_ENV = "SEGPIPE_DEBUG"
PROGRESS_INTERVAL_ENV = "SEGPIPE_PROGRESS_INTERVAL"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"segpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version and exit."),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help=f"On an error, also print the traceback (or set {DEBUG_ENV}=1); accepted anywhere.",
        ),
    ] = False,
) -> None:
    # --debug is taken out of the arguments by main() so it works after a command too;
    # it is declared here for the help.
    del version, debug


@dataclass
class _LineTask:
    description: str
    total: float | None
    info: str
    completed: float = 0.0
    started: float = field(default_factory=time.monotonic)
    last_print: float = -math.inf
    printed: tuple[float, float | None, str] | None = None


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}"


class _LineProgress:
    """Progress as plain lines for a log file or a pipe, where a live bar shows nothing.

    A task's first report prints at once, later ones at most once per ``interval``
    seconds, and every task's final state when the block ends; a block ended by an error
    prints only where the tasks that had reported stopped, so that bad input, refused
    before any work, stays the one line that names it.
    """

    def __init__(self, out: Console, interval: float) -> None:
        self._out = out
        self._interval = interval
        self._tasks: list[_LineTask] = []

    def __enter__(self) -> _LineProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        for task in self._tasks:
            if kind is not None and task.printed is None:
                continue
            if task.printed != (task.completed, task.total, task.info):
                self._print(task)

    def add_task(self, description: str, total: float | None = None, info: str = "") -> TaskID:
        self._tasks.append(_LineTask(description, total, info))
        return len(self._tasks) - 1  # type: ignore[return-value]  # TaskID is a NewType of int

    def update(
        self,
        task_id: TaskID,
        *,
        completed: float | None = None,
        total: float | None = None,
        info: str | None = None,
    ) -> None:
        task = self._tasks[task_id]
        if completed is not None:
            task.completed = completed
        if total is not None:
            task.total = total
        if info is not None:
            task.info = info
        if time.monotonic() - task.last_print >= self._interval:
            self._print(task)

    def _print(self, task: _LineTask) -> None:
        done = _number(task.completed)
        if task.total:
            done += f"/{_number(task.total)} ({task.completed / task.total:.0%})"
        line = " ".join(part for part in (f"{task.description}: {done}", task.info) if part)
        elapsed = time.monotonic() - task.started
        self._out.print(f"  {line}, {elapsed:.0f} s", markup=False, highlight=False, soft_wrap=True)
        task.last_print = time.monotonic()
        task.printed = (task.completed, task.total, task.info)


def _progress() -> Progress | _LineProgress:
    """A live bar on a terminal; elsewhere (a log file, a pipe) throttled progress lines."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not console.is_terminal:
        return _LineProgress(console, float(os.environ.get(PROGRESS_INTERVAL_ENV, "10")))
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    size: Annotated[int, typer.Option(help="Scene edge in pixels.")] = 2048,
    bands: Annotated[int, typer.Option(help="Number of bands.")] = 4,
    tiles: Annotated[int, typer.Option(help="Tiles per side of the mosaic.")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a synthetic region: image tiles + VRT, dense truth, sparse labels (raster and vector)."""
    from segpipe.synth import synthesize

    with _progress() as bar:
        task = bar.add_task("synth", total=None, info="")
        region = synthesize(
            out,
            size=size,
            bands=bands,
            tiles=tiles,
            seed=seed,
            progress=lambda d, t: bar.update(task, completed=d, total=t),
        )
    console.print(
        f"wrote {region.image} ({len(region.tiles)} tiles), {region.truth}, {region.labels}, "
        f"{region.labels_vector} ({region.labelled_fraction:.1%} labelled), {region.classes}"
    )


_HELP = {
    "crs": "Target CRS (EPSG code or WKT); default: the CRS covering most of the scenes. Warps the inputs.",
    "resolution": "Target pixel size in CRS units; default: the finest band's.",
    "bounds": "Target extent LEFT BOTTOM RIGHT TOP in the target CRS; default: the scenes' union "
              "(or the AOI's box).",
    "aoi": "Area of interest (a vector file, any CRS): its box is ingested, pixels outside it become nodata.",
    "resampling": "GDAL resampling of imagery onto the grid (nearest, bilinear, cubic, average...); "
                  "labels: always nearest.",
    "order": "Where scenes overlap: the first valid pixel of the 'given' order, of the 'latest' or of the "
             "'least-cloudy' scene.",
    "assets": "STAC inputs: asset keys to stack as bands, in order, e.g. B02,B03,B04 "
              "(default: every data image).",
    "label_layer": "Layer of a multi-layer vector labels file (default: one class per layer, "
                   "named after it).",
    "background_value": "Label value that means background, not unlabelled (0 in a 0/1 mask): "
                        "a class of its own.",
}


@app.command()
def ingest(
    # str, not Path: Path would squash s3:// URLs to s3:/
    images: Annotated[
        list[str], typer.Argument(help="GeoTIFFs, a VRT, a folder of GeoTIFFs, s3:// URLs, or a STAC Item, "
                                  "ItemCollection (saved search) or catalogue (.json).")
    ],
    out: Annotated[str, typer.Option(help="Region store (Zarr) to create: a folder or an s3:// URL.")],
    labels: Annotated[str | None, typer.Option(help="Label raster or polygons (any CRS).")] = None,
    label_field: Annotated[str | None, typer.Option(help="Class field of label polygons.")] = None,
    classes: Annotated[str | None, typer.Option(help="classes.json with names and colours.")] = None,
    block_size: Annotated[int, typer.Option(help="Block (shard) edge in pixels.")] = 1024,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store.")] = False,
    crs: Annotated[str | None, typer.Option(help=_HELP["crs"])] = None,
    resolution: Annotated[float | None, typer.Option(help=_HELP["resolution"])] = None,
    bounds: Annotated[tuple[float, float, float, float] | None, typer.Option(help=_HELP["bounds"])] = None,
    aoi: Annotated[str | None, typer.Option(help=_HELP["aoi"])] = None,
    resampling: Annotated[str, typer.Option(help=_HELP["resampling"])] = "bilinear",
    order: Annotated[str, typer.Option(help=_HELP["order"])] = "given",
    assets: Annotated[str | None, typer.Option(help=_HELP["assets"])] = None,
    label_layer: Annotated[str | None, typer.Option(help=_HELP["label_layer"])] = None,
    background_value: Annotated[int | None, typer.Option(help=_HELP["background_value"])] = None,
) -> None:
    """Build a region store from image tiles, a VRT or STAC scenes, and optional labels.

    Tiles on one grid are mosaicked as they are; STAC inputs, tiles in several CRSs or
    resolutions, and any grid option are warped onto one grid, block by block.
    """
    from segpipe.stages.ingest.driver import ingest as run

    info = run(
        images,
        out,
        labels=labels,
        label_field=label_field,
        classes=classes,
        block_size=block_size,
        overwrite=overwrite,
        progress=lambda msg: console.print(f"  {msg}"),
        crs=crs,
        resolution=resolution,
        bounds=bounds,
        aoi=aoi,
        resampling=resampling,
        order=order,
        assets=[a.strip() for a in assets.split(",") if a.strip()] if assets else None,
        label_layer=label_layer,
        background_value=background_value,
    )
    console.print(
        f"wrote {out}: {info.width} x {info.height} px, {len(info.band_names)} bands, "
        f"{len(info.classes)} classes"
    )


# Every training setting's default, shown in the help (a setting not given is not passed
# on, so the settings' own defaults apply); a network's arch, unet, is the default one.
_DEFAULTS: dict[str, Any] = {
    name: field.default
    for model in (AutoConfig, ForestConfig, NetworkConfig)  # the last one's arch, unet, wins
    for name, field in model.model_fields.items()
}


# `segpipe train`'s options that are training settings, each named as its setting.
_Encoder = Annotated[str, typer.Option(help="Encoder, e.g. resnet18, resnet34, vgg16_bn.")]
# Settings without a default are chosen from the data (segpipe.stages.train.adapt); the help
# says how, and the package records what was chosen (training.auto).
_Epochs = Annotated[
    int | None,
    typer.Option(
        help="Epochs (auto: 2,048 chips in all on a CPU, 16,384 on a GPU; a rare foreground 4,096 and "
        "65,536; a linear start 4,096 on a CPU; 4-64)."
    ),
]
_SamplesPerEpoch = Annotated[
    int | None, typer.Option(help="Chips per epoch (auto: the labelled extent twice over, 64-512).")
]
_ChipSize = Annotated[
    int | None,
    typer.Option(help="Chip edge, a multiple of 32 px (auto: 128 on a CPU, 256 on a GPU, <= the region)."),
]
_BatchSize = Annotated[int | None, typer.Option(help="Chips per step (auto: 16, or 8 above 128 px).")]
_Lr = Annotated[
    float | None,
    typer.Option(
        help="Peak learning rate (auto: 1e-3, 3e-4 from a linear start, 2e-3 for a rare foreground; "
        "x sqrt(batch / 16))."
    ),
]
_WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
_ValidFraction = Annotated[
    float,
    typer.Option(help="Share of labelled cells held out for validation, spatially disjoint (0 = none)."),
]
_ValidCell = Annotated[
    int | None,
    typer.Option(help="Edge in pixels of the cells held out wholesale (default: chosen from the labels)."),
]
_Seed = Annotated[int, typer.Option(help="Random seed.")]
_Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
_Threads = Annotated[int, typer.Option(help="Torch CPU threads (0 = all cores).")]
_Loss = Annotated[str, typer.Option(help="ce (cross-entropy) or focal.")]
_FocalGamma = Annotated[float, typer.Option(help="Focusing exponent of the focal loss.")]
_DiceWeight = Annotated[
    float | None,
    typer.Option(help="Soft-Dice share, 0-1 (auto: a class under 5 %: 0.5 if <= 3 classes, else 0.3)."),
]
_OverlapLoss = Annotated[
    str,
    typer.Option(help="Overlap loss of --dice-weight: dice or lovasz (Lovasz-softmax, IoU's surrogate)."),
]
_ClassBalancing = Annotated[
    bool | None,
    typer.Option(help="Weight classes by label frequency (a network's loss, a forest's trees) (auto: off)."),
]
_Patience = Annotated[int | None, typer.Option(help="Stop after N epochs without improvement.")]
_Monitor = Annotated[str, typer.Option(help="valid_miou or valid_loss.")]
_Keep = Annotated[
    str | None,
    typer.Option(
        help="Weights kept: best (held-out score) or last (final epoch, unless stopped early); "
        "auto: last from a linear start or for a rare foreground, else best."
    ),
]
_Schedule = Annotated[str, typer.Option(help="Learning-rate schedule: onecycle or cosine.")]
_Pretrained = Annotated[
    str | None, typer.Option(help="Local encoder weights (.safetensors/.pth), e.g. torchvision ResNet.")
]
_ClipPercentiles = Annotated[
    tuple[float, float] | None,
    typer.Option(help="Clip each band to these percentiles before standardising, e.g. 2 98."),
]
_BalancedSampling = Annotated[
    bool | None, typer.Option(help="Centre chips on each class equally (auto: <= 3 classes, one under 5 %).")
]
_CopyPaste = Annotated[
    float | None,
    typer.Option(help="Share of chips given 1-3 objects of the rarest class, cut from the training part, "
                 "pasted in turned and flipped (0 = off; auto: 0.5 for a rare foreground, a class under 5 % "
                 "among <= 3 classes, else 0)."),
]
_ColorJitter = Annotated[
    float, typer.Option(help="Random brightness/contrast strength (normalised units; 0 = off).")
]
_CheckpointEvery = Annotated[
    int, typer.Option(help="Checkpoint every N steps of the whole run, and at every epoch end (0 = off).")
]
_CheckpointSeconds = Annotated[
    float, typer.Option(help="Also checkpoint when this many seconds passed since the last (0 = off).")
]
_PixelHead = Annotated[
    int | None,
    typer.Option(help="Width of a per-pixel path added to the network, 0 = none (auto: 32 at 10 m+ pixels)."),
]
_Devices = Annotated[int, typer.Option(help="Data-parallel processes (one per GPU; gloo on CPU).")]
_Members = Annotated[
    int | None,
    typer.Option(
        help="Networks trained from different seeds and averaged, each costing a run (auto: 3 with "
        "--refit where the split holds out under 20 cells or patches, else 1)."
    ),
]
_Refit = Annotated[
    bool | None,
    typer.Option(
        help="With --members 2+: members after the first train on every labelled pixel, held-out "
        "cells included; the first's held-out scores are the package's (auto: with auto --members 3)."
    ),
]
_LinearStart = Annotated[
    bool | None,
    typer.Option(
        help="Start from a logistic regression fitted per pixel; the network learns the rest "
        "(auto: on at pixels of 10 m or coarser)."
    ),
]
_ClipGradNorm = Annotated[
    float, typer.Option(help="Scale a step's gradient down to this norm when larger (0 = off).")
]
_Ema = Annotated[
    float,
    typer.Option(
        help="Keep an exponential moving average of the weights with this decay, scored and kept "
        "instead of the last step's (0 = off; 0.99: about the last 100 steps)."
    ),
]
_Trees = Annotated[int, typer.Option(help="Trees of --arch random_forest.")]
_MinSamplesLeaf = Annotated[int, typer.Option(help="--arch random_forest: fewest training pixels in a leaf.")]
_MaxDepth = Annotated[
    int | None,
    typer.Option(help="--arch random_forest: deepest split level (default: until leaves are pure)."),
]
_MaxTrainPixels = Annotated[int, typer.Option(help="--arch random_forest: training pixels sampled at most.")]
_ForestContext = Annotated[
    int,
    typer.Option(
        help="--arch random_forest: also give the trees each band's mean and std over a K x K "
        "window (odd K; 1 = band values only)."
    ),
]
# The options' names before they were the settings' names: still accepted, not shown.
_ALIASES = {"backbone": "encoder", "dice": "dice_weight"}


@app.command()
def train(
    ctx: typer.Context,
    store: Annotated[Path, typer.Argument(help="Region store with labels.")],
    out: Annotated[Path, typer.Option(help="Model package directory to write.")],
    config: Annotated[
        Path | None,
        typer.Option(help="YAML mapping of training settings (as named below, with _); options override it."),
    ] = None,
    arch: Annotated[str, typer.Option(help=ARCH_HELP)] = _DEFAULTS["arch"],
    encoder: _Encoder = _DEFAULTS["encoder"],
    epochs: _Epochs = _DEFAULTS["epochs"],
    samples_per_epoch: _SamplesPerEpoch = _DEFAULTS["samples_per_epoch"],
    chip_size: _ChipSize = _DEFAULTS["chip_size"],
    batch_size: _BatchSize = _DEFAULTS["batch_size"],
    lr: _Lr = _DEFAULTS["lr"],
    weight_decay: _WeightDecay = _DEFAULTS["weight_decay"],
    valid_fraction: _ValidFraction = _DEFAULTS["valid_fraction"],
    valid_cell: _ValidCell = _DEFAULTS["valid_cell"],
    seed: _Seed = _DEFAULTS["seed"],
    device: _Device = _DEFAULTS["device"],
    threads: _Threads = _DEFAULTS["threads"],
    loss: _Loss = _DEFAULTS["loss"],
    focal_gamma: _FocalGamma = _DEFAULTS["focal_gamma"],
    dice_weight: _DiceWeight = _DEFAULTS["dice_weight"],
    overlap_loss: _OverlapLoss = _DEFAULTS["overlap_loss"],
    class_balancing: _ClassBalancing = _DEFAULTS["class_balancing"],
    patience: _Patience = _DEFAULTS["patience"],
    monitor: _Monitor = _DEFAULTS["monitor"],
    keep: _Keep = _DEFAULTS["keep"],
    schedule: _Schedule = _DEFAULTS["schedule"],
    pretrained: _Pretrained = _DEFAULTS["pretrained"],
    clip_percentiles: _ClipPercentiles = _DEFAULTS["clip_percentiles"],
    balanced_sampling: _BalancedSampling = _DEFAULTS["balanced_sampling"],
    copy_paste: _CopyPaste = _DEFAULTS["copy_paste"],
    color_jitter: _ColorJitter = _DEFAULTS["color_jitter"],
    checkpoint_every: _CheckpointEvery = _DEFAULTS["checkpoint_every"],
    checkpoint_seconds: _CheckpointSeconds = _DEFAULTS["checkpoint_seconds"],
    pixel_head: _PixelHead = _DEFAULTS["pixel_head"],
    devices: _Devices = _DEFAULTS["devices"],
    members: _Members = _DEFAULTS["members"],
    refit: _Refit = _DEFAULTS["refit"],
    linear_start: _LinearStart = _DEFAULTS["linear_start"],
    clip_grad_norm: _ClipGradNorm = _DEFAULTS["clip_grad_norm"],
    ema: _Ema = _DEFAULTS["ema"],
    trees: _Trees = _DEFAULTS["trees"],
    min_samples_leaf: _MinSamplesLeaf = _DEFAULTS["min_samples_leaf"],
    max_depth: _MaxDepth = _DEFAULTS["max_depth"],
    max_train_pixels: _MaxTrainPixels = _DEFAULTS["max_train_pixels"],
    forest_context: _ForestContext = _DEFAULTS["forest_context"],
    resume: Annotated[
        bool, typer.Option(help="Continue from the checkpoint in --out (an error when there is none).")
    ] = False,
    scheduler: Annotated[
        str | None, typer.Option(help="Train on a worker of this dask cluster (tcp://host:port).")
    ] = None,
    budget_minutes: Annotated[
        float,
        typer.Option("--budget", "--budget-minutes", help="--arch auto: wall-clock minutes for all models."),
    ] = _DEFAULTS["budget_minutes"],
    baseline: Annotated[
        bool,
        typer.Option(help="After a network, fit the forest on the same split and say when it scores higher."),
    ] = True,
    backbone: Annotated[str | None, typer.Option(hidden=True)] = None,
    dice: Annotated[float | None, typer.Option(hidden=True)] = None,
) -> None:
    """Train a segmentation network (or the random forest) on the store's labels (class 0 ignored).

    Each training setting comes from its option when given, else from the --config
    file, else its default. Settings shown without a default are chosen from the data
    (the package records what was chosen, and why, under training.auto). The split
    holds out whole cells (chosen so that at least 40 hold labels), or whole patches where
    the labels are separate polygons, and never leaves a class with less than 70 % of its
    labelled pixels for training.
    """
    # The settings arrive through ctx, by name; the parameters above declare the options.
    given = _given_settings(ctx)
    settings = {**(read_mapping(config) if config is not None else {}), **given}
    cfg = _train_config(config, given, settings)
    if isinstance(cfg, AutoConfig) and scheduler is None:
        _train_auto(store, out, cfg, resume)
        return
    spec, plan = _run_training(store, out, cfg, resume, scheduler)
    kept = spec.training.get("kept_epoch")
    which = f", the weights of epoch {kept}" if kept else ""
    miou = spec.metrics.get("miou", float("nan"))
    console.print(f"wrote {out} (valid mIoU {miou:.3f}{which})", soft_wrap=True)
    if baseline and isinstance(cfg, NetworkConfig) and scheduler is None:
        from segpipe.stages.train.select import compare_with_forest

        console.print("  scoring the per-pixel forest on the same held-out cells...")
        compare_with_forest(store, out, cfg, lambda line: console.print(f"  {line}"), plan)


def _train_auto(store: Path, out: Path, cfg: AutoConfig, resume: bool) -> None:
    """``--arch auto`` here: the candidates within the budget, the table, the kept package."""
    from segpipe.stages.train.select import train_auto

    with _progress() as bar:
        task = bar.add_task("train", total=None, info="")
        announce = lambda line: console.print(f"  {line}")  # noqa: E731
        spec = train_auto(store, out, cfg, _train_report(bar, task), announce, resume=resume)
    kept = spec.training["selection"]["kept"]
    console.print(f"wrote {out}: kept {kept} (candidates in {out / 'candidates'})", soft_wrap=True)


def _given_settings(ctx: typer.Context) -> dict[str, Any]:
    """The training settings given on the command line, by setting name (old spellings too).

    Raises:
        InputError: A setting is given under its old and its new name.
    """
    from segpipe.errors import InputError

    given: dict[str, Any] = {}
    for name, value in ctx.params.items():
        setting = _ALIASES.get(name, name)
        source = ctx.get_parameter_source(name)
        # ParameterSource is compared by name: it is the enum of the click bundled in typer.
        if setting not in _DEFAULTS or source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        if setting in given:
            old = next(alias for alias, new in _ALIASES.items() if new == setting)
            raise InputError(f"--{old} is the old name of --{_option(setting)}: give one of them")
        given[setting] = value
    return given


def _option(setting: str) -> str:
    return setting.replace("_", "-")


def _train_config(file: Path | None, given: dict[str, Any], settings: dict[str, Any]) -> TrainConfig:
    """The settings of the file (when given), overridden by those of the command line, validated.

    Args:
        file: The --config file (named in a refusal of one of its entries).
        given: The settings given as options.
        settings: The file's settings overridden by ``given`` (the file read once, by the caller).

    Raises:
        InputError: The file is missing or no YAML mapping, or a setting is refused;
            the message names the option or the file and its entry.
    """
    from segpipe.stages.train.config import SettingError, train_config

    try:
        return train_config(settings)
    except SettingError as exc:
        if exc.key is None or (exc.names_itself and exc.key in given):
            raise
        if file is not None and exc.key not in given:
            worded = exc.in_file(file, exc.key)
        else:
            worded = f"--{_option(exc.key)} {exc.value!r}: {exc.reason}"
        raise type(exc)(exc.key, exc.value, worded, names_itself=True, unknown=exc.unknown) from exc


def _run_training(
    store: Path, out: Path, cfg: TrainConfig, resume: bool, scheduler: str | None
) -> tuple[ModelSpec, TrainPlan | None]:
    """Train on a worker of ``scheduler``'s cluster, or here with progress shown.

    Returns:
        The package's description, and a network's plan when it trained here (the
        forest baseline scores on the same split without planning it again).
    """
    from segpipe.io.store import damaged_chunks

    if scheduler:
        from segpipe.stages.train.remote import train_on_scheduler

        announce = lambda line: console.print(f"  {line}")  # noqa: E731
        with damaged_chunks(store):
            return train_on_scheduler(scheduler, store, out, cfg, resume, announce=announce), None
    from segpipe.stages.train.entry import train as run
    from segpipe.stages.train.loop import plan_training

    with _progress() as bar, damaged_chunks(store):
        # A forest is fitted in one pass: its progress reports count as one epoch.
        # A network's epochs may be auto: the bar learns the total from the first report.
        task = bar.add_task("train", total=None, info="")
        plan = plan_training(store, cfg) if isinstance(cfg, NetworkConfig) and not resume else None
        announce = lambda line: console.print(f"  {line}")  # noqa: E731
        report = _train_report(bar, task)
        return run(store, out, cfg, progress=report, resume=resume, plan=plan, announce=announce), plan


def _train_report(bar: Progress | _LineProgress, task: TaskID) -> Callable[[TrainProgress], None]:
    """Show a training's progress on ``bar``, and each epoch's scores as a line."""

    def report(p: TrainProgress) -> None:
        if p.record and "valid_miou" in p.record:
            console.print(
                f"  epoch {p.epoch}: train loss {p.record['train_loss']:.3f}, "
                f"valid loss {p.record['valid_loss']:.3f}, valid mIoU {p.record['valid_miou']:.3f}"
            )
        info = f"epoch {p.epoch}/{p.epochs} loss {p.loss:.3f}"
        bar.update(task, total=p.epochs, completed=p.epoch - 1 + p.step / p.steps, info=info)

    return report


@app.command("export-chips")
def export_chips(
    store: Annotated[Path, typer.Argument(help="Region store with labels.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the chips into.")],
    chip_size: Annotated[int, typer.Option(help="Chip edge in pixels.")] = 256,
    count: Annotated[int, typer.Option(help="Number of chips.")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same chips).")] = 0,
    balanced: Annotated[bool, typer.Option(help="Centre chips on each class equally often.")] = False,
) -> None:
    """Export image/label chip GeoTIFFs plus index.csv and dataset.json, drawn like training chips."""
    from segpipe.io.store import damaged_chunks
    from segpipe.stages.train.chips import export_chips as run

    with damaged_chunks(store):
        result = run(store, out, chip_size=chip_size, count=count, seed=seed, balanced=balanced)
    console.print(f"wrote {result.count} chip pairs to {result.out} (index {result.index})", soft_wrap=True)


@app.command()
def ensemble(
    members: Annotated[list[Path], typer.Argument(help="Two or more model packages to combine.")],
    out: Annotated[Path, typer.Option(help="Directory of the ensemble package.")],
    weight: Annotated[
        list[float] | None,
        typer.Option(help="Weight of each member's probabilities, in order (default: equal)."),
    ] = None,
) -> None:
    """Combine trained packages (same bands, classes, normalisation) into one averaging them."""
    from segpipe.models.combine import make_ensemble

    path = make_ensemble(members, out, weight or None)
    console.print(f"wrote ensemble of {len(members)} models to {path}", soft_wrap=True)


@app.command()
def predict(
    store: Annotated[str, typer.Argument(help="Region store (a folder or an s3:// URL).")],
    model: Annotated[str, typer.Option(help="Model package directory or s3:// URL.")],
    tile_size: Annotated[int | None, typer.Option(help="Window edge (multiple of 32).")] = None,
    overlap: Annotated[int | None, typer.Option(help="Window overlap in pixels.")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Most windows per forward pass (default: 8 on GPUs, 2 on CPUs).")
    ] = None,
    scheduler: Annotated[str | None, typer.Option(help="Dask scheduler address (tcp://host:port).")] = None,
    force: Annotated[bool, typer.Option(help="Recompute finished blocks.")] = False,
    blend: Annotated[
        str, typer.Option(help="Blending of overlapping windows: cosine, gaussian, mean or crop.")
    ] = "cosine",
    tta: Annotated[
        bool | None,
        typer.Option("--tta/--no-tta", help="Average 8 flips/rotations per window (8x the forward calls). "
                     "Default: a network does on a region of at most 4096 x 4096 px, a per-pixel model "
                     "never."),
    ] = None,
    probabilities: Annotated[
        bool, typer.Option(help="Also write the per-class probabilities layer (class, y, x), uint8 %.")
    ] = False,
    task_size: Annotated[int, typer.Option(help="Largest task edge in pixels (whole blocks).")] = 4096,
    allow_resolution_mismatch: Annotated[
        bool, typer.Option(help="Predict even where the image's pixel size differs by more than 25 % "
                           "from the one the model was trained at.")
    ] = False,
    plan_only: Annotated[
        bool, typer.Option(help="Print what the run would do and exit: blocks, tasks, windows, compute "
                           "overhead and a forward-time estimate from timed calls here. Writes nothing.")
    ] = False,
) -> None:
    """Classify every pixel of the store, block by block on a Dask cluster, blending overlapping windows."""
    from segpipe.stages.predict.driver import predict as run

    if plan_only:
        from segpipe.stages.predict.dryrun import format_plan, plan_predict

        plan = plan_predict(store, model, tile_size=tile_size, overlap=overlap, batch_size=batch_size,
                            force=force, blend=blend, tta=tta, probabilities=probabilities,
                            max_task_pixels=task_size * task_size, scheduler=scheduler,
                            allow_resolution_mismatch=allow_resolution_mismatch)
        console.print(format_plan(plan), soft_wrap=True)
        return

    # The store, the whole package and the settings are checked before any cluster
    # starts; the cluster's address and dashboard are then logged as it comes up.
    from segpipe.io.store import damaged_chunks

    _show_cluster_log()
    with _progress() as bar, damaged_chunks(store):
        task = bar.add_task("predict", total=None, info="blocks")
        summary = run(
            store,
            model,
            tile_size=tile_size,
            overlap=overlap,
            batch_size=batch_size,
            scheduler=scheduler,
            force=force,
            progress=lambda d, t: bar.update(task, completed=d, total=t),
            blend=blend,
            tta=tta,
            probabilities=probabilities,
            max_task_pixels=task_size * task_size,
            allow_resolution_mismatch=allow_resolution_mismatch,
        )
    views = ", 8 views a window (--no-tta: one)" if summary.tta else ""
    console.print(
        f"predicted {summary.blocks_done} blocks ({summary.blocks_skipped} already done) "
        f"in {summary.tasks} tasks{views}, {summary.seconds:.1f} s"
    )


@app.command()
def export(
    store: Annotated[str, typer.Argument(help="Region store (a folder or an s3:// URL).")],
    out: Annotated[
        str | None, typer.Option(help="Cloud-Optimized GeoTIFF to write (a path or an s3:// URL).")
    ] = None,
    layer: Annotated[str, typer.Option(help="classes, confidence, probabilities or image.")] = "classes",
    compress: Annotated[str, typer.Option(help="DEFLATE or ZSTD (faster, smaller).")] = "DEFLATE",
    stac: Annotated[bool, typer.Option(help="Write a STAC Item <name>.stac.json beside the COG.")] = True,
    vector: Annotated[
        Path | None,
        typer.Option(help="Polygons of the classes, one per connected patch, to a .gpkg (class, class_name, "
                     "area in map units², mean_confidence in percent)."),
    ] = None,
    min_area: Annotated[
        float | None,
        typer.Option(help="--vector: minimum mapping unit in map units² (m² in a metric CRS): smaller "
                     "patches first take their largest neighbour's class, as gdal_sieve -4 does."),
    ] = None,
    simplify: Annotated[
        float | None,
        typer.Option(help="--vector: simplify each polygon with this tolerance in map units (default: exact "
                     "pixel outlines)."),
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="--vector: run the blocks on this dask cluster (tcp://host:port).")
    ] = None,
) -> None:
    """Export a store layer as a validated Cloud-Optimized GeoTIFF (plus a STAC Item), and/or its polygons.

    A class COG gets its legend beside it: GDAL's <name>.tif.aux.xml (class names and a
    raster attribute table that GDAL, QGIS and ArcGIS read) and a QGIS style <stem>.qml.
    --vector reads the classes block by block and gives the polygons a whole-raster
    polygonization would (4-connectivity), patches cut by block borders merged.
    """
    from segpipe.errors import InputError

    if vector is None and (min_area is not None or simplify is not None or scheduler is not None):
        raise InputError("--min-area, --simplify and --scheduler apply to --vector: add --vector OUT.gpkg")
    if out is None and vector is None:
        raise InputError("give --out OUT.tif (a COG), --vector OUT.gpkg (polygons), or both")
    if vector is not None:  # before the COG is written: a bad option must not replace an earlier one
        from segpipe.stages.export.vector import check_vector_request

        check_vector_request(vector, min_area, simplify)
    from segpipe.io.store import damaged_chunks

    with damaged_chunks(store):
        if out is not None:
            from segpipe.api import export as run

            for written in run(store, out, layer=layer, compress=compress, stac=stac).files:
                console.print(f"wrote {written}", soft_wrap=True)
        if vector is not None:
            written = _export_vector(store, vector, min_area, simplify, scheduler)
            console.print(f"wrote {written}", soft_wrap=True)


def _export_vector(
    store: str, vector: Path, min_area: float | None, simplify: float | None, scheduler: str | None
) -> Path:
    """``--vector``: in this process, or on ``scheduler``'s cluster."""
    from segpipe.stages.export.vector import write_vector

    if scheduler is None:
        return write_vector(store, vector, min_area=min_area, simplify=simplify)
    from segpipe.cluster import get_client

    with get_client(scheduler) as client:
        return write_vector(store, vector, min_area=min_area, simplify=simplify, client=client)


@app.command("export-model")
def export_model(
    model: Annotated[Path, typer.Argument(help="A trained model package (model.json + weights).")],
    onnx: Annotated[Path, typer.Option(help="The ONNX file to write (input 'image', output 'logits').")],
    package: Annotated[
        Path | None,
        typer.Option(help="Also write an ONNX model package there, which 'segpipe predict --model' runs."),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    window: Annotated[
        int | None, typer.Option(help="Window edge of a one-size network (PSPNet); default: predict's tile.")
    ] = None,
) -> None:
    """Export a trained network (or forest, or ensemble) to ONNX, checked against torch before it is kept.

    The input is normalised band values, N x bands x H x W float32; batch and window stay
    free except for PSPNet. Every package also carries mlm.json (STAC MLM) beside it.
    """
    from segpipe.models.onnx import export_onnx

    done = export_onnx(model, onnx, opset, package=package, window=window)
    console.print(f"wrote {done.path}", soft_wrap=True)
    if done.package is not None:
        for name in sorted(p.name for p in done.package.iterdir()):
            console.print(f"wrote {done.package / name}", soft_wrap=True)
    shape = f"a {done.window} px window" if done.window else "any window (a multiple of 32)"
    console.print(f"  opset {done.opset}, {shape}; largest difference to torch {done.max_abs_diff:.1e}")


@app.command()
def preview(
    cog: Annotated[Path, typer.Argument(help="An exported layer (a COG of 'segpipe export') or a GeoTIFF.")],
    out: Annotated[Path, typer.Option(help="The PNG to write.")],
    max_size: Annotated[int, typer.Option(help="Longest side of the map, in pixels.")] = 1024,
) -> None:
    """Draw a whole layer at a glance: classes in their colours with names and shares, else a colour bar.

    Reads the overview nearest the size shown, so a region of any size costs one small read.
    """
    from segpipe.stages.export.preview import write_preview

    console.print(f"wrote {write_preview(cog, out, max_size)}", soft_wrap=True)


_COLLECTION_TEXT = "Pixel classifications made by segpipe"


@app.command("stac-collection")
def stac_collection(
    out: Annotated[Path, typer.Argument(help="The Collection file to write (collection.json).")],
    items: Annotated[list[Path], typer.Argument(help="STAC Items of exported layers (<name>.stac.json).")],
    collection_id: Annotated[
        str | None, typer.Option("--id", help="Collection id (default: its folder's name).")
    ] = None,
    description: Annotated[str, typer.Option(help="Collection description.")] = _COLLECTION_TEXT,
) -> None:
    """Gather the STAC Items of several exports (a batch of regions) into one STAC Collection."""
    from segpipe.stages.export.collection import write_collection

    written = write_collection(items, out, collection_id, description)
    console.print(f"wrote {written} ({len(items)} items)", soft_wrap=True)


@app.command()
def evaluate(
    prediction: Annotated[str, typer.Argument(help="Region store or class GeoTIFF (or an s3:// URL).")],
    reference: Annotated[str, typer.Option(help="Reference label raster or polygons (or an s3:// URL).")],
    out: Annotated[str, typer.Option(help="Report folder (or an s3:// prefix).")],
    reference_field: Annotated[str | None, typer.Option(help="Class field of reference polygons.")] = None,
    layer: Annotated[str, typer.Option(help="Store layer to evaluate.")] = "classes",
    points: Annotated[int | None, typer.Option(help="Evaluate on N random points, not every pixel.")] = None,
    sampling: Annotated[str, typer.Option(help="Points: stratified, equalized or random.")] = "stratified",
    seed: Annotated[int, typer.Option(help="Seed of the point draw.")] = 0,
) -> None:
    """Compare a prediction with a reference: confusion matrix, accuracy, per-class scores, mIoU, report."""
    from segpipe.io.store import damaged_chunks
    from segpipe.stages.evaluate.assess import evaluate as run

    with damaged_chunks(prediction):
        result = run(prediction, reference, out, reference_field=reference_field, layer=layer, points=points,
                     sampling=sampling, seed=seed)
    console.print(
        f"overall accuracy {result['overall_accuracy']:.3f}, mIoU {result['miou']:.3f}; "
        f"wrote metrics.json and report.md to {out}"
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("demo-out"),
    size: Annotated[int, typer.Option(help="Scene edge in pixels.")] = 2048,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Run the whole pipeline on a synthetic region through the process_region Prefect flow."""
    from flows.demo import run_demo

    summary = run_demo(out, size=size, epochs=epochs, seed=seed, console=console)
    typer.echo(json.dumps({"miou": summary["miou"], "summary": str(out / "summary.json")}))


SCHEDULER_HELP = (
    "Dask scheduler address (tcp://host:port); default: $SEGPIPE_SCHEDULER, else a local cluster."
)
TASK_RUNNER_HELP = (
    "Where the stages run: local (threads of this process) or dask (Prefect's DaskTaskRunner "
    "on the scheduler's cluster); default: the YAML file's task_runner, else local."
)


def _flow_console(task_runner: str | None) -> None:
    """Check ``--task-runner`` and show where clusters start (their dashboards) on stderr."""
    from segpipe.errors import InputError

    if task_runner not in (None, "local", "dask"):
        raise InputError(f"--task-runner {task_runner!r} must be local or dask")
    from flows.engine import leave_tracebacks_to_the_command

    leave_tracebacks_to_the_command()
    _show_cluster_log()


def _show_cluster_log() -> None:
    """Show the cluster's log lines (where it starts, its dashboard) on stderr."""
    import logging

    from rich.logging import RichHandler

    cluster_log = logging.getLogger("segpipe.cluster")
    cluster_log.setLevel(logging.INFO)
    if not any(isinstance(h, RichHandler) for h in cluster_log.handlers):
        cluster_log.addHandler(RichHandler(console=console, show_path=False, show_time=False))


@app.command("run")
def run_region(
    region: Annotated[Path, typer.Argument(help="Region description (YAML: a process_region RegionRun).")],
    scheduler: Annotated[str | None, typer.Option(help=SCHEDULER_HELP)] = None,
    task_runner: Annotated[str | None, typer.Option(help=TASK_RUNNER_HELP)] = None,
) -> None:
    """Process one region end to end with the process_region flow; a rerun skips finished stages."""
    from flows.engine import use_local_engine
    from flows.manifest import read_region
    from flows.process_region import run_region as run_flow

    _flow_console(task_runner)
    run = read_region(region)  # a bad file is named before the engine's slow start
    use_local_engine()
    if scheduler:
        run = run.model_copy(update={"scheduler": scheduler})
    if task_runner:
        run = run.model_copy(update={"task_runner": task_runner})
    result = run_flow(run)
    typer.echo(json.dumps({"region": run.name or str(region), "miou": result["miou"]}))


@app.command()
def batch(
    manifest: Annotated[Path, typer.Argument(help="Manifest (YAML: regions and concurrency).")],
    scheduler: Annotated[str | None, typer.Option(help=SCHEDULER_HELP + " For every region.")] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Regions at a time (overrides the manifest).")
    ] = None,
    task_runner: Annotated[str | None, typer.Option(help=TASK_RUNNER_HELP + " For every region.")] = None,
) -> None:
    """Process every region of a manifest with the process_regions flow; a rerun skips finished stages."""
    from flows.engine import use_local_engine
    from flows.manifest import read_manifest
    from flows.process_regions import process_regions

    _flow_console(task_runner)
    plan = read_manifest(manifest)  # a bad file is named before the engine's slow start
    use_local_engine()
    if scheduler:
        plan = plan.model_copy(
            update={"regions": [r.model_copy(update={"scheduler": scheduler}) for r in plan.regions]}
        )
    if concurrency:
        plan = plan.model_copy(update={"concurrency": concurrency})
    if task_runner:
        plan = plan.model_copy(update={"task_runner": task_runner})
    result = process_regions(plan)
    typer.echo(json.dumps({name: r["miou"] for name, r in result["regions"].items()}))


def _take_debug_flag(args: list[str]) -> bool:
    """Remove ``--debug`` from ``args`` (before any ``--``); True when asked for, or by the environment."""
    end = args.index("--") if "--" in args else len(args)
    asked = "--debug" in args[:end]
    args[:end] = [a for a in args[:end] if a != "--debug"]
    return asked or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _wide_help_when_piped(args: list[str]) -> None:
    """Lay help out 120 columns wide when it goes to a pipe or a file.

    Typer draws help as a table as wide as the terminal, 80 columns without one, and
    cuts long option names there (``--samples-per-e…``). Set only for help, so no child
    process inherits it.
    """
    asked = "--help" in args or "-h" in args
    if asked and not sys.stdout.isatty() and not {"TERMINAL_WIDTH", "COLUMNS"} & os.environ.keys():
        os.environ["TERMINAL_WIDTH"] = "120"


def _error_line(message: str) -> None:
    # A Text, not markup: messages hold brackets ("[Errno 28]") that rich would eat.
    console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True, highlight=False)


def _usage_error(exc: typer.TyperException) -> NoReturn:
    """The usage line and one ``error:`` line, exit 2 (typer's own click raised ``exc``)."""
    # This typer bundles its own click, so click's exceptions never match: typer's
    # TyperException is the base of its usage errors.
    ctx = getattr(exc, "ctx", None)
    message = exc.format_message()
    given = _given_value(exc, sys.argv[1:])
    if given is not None and repr(given) not in message:
        message = f"{message.rstrip('.')} (given {given!r})"
    if ctx is not None:
        console.print(ctx.get_usage(), markup=False, highlight=False, soft_wrap=True)
        if ctx.parent is None and hasattr(ctx.command, "list_commands"):  # no or an unknown command
            message += f" Commands: {', '.join(ctx.command.list_commands(ctx))}."
    where = ctx.command_path if ctx is not None else "segpipe"
    _error_line(f"{message} (see '{where} --help')")
    sys.exit(int(getattr(exc, "exit_code", 2)))


def _given_value(exc: typer.TyperException, args: list[str]) -> str | None:
    """The text the user gave the option ``exc`` complains about, so the message can name it.

    typer's parser says "Input should be a valid integer" without the value; the user
    should see which of several values was wrong.
    """
    opts = getattr(getattr(exc, "param", None), "opts", None) or []
    for i, arg in enumerate(args):
        for opt in opts:
            if arg == opt and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(f"{opt}="):
                return arg.split("=", 1)[1]
    return None


def _fail(exc: BaseException, debug: bool) -> NoReturn:
    """End the command on ``exc``: one ``error:`` line (after the traceback with --debug)."""
    if isinstance(exc, typer.TyperException):  # click's usage errors and bad files
        _usage_error(exc)
    if isinstance(exc, typer.Abort):  # end of input at a prompt
        _error_line("aborted")
        sys.exit(1)
    verdict = classify(exc)
    if debug and verdict.code != INTERRUPTED:
        traceback.print_exception(exc)
    _error_line(verdict.message)
    sys.exit(verdict.code)


GDAL_CACHE_DEFAULT = "256"
"""GDAL's block cache in MB for every ``segpipe`` command and its local workers (``GDAL_CACHEMAX``)."""


def main() -> None:
    """Entry point: run the app; every error ends it with one ``error:`` line and its exit code."""
    args = sys.argv[1:]
    debug = _take_debug_flag(args)
    catch_sigterm()  # a scheduler's kill cleans up like Ctrl-C
    if not debug:
        one_line_warnings()
    # GDAL's block cache defaults to 5 % of RAM per process: ingest's memory followed it
    # (892 MB at 8192 px, 411 MB at 64 MB). A bound for this process and the local
    # cluster's workers, which inherit the environment; a value the user set wins.
    os.environ.setdefault("GDAL_CACHEMAX", GDAL_CACHE_DEFAULT)
    _wide_help_when_piped(args)
    try:
        code = app(args=args, prog_name="segpipe", standalone_mode=False)
    except SystemExit:
        raise
    except BaseException as exc:  # the boundary: KeyboardInterrupt too
        _fail(exc, debug)
    # Without standalone mode an Exit comes back as its code: 0 after --help or
    # --version, 130 after Ctrl-C (typer turns KeyboardInterrupt into Exit(130)).
    if code == INTERRUPTED:
        _error_line("interrupted")
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
