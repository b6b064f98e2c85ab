"""benchmarks/accuracy.py's arithmetic and bookkeeping on tiny arrays (the benchmark itself is not run)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from script_support import load_script

from segpipe.stages.evaluate.metrics import confusion_matrix, scores

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"


@pytest.fixture(scope="module")
def acc() -> ModuleType:
    return load_script(SCRIPT, "accuracy_script")


CLASSES = ((1, "a", "#000000"), (2, "b", "#111111"), (3, "c", "#222222"))


def test_scores_count_only_labelled_pixels_and_classes_the_reference_holds(acc: ModuleType) -> None:
    ref = np.array([[0, 1, 1, 2], [2, 2, 0, 1]], dtype=np.uint8)
    pred = np.array([[3, 1, 2, 2], [2, 3, 3, 1]], dtype=np.uint8)
    miou, ious, accuracy = acc.scores_from_counts(acc.counts(pred, ref, CLASSES))
    # class 1: 3 reference px, 2 hit, predicted 2 -> 2 / 3; class 2: 3 px, 2 hit, predicted 3 -> 2 / 4;
    # class 3 is only predicted (2 labelled px): an error in 1 and 2's rows, with no IoU of its own
    assert ious == pytest.approx({"a": 2 / 3, "b": 2 / 4})
    assert miou == pytest.approx((2 / 3 + 2 / 4) / 2)
    assert accuracy == pytest.approx(4 / 6)


def test_scores_agree_with_segpipe_when_every_class_is_in_the_reference(acc: ModuleType) -> None:
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 4, size=(40, 50), dtype=np.uint8)
    pred = np.where(rng.random((40, 50)) < 0.7, ref, rng.integers(1, 4, size=(40, 50))).astype(np.uint8)
    pred[ref == 0] = rng.integers(1, 4, size=int((ref == 0).sum()))
    mine = acc.scores_from_counts(acc.counts(pred, ref, CLASSES))
    theirs = scores(confusion_matrix(pred, ref, [1, 2, 3]), [1, 2, 3], ["a", "b", "c"])
    assert mine[0] == pytest.approx(theirs["miou"])
    assert mine[1] == pytest.approx({c["name"]: c["iou"] for c in theirs["per_class"]})
    assert mine[2] == pytest.approx(theirs["overall_accuracy"])


def row(dataset: str, config: str, seed: int, miou: float, **extra: Any) -> dict[str, Any]:
    base = {
        "dataset": dataset,
        "config": config,
        "seed": seed,
        "status": "ok",
        "test_miou": miou,
        "overall_accuracy": 0.9,
        "train_cpu_s": 10.0 * (seed + 1),
        "train_wall_s": 5.0,
        "commit": "abc",
    }
    return base | extra


def test_table_gives_mean_range_foreground_and_failures(acc: ModuleType) -> None:
    rows = [
        row("spacenet4-atlanta", "default", 0, 0.5, test_iou={"background": 0.9, "building": 0.1}),
        row("spacenet4-atlanta", "default", 1, 0.7, test_iou={"background": 0.9, "building": 0.5}),
        {"dataset": "spacenet4-atlanta", "config": "auto", "seed": 0, "status": "failed", "commit": "abc"},
        row("s2-brandenburg", "forest", 0, 0.25, test_iou={}),
    ]
    lines = acc.table(rows).splitlines()
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| spacenet4-atlanta | default | 0,1 | 0.600 | 0.500-0.700 | building 0.300 |")
    assert "| 15 |" in lines[2]  # mean CPU s per seed
    assert lines[3].startswith("| spacenet4-atlanta | auto | 0 | failed |")
    assert lines[4].startswith("| s2-brandenburg | forest | 0 | 0.250 | 0.250-0.250 | - |")


def test_section_replaces_only_the_marked_part(acc: ModuleType, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nkept text\n")
    acc.write_section(f"{acc.START}\nfirst\n{acc.END}", doc)
    assert doc.read_text() == f"# Benchmarks\n\nkept text\n\n{acc.START}\nfirst\n{acc.END}\n"
    doc.write_text(doc.read_text() + "\n## Later section\n")
    acc.write_section(f"{acc.START}\nsecond\n{acc.END}", doc)
    text = doc.read_text()
    assert "first" not in text and "second" in text
    assert text.startswith("# Benchmarks\n\nkept text\n") and text.endswith("## Later section\n")


def test_results_keep_other_runs_unless_fresh(acc: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "accuracy.json"
    old = [row("s2-brandenburg", "forest", 0, 0.2), row("spacenet4-atlanta", "default", 0, 0.4)]
    path.write_text(json.dumps({"runs": old}))
    new = [row("spacenet4-atlanta", "default", 0, 0.6), row("spacenet4-atlanta", "sklearn_rf", 0, 0.3)]
    merged = acc.merge_rows(new, path, fresh=False)
    # table order: data sets as listed in DATASETS, the baseline after the configs
    assert [(r["dataset"], r["config"], r["test_miou"]) for r in merged] == [
        ("spacenet4-atlanta", "default", 0.6),
        ("spacenet4-atlanta", "sklearn_rf", 0.3),
        ("s2-brandenburg", "forest", 0.2),
    ]
    assert len(acc.merge_rows(new, path, fresh=True)) == 2


def test_split_parts_partition_the_labels(acc: ModuleType, tmp_path: Path) -> None:
    labels = np.arange(1, 61, dtype=np.uint8).reshape(6, 10)
    src = tmp_path / "labels.tif"
    profile = {
        "driver": "GTiff",
        "width": 10,
        "height": 6,
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": from_origin(0, 60, 10, 10),
    }
    with rasterio.open(src, "w", **profile) as ds:
        ds.write(labels, 1)
    train = acc.masked_copy(src, tmp_path / "train.tif", 6, "train")
    test = acc.masked_copy(src, tmp_path / "test.tif", 6, "test")
    assert (train[:, 6:] == 0).all() and (test[:, :6] == 0).all()
    np.testing.assert_array_equal(train + test, labels)
    with rasterio.open(tmp_path / "test.tif") as ds:
        assert ds.nodata == 0
        np.testing.assert_array_equal(ds.read(1), test)


def test_every_data_set_has_its_readme_split(acc: ModuleType) -> None:
    splits = {name: acc.split_x(acc.DATA / ds.folder) for name, ds in acc.DATASETS.items()}
    assert splits["nc-landsat7-dense"] == splits["nc-landsat7-polygons"] == 293
    assert splits["spacenet4-atlanta"] == 540 and splits["s2-brandenburg"] == 461


def candidate(seed: int, name: str, valid: float, test: float) -> dict[str, Any]:
    return row("nc-landsat7-dense", f"auto/{name}", seed, test, valid_miou=valid, test_iou={})


def test_selection_rules_pick_from_validation_and_score_on_test(acc: ModuleType) -> None:
    rows = [
        # seed 0: the forest wins validation by 0.01 but the network wins the test part
        candidate(0, "random_forest", 0.30, 0.22), candidate(0, "unet", 0.29, 0.26),
        candidate(0, "ensemble", 0.295, 0.25),
        # seed 1: the network is clearly better on both
        candidate(1, "random_forest", 0.20, 0.21), candidate(1, "unet", 0.35, 0.28),
        candidate(1, "ensemble", 0.32, 0.27),
        # seed 2 lacks its ensemble: left out of every rule
        candidate(2, "random_forest", 0.2, 0.2), candidate(2, "unet", 0.3, 0.3),
    ]
    lines = {line.split(" | ")[3]: line for line in acc.rules_summary(rows).splitlines()[2:]}
    assert all(line.startswith("| nc-landsat7-dense | predict's default | ") for line in lines.values())
    assert "| 0,1 |" in lines["always the forest"] and "| 0.215 | 0.210-0.220 |" in lines["always the forest"]
    assert "| 0.270 | 0.260-0.280 |" in lines["always the network"]
    assert "| 0.260 | 0.250-0.270 |" in lines["always the ensemble"]
    # the earlier rule keeps the forest on seed 0 (0.22) and the network on seed 1 (0.28)
    assert "| 0.250 | 0.220-0.280 |" in lines["best single; ensemble if +0.01 (auto's earlier rule)"]
    # auto's rule (the hedge) keeps the ensemble on seed 0 (within 0.02) and the network on seed 1 (+0.03)
    assert "| 0.265 | 0.250-0.280 |" in lines["ensemble unless a single is +0.02 (auto)"]


def test_auto_is_compared_with_the_better_of_forest_and_network(acc: ModuleType) -> None:
    rows = [
        row("s2-brandenburg", "default", 0, 0.24), row("s2-brandenburg", "default", 1, 0.22),
        row("s2-brandenburg", "forest", 0, 0.29), row("s2-brandenburg", "forest", 1, 0.28),
        row("s2-brandenburg", "auto", 0, 0.28), row("s2-brandenburg", "auto", 1, 0.29),
    ]
    (line,) = acc.auto_summary(rows).splitlines()[2:]
    assert line == (
        "| s2-brandenburg | predict's default | 0,1 | 0.285 | 0.280-0.290 | 0.285 | 0.230 | +0.000 | -0.010 |"
    )
    # auto and the network predicted once a window are compared with each other, not with the default's
    once = [{**r, "config": {"auto": "auto_one_view", "default": "one_view"}.get(r["config"], r["config"])}
            for r in rows]
    (line,) = acc.auto_summary(once).splitlines()[2:]
    assert line.startswith("| s2-brandenburg | `--no-tta` | 0,1 | 0.285 |")
