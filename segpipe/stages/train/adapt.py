"""Network settings that follow the data: what a setting left at ``auto`` becomes.

A 300 px scene is not a 30,000 px one, and a task whose foreground covers 3 % of the
labels is not a balanced land-cover map. Every network setting below defaults to None
(``auto``) and is resolved here from the region, the labels and the device, once, before
training; the package records each chosen value and the rule that chose it under
``training.auto``. A value the user gives is never changed.

The rules (also in ``segpipe train --help`` and the README):

- ``chip_size``: 256 px on a GPU, 128 px on a CPU (four times cheaper a step), never more
  than the region's smaller edge (rounded down to a multiple of 32).
- ``batch_size``: 16 chips of 128 px or less, 8 of larger chips.
- ``samples_per_epoch``: enough chips to cover the labelled extent about twice (chip
  area against the bounding box of the labels), between 64 and 512.
- ``epochs``: a total of :data:`CPU_CHIPS` chips on a CPU (about 7 CPU-minutes of a
  ResNet-18 U-Net at 128 px on 2 cores) or :data:`GPU_CHIPS` on a GPU, spread over epochs
  of ``samples_per_epoch``, between 4 and 64 epochs; a rare foreground (below) gets
  :data:`FOREGROUND_CPU_CHIPS` or :data:`FOREGROUND_GPU_CHIPS`, because it is learnt late,
  and a linear start (below) :data:`LINEAR_START_CPU_CHIPS` on a CPU, for its lower rate.
- ``lr``: 1e-3 at 16 chips a batch (:data:`LINEAR_START_LR`, 3e-4, from a linear start;
  :data:`FOREGROUND_LR`, 2e-3, for a rare foreground without one), scaled by the square
  root of the batch size.
- ``keep``: ``last`` (the final epoch's weights) from a linear start or for a rare
  foreground, else ``best`` (the best held-out epoch's).
- rare classes: when a class holds under :data:`RARE_SHARE` of the labelled pixels and
  there are at most three classes (a foreground task: buildings on background),
  ``balanced_sampling`` (chips centred on each class equally often), ``dice_weight``
  0.5 (overlap per class, which a 4 % foreground cannot win by being ignored) and
  ``copy_paste`` 0.5 (half the chips given 1-3 of the class's objects cut from the
  training part); with more classes, ``dice_weight`` 0.3 alone; without a rare class,
  none. ``class_balancing`` (loss weights) stays off unless asked for.
- ``pixel_head``: 32 hidden units when the pixels are 10 m or coarser (Landsat,
  Sentinel-2), where objects one to three pixels wide blur in the encoder; else 0.
- ``linear_start``: on at the same pixel sizes, where a per-pixel model is already a
  strong one: the network starts as the logistic regression of the training pixels and
  learns what context adds, at a fine-tuning's rate, over twice the chips, keeping its last
  epoch (s2-brandenburg: test mIoU 0.271 -> 0.320 over five seeds, every seed higher, the
  spread 0.065 -> 0.035; nc-landsat7 dense 0.275 -> 0.264; docs/benchmarks.md); off for finer
  pixels, where one band's values tell little (the building scene's regression finds no
  building). Every setting above that follows it follows the resolved value, given or not.
- ``members`` and ``refit``: :data:`REFIT_MEMBERS` networks averaged, all but the first
  trained on every labelled pixel (held-out cells included), where the split holds out
  fewer than :data:`REFIT_UNITS` cells or patches; else one network. With so few held-out
  units, which of them a seed draws moves what the network learns (a seed's whole-polygon
  or 23-building draw), and one network's start moves it as much on a small scene: the
  refitted members even out both, while the first, which never saw the held-out cells,
  still gives the package's honest held-out scores (:mod:`segpipe.stages.train.members`).
  It triples the training and each window's forward pass; ``--members 1`` turns it off.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.io.store import RegionInfo
from segpipe.models.catalog import has_encoder
from segpipe.stages.train.config import CHIP_MULTIPLE, NetworkConfig, ResolvedNetworkConfig
from segpipe.stages.train.sampling import Candidates

__all__ = [
    "AUTO_SETTINGS",
    "CPU_CHIPS",
    "FOREGROUND_CPU_CHIPS",
    "FOREGROUND_GPU_CHIPS",
    "FOREGROUND_LR",
    "GPU_CHIPS",
    "LINEAR_START_CPU_CHIPS",
    "LINEAR_START_LR",
    "RARE_SHARE",
    "REFIT_MEMBERS",
    "REFIT_UNITS",
    "Facts",
    "facts_of",
    "pixel_metres",
    "resolve",
]

# On a CPU, 1,024 chips left land cover still rising at the last epoch: on s2-brandenburg
# the default U-Net's test mIoU over five seeds was 0.206-0.257 (mean 0.233) at 1,024 and
# 0.236-0.301 (mean 0.271) at 2,048, every seed higher (benchmarks/accuracy.py, session 17).
CPU_CHIPS = 2048
GPU_CHIPS = 16384
RARE_SHARE = 0.05
# A rare foreground is learnt after the background: on the SpaceNet building scene (4 %
# buildings) the default U-Net's test building IoU over five seeds was 0.13-0.24 at
# 1,024 chips and 0.22-0.33 at 4,096 (benchmarks/accuracy.py, docs/benchmarks.md); so a
# foreground task gets four times the chips land cover once had, on either device.
FOREGROUND_CPU_CHIPS = 4096
FOREGROUND_GPU_CHIPS = 65536
# A network that starts as the per-pixel regression (10 m pixels or coarser) fine-tunes it:
# at the default peak rate, 1e-3, one s2-brandenburg seed of five lost its start during the
# warm-up (test mIoU spread 0.086); at 3e-4 none did, and twice the chips made up for the lower
# rate: 0.320 over five seeds (0.306-0.341) against 0.271 (0.236-0.301) for the network without
# the start, and the last epoch's weights kept (benchmarks/accuracy.py, sessions 23-24).
LINEAR_START_LR = 3e-4
# A rare foreground pasted into half the chips (copy_paste 0.5) trains at twice the rate and
# keeps its last epoch: on the SpaceNet building scene, five seeds through the CLI, test mIoU
# 0.618 -> 0.662 and building IoU 0.270 -> 0.352; pasting alone (at 1e-3, best epoch kept)
# left both where they were, and the faster rate alone overfit the 23 training buildings
# (0.611, building 0.254; docs/benchmarks.md, sessions 26-27).
FOREGROUND_LR = 2e-3
LINEAR_START_CPU_CHIPS = 4096
_MAX_EPOCHS = 64
# Held-out cells (or patches) under which refitted members are added. The scenes of
# benchmarks/accuracy.py (384-900 px) hold out 2-9 (seeds 0-4); a 3,000 px dense map about 20
# of its 256 px cells, and a region of 30,000 px thousands, where a draw of cells averages out.
REFIT_UNITS = 20
# Members there: the split's network and two refitted on every label. A refit pair left
# s2-brandenburg's test mIoU spread over five seeds at 0.032 (mean 0.336); three members, 0.029
# (0.340), and spacenet4-atlanta's 0.021 -> 0.012 (0.672 -> 0.676), at 1.5 times the training
# (docs/benchmarks.md, sessions 33-34).
REFIT_MEMBERS = 3
# Settings that default to None and are chosen here.
AUTO_SETTINGS = (
    "chip_size",
    "batch_size",
    "samples_per_epoch",
    "epochs",
    "lr",
    "class_balancing",
    "balanced_sampling",
    "dice_weight",
    "pixel_head",
    "linear_start",
    "keep",
    "copy_paste",
    "members",
    "refit",
)
_COARSE_METRES = 10.0
# At most this many classes with a rare one: a foreground task (buildings on background).
_FOREGROUND_CLASSES = 3


@dataclass(frozen=True)
class Facts:
    """What the rules read about a region and its labels.

    Attributes:
        height: Region rows.
        width: Region columns.
        pixel_metres: Pixel edge in metres (None: unknown, e.g. a geographic CRS).
        extent: Labelled bounding box as (rows, columns).
        class_pixels: Labelled pixels per class present.
        gpu: Training runs on a GPU.
        held_units: Cells (or patches) the split holds out (0: none, all labels train).
    """

    height: int
    width: int
    pixel_metres: float | None
    extent: tuple[int, int]
    class_pixels: np.ndarray
    gpu: bool
    held_units: int = 0

    @property
    def rarest_share(self) -> float:
        """The smallest class's share of the labelled pixels."""
        total = float(self.class_pixels.sum())
        return float(self.class_pixels.min()) / total if total else 1.0


