"""Done markers are read from the chunk keys a store lists, not chunk by chunk (issue 17)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from segpipe.io.store import marked_cells

SHAPE = (13, 17)


def _markers(group: zarr.Group, name: str, chunks: tuple[int, int] = (1, 1)) -> tuple[zarr.Array, np.ndarray]:
    arr = group.create_array(name, shape=SHAPE, chunks=chunks, dtype="uint8", fill_value=0)
    want = np.random.default_rng(3).random(SHAPE) < 0.3
    want[-1, -1] = True  # the last cell: off-by-one in the key parsing shows here
    for y, x in zip(*np.nonzero(want), strict=True):
        arr[y, x] = 1  # as workers mark blocks: one cell at a time
    return arr, want


@pytest.mark.parametrize("name", ["progress_predict", "_predict/progress_predict"])
def test_markers_of_a_local_store_come_from_the_listing(tmp_path: Path, name: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _, want = _markers(zarr.open_group(tmp_path / "s.zarr", mode="w"), name)
    reopened = zarr.open_group(tmp_path / "s.zarr", mode="r")[name]

    def no_reads(*args: object, **kwargs: object) -> None:
        raise AssertionError("a chunk was read")

    monkeypatch.setattr(zarr.Array, "__getitem__", no_reads)
    np.testing.assert_array_equal(marked_cells(reopened), want)


def test_an_empty_marker_array_is_all_unset(tmp_path: Path) -> None:
    arr = zarr.open_group(tmp_path / "s.zarr", mode="w").create_array(
        "p", shape=SHAPE, chunks=(1, 1), dtype="uint8", fill_value=0)
    assert not marked_cells(arr).any() and marked_cells(arr).shape == SHAPE


@pytest.mark.parametrize("where", ["memory", "larger chunks"])
def test_other_layouts_are_read_cell_by_cell(tmp_path: Path, where: str) -> None:
    place = zarr.storage.MemoryStore() if where == "memory" else tmp_path / "s.zarr"
    group = zarr.open_group(place, mode="w")
    arr, want = _markers(group, "p", (1, 1) if where == "memory" else (4, 4))
    np.testing.assert_array_equal(marked_cells(arr), want)
