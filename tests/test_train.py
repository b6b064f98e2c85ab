import json

import numpy as np
import pytest
from safetensors.torch import load_file

from segpipe.errors import ArchitectureError, LabelsError, StoreError
from segpipe.models import load_model, read_spec
from segpipe.stages.ingest.driver import ingest
from segpipe.stages.train import TrainConfig, train
from segpipe.stages.train.sampling import BlockReader, Candidates, split_cells
from segpipe.synth import synthesize

TINY = {"epochs": 1, "samples_per_epoch": 8, "chip_size": 64, "batch_size": 4, "valid_cell": 64}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    region = synthesize(root / "region", size=256, bands=4, tiles=2, seed=1)
    ingest([region.image], root / "r.zarr", labels=region.labels, classes=region.classes, block_size=128)
    return root / "r.zarr"


def test_block_reader_matches_direct_slicing():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, (3, 130, 97))
    reader = BlockReader(data, block=32, max_blocks=3)
    for _ in range(50):
        y0, x0 = int(rng.integers(0, 100)), int(rng.integers(0, 60))
        h, w = int(rng.integers(1, 130 - y0 + 1)), int(rng.integers(1, 97 - x0 + 1))
        assert np.array_equal(reader.read(y0, x0, h, w), data[:, y0 : y0 + h, x0 : x0 + w])


def test_validation_cells_are_whole_and_keep_every_class():
    rng = np.random.default_rng(1)
    y, x = rng.integers(0, 1024, 4000), rng.integers(0, 1024, 4000)
    value = (y // 256) * 4 + x // 512 + 1  # 8 classes, each spanning several 64-px cells
    cand = Candidates(y, x, value)
    valid = split_cells(cand, 64, 0.1, seed=2)
    cells = (y // 64) * 100 + x // 64
    for c in np.unique(cells):
        assert valid[cells == c].all() or not valid[cells == c].any()
    for v in np.unique(value):
        assert valid[value == v].any() and not valid[value == v].all()


@pytest.mark.parametrize("arch", ["unet", "pspnet", "deeplabv3", "deeplabv3plus"])
def test_every_architecture_trains_into_a_package(store, tmp_path, arch):
    spec = train(store, tmp_path / arch, TrainConfig(arch=arch, **TINY))
    pkg = tmp_path / arch
    assert {"model.json", "weights.safetensors", "loss_curve.png"} <= {p.name for p in pkg.iterdir()}
    data = json.loads((pkg / "model.json").read_text())
    assert data["arch"] == arch and data["encoder"] == "resnet18"
    assert data["band_names"] == ["blue", "green", "red", "nir"]
    assert len(data["mean"]) == 4 and all(s > 0 for s in data["std"])
    assert [c["value"] for c in data["classes"]] == [c.value for c in spec.classes]
    assert data["chip_size"] == 64
    assert data["training"]["history"][0]["epoch"] == 1
    net, loaded = load_model(pkg)
    assert loaded == read_spec(pkg)
    assert set(load_file(str(pkg / "weights.safetensors"))) == set(net.state_dict())


def test_statistics_ignore_nodata(store, tmp_path):
    import rasterio

    spec = train(store, tmp_path / "m", TrainConfig(**TINY))
    from segpipe.io.store import open_layer

    image = np.asarray(open_layer(store, "image")[:]).astype(float)
    valid = (image != 0).all(axis=0)
    assert not valid.all()  # the synthetic scene has a nodata corner
    assert np.allclose(spec.mean, image[:, valid].mean(axis=1), rtol=1e-6)
    assert np.allclose(spec.std, image[:, valid].std(axis=1), rtol=1e-5)
    del rasterio


def test_training_is_deterministic_under_a_seed(store, tmp_path):
    a = train(store, tmp_path / "a", TrainConfig(seed=7, **TINY))
    b = train(store, tmp_path / "b", TrainConfig(seed=7, **TINY))
    wa = load_file(str(tmp_path / "a" / "weights.safetensors"))
    wb = load_file(str(tmp_path / "b" / "weights.safetensors"))
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
    assert a.training["history"][0]["train_loss"] == b.training["history"][0]["train_loss"]


def test_unknown_architecture_is_refused(store, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TrainConfig(arch="segformer")
    with pytest.raises(ArchitectureError, match="encoder"):
        train(store, tmp_path / "x", TrainConfig(encoder="resnet9000", **TINY))
    assert not (tmp_path / "x" / "model.json").exists()


def test_store_without_labels_is_refused(tmp_path, store):
    from segpipe.io.store import read_region_info

    info = read_region_info(store)
    region = synthesize(tmp_path / "region", size=128, tiles=1)
    ingest([region.image], tmp_path / "nolabels.zarr", block_size=128)
    with pytest.raises(StoreError, match="--labels"):
        train(tmp_path / "nolabels.zarr", tmp_path / "m", TrainConfig(**TINY))
    assert info.height == 256


def test_training_learns_the_labels(store, tmp_path):
    spec = train(
        store,
        tmp_path / "m",
        TrainConfig(epochs=3, samples_per_epoch=64, chip_size=64, batch_size=8, valid_fraction=0.0, lr=3e-3),
    )
    losses = [r["train_loss"] for r in spec.training["history"]]
    assert losses[-1] < losses[0]
    with pytest.raises(LabelsError):
        train(
            store,
            tmp_path / "n",
            TrainConfig(
                valid_fraction=0.99, valid_cell=1024, **{k: v for k, v in TINY.items() if k != "valid_cell"}
            ),
        )


def test_losses_ignore_unlabelled_pixels_and_focal_reduces_to_ce():
    import torch

    from segpipe.stages.train.losses import balanced_class_weights, make_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :4] = 255
    ce = make_loss("ce")(logits, target)
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(ce, expected)
    assert torch.allclose(make_loss("focal", focal_gamma=0.0)(logits, target), expected)
    assert make_loss("focal", focal_gamma=2.0)(logits, target) < ce  # easy pixels count less
    weights = balanced_class_weights(np.array([100, 400, 25]))
    assert np.allclose(weights, [1.0, 0.25, 4.0])
    weighted = make_loss("focal", class_weights=weights, focal_gamma=0.0)(logits, target)
    assert torch.allclose(weighted, make_loss("ce", class_weights=weights)(logits, target))
    changed = logits.clone()
    changed[:, :, :4] = 100.0  # unlabelled pixels may hold anything
    assert torch.allclose(
        make_loss("ce", dice_weight=0.5)(changed, target), make_loss("ce", dice_weight=0.5)(logits, target)
    )
    perfect = torch.nn.functional.one_hot(torch.where(target == 255, 0, target), 3).permute(0, 3, 1, 2) * 50.0
    assert make_loss("ce", dice_weight=1.0)(perfect.float(), target) < 1e-3


def test_early_stopping_and_class_balancing(store, tmp_path, monkeypatch):
    import segpipe.stages.train.loop as loop

    losses = iter([0.5, 0.4, 0.45, 0.6, 0.7, 0.8])  # best at epoch 2, then worse

    def fake_evaluate(net, sampler, windows, spec, device, batch_size):
        k = len(spec.classes)
        return next(losses), np.eye(k, k + 1, dtype=np.int64)

    monkeypatch.setattr(loop, "_evaluate", fake_evaluate)
    spec = train(
        store,
        tmp_path / "m",
        TrainConfig(**{**TINY, "epochs": 6}, patience=2, monitor="valid_loss", class_balancing=True),
    )
    history = spec.training["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["early_stop"] and "early_stop" not in history[2]
    weights = spec.training["class_weights"]
    assert len(weights) == len(spec.classes) and min(weights) > 0
