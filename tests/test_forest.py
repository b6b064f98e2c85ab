"""The random-forest baseline in the network pipeline: same package, same predict, same metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from distributed import Client
from predict_support import CLASSES, make_store
from sklearn.ensemble import RandomForestClassifier
from typer.testing import CliRunner

from segpipe.cli import app
from segpipe.errors import BandMismatchError, InputError
from segpipe.io.store import open_layer
from segpipe.models import ModelSpec, build_network, load_model, normalise, output_stride, save_model
from segpipe.models.forest import ForestNet, context_features, from_sklearn
from segpipe.stages.evaluate.assess import evaluate
from segpipe.stages.ingest.driver import ingest
from segpipe.stages.predict.driver import predict, window_settings
from segpipe.stages.train import train, train_config
from segpipe.stages.train.forest import forest_features
from segpipe.synth import synthesize

FOREST = {"arch": "random_forest", "trees": 8, "valid_cell": 64, "threads": 1}


def _grid_data(rng: np.random.Generator, n: int, bands: int) -> np.ndarray:
    # Few distinct values: many test pixels sit exactly on a training value, right
    # beside a split threshold, where float32 rounding of thresholds would show.
    return (rng.integers(0, 40, (n, bands)) / 7.0).astype(np.float32)


@pytest.mark.parametrize("class_weight", [None, "balanced_subsample"])
def test_forest_net_reproduces_predict_proba_and_predict(class_weight: str | None) -> None:
    rng = np.random.default_rng(0)
    x = _grid_data(rng, 3000, 5)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 8).astype(int) + 2 * (x[:, 3] > 4)
    flip = rng.random(y.size) < 0.15
    y[flip] = rng.integers(0, 4, int(flip.sum()))
    forest = RandomForestClassifier(
        n_estimators=25, min_samples_leaf=3, class_weight=class_weight, random_state=0
    ).fit(x, y)
    net = from_sklearn(forest, 5)  # class 4 never seen: probability 0
    test = np.concatenate([x[:500], _grid_data(rng, 2000, 5), rng.normal(3, 3, (500, 5)).astype(np.float32)])
    with torch.inference_mode():
        probs = net.probabilities(torch.from_numpy(test)).numpy()
        image = torch.from_numpy(test.T.reshape(1, 5, 50, 60).copy())
        softmax = torch.softmax(net(image), dim=1)[0].reshape(5, -1).T.numpy()
    expected = forest.predict_proba(test)
    np.testing.assert_allclose(probs[:, :4], expected, rtol=0, atol=1e-6)
    assert np.all(probs[:, 4] == 0)
    np.testing.assert_allclose(softmax[:, :4], expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(probs.argmax(axis=1), forest.predict(test))


def test_forest_package_reloads_without_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 3)).astype(np.float32)
    forest = RandomForestClassifier(n_estimators=4, random_state=0).fit(x, (x[:, 0] > 0).astype(int))
    net = from_sklearn(forest, 3)
    spec = ModelSpec(
        "random_forest",
        "none",
        ("b1", "b2", "b3"),
        (0.0,) * 3,
        (1.0,) * 3,
        CLASSES,
        64,
        options=net.options(),
        output_stride=output_stride("random_forest"),
    )
    save_model(tmp_path / "m", spec, net)
    loaded, _ = load_model(tmp_path / "m")
    assert isinstance(loaded, ForestNet) and output_stride("random_forest") == 1
    batch = torch.from_numpy(rng.normal(size=(2, 3, 16, 16)).astype(np.float32))
    with torch.inference_mode():
        assert torch.equal(loaded(batch), net(batch))
    empty = build_network("random_forest", "none", 3, 3, net.options())
    assert {k: v.shape for k, v in empty.state_dict().items()} == {
        k: v.shape for k, v in net.state_dict().items()
    }


def _forest_package(path: Path, rng: np.random.Generator) -> tuple[Path, RandomForestClassifier, ModelSpec]:
    """A forest on the predict stores' 3 bands, labelled by a function of the pixel value.

    Labels that depend on the value alone make every leaf pure, so the forest's
    probabilities are exact fractions and its classes have no near-ties to break.
    """
    mean, std = (700.0, 650.0, 720.0), (300.0, 280.0, 310.0)
    bands = ("b1", "b2", "b3")
    spec = ModelSpec("random_forest", "none", bands, mean, std, CLASSES, 64, nodata=0, output_stride=1)
    raw = rng.integers(1, 2000, (3, 4000, 1)).astype(np.uint16)
    x = normalise(raw, spec)[:, :, 0].T
    y = (x[:, 0] > 0.2).astype(int) + (x[:, 1] + x[:, 2] > 0.5)
    forest = RandomForestClassifier(n_estimators=15, random_state=0).fit(x, y)
    net = from_sklearn(forest, 3)
    spec = dataclasses.replace(spec, options=net.options())
    return save_model(path, spec, net), forest, spec


@pytest.mark.parametrize(("tile", "overlap"), [(None, None), (48, 0)])
def test_predict_with_a_forest_equals_sklearn(
    tmp_path: Path, client: Client, tile: int | None, overlap: int | None
) -> None:
    model, forest, spec = _forest_package(tmp_path / "m", np.random.default_rng(2))
    store = make_store(tmp_path / "s.zarr", block=64)
    predict(store, model, client=client, tile_size=tile, overlap=overlap, max_task_pixels=64 * 64)
    raw = np.asarray(open_layer(store, "image")[...])
    classes = np.asarray(open_layer(store, "classes")[...])
    confidence = np.asarray(open_layer(store, "confidence")[...])
    valid = (raw != 0).all(axis=0)
    pixels = normalise(raw, spec)[:, valid].T
    values = np.array([c.value for c in CLASSES], dtype=np.uint8)
    np.testing.assert_array_equal(classes[valid], values[forest.predict(pixels)])
    assert np.all(classes[~valid] == 255)
    expected = np.rint(forest.predict_proba(pixels).max(axis=1) * 100)
    assert np.abs(confidence[valid].astype(int) - expected).max() <= 1


def test_predict_refuses_other_bands(tmp_path: Path, client: Client) -> None:
    model, _, _ = _forest_package(tmp_path / "m", np.random.default_rng(3))
    store = make_store(tmp_path / "s4.zarr", block=64, bands=4)
    with pytest.raises(BandMismatchError, match="4 bands"):
        predict(store, model, client=client)


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("forest")
    scene = synthesize(root / "region", size=256, bands=4, tiles=2, seed=1)
    ingest([scene.image], root / "r.zarr", labels=scene.labels, classes=scene.classes, block_size=128)
    return root / "r.zarr", scene.truth


def test_train_predict_evaluate_a_forest(region: tuple[Path, Path], tmp_path: Path, client: Client) -> None:
    store, truth = region
    spec = train(store, tmp_path / "rf", train_config(**FOREST))
    pkg = tmp_path / "rf"
    assert {"model.json", "weights.safetensors", "loss_curve.png", "confusion_matrix.png"} <= {
        p.name for p in pkg.iterdir()
    }
    data = json.loads((pkg / "model.json").read_text())
    assert data["arch"] == "random_forest" and data["options"]["n_trees"] == 8
    assert data["crs_units"] == "metre" and len(data["pixel_size"]) == 2  # forests too
    assert data["band_names"] == ["blue", "green", "red", "nir"]
    assert 0.0 <= data["metrics"]["miou"] <= 1.0
    record = data["training"]["history"][0]
    assert {"train_loss", "valid_loss", "valid_miou", "valid_accuracy"} <= set(record)
    assert data["training"]["valid_pixels_sampled"] > 0
    net, loaded = load_model(pkg)
    assert isinstance(net, ForestNet) and loaded.metrics == spec.metrics

    again = train(store, tmp_path / "rf2", train_config(**FOREST))
    assert again.metrics == spec.metrics
    weights = (pkg / "weights.safetensors").read_bytes()
    assert weights == (tmp_path / "rf2" / "weights.safetensors").read_bytes()

    predict(store, pkg, client=client, overlap=0)
    classes = np.asarray(open_layer(store, "classes")[...])
    assert set(np.unique(classes)) <= {c.value for c in spec.classes} | {255}
    result = evaluate(store, truth, tmp_path / "eval", preview=False)
    assert 0.0 <= result["miou"] <= 1.0 and result["pixels"] > 0


def test_cli_trains_a_forest(region: tuple[Path, Path], tmp_path: Path) -> None:
    store, _ = region
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(store),
            "--out",
            str(tmp_path / "cli"),
            "--arch",
            "random_forest",
            "--trees",
            "3",
            "--forest-context",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    _, spec = load_model(tmp_path / "cli")
    assert spec.arch == "random_forest" and spec.options["n_trees"] == 3 and spec.output_stride == 1
    assert spec.options["context"] == 5


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--arch", "random_forest", "--chip-size", "64", "--loss", "focal"], "chip_size=64, loss='focal'"),
        (["--arch", "unet", "--forest-context", "5"], "forest_context=5"),
    ],
)
def test_settings_of_the_other_family_are_refused(
    region: tuple[Path, Path], tmp_path: Path, options: list[str], named: str
) -> None:
    # Silently ignoring them would let a user compare runs that never had them.
    store, _ = region
    result = CliRunner().invoke(app, ["train", str(store), "--out", str(tmp_path / "m"), *options])
    # The installed entry point (segpipe.cli.main) prints InputError and exits with 2.
    assert isinstance(result.exception, InputError)
    assert named in str(result.exception) and "leave them at their defaults" in str(result.exception)
    assert not (tmp_path / "m").exists()


def _window_stats(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of every pixel's k x k window cut to the array: the definition, pixel by pixel."""
    bands, h, w = x.shape
    mean, std = np.zeros_like(x), np.zeros_like(x)
    r = k // 2
    for y in range(h):
        for xx in range(w):
            win = x[:, max(0, y - r) : y + r + 1, max(0, xx - r) : xx + r + 1].reshape(bands, -1)
            mean[:, y, xx], std[:, y, xx] = win.mean(axis=1), win.std(axis=1)
    return mean, std