def facts_of(info: RegionInfo, cand: Candidates, gpu: bool, held_units: int = 0) -> Facts:
    """The facts of a region store, its labelled candidates and the split's held-out units."""
    present = np.unique(cand.value)
    counts = cand.counts[present] if cand.counts is not None else np.bincount(cand.value)[present]
    extent = (int(np.ptp(cand.y)) + 1, int(np.ptp(cand.x)) + 1) if cand.y.size else (0, 0)
    return Facts(info.height, info.width, pixel_metres(info), extent, counts, gpu, held_units)


def pixel_metres(info: RegionInfo) -> float | None:
    """The pixel edge in metres, when the CRS is projected in metres (None otherwise)."""
    if not info.crs_wkt:
        return None
    from rasterio.crs import CRS

    crs = CRS.from_wkt(info.crs_wkt)
    if not crs.is_projected or crs.linear_units_factor[1] != 1.0:
        return None
    a, b, _, d, e, _ = info.transform
    return float(math.sqrt(abs(a * e - b * d)))


def resolve(cfg: NetworkConfig, facts: Facts) -> tuple[ResolvedNetworkConfig, dict[str, dict[str, Any]]]:
    """``cfg`` with every setting left at None chosen by the rules.

    Returns:
        The settings, and for each chosen one its value and the rule (``training.auto``).
    """
    chosen: dict[str, dict[str, Any]] = {}

    def pick(name: str, value: Any, why: str) -> Any:
        given = getattr(cfg, name)
        if given is not None:
            return given
        chosen[name] = {"value": value, "rule": why}
        return value

    network = has_encoder(cfg.arch)
    start = pick("linear_start", *(_coarse(facts) if network else (False, "a per-pixel model")))
    chip = pick("chip_size", *_chip(facts))
    batch = pick("batch_size", 16 if chip <= 128 else 8, "16 chips of <= 128 px, else 8")
    per_epoch = pick("samples_per_epoch", *_per_epoch(facts, chip))
    pick("epochs", *_epochs(facts, per_epoch, start))
    foreground = _foreground(facts)
    pick("lr", *_lr(batch, start, foreground))
    pick("keep", *_keep(start, foreground))
    _rare_classes(facts, pick)
    pick("pixel_head", *(_pixel_head(facts) if network else (0, "a per-pixel model")))
    members = pick("members", *(_members(cfg.refit, facts) if network else (1, "a per-pixel model")))
    pick("refit", members > 1 and cfg.members is None, _refit_rule(cfg.members, members))
    update = {name: entry["value"] for name, entry in chosen.items()}
    return ResolvedNetworkConfig(**{**cfg.model_dump(), **update}), chosen


