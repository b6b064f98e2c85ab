"""Ingest computes in waves of blocks, so that no dask graph covers the whole region (issue 17)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from test_ingest import NAMES, write_tif

import segpipe.stages.ingest.driver as ingest_driver
import segpipe.waves
from segpipe.stages.ingest.driver import ingest
from segpipe.waves import block_spans

SHAPES = [(1, 1, 1), (3, 5, 2), (4, 4, 16), (4, 4, 5), (2, 7, 3), (5, 3, 1)]


@pytest.mark.parametrize(("rows", "cols", "most"), SHAPES)
def test_block_spans_cover_the_grid_once_in_waves_of_at_most_most(rows: int, cols: int, most: int) -> None:
    seen = np.zeros((rows, cols), int)
    spans = list(block_spans(rows, cols, most))
    for ys, xs in spans:
        assert (ys.stop - ys.start) * (xs.stop - xs.start) <= most
        seen[ys, xs] += 1
    assert (seen == 1).all()
    assert [(ys.start, xs.start) for ys, xs in spans] == sorted((ys.start, xs.start) for ys, xs in spans)
    assert len(spans) == -(-rows // (most // cols)) if cols <= most else rows * -(-cols // most)


def test_block_spans_refuse_an_empty_wave() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        list(block_spans(2, 2, 0))


def _region(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(7)
    image = rng.integers(1, 5000, (3, 150, 200), dtype=np.uint16)
    image[:, :10, :30] = 0  # nodata
    labels = rng.integers(0, 4, (1, 150, 200), dtype=np.uint8)
    return (write_tif(tmp_path / "image.tif", image),
            write_tif(tmp_path / "labels.tif", labels, nodata=None, names=None))


def _layers(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: group[name][...] for name in ("image", "labels", "x", "y")}


@pytest.mark.parametrize("warped", [False, True], ids=["mosaic", "warped"])
def test_ingest_in_waves_writes_what_one_wave_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warped: bool
) -> None:
    image, labels = _region(tmp_path)
    options: dict[str, Any] = {"block_size": 32, "labels": labels}
    if warped:
        options["resolution"] = 10.0  # a grid option: the warped path, counted from the written store
    ingest([image], tmp_path / "one.zarr", **options)  # 5 x 7 = 35 blocks: one wave

    sizes: list[int] = []
    compute = ingest_driver._compute

    def spy(*collections: Any) -> tuple[Any, ...]:
        sizes.append(len(collections))
        return compute(*collections)

    monkeypatch.setattr(segpipe.waves, "WAVE_BLOCKS", 2)
    monkeypatch.setattr(ingest_driver, "_compute", spy)
    info = ingest([image], tmp_path / "waves.zarr", **options)

    assert info.band_names == NAMES
    one, waves = _layers(tmp_path / "one.zarr"), _layers(tmp_path / "waves.zarr")
    for name in one:
        np.testing.assert_array_equal(waves[name], one[name], err_msg=name)
    # 5 x 7 blocks in waves of 2 (a block row of 7 does not fit): 5 x 4 image waves and as
    # many label waves of at most 2 block tasks each.
    assert len(sizes) >= 2 * 20
    assert max(sizes) <= 2