@pytest.mark.parametrize("k", [3, 5])
def test_context_features_are_window_mean_and_std(k: int) -> None:
    x = np.random.default_rng(4).normal(size=(2, 7, 9)).astype(np.float32)
    out = context_features(torch.from_numpy(x)[None], k)[0].numpy()
    mean, std = _window_stats(x.astype(np.float64), k)
    assert out.shape == (6, 7, 9)
    np.testing.assert_array_equal(out[:2], x)
    np.testing.assert_allclose(out[2:4], mean, atol=1e-5)
    np.testing.assert_allclose(out[4:], std, atol=1e-4)
    assert torch.equal(context_features(torch.from_numpy(x)[None], 1)[0], torch.from_numpy(x))
    with pytest.raises(InputError, match="odd"):
        context_features(torch.from_numpy(x)[None], 4)
    with pytest.raises(ValueError, match="odd"):
        train_config(arch="random_forest", forest_context=4)


def test_context_forest_reproduces_sklearn_on_its_features() -> None:
    rng = np.random.default_rng(5)
    image = torch.from_numpy(_grid_data(rng, 3 * 40 * 50, 1).reshape(1, 3, 40, 50))
    feats = context_features(image, 3)[0].reshape(9, -1).T.numpy()
    y = (feats[:, 3] > feats[:, 4]).astype(int) + (feats[:, 7] > 1.5)
    forest = RandomForestClassifier(n_estimators=10, min_samples_leaf=3, random_state=0).fit(feats, y)
    net = from_sklearn(forest, 3, context=3)
    assert net.options()["context"] == 3 and net.n_bands == 3
    with torch.inference_mode():
        probs = torch.softmax(net(image), dim=1)[0].reshape(3, -1).T.numpy()
    np.testing.assert_allclose(probs, forest.predict_proba(feats), rtol=0, atol=1e-6)
    rebuilt = build_network("random_forest", "none", 3, 3, net.options())
    assert isinstance(rebuilt, ForestNet) and rebuilt.context == 3
    with pytest.raises(InputError, match="not 3 per band"):
        from_sklearn(RandomForestClassifier(n_estimators=2).fit(feats[:, :4], y), 3, context=3)


