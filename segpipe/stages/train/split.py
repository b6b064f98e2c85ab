"""The train/validation split: spatially disjoint, and never at the cost of a class.

The region is cut into square cells, each wholly train or wholly validation, so that
validation pixels are never the neighbours of training pixels. Four rules keep the split
from hurting the model it is meant to judge (issue 18: a fixed 256 px cell on a 300 px
scene put 50-85 % of the labels, and every pixel of a rare class, in validation):

1. **The cell follows the labels.** Unless the user fixes ``valid_cell``, the cell is the
   largest of :data:`CELL_SIZES` that cuts the labelled pixels into at least
   :data:`MIN_CELLS` occupied cells, so that one cell never holds a large share of them.
2. **Every class keeps most of its pixels for training.** After the random draw (and the
   repair that gives every class cells in both parts where it can), validation cells go
   back to training, largest share of the class first, until each class has at least
   :func:`min_train_share` of its labelled pixels in training. Moves only ever go from
   validation to training, so securing one class never undoes another.
3. **Sparse labels are held out a patch at a time.** Where the labels are separate
   patches (training polygons: many connected pieces, none holding a large share), the
   units drawn are the patches, not square cells: a cell small enough to give
   :data:`MIN_CELLS` of them cut most polygons in two, and on nc-landsat7's 33 polygons
   53-100 % of the validation pixels then lay in polygons partly in training (a U-Net
   scored 0.41 validation mIoU there and 0.15 on the test part). Patches are found on
   :data:`PATCH_GRID` px cells (coarser where the sample is thinned: :func:`patch_grid`),
   so labels closer than that are one patch, and the cells held out include a ring of one
   cell around each held-out patch (:meth:`Split.valid_cells`).
4. **A class that cannot be held out is kept for training.** A class found in a single
   cell stays wholly in training and is named in a warning: its validation score is not
   measured. Where nothing is left for validation at all (a zero fraction, or labels in
   one cell), the scheme is ``none``: networks train without validation and a random
   forest reports out-of-bag scores instead (:mod:`segpipe.stages.train.forest`).

The package records what ran (:meth:`Split.record`) under ``training.split``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segpipe.stages.train.sampling import Candidates

__all__ = [
    "CELL_SIZES", "MIN_CELLS", "Split", "choose_cell", "min_train_share", "patch_grid", "plan_split",
    "split_cells",
]

# Cell edges tried, largest first; a cell under 16 px would hold out little more than
# single pixels, which measures nothing about spatial generalisation.
CELL_SIZES = (256, 192, 128, 96, 64, 48, 32, 24, 16)
# Occupied cells wanted: with a 15 % fraction about six of them go to validation, so no
# single cell decides a class's fate.
MIN_CELLS = 40

log = logging.getLogger(__name__)
_SAID: set[str] = set()

# Sparse labels: patches are the connected pieces of the labelled PATCH_GRID px cells
# (8-neighbours); the labels count as patches when there are at least MIN_PATCHES of them
# and none holds more than MAX_PATCH_SHARE of the candidates (a dense map is one piece).
PATCH_GRID = 8
# A network samples at most 4,096 labelled pixels a block, so inside a dense map an 8 px
# cell often holds none: a 900 px dense map left 73 % of them empty and broke into 98
# "patches", each held out with an 8 px ring, next to training pixels. Where the sample is
# thinned the grid grows until a labelled cell is left empty with a chance under 1 %
# (exp(-(edge / spacing)^2) <= 0.01, spacing = sqrt(labelled pixels / sampled ones)).
_EMPTY_CELL_EDGE = float(np.sqrt(np.log(100.0)))
MIN_PATCHES = 10
MAX_PATCH_SHARE = 0.25
# Fine cells over which patches are found at most (beyond: labels spread over a huge
# region, where square cells serve).
_MAX_PATCH_CELLS = 50_000_000

SPATIAL = "spatial-cells"
PATCHES = "spatial-patches"
NONE = "none"


@dataclass(frozen=True)
class Split:
    """Which labelled candidates are held out, and how that was decided.

    Attributes:
        in_valid: One flag per candidate: True = validation.
        cell: Cell edge in pixels.
        scheme: ``spatial-cells`` (validation cells exist) or ``none`` (all for training).
        train_only: Label values kept wholly in training (not validated).
        warnings: What the user should hear about (logged and recorded).
        pixels: Per label value, the (train, validation) candidates.
        held_units: Cells (or patches) held out: few of them make which ones a seed
            draws matter (:mod:`segpipe.stages.train.adapt` adds a refit member then).
    """

    in_valid: np.ndarray
    cell: int
    scheme: str
    train_only: tuple[int, ...] = ()
    warnings: tuple[str, ...] = ()
    pixels: dict[int, tuple[int, int]] = field(default_factory=dict)
    held_units: int = 0

    def valid_cells(self, cand: Candidates) -> frozenset[tuple[int, int]]:
        """The (row, column) cells held out, as :class:`ChipSampler` takes them.

        With patches, also the cells around each held-out patch: ``cand`` is a sample of
        the labels, so a held-out polygon's edge may have labelled pixels in a cell no
        sampled pixel fell in, which would otherwise train. Those neighbours hold no
        sampled pixel of another patch (it would have joined the patch), so nothing the
        sample put in training moves.
        """
        c = self.cell
        held = self.in_valid
        cells = np.unique(np.stack([cand.y[held] // c, cand.x[held] // c], axis=1).astype(np.int64), axis=0)
        if self.scheme == PATCHES and cells.size:
            ring = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dtype=np.int64)
            cells = np.unique((cells[:, None, :] + ring[None]).reshape(-1, 2), axis=0)
            cells = cells[(cells >= 0).all(axis=1)]
        return frozenset(zip(cells[:, 0].tolist(), cells[:, 1].tolist(), strict=True))

    def assign(self, cand: Candidates, valid_cells: frozenset[tuple[int, int]]) -> np.ndarray:
        """Which of other candidates of the same labels fall in ``valid_cells`` (True = validation).

        A forest samples more labelled pixels than a network; placing them in the cells
        decided on the network's sample gives both families the same held-out cells.
        """
        c = self.cell
        keys = {y * (1 << 32) + x for y, x in valid_cells}
        own = (cand.y // c).astype(np.int64) * (1 << 32) + cand.x // c
        return np.isin(own, np.fromiter(keys, dtype=np.int64, count=len(keys)))

    def log_warnings(self) -> None:
        """Log each warning once per process (``--arch auto`` plans the same split thrice)."""
        for note in self.warnings:
            if note not in _SAID:
                _SAID.add(note)
                log.warning("%s", note)

    def record(self, fraction: float) -> dict[str, Any]:
        """The package's ``training.split`` entry."""
        return {
            "scheme": self.scheme,
            "cell": self.cell,
            "valid_fraction": fraction,
            "min_train_share": min_train_share(fraction),
            "train_only_classes": list(self.train_only),
            "held_out_units": self.held_units,
            "candidates": {str(v): {"train": t, "valid": h} for v, (t, h) in sorted(self.pixels.items())},
        }