def _rare_classes(facts: Facts, pick: Callable[[str, Any, str], Any]) -> None:
    """Balanced chips, Dice and pasting for a rare foreground; Dice alone among many classes.

    Centring half the chips on a rare class teaches a foreground (buildings, water) that
    plain sampling seldom shows; among seven land-cover classes it centres a seventh of
    the chips on a few hundred noisy pixels each, and on nc-landsat7 that (with 10x loss
    weights) left a short training far worse than plain sampling, while a Dice share
    still lifts the small classes' IoU there. Loss weights on top of balanced chips
    over-correct: on the SpaceNet building scene (4 % buildings) the three together
    swung validation mIoU between 0.08 and 0.35 from epoch to epoch, buildings
    predicted over open ground, so loss weights stay off. Pasting a foreground's objects
    into half the chips (``copy_paste``) shows each in many surroundings; with the faster
    rate and the last epoch (:data:`FOREGROUND_LR`) it lifted that scene's building IoU.
    """
    share, n = facts.rarest_share, int(facts.class_pixels.size)
    rare, foreground = share < RARE_SHARE, _foreground(facts)
    why = f"rarest class {share:.1%} of the labels ({'under' if rare else 'at least'} 5 %), {n} classes"
    pick("class_balancing", False, "balanced chips and Dice weigh a rare class already")
    pick("balanced_sampling", foreground, why)
    pick("dice_weight", 0.5 if foreground else 0.3 if rare else 0.0, why)
    pick("copy_paste", 0.5 if foreground else 0.0, why)