def test_context_forest_trains_on_the_features_it_predicts_with(
    region: tuple[Path, Path], tmp_path: Path, client: Client
) -> None:
    store, _ = region
    spec = train(store, tmp_path / "ctx", train_config(**FOREST, forest_context=3))
    data = json.loads((tmp_path / "ctx" / "model.json").read_text())
    assert spec.options["context"] == 3 and data["training"]["forest"]["context"] == 3
    assert "nir std 3x3" in data["training"]["forest"]["feature_importance"]

    # Features read block by block with a halo equal those of the whole image.
    raw = np.asarray(open_layer(store, "image")[...])
    valid = (raw != 0).all(axis=0)
    whole = context_features(torch.from_numpy(normalise(raw, spec, valid)[None]), 3)[0].numpy()
    rng = np.random.default_rng(6)
    ys, xs = rng.integers(0, raw.shape[1], 400), rng.integers(0, raw.shape[2], 400)
    image = open_layer(store, "image")
    feats, has_data = forest_features(image, 128, spec, 3, ys, xs)
    np.testing.assert_array_equal(has_data, valid[ys, xs])
    np.testing.assert_array_equal(feats, whole[:, ys[has_data], xs[has_data]].T)

    # Prediction windows (default overlap for the context) give the whole-image answer.
    assert window_settings(spec, None, None)[1] == 4
    predict(store, tmp_path / "ctx", client=client)
    net, _ = load_model(tmp_path / "ctx")
    with torch.inference_mode():
        expected = net(torch.from_numpy(normalise(raw, spec, valid)[None]))[0].argmax(0).numpy()
    values = np.array([c.value for c in spec.classes], dtype=np.uint8)
    classes = np.asarray(open_layer(store, "classes")[...])
    assert (classes[valid] == values[expected[valid]]).mean() > 0.995


