"""benchmarks/building_shapes.py's clean-ups and scores on tiny masks (the benchmark itself is not run)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from script_support import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "building_shapes.py"


@pytest.fixture(scope="module")
def shapes() -> ModuleType:
    return load_script(SCRIPT, "building_shapes_script")


def test_iou_counts_overlap_over_union_and_is_zero_for_two_empty_masks(shapes: ModuleType) -> None:
    a = np.array([[1, 1, 0, 0]], dtype=bool)
    b = np.array([[0, 1, 1, 0]], dtype=bool)
    assert shapes.iou(a, b) == pytest.approx(1 / 3)
    assert shapes.iou(np.zeros(4, bool), np.zeros(4, bool)) == 0.0


def test_small_pieces_go_and_diagonal_neighbours_count_as_one_piece(shapes: ModuleType) -> None:
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # 2 px, joined at a corner
    mask[3:6, 3:6] = True  # 9 px
    mask[0, 5] = True  # 1 px on its own
    kept = shapes.drop_small(mask, 2)
    assert kept[0, 0] and kept[1, 1] and kept[3:6, 3:6].all()
    assert not kept[0, 5]
    assert not shapes.drop_small(mask, 10).any()


def test_a_rotated_rectangle_fills_the_notch_of_an_l_shaped_piece(shapes: ModuleType) -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:7, 1:7] = True
    mask[1:3, 5:7] = False  # a notch out of one corner
    rect = shapes.per_piece(mask, shapes.shapely.oriented_envelope)
    assert rect[1:7, 1:7].all()
    assert rect.sum() == 36
    assert not shapes.per_piece(np.zeros((4, 4), bool), shapes.shapely.convex_hull).any()


def test_score_reads_each_side_of_the_split_and_growing_restores_a_shrunk_map(shapes: ModuleType) -> None:
    reference = np.ones((20, 20), dtype=np.uint8)
    reference[4:10, 2:8] = 2  # left part
    reference[4:10, 12:18] = 2  # test part
    classes = np.ones_like(reference)
    classes[5:9, 13:17] = 2  # the test building, one pixel short on every side; none on the left
    rows = {row["variant"]: row for row in shapes.score(classes, reference, foreground=2, split_x=10)}
    assert rows["as predicted"]["test_iou"] == pytest.approx(16 / 36, abs=1e-4)
    assert rows["as predicted"]["left_iou"] == 0.0
    assert rows["grown 1 px"]["test_iou"] == pytest.approx(1.0)
    assert rows["shrunk 1 px"]["test_iou"] == pytest.approx(4 / 36, abs=1e-4)
    assert rows["rotated rectangles"]["test_iou"] == pytest.approx(16 / 36, abs=1e-4)
