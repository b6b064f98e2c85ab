"""The Markdown accuracy report and the decimated preview mosaic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segpipe.stages.evaluate.metrics import confusion_matrix, json_ready, scores
from segpipe.stages.evaluate.report import (
    assemble_preview,
    decimate,
    markdown_report,
    preview_step,
    write_report,
)


def _metrics(points: bool) -> dict:
    ref = np.array([1, 1, 1, 2, 2, 5, 5, 5], np.uint8)
    pred = np.array([1, 1, 2, 2, 0, 5, 1, 5], np.uint8)
    result = scores(confusion_matrix(pred, ref, [1, 2, 5]), [1, 2, 5], ["tree", "grass", "water"])
    metrics = {
        "prediction": "p.zarr",
        "reference": "r.tif",
        **result,
        "pixel_counts": {"grid": 100, "evaluated": 8, "labelled_without_prediction": 2},
        "assessment": {"mode": "pixels"},
    }
    if points:
        metrics["assessment"] = {
            "mode": "points",
            "sampling": "equalized",
            "requested": 10,
            "points": 8,
            "seed": 4,
            "points_file": "points.csv",
            "overall_accuracy_area_weighted": 0.8125,
            "per_stratum": [{"value": 1, "name": "tree", "pixels": 60, "points": 3}],
        }
    return json_ready(metrics)


def test_report_holds_the_scores_and_the_matrix(tmp_path: Path) -> None:
    text = write_report(tmp_path / "report.md", _metrics(False), ["confusion_matrix.png"]).read_text()
    assert "| overall accuracy | 0.625 |" in text
    assert "| pixels evaluated | 8 |" in text
    # tree: support 3, predicted 3 (two right, one from water), precision 2/3, recall 2/3
    assert "| 1 | tree | 3 | 3 | 0.667 | 0.667 | 0.667 | 0.500 |" in text
    assert "| grass | 0 | 1 | 0 | 1 |" in text  # grass row: one as grass, one "other"
    assert "| water | 1 | 0 | 2 | 0 |" in text
    assert "Every pixel of the region was compared: 8 pixels" in text
    assert "![confusion matrix](confusion_matrix.png)" in text


def test_report_of_points_names_the_design() -> None:
    text = markdown_report(_metrics(True))
    assert "**8 points** (10 requested), **equalized** random sampling, seed 4" in text
    assert "**0.812**" in text and "| 1 | tree | 60 | 3 |" in text
    assert "| points evaluated | 8 |" in text and "## Confusion matrix (points)" in text


def test_decimated_pieces_tile_the_whole_view() -> None:
    rng = np.random.default_rng(0)
    full = rng.integers(0, 255, size=(301, 517), dtype=np.uint8)
    step = 4
    pieces = []
    for y0 in range(0, 301, 96):
        for x0 in range(0, 517, 160):
            win = full[y0 : y0 + 96, x0 : x0 + 160]
            pieces.append((y0, x0, decimate(win, y0, x0, step), decimate(win, y0, x0, step), None))
    pred, ref, rgb = assemble_preview(pieces, 301, 517, step)
    np.testing.assert_array_equal(pred, full[::step, ::step])
    np.testing.assert_array_equal(ref, full[::step, ::step])
    assert rgb is None
    assert preview_step(32768, 1000) == 32 and preview_step(500, 20) == 1


def test_report_sections_are_named_pieces() -> None:
    from segpipe.stages.evaluate.report import _confusion_lines, _per_class_lines

    metrics = _metrics(False)
    per_class = _per_class_lines(metrics)
    assert per_class[0] == "## Per class" and per_class[-3:][0].startswith("| 1 | tree |")
    assert len(per_class) == 4 + 2 + 3  # title, blank, text, blank, header, alignment, one row per class
    confusion = _confusion_lines(metrics, "points")
    assert confusion[0] == "## Confusion matrix (points)"
    assert confusion[4] == "| reference \\ prediction | tree | grass | water | other |"
    assert confusion[-1] == "| water | 1 | 0 | 2 | 0 |"
    text = markdown_report(metrics)
    assert "\n".join(per_class) in text and "\n".join(_confusion_lines(metrics, "pixels")) in text
