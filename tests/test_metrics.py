"""Confusion matrix and scores: hand-computed cases and sklearn as an oracle."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, jaccard_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from segpipe.errors import InputError
from segpipe.stages.evaluate.metrics import (
    add,
    confusion_from_histogram,
    confusion_matrix,
    joint_histogram,
    json_ready,
    scores,
)

# Reference and prediction of 12 pixels, classes 1, 2, 5. Reference 0 = unlabelled,
# prediction 255 = nodata, prediction 0 and 9 = outside the classes ("other").
REF = np.array([[1, 1, 1, 1, 2, 2], [2, 5, 5, 0, 1, 2]], np.uint8)
PRED = np.array([[1, 1, 2, 0, 2, 2], [1, 5, 9, 3, 255, 5]], np.uint8)


def test_hand_computed_matrix() -> None:
    cm = confusion_matrix(PRED, REF, [1, 2, 5])
    #                         pred: 1  2  5  other
    expected = np.array([[2, 1, 0, 1],  # ref 1: (1,1) (1,1) (1,2) (1,0); (1,255) skipped
                         [1, 2, 1, 0],  # ref 2: (2,2) (2,2) (2,1) (2,5)
                         [0, 0, 1, 1]])  # ref 5: (5,5) (5,9); (0,3) skipped: unlabelled
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64


def test_hand_computed_scores() -> None:
    cm = confusion_matrix(PRED, REF, [1, 2, 5])
    s = scores(cm, [1, 2, 5], ["tree", "grass", "water"])
    assert s["pixels"] == 10 and s["correct"] == 5
    assert s["overall_accuracy"] == 0.5
    assert s["classes"] == [
        {"value": 1, "name": "tree"},
        {"value": 2, "name": "grass"},
        {"value": 5, "name": "water"},
    ]
    tree, grass, water = s["per_class"]
    assert (tree["support"], tree["predicted"], tree["true_positive"]) == (4, 3, 2)
    assert tree["precision"] == 2 / 3 and tree["recall"] == 0.5
    assert tree["f1"] == 4 / 7 and tree["iou"] == 2 / 5
    assert grass["precision"] == 2 / 3 and grass["recall"] == 0.5 and grass["iou"] == 2 / 5
    assert water["precision"] == 0.5 and water["recall"] == 0.5 and water["iou"] == 1 / 3
    assert s["miou"] == pytest.approx((2 / 5 + 2 / 5 + 1 / 3) / 3, rel=1e-15)
    # kappa by hand: po = 5/10, pe = (4*3 + 4*3 + 2*2) / 100 = 28/100
    kappa = (Fraction(5, 10) - Fraction(28, 100)) / (1 - Fraction(28, 100))
    assert s["kappa"] == float(kappa)
    assert s["confusion_matrix"] == [[2, 1, 0], [1, 2, 1], [0, 0, 1]]
    assert s["other_predictions"] == [1, 0, 1]


def test_excluded_pixels_never_count() -> None:
    ref = np.array([0, 0, 255, 7, 1, 1, 2], np.uint8)
    pred = np.array([1, 2, 1, 1, 255, 1, 255], np.uint8)
    cm = confusion_matrix(pred, ref, [1, 2])
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 0, 0]])
    s = scores(cm, [1, 2])
    assert s["pixels"] == 1 and s["overall_accuracy"] == 1.0
    assert math.isnan(s["per_class"][1]["recall"]) and math.isnan(s["per_class"][1]["iou"])
    assert s["miou"] == 1.0  # class 2 is in neither raster: no IoU, not averaged as 0
    assert s["per_class"][1]["name"] == "class 2"


def test_other_predictions_lower_accuracy_but_give_no_false_positive() -> None:
    ref = np.array([1, 1, 1, 1, 2, 2], np.uint8)
    pred = np.array([1, 1, 0, 3, 2, 2], np.uint8)
    s = scores(confusion_matrix(pred, ref, [1, 2]), [1, 2])
    assert s["overall_accuracy"] == 4 / 6
    assert s["per_class"][0]["recall"] == 0.5 and s["per_class"][0]["precision"] == 1.0
    assert s["per_class"][1]["precision"] == 1.0 and s["per_class"][1]["iou"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = [1, 3, 4, 9]
    ref = rng.choice(np.array([0, 1, 3, 4, 9], np.uint8), size=(97, 131))
    # a biased classifier: right 60% of the time, else a random class
    pred = np.where(rng.random(ref.shape) < 0.6, ref, rng.choice(np.array(values, np.uint8), size=ref.shape))
    pred = np.where(ref == 0, rng.choice(np.array(values, np.uint8), size=ref.shape), pred).astype(np.uint8)
    cm = confusion_matrix(pred, ref, values)
    keep = ref != 0
    y_true, y_pred = ref[keep], pred[keep]
    np.testing.assert_array_equal(cm[:, :4], sk_confusion_matrix(y_true, y_pred, labels=values))
    assert cm[:, 4].sum() == 0
    s = scores(cm, values)
    assert s["kappa"] == pytest.approx(cohen_kappa_score(y_true, y_pred, labels=values), rel=1e-12, abs=0)
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=values, zero_division=np.nan)
    iou = jaccard_score(y_true, y_pred, labels=values, average=None)
    for i, cls in enumerate(s["per_class"]):
        assert cls["support"] == support[i]
        assert cls["precision"] == pytest.approx(p[i], rel=1e-14)
        assert cls["recall"] == pytest.approx(r[i], rel=1e-14)
        assert cls["f1"] == pytest.approx(f[i], rel=1e-14)
        assert cls["iou"] == pytest.approx(iou[i], rel=1e-14)
    assert s["overall_accuracy"] == np.count_nonzero(y_true == y_pred) / y_true.size


def test_kappa_with_other_column_matches_sklearn() -> None:
    rng = np.random.default_rng(5)
    ref = rng.choice(np.array([1, 2, 3], np.uint8), size=5000)
    pred = np.where(rng.random(5000) < 0.7, ref, rng.choice(np.array([1, 2, 3, 0, 200], np.uint8), size=5000))
    s = scores(confusion_matrix(pred, ref, [1, 2, 3]), [1, 2, 3])
    other = np.where(np.isin(pred, [1, 2, 3]), pred, 99)  # one "other" label for sklearn
    assert s["kappa"] == pytest.approx(cohen_kappa_score(ref, other, labels=[1, 2, 3, 99]), rel=1e-12)
    assert s["overall_accuracy"] == np.count_nonzero(ref == pred) / 5000


def test_blockwise_accumulation_equals_whole() -> None:
    rng = np.random.default_rng(11)
    ref = rng.integers(0, 6, size=(300, 257), dtype=np.uint8)
    pred = rng.integers(0, 7, size=(300, 257), dtype=np.uint8)
    pred[rng.random(pred.shape) < 0.1] = 255
    values = [1, 2, 3, 4, 5]
    total = np.zeros((5, 6), np.int64)
    hist = np.zeros((256, 256), np.int64)
    for y in range(0, 300, 64):
        for x in range(0, 257, 100):
            add(total, pred[y : y + 64, x : x + 100], ref[y : y + 64, x : x + 100], values)
            hist += joint_histogram(pred[y : y + 64, x : x + 100], ref[y : y + 64, x : x + 100])
    whole = confusion_matrix(pred, ref, values)
    np.testing.assert_array_equal(total, whole)
    np.testing.assert_array_equal(confusion_from_histogram(hist, values), whole)
    assert hist.sum() == pred.size
    with pytest.raises(InputError):
        add(np.zeros((4, 5), np.int64), pred, ref, values)


def test_wide_integer_inputs() -> None:
    ref = np.array([1, 2, 300, -1, 2], np.int32)
    pred = np.array([1, 500, 1, 1, -4], np.int32)
    # 300 and -1 in the reference are no labels; 500 and -4 predicted are "other"
    np.testing.assert_array_equal(confusion_matrix(pred, ref, [1, 2]), [[1, 0, 0], [0, 0, 2]])


def test_bad_inputs() -> None:
    with pytest.raises(InputError, match="shape"):
        confusion_matrix(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8), [1])
    with pytest.raises(InputError, match="integers"):
        confusion_matrix(np.zeros(3, np.float32), np.zeros(3, np.uint8), [1])
    with pytest.raises(InputError, match="out of range"):
        confusion_matrix(np.zeros(3, np.uint8), np.zeros(3, np.uint8), [0, 1])
    with pytest.raises(InputError, match="repeat"):
        confusion_matrix(np.zeros(3, np.uint8), np.zeros(3, np.uint8), [1, 1])
    with pytest.raises(InputError, match="does not fit"):
        scores(np.zeros((2, 2), np.int64), [1, 2, 3])


def test_large_counts_stay_exact() -> None:
    # counts near 2**40 would overflow int64 in N**2; Python ints keep kappa exact
    cm = np.array([[2**40, 3], [5, 2**40 + 7]], np.int64)
    s = scores(cm, [1, 2])
    n, correct = 2**41 + 15, 2**41 + 7
    chance = (2**40 + 3) * (2**40 + 5) + (2**40 + 12) * (2**40 + 10)
    assert s["kappa"] == float(Fraction(n * correct - chance, n * n - chance))
    assert s["pixels"] == n


def test_empty_matrix_gives_nan_and_json_null() -> None:
    s = scores(np.zeros((2, 3), np.int64), [1, 2])
    assert math.isnan(s["overall_accuracy"]) and math.isnan(s["kappa"]) and math.isnan(s["miou"])
    text = json.dumps(json_ready(s), allow_nan=False)
    back = json.loads(text)
    assert back["overall_accuracy"] is None and back["per_class"][0]["f1"] is None
    assert json_ready({"a": np.int64(3), "b": np.array([1.5, np.inf])}) == {"a": 3, "b": [1.5, None]}


def test_evaluable_pixels_and_per_class_counts() -> None:
    from segpipe.stages.evaluate.metrics import _per_class, evaluable

    mask = evaluable(PRED, REF)
    expected = (REF >= 1) & (REF <= 254) & (PRED != 255)
    np.testing.assert_array_equal(mask, expected)
    assert int(mask.sum()) == 10  # one unlabelled, one nodata of 12
    rows = _per_class([[2, 1, 0, 1], [1, 2, 1, 0], [0, 0, 1, 1]], [1, 2, 5], ["a", "b", "c"])
    assert [r["support"] for r in rows] == [4, 4, 2]  # "other" counts in the support
    assert [r["predicted"] for r in rows] == [3, 3, 2]
    assert rows[0]["iou"] == 2 / 5 and rows[2]["precision"] == 0.5 and rows[1]["f1"] == 4 / 7
