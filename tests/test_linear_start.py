"""``linear_start``: a network that starts as the per-pixel logistic regression and learns the rest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from segpipe import api
from segpipe.io.store import open_layer
from segpipe.models import build_network, load_model
from segpipe.models.networks import LinearPath, PixelHead
from segpipe.stages.ingest.driver import ingest
from segpipe.stages.train import train, train_config
from segpipe.stages.train.loop import plan_training
from segpipe.synth import synthesize

SETTINGS = {
    "members": 1, "epochs": 1, "samples_per_epoch": 8, "chip_size": 64, "batch_size": 4, "valid_cell": 64,
    "seed": 2,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("linear_start")
    region = synthesize(root / "region", size=256, bands=4, tiles=2, seed=3)
    ingest([region.image], root / "r.zarr", labels=region.truth, classes=region.classes, block_size=128)
    return root / "r.zarr"


def test_the_network_starts_as_the_fitted_logistic_regression(store: Path, tmp_path: Path) -> None:
    plan = plan_training(store, train_config(linear_start=True, pixel_head=8, **SETTINGS))
    assert plan.spec.options == {"pixel_head": 8, "linear_path": True}
    net = build_network("unet", "resnet18", 4, len(plan.spec.classes), plan.spec.options)
    assert isinstance(net, LinearPath) and isinstance(net.network, PixelHead)
    net.load_state_dict(plan.initial)
    net.eval()
    x = torch.randn(2, 4, 64, 64)
    with torch.inference_mode():
        # Every other logit path starts at zero: the first output is the regression's alone.
        assert torch.count_nonzero(net.network(x)) == 0
        assert torch.equal(net(x), net.linear(x))
    # The regression is the one --arch linear fits on the same split and pixels.
    train(store, tmp_path / "linear", train_config(arch="linear", **SETTINGS))
    fitted = load_file(str(tmp_path / "linear" / "weights.safetensors"))
    np.testing.assert_allclose(net.linear.weight.detach().numpy(), fitted["weight"].numpy(), atol=1e-5)
    np.testing.assert_allclose(net.linear.bias.detach().numpy(), fitted["bias"].numpy(), atol=1e-5)
    assert torch.count_nonzero(net.linear.weight) > 0


def test_a_linear_start_package_trains_and_predicts(store: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    train(store, model, train_config(linear_start=True, pixel_head=0, **SETTINGS))
    data = json.loads((model / "model.json").read_text())
    assert data["options"] == {"linear_path": True}
    assert data["training"]["config"]["linear_start"] is True
    net, _ = load_model(model)
    assert isinstance(net, LinearPath)
    # Training moved the zeroed output layer: the network adds to the regression.
    assert torch.count_nonzero(net.network.segmentation_head[0].weight) > 0
    api.predict(store, model, scheduler="synchronous", force=True)
    classes = np.asarray(open_layer(store, "classes")[:])
    assert len(np.unique(classes)) >= 2


def test_models_without_an_encoder_ignore_it(store: Path, tmp_path: Path) -> None:
    train(store, tmp_path / "linear", train_config(arch="linear", linear_start=True, **SETTINGS))
    data = json.loads((tmp_path / "linear" / "model.json").read_text())
    assert data["options"] == {}
    assert any("linear_start" in w for w in data["training"]["warnings"])
    with pytest.raises(ValueError, match="linear_start"):
        train_config(arch="random_forest", linear_start=True)


def test_the_setting_left_at_its_default_keeps_older_checkpoints_resumable() -> None:
    assert "linear_start" not in train_config().resume_key()
    assert '"linear_start":true' in train_config(linear_start=True).resume_key()