def min_train_share(fraction: float) -> float:
    """The share of each class's labelled pixels that must stay in training.

    Twice the validation fraction may go to validation (cells are coarse, so a class's
    share cannot be exact), but never more than half.
    """
    return max(0.5, 1.0 - 2.0 * fraction)


def choose_cell(cand: Candidates, requested: int | None) -> int:
    """The cell edge: ``requested``, or the largest that gives :data:`MIN_CELLS` occupied cells."""
    if requested is not None:
        return requested
    for cell in CELL_SIZES:
        if _cell_index(cand, cell)[0] >= MIN_CELLS:
            return cell
    return CELL_SIZES[-1]


def plan_split(cand: Candidates, cell: int | None, fraction: float, seed: int) -> Split:
    """The split of the labelled candidates (see the module's rules).

    Args:
        cand: Labelled candidates (positions and label values).
        cell: Cell edge, or None to choose it from the labels (:func:`choose_cell`).
        fraction: Share of cells drawn for validation.
        seed: Seed of the draw.

    Returns:
        The split, with the warnings to show.
    """
    grid = patch_grid(cand)
    patches = _patch_index(cand, grid) if cell is None else None
    edge = grid if patches is not None else choose_cell(cand, cell)
    n_cells, inverse = patches if patches is not None else _cell_index(cand, edge)
    values, klass = np.unique(cand.value, return_inverse=True)
    counts = np.zeros((n_cells, values.size), dtype=np.int64)
    np.add.at(counts, (inverse, klass.ravel()), 1)
    is_valid = _draw(counts, fraction, seed)
    share = min_train_share(fraction)
    _secure_training(counts, is_valid, share)
    train_only = _restore_validation(counts, is_valid, share)
    in_valid = is_valid[inverse]
    scheme = (PATCHES if patches is not None else SPATIAL) if in_valid.any() else NONE
    held = counts[is_valid].sum(axis=0)
    pixels = {int(v): (int(counts[:, k].sum() - held[k]), int(held[k])) for k, v in enumerate(values)}
    only = tuple(int(values[k]) for k in train_only)
    unit = "patches of labels" if patches is not None else f"{edge} px cells"
    notes = _warnings(scheme, fraction, unit, only)
    return Split(in_valid, edge, scheme, only, notes, pixels, int(is_valid.sum()))


