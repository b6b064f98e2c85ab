"""The ``linear`` architecture: one 1 x 1 convolution, fitted by L-BFGS on pixels, predicted per pixel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from segpipe import api
from segpipe.errors import InputError
from segpipe.io.store import NODATA_U8, open_layer, valid_mask
from segpipe.models import load_model, normalise
from segpipe.models.catalog import has_encoder, output_stride
from segpipe.stages.ingest.driver import ingest
from segpipe.stages.train import train, train_config
from segpipe.synth import synthesize

SETTINGS = {"epochs": 2, "samples_per_epoch": 16, "chip_size": 64, "batch_size": 4, "valid_cell": 64}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("linear")
    region = synthesize(root / "region", size=256, bands=4, tiles=2, seed=3)
    store = root / "r.zarr"
    # Dense labels: enough pixels for a validation split and for the solver to be judged.
    ingest([region.image], store, labels=region.truth, classes=region.classes, block_size=128)
    # An encoder named on the command line is not used by a 1 x 1 convolution, and not recorded.
    train(store, root / "model", train_config(arch="linear", encoder="vgg11_bn", **SETTINGS))
    return store, root / "model"


def test_the_package_is_one_convolution_without_encoder(trained: tuple[Path, Path]) -> None:
    _, model = trained
    data = json.loads((model / "model.json").read_text())
    assert data["arch"] == "linear" and data["encoder"] == "none"
    assert data["output_stride"] == 1 and data["options"] == {}
    # 10 m pixels would give a network a per-pixel head; a per-pixel model gets none.
    assert data["training"]["auto"]["pixel_head"] == {"value": 0, "rule": "a per-pixel model"}
    weights = load_file(str(model / "weights.safetensors"))
    n_classes = len(data["classes"])
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    assert shapes == {"weight": (n_classes, 4, 1, 1), "bias": (n_classes,)}
    assert not has_encoder("linear") and output_stride("linear") == 1
    solver = data["training"]["solver"]
    assert solver["method"].startswith("L-BFGS") and 0 < solver["iterations"] < 500
    assert solver["pixels"] > 1000 and np.isfinite(data["training"]["history"][0]["valid_miou"])


def test_prediction_is_the_per_pixel_argmax_of_the_convolution(trained: tuple[Path, Path]) -> None:
    store, model = trained
    summary = api.predict(store, model, scheduler="synchronous", force=True)
    assert summary.overlap == 0  # no context: overlapping windows would only repeat work
    net, spec = load_model(model)
    raw = np.asarray(open_layer(store, "image")[:])
    valid = valid_mask(raw, spec.nodata)
    z = normalise(raw, spec, valid).astype(np.float64)
    weight = net.weight.detach().numpy()[:, :, 0, 0].astype(np.float64)
    logits = np.einsum("kb,byx->kyx", weight, z) + net.bias.detach().numpy()[:, None, None]
    values = np.array([c.value for c in spec.classes])
    expected = np.where(valid, values[np.argmax(logits, axis=0)], NODATA_U8)
    top2 = np.sort(logits, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4  # float32 against float64: only near-ties may differ
    classes = np.asarray(open_layer(store, "classes")[:])
    assert clear.mean() > 0.99
    assert np.array_equal(classes[clear], expected[clear])
    assert len(np.unique(classes[valid])) >= 2


def test_pretrained_encoder_weights_are_refused(trained: tuple[Path, Path], tmp_path: Path) -> None:
    store, _ = trained
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    with pytest.raises(InputError, match="no encoder"):
        train(store, tmp_path / "m", train_config(arch="linear", pretrained=str(weights), **SETTINGS))


def test_the_fit_is_scikit_learns_logistic_regression_on_the_training_pixels(
    trained: tuple[Path, Path],
) -> None:
    from sklearn.linear_model import LogisticRegression

    from segpipe.stages.train.logistic import training_pixels
    from segpipe.stages.train.loop import plan_training

    store, model = trained
    plan = plan_training(store, train_config(arch="linear", **SETTINGS))
    x, y = training_pixels(plan)
    # scikit-learn's objective is C * sum(loss) + |w|^2 / 2: the same optimum when C = 1 / (n * l2).
    x = x.astype(np.float64)  # scikit-learn fits in float32 when given it: less exactly than ours
    reference = LogisticRegression(C=1.0 / (y.size * plan.cfg.weight_decay), tol=1e-10, max_iter=20000)
    reference.fit(x, y)
    net, _ = load_model(model)
    logits = x @ net.weight.detach().numpy()[:, :, 0, 0].T + net.bias.detach().numpy()
    ours = np.exp(logits - logits.max(axis=1, keepdims=True))
    ours /= ours.sum(axis=1, keepdims=True)
    assert np.abs(ours - reference.predict_proba(x)).max() < 1e-3


def test_training_pixels_stay_out_of_the_held_out_cells(trained: tuple[Path, Path]) -> None:
    from segpipe.stages.train import logistic
    from segpipe.stages.train.loop import plan_training
    from segpipe.stages.train.sampling import find_candidates

    store, _ = trained
    plan = plan_training(store, train_config(arch="linear", **SETTINGS))
    assert plan.valid_cells  # the fixture's split holds cells out
    _, y = logistic.training_pixels(plan)
    labels = open_layer(store, "labels")
    every = find_candidates(labels, plan.block_size, max_per_block=1 << 20, seed=0)
    outside = ~plan.split.assign(every, plan.valid_cells)
    # every labelled pixel outside the held-out cells (the fixture is under MAX_PIXELS), none inside
    assert y.size == int(outside.sum()) < every.y.size


def test_resume_is_refused_with_a_named_error(trained: tuple[Path, Path], tmp_path: Path) -> None:
    store, _ = trained
    with pytest.raises(InputError, match="fitted in one pass"):
        train(store, tmp_path / "m", train_config(arch="linear", **SETTINGS), resume=True)


def test_settings_of_optimiser_steps_are_named_as_unused(
    trained: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, _ = trained
    spec = train(store, tmp_path / "m", train_config(arch="linear", lr=0.5, **SETTINGS))
    (note,) = [w for w in spec.training["warnings"] if "not used by --arch linear" in w]
    assert note.startswith("epochs, samples_per_epoch, lr:") and note in caplog.text


def test_classes_are_weighted_only_when_asked(trained: tuple[Path, Path], tmp_path: Path) -> None:
    store, model = trained
    assert json.loads((model / "model.json").read_text())["training"]["solver"]["class_weights"] is None
    spec = train(store, tmp_path / "m", train_config(arch="linear", class_balancing=True, **SETTINGS))
    weights = spec.training["solver"]["class_weights"]
    assert len(weights) == len(spec.classes) and max(weights) > min(weights)