def _write(path: Path, data: np.ndarray) -> Path:
    profile = {"driver": "GTiff", "height": data.shape[-2], "width": data.shape[-1], "count": data.shape[0]}
    transform = rasterio.transform.from_origin(300000, 4000, 10, 10)
    with rasterio.open(path, "w", **profile, dtype=data.dtype, crs="EPSG:32617", transform=transform) as dst:
        dst.write(data)
    return path


def test_class_balancing_weights_the_forests_pixels(tmp_path: Path) -> None:
    # Class 3 (1,024 px) shares its spectrum with half of class 2 (2,048 of 4,096 px).
    # By pixel count class 2 wins that spectrum; weighted by the inverse of each class's
    # count, class 3 weighs twice as much as class 2 there, so it must win.
    labels = np.zeros((128, 128), np.uint8)
    labels[:64], labels[64:96], labels[96:104] = 1, 2, 3
    value = np.full((128, 128), 10, np.uint8)
    value[64:80] = value[96:104] = 50
    value[80:96] = 90
    image = np.stack([value, value // 2 + 1])
    _write(tmp_path / "image.tif", image)
    _write(tmp_path / "labels.tif", labels[None])
    ingest([tmp_path / "image.tif"], tmp_path / "r.zarr", labels=tmp_path / "labels.tif", block_size=128)
    cfg = {**FOREST, "valid_fraction": 0.0}

    shared = image[:, 70:71, :1]
    answers = {}
    for balanced in (False, True):
        out = tmp_path / f"rf_{balanced}"
        spec = train(tmp_path / "r.zarr", out, train_config(**cfg, class_balancing=balanced))
        net, _ = load_model(out)
        pixel = torch.from_numpy(normalise(shared, spec, np.ones((1, 1), bool))[None])
        with torch.inference_mode():
            answers[balanced] = spec.classes[int(net(pixel)[0, :, 0, 0].argmax())].value
        recorded = json.loads((out / "model.json").read_text())["training"]["forest"]["class_weight"]
        assert recorded == ("balanced_subsample" if balanced else None)
    assert answers == {False: 2, True: 3}


def test_the_pieces_of_forest_training(region: tuple[Path, Path]) -> None:
    import segpipe.stages.train.forest as forest_training
    from segpipe.models.forest import feature_names
    from segpipe.stages.train import ForestConfig

    store, _ = region
    cfg = ForestConfig(**{**FOREST, "forest_context": 3})  # type: ignore[arg-type]
    data = forest_training._read_pixels(store, cfg)
    assert data.x_train.shape == (data.y_train.size, 4 * 3) and data.x_valid.shape[0] == data.y_valid.size > 0
    assert data.spec.arch == "random_forest" and data.spec.chip_size == 128  # the window hint
    fitted = forest_training._fit(cfg, data.x_train, data.y_train)
    assert fitted.n_estimators == 8 and fitted.class_weight is None
    net = from_sklearn(fitted, len(data.spec.classes), cfg.forest_context)

    record = forest_training._fit_record(net, data, 1.5)
    assert record["epoch"] == 1 and record["seconds"] == 1.5 and 0 <= record["train_accuracy"] <= 1
    cm = forest_training._validate(net, data, record)
    k = len(data.spec.classes)
    assert cm is not None and cm.shape == (k, k + 1) and cm.sum() == data.y_valid.size
    assert {"valid_loss", "valid_miou", "valid_accuracy"} <= set(record)
    # Without held-out pixels, the trees that did not draw a pixel score it (out of bag).
    bagged = forest_training._fit(cfg, data.x_train, data.y_train, out_of_bag=True)
    oob: dict[str, float] = {}
    cm = forest_training._out_of_bag(bagged, data, oob)
    assert cm is not None and 0.8 * data.y_train.size <= cm.sum() <= data.y_train.size
    assert 0 < oob["valid_miou"] <= 1 and oob["valid_loss"] > 0
    assert forest_training._out_of_bag(fitted, data, {}) is None  # fitted without the votes

    info = forest_training._forest_record(net, fitted, cfg, data.band_names)
    assert list(info["feature_importance"]) == feature_names(data.band_names, 3)
    assert sum(info["feature_importance"].values()) == pytest.approx(1.0)
    assert (info["trees"], info["context"], info["class_weight"]) == (8, 3, None)
    training = forest_training._training_record(store, cfg, data, record, 2.0)
    assert training["config"] == cfg.model_dump() and training["seconds"] == 2.0
    assert training["train_pixels_sampled"] == data.y_train.size and training["device"] == "cpu"
    balanced = cfg.model_copy(update={"class_balancing": True})
    assert forest_training._class_weight(balanced) == "balanced_subsample"
