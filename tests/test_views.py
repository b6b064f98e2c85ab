"""Test-time augmentation left to segpipe: a network on a small region only (segpipe.stages.predict.views)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from predict_support import CLASSES, make_store
from typer.testing import CliRunner

from segpipe.cli import app
from segpipe.io.store import open_layer
from segpipe.models import ModelSpec
from segpipe.stages.predict.driver import check_predict_inputs, edge_margin, predict, window_settings
from segpipe.stages.predict.views import TTA_AUTO_PIXELS, choose_tta, per_pixel

UNET = ModelSpec("unet", "resnet18", ("b1", "b2", "b3"), (700.0,) * 3, (300.0,) * 3, CLASSES, 64)
FOREST = dataclasses.replace(UNET, arch="random_forest", encoder="none")
LINEAR = dataclasses.replace(UNET, arch="linear", encoder="none")


def _ensemble(*archs: str) -> ModelSpec:
    members = [{"arch": a, "encoder": "resnet18", "options": {}, "weight": 1.0} for a in archs]
    return dataclasses.replace(UNET, arch="ensemble", encoder="+".join(archs), options={"members": members})


def test_a_network_averages_views_up_to_the_bound_and_not_beyond() -> None:
    edge = int(TTA_AUTO_PIXELS**0.5)
    on, why = choose_tta(None, UNET, edge, edge)
    assert on and "within" in why
    off, why = choose_tta(None, UNET, edge, edge + 1)
    assert not off and "over" in why
    assert choose_tta(None, UNET, 300, 300)[0]


@pytest.mark.parametrize("spec", [FOREST, LINEAR, _ensemble("random_forest", "linear")])
def test_a_per_pixel_model_never_averages_views_unless_asked(spec: ModelSpec) -> None:
    assert per_pixel(spec)
    on, why = choose_tta(None, spec, 300, 300)
    assert not on and "per-pixel" in why
    assert choose_tta(True, spec, 300, 300) == (True, "as asked")


def test_an_ensemble_with_a_network_averages_views() -> None:
    spec = _ensemble("random_forest", "unet")
    assert not per_pixel(spec)
    assert choose_tta(None, spec, 500, 500)[0]


def test_the_users_choice_wins_either_way() -> None:
    assert choose_tta(False, UNET, 100, 100) == (False, "as asked")
    assert choose_tta(True, UNET, 100_000, 100_000) == (True, "as asked")


def test_predict_says_it_averaged_views_and_keys_the_result_by_it(tmp_path: Path, model_dir: Path) -> None:
    """The CLI's default averages a network's views on a small store; --no-tta is another result."""
    store = make_store(tmp_path / "s.zarr", block=128)
    runner = CliRunner()
    base = ["predict", str(store), "--model", str(model_dir), "--scheduler", "synchronous"]
    first = runner.invoke(app, base)
    assert first.exit_code == 0, first.output
    assert "8 views a window" in first.output
    assert open_layer(str(store), "classes").attrs["tta"] is True
    second = runner.invoke(app, [*base, "--no-tta"])
    assert second.exit_code == 0, second.output
    assert "views" not in second.output and "(0 already done)" in second.output  # a new key: all again
    assert open_layer(str(store), "classes").attrs["tta"] is False


def test_the_decision_is_logged_once_by_the_run_not_by_each_check(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The flow checks its inputs before it predicts: only the run says what it decided."""
    store = make_store(tmp_path / "s.zarr", block=128)
    caplog.set_level(logging.INFO, logger="segpipe.stages.predict.driver")
    inputs = check_predict_inputs(store, model_dir)
    assert inputs.key["tta"] is True and "within" in inputs.views_why
    assert not [r for r in caplog.records if "test-time augmentation" in r.getMessage()]
    predict(store, model_dir, scheduler="synchronous")
    said = [r.getMessage() for r in caplog.records if "test-time augmentation" in r.getMessage()]
    assert said == [f"test-time augmentation on, 8 views a window ({inputs.views_why})"]


def test_an_ensemble_of_per_pixel_models_overlaps_like_its_widest_forest_not_like_a_network() -> None:
    members = [
        {"arch": "random_forest", "encoder": "none", "options": {"context": 5}, "weight": 1.0},
        {"arch": "linear", "encoder": "none", "options": {}, "weight": 1.0},
    ]
    spec = dataclasses.replace(UNET, arch="ensemble", encoder="random_forest+linear",
                               options={"members": members})
    tile, overlap = window_settings(spec, None, None)
    assert overlap == 8 and edge_margin(spec, overlap) == 0  # 4 * (5 // 2): the forest's context
    network = _ensemble("random_forest", "unet")
    tile, overlap = window_settings(network, None, None)
    assert overlap == tile // 4 and edge_margin(network, overlap) == overlap // 2
