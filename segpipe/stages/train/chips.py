"""Export training chips as GeoTIFFs, for training in other tools.

Like ArcGIS's "Export Training Data For Deep Learning": ``image_XXXX.tif`` (all
bands, the store's dtype and nodata) and ``label_XXXX.tif`` (uint8 class values,
0 = unlabelled) with the store's CRS and each chip's own transform, plus
``index.csv`` (one row per chip) and ``dataset.json`` (bands, classes, settings).
Chips are drawn by the same :class:`CentreSampler` and :class:`ChipSampler` as
training, so exported chips are the chips segpipe itself would train on.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from segpipe.errors import InputError, StoreError
from segpipe.io.store import RegionInfo, open_layer, read_region_info
from segpipe.io.swap import staged_folder
from segpipe.stages.train.sampling import Candidates, CentreSampler, ChipSampler, find_candidates
from segpipe.types import classes_to_json

__all__ = ["ChipExport", "export_chips"]

INDEX_FILE = "index.csv"
DATASET_FILE = "dataset.json"
_CHIP_FILE = re.compile(r"(image|label)_\d+\.tif")


@dataclass(frozen=True)
class ChipExport:
    """What :func:`export_chips` wrote.

    Attributes:
        out: Output folder.
        count: Chips written.
        index: The ``index.csv`` path.
    """

    out: Path
    count: int
    index: Path


def _write_tiff(
    path: Path, data: np.ndarray, transform: Affine, crs: object, nodata: float | None, names: tuple[str, ...]
) -> None:
    import rasterio

    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=data.shape[1],
        width=data.shape[2],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
    ) as dst:
        dst.write(data)
        dst.descriptions = names


def export_chips(
    store: str | Path,
    out: str | Path,
    chip_size: int = 256,
    count: int = 100,
    seed: int = 0,
    balanced: bool = False,
) -> ChipExport:
    """Write ``count`` image/label chip pairs centred on labelled pixels.

    Args:
        store: Region store with ``image`` and ``labels``.
        out: Folder to write, replaced whole once every chip is written (files in it that
            export-chips does not write are kept).
        chip_size: Chip edge in pixels (at most the region's smaller edge).
        count: Number of chips.
        seed: Seed of the draw (same seed, same chips).
        balanced: Centre chips on each class equally often.

    Returns:
        What was written.

    Raises:
        StoreError: The store has no labels.
        LabelsError: No labelled pixel.
        InputError: Bad chip size or count.
    """
    from rasterio.crs import CRS

    info = read_region_info(store)
    _check_request(info, chip_size, count)
    cand, sampler = _chip_source(store, info, chip_size, seed)
    rng = np.random.default_rng(seed)
    picks = CentreSampler(cand, balanced).draw(rng, count)
    crs = CRS.from_wkt(info.crs_wkt) if info.crs_wkt else None
    width = max(4, len(str(count - 1)))
    # Written beside ``out`` and swapped in whole: a kill leaves the earlier chips or the
    # new ones, never a mix, and no chip of an earlier, larger export stays beside the index.
    with staged_folder(out, _owned, "chip folder") as folder:
        rows = []
        for n, i in enumerate(picks):
            y0, x0 = sampler.window_for(int(cand.y[i]), int(cand.x[i]), rng)
            chip = _Chip(f"{n:0{width}d}", y0, x0, int(cand.value[i]))
            rows.append(_write_chip(folder, chip, sampler, info, crs))
        _write_index(folder, rows)
        settings = {"chip_size": chip_size, "count": count, "seed": seed, "balanced": balanced}
        (folder / "dataset.json").write_text(json.dumps(_dataset(store, info, settings), indent=2) + "\n")
    return ChipExport(Path(out), count, Path(out) / INDEX_FILE)


def _owned(name: str) -> bool:
    """Whether ``name`` is a file export-chips writes (an earlier export's is never kept)."""
    return name in (INDEX_FILE, DATASET_FILE) or _CHIP_FILE.fullmatch(name) is not None


def _check_request(info: RegionInfo, chip_size: int, count: int) -> None:
    """Refuse a count below one or a chip that does not fit the region."""
    if count < 1:
        raise InputError(f"--count must be at least 1, not {count}")
    if chip_size < 1:
        raise InputError(f"--chip-size must be a positive number of pixels, not {chip_size}")
    if chip_size > min(info.height, info.width):
        raise InputError(
            f"--chip-size {chip_size} does not fit the {info.height} x {info.width} px region: "
            f"use at most {min(info.height, info.width)}"
        )


def _chip_source(
    store: str | Path, info: RegionInfo, chip_size: int, seed: int
) -> tuple[Candidates, ChipSampler]:
    """The labelled positions and the sampler reading chips around them, as training draws them.

    Raises:
        StoreError: The store has no labels.
    """
    try:
        labels = open_layer(store, "labels")
    except StoreError as exc:
        raise StoreError(f"region store {store} has no labels: ingest it with --labels") from exc
    cand = find_candidates(labels, info.block_size, seed=seed)
    # Label values pass through unchanged: exported chips keep the store's class values.
    identity = np.arange(256, dtype=np.uint8)
    sampler = ChipSampler(
        open_layer(store, "image"), labels, info.block_size, chip_size, identity, chip_size, set(), "train"
    )
    return cand, sampler


@dataclass(frozen=True)
class _Chip:
    """One chip to write: its name, top-left pixel and the class at its centre."""

    name: str
    row: int
    col: int
    centre_class: int


def _write_chip(
    folder: Path, chip: _Chip, sampler: ChipSampler, info: RegionInfo, crs: object
) -> dict[str, object]:
    """Write the chip's image and label GeoTIFFs; its row of ``index.csv``."""
    image, lab = sampler.read(chip.row, chip.col)
    transform = info.affine * Affine.translation(chip.col, chip.row)
    _write_tiff(folder / f"image_{chip.name}.tif", image, transform, crs, info.nodata, info.band_names)
    _write_tiff(folder / f"label_{chip.name}.tif", lab[None], transform, crs, 0, ("label",))
    left, top = transform * (0, 0)
    right, bottom = transform * (lab.shape[-1], lab.shape[-2])
    return {
        "id": chip.name,
        "image": f"image_{chip.name}.tif",
        "label": f"label_{chip.name}.tif",
        "row": chip.row,
        "col": chip.col,
        "centre_class": chip.centre_class,
        "xmin": min(left, right),
        "ymin": min(top, bottom),
        "xmax": max(left, right),
        "ymax": max(top, bottom),
    }


def _write_index(folder: Path, rows: list[dict[str, object]]) -> Path:
    """``index.csv``: one row per chip."""
    index = folder / INDEX_FILE
    with index.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return index


def _dataset(store: str | Path, info: RegionInfo, settings: Mapping[str, object]) -> dict[str, object]:
    """``dataset.json``: the bands, classes and grid of the store, and the export's settings."""
    return {
        "kind": "segpipe-chips",
        "store": str(store),
        **settings,
        "band_names": list(info.band_names),
        "dtype": info.dtype,
        "nodata": info.nodata,
        "crs_wkt": info.crs_wkt,
        "classes": classes_to_json(info.classes),
        "label_nodata": 0,
    }