def _foreground(facts: Facts) -> bool:
    """A rare class among at most three: a foreground task such as buildings on background."""
    return facts.rarest_share < RARE_SHARE and int(facts.class_pixels.size) <= _FOREGROUND_CLASSES


def _chip(facts: Facts) -> tuple[int, str]:
    wanted = 256 if facts.gpu else 128
    fits = max(CHIP_MULTIPLE, min(facts.height, facts.width) // CHIP_MULTIPLE * CHIP_MULTIPLE)
    device = "GPU" if facts.gpu else "CPU"
    return min(wanted, fits), f"{wanted} px on a {device}, at most the region's smaller edge ({fits} px)"


def _per_epoch(facts: Facts, chip: int) -> tuple[int, str]:
    cover = facts.extent[0] * facts.extent[1] / float(chip * chip)
    n = int(np.clip(math.ceil(2 * cover), 64, 512))
    return n, f"twice the labelled extent in chips ({cover:.1f}), within 64-512"


def _epochs(facts: Facts, per_epoch: int, start: bool) -> tuple[int, str]:
    foreground = _foreground(facts)
    if facts.gpu:
        total = FOREGROUND_GPU_CHIPS if foreground else GPU_CHIPS
    else:
        total = FOREGROUND_CPU_CHIPS if foreground else LINEAR_START_CPU_CHIPS if start else CPU_CHIPS
    extra = " (a rare foreground)" if foreground else " (a linear start, at its lower rate)" if start else ""
    n = int(np.clip(round(total / per_epoch), 4, _MAX_EPOCHS))
    return n, f"{total} chips in all on a {'GPU' if facts.gpu else 'CPU'}{extra}, 4-{_MAX_EPOCHS} epochs"


def _lr(batch: int, start: bool, foreground: bool) -> tuple[float, str]:
    """The peak rate: 1e-3 (3e-4 from a linear start, else 2e-3 for a rare foreground) x sqrt(batch / 16)."""
    if start:
        peak, why = LINEAR_START_LR, "3e-4 from a linear start"
    else:
        peak, why = (FOREGROUND_LR, "2e-3 for a rare foreground") if foreground else (1e-3, "1e-3")
    return round(peak * math.sqrt(batch / 16), 6), f"{why} x sqrt(batch / 16)"


def _keep(start: bool, foreground: bool) -> tuple[str, str]:
    """The last epoch's weights from a linear start or for a rare foreground, else the best epoch's."""
    if start or foreground:
        return "last", "a linear start" if start else "a rare foreground"
    return "best", "no linear start, no rare foreground"


def _members(refit: bool | None, facts: Facts) -> tuple[int, str]:
    """Three members (the others refitted on every label) where few cells are held out, else one."""
    if refit is not None:
        if not refit:
            return 1, "--no-refit: one network"
        return REFIT_MEMBERS, "--refit asks for refitted members"
    held = facts.held_units
    few = 0 < held < REFIT_UNITS
    span = f"{'' if few else 'not '}1-{REFIT_UNITS - 1}"
    return (REFIT_MEMBERS if few else 1), f"{held} held-out cells or patches ({span})"


def _refit_rule(given: int | None, members: int) -> str:
    if given is not None:
        return "--members given: its members share the split"
    return "the members after the first train on every label" if members > 1 else "one network"


def _coarse(facts: Facts) -> tuple[bool, str]:
    """Whether the pixels are 10 m or coarser (where the per-pixel rules apply), and why."""
    metres = facts.pixel_metres
    if metres is None:
        return False, "pixel size unknown"
    coarse = metres >= _COARSE_METRES
    return coarse, f"{metres:g} m pixels ({'>=' if coarse else '<'} 10 m)"


def _pixel_head(facts: Facts) -> tuple[int, str]:
    coarse, why = _coarse(facts)
    return (32 if coarse else 0), why