def _warnings(scheme: str, fraction: float, unit: str, train_only: tuple[int, ...]) -> tuple[str, ...]:
    """What the user should hear about the split."""
    notes = []
    if train_only:
        named = ", ".join(str(v) for v in train_only)
        notes.append(
            f"label value(s) {named} lie in too few {unit} to hold any out without taking "
            "most of their pixels from training: kept wholly for training, so their validation "
            "scores are not measured"
        )
    if scheme == NONE and fraction > 0:
        notes.append(
            "the labels are too few or too close together to hold any out spatially: training "
            "on all of them without validation (a random forest reports out-of-bag scores)"
        )
    return tuple(notes)


def _cell_index(cand: Candidates, cell: int) -> tuple[int, np.ndarray]:
    """The number of occupied cells and each candidate's cell index."""
    key = (cand.y // cell).astype(np.int64) * (int(cand.x.max(initial=0)) // cell + 1) + cand.x // cell
    _, inverse = np.unique(key, return_inverse=True)
    return int(inverse.max(initial=-1)) + 1, inverse.ravel()


def patch_grid(cand: Candidates) -> int:
    """Cell edge on which patches are found: :data:`PATCH_GRID`, or coarser for a thinned sample.

    The sample is thinned where the labels (``cand.counts``, all their pixels) hold more
    labelled pixels than ``cand`` has positions; unknown counts count as a full sample.
    """
    if cand.counts is None or cand.y.size == 0:
        return PATCH_GRID
    spacing = float(np.sqrt(max(int(cand.counts[1:].sum()), 1) / cand.y.size))
    cells = int(np.ceil(_EMPTY_CELL_EDGE * spacing / PATCH_GRID))
    return PATCH_GRID * max(cells, 1)


def _patch_index(cand: Candidates, grid: int) -> tuple[int, np.ndarray] | None:
    """The number of patches and each candidate's patch, when the labels are separate patches.

    None for labels that are not (a dense map is one patch) or that spread over more than
    :data:`_MAX_PATCH_CELLS` cells of ``grid`` px.
    """
    from scipy import ndimage

    if cand.y.size == 0:
        return None
    gy, gx = cand.y // grid, cand.x // grid
    y0, x0 = int(gy.min()), int(gx.min())
    shape = (int(gy.max()) - y0 + 1, int(gx.max()) - x0 + 1)
    if shape[0] * shape[1] > _MAX_PATCH_CELLS:
        return None
    occupied = np.zeros(shape, dtype=bool)
    occupied[gy - y0, gx - x0] = True
    pieces, n = ndimage.label(occupied, structure=np.ones((3, 3), dtype=bool))
    patch = pieces[gy - y0, gx - x0] - 1
    if n < MIN_PATCHES or np.bincount(patch).max() > MAX_PATCH_SHARE * cand.y.size:
        return None
    return int(n), patch.astype(np.int64)


def _draw(counts: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Cells drawn for validation, repaired so classes in two or more cells are in both parts."""
    rng = np.random.default_rng(seed)
    is_valid = np.asarray(rng.random(counts.shape[0]) < fraction)
    if fraction <= 0 or counts.shape[0] < 2:
        return np.zeros(counts.shape[0], dtype=bool)
    if not is_valid.any():  # few cells: the draw may hold none out, though one can be
        is_valid[rng.integers(counts.shape[0])] = True
    _repair(counts > 0, is_valid, rng)
    return is_valid


def _repair(present: np.ndarray, is_valid: np.ndarray, rng: np.random.Generator) -> None:
    """Give every class found in two or more cells cells in both parts, in place.

    A repair moves the cell of the class whose move strands the fewest other classes, and
    repairs repeat until nothing changes: fixing one class must not silently break another.
    """
    holding = [np.flatnonzero(present[:, k]) for k in range(present.shape[1])]

    def stranded(c: int, klass: int) -> int:
        """Classes other than ``klass`` that moving cell ``c`` would take out of its part."""
        part = is_valid[c]
        return sum(
            1
            for u in np.flatnonzero(present[c])
            if u != klass and holding[u].size >= 2 and int((is_valid[holding[u]] == part).sum()) == 1
        )

    for _ in range(4 * len(holding)):
        changed = False
        for klass, held in enumerate(holding):
            n_valid = int(is_valid[held].sum())
            if held.size < 2 or 0 < n_valid < held.size:
                continue
            cost = np.array([stranded(int(c), klass) for c in held])
            is_valid[int(rng.choice(held[cost == cost.min()]))] = n_valid == 0
            changed = True
        if not changed:
            break


def _secure_training(counts: np.ndarray, is_valid: np.ndarray, share: float) -> None:
    """Return validation cells to training until every class keeps ``share`` of its pixels there.

    Rarest classes first; the cell holding most of the class goes back first (fewest
    moves). Classes found in a single cell are kept wholly for training.
    """
    for k in np.argsort(counts.sum(axis=0), kind="stable"):
        cells = np.flatnonzero(counts[:, k])
        if cells.size < 2:
            is_valid[cells] = False
            continue
        total = counts[cells, k].sum()
        while counts[cells[~is_valid[cells]], k].sum() < share * total:
            held = cells[is_valid[cells]]
            is_valid[held[np.argmax(counts[held, k])]] = False


def _restore_validation(counts: np.ndarray, is_valid: np.ndarray, share: float) -> list[int]:
    """Hold out a small cell of each class left without validation, where every class can afford it.

    Securing training may have taken back a class's only validation cell; one of its
    smaller cells can often serve instead without taking any class in it below ``share``.

    Returns:
        The class indices still without a validation cell.
    """
    total = counts.sum(axis=0)
    unvalidated = []
    for k in range(counts.shape[1]):
        cells = np.flatnonzero(counts[:, k])
        if is_valid[cells].any():
            continue
        for c in cells[np.argsort(counts[cells, k], kind="stable")]:
            kept = counts[~is_valid].sum(axis=0) - counts[c]
            if cells.size >= 2 and np.all(kept[counts[c] > 0] >= share * total[counts[c] > 0]):
                is_valid[c] = True
                break
        else:
            unvalidated.append(k)
    return unvalidated


def split_cells(cand: Candidates, cell: int, fraction: float, seed: int) -> np.ndarray:
    """Which candidates are held out with a fixed ``cell`` (True = validation); see :func:`plan_split`."""
    return plan_split(cand, cell, fraction, seed).in_valid
