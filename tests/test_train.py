import json

import numpy as np
import pytest
from safetensors.torch import load_file

from segpipe.errors import ArchitectureError, StoreError
from segpipe.io.store import read_region_info
from segpipe.models import load_model, read_spec
from segpipe.stages.ingest.driver import ingest
from segpipe.stages.train import NetworkConfig, train, train_config
from segpipe.stages.train.sampling import BlockReader, Candidates
from segpipe.stages.train.split import split_cells
from segpipe.synth import synthesize

TINY = {"members": 1, "epochs": 1, "samples_per_epoch": 8, "chip_size": 64, "batch_size": 4, "valid_cell": 64}


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
    spec = train(store, tmp_path / arch, train_config(arch=arch, **TINY))
    pkg = tmp_path / arch
    assert {"model.json", "weights.safetensors", "loss_curve.png"} <= {p.name for p in pkg.iterdir()}
    data = json.loads((pkg / "model.json").read_text())
    assert data["arch"] == arch and data["encoder"] == "resnet18"
    assert data["band_names"] == ["blue", "green", "red", "nir"]
    assert len(data["mean"]) == 4 and all(s > 0 for s in data["std"])
    assert [c["value"] for c in data["classes"]] == [c.value for c in spec.classes]
    assert data["chip_size"] == 64
    # the region's pixel size, recorded so predict can refuse imagery of another resolution
    transform = read_region_info(store).transform
    assert data["pixel_size"] == [abs(transform[0]), abs(transform[4])] and data["crs_units"] == "metre"
    assert data["training"]["history"][0]["epoch"] == 1
    net, loaded = load_model(pkg)
    assert loaded == read_spec(pkg)
    assert set(load_file(str(pkg / "weights.safetensors"))) == set(net.state_dict())


def test_statistics_ignore_nodata(store, tmp_path):
    import rasterio

    spec = train(store, tmp_path / "m", train_config(**TINY))
    from segpipe.io.store import open_layer

    image = np.asarray(open_layer(store, "image")[:]).astype(float)
    valid = (image != 0).all(axis=0)
    assert not valid.all()  # the synthetic scene has a nodata corner
    assert np.allclose(spec.mean, image[:, valid].mean(axis=1), rtol=1e-6)
    assert np.allclose(spec.std, image[:, valid].std(axis=1), rtol=1e-5)
    del rasterio


def test_training_is_deterministic_under_a_seed(store, tmp_path):
    a = train(store, tmp_path / "a", train_config(seed=7, **TINY))
    b = train(store, tmp_path / "b", train_config(seed=7, **TINY))
    wa = load_file(str(tmp_path / "a" / "weights.safetensors"))
    wb = load_file(str(tmp_path / "b" / "weights.safetensors"))
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
    assert a.training["history"][0]["train_loss"] == b.training["history"][0]["train_loss"]


def test_unknown_architecture_is_refused(store, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        NetworkConfig(arch="segformer")  # type: ignore[arg-type]
    with pytest.raises(ArchitectureError, match="segformer"):
        train_config(arch="segformer")
    with pytest.raises(ArchitectureError, match="encoder"):
        train(store, tmp_path / "x", train_config(encoder="resnet9000", **TINY))
    assert not (tmp_path / "x" / "model.json").exists()


def test_store_without_labels_is_refused(tmp_path, store):
    from segpipe.io.store import read_region_info

    info = read_region_info(store)
    region = synthesize(tmp_path / "region", size=128, tiles=1)
    ingest([region.image], tmp_path / "nolabels.zarr", block_size=128)
    with pytest.raises(StoreError, match="--labels"):
        train(tmp_path / "nolabels.zarr", tmp_path / "m", train_config(**TINY))
    assert info.height == 256


def test_training_learns_the_labels(store, tmp_path):
    spec = train(
        store,
        tmp_path / "m",
        train_config(epochs=3, samples_per_epoch=64, chip_size=64, batch_size=8, valid_fraction=0.0, lr=3e-3),
    )
    losses = [r["train_loss"] for r in spec.training["history"]]
    assert losses[-1] < losses[0]
    # Labels in one cell cannot be held out: all of them train, and the package says so.
    spec = train(
        store,
        tmp_path / "n",
        train_config(**{**TINY, "valid_fraction": 0.99, "valid_cell": 1024}),
    )
    assert spec.training["split"]["scheme"] == "none" and spec.training["valid_pixels_sampled"] == 0
    assert any("hold any out" in w for w in spec.training["warnings"])


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


def test_lovasz_is_one_minus_iou_at_hard_predictions_and_ignores_unlabelled():
    import torch

    from segpipe.stages.train.losses import make_loss

    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (2, 16, 16), generator=gen)
    target[0, :3] = 255
    guess = torch.randint(0, 3, (2, 16, 16), generator=gen)
    # Logits this large make the softmax one-hot: the Lovasz extension then equals the
    # Jaccard loss itself, class by class over the labelled pixels of the batch.
    logits = torch.nn.functional.one_hot(guess, 3).permute(0, 3, 1, 2).float() * 100.0
    lovasz = make_loss("ce", dice_weight=1.0, overlap="lovasz")
    labelled = target != 255
    ious = []
    for c in range(3):
        truth, pred = (target == c) & labelled, (guess == c) & labelled
        ious.append((truth & pred).sum().item() / (truth | pred).sum().item())
    assert lovasz(logits, target).item() == pytest.approx(1.0 - np.mean(ious), abs=1e-5)
    changed = logits.clone()
    changed[0, :, :3] = -logits[0, :, :3]  # unlabelled pixels may hold anything
    assert torch.allclose(lovasz(changed, target), lovasz(logits, target))
    soft = torch.randn(2, 3, 16, 16, generator=gen, requires_grad=True)
    lovasz(soft, target).backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    assert soft.grad[0, :, :3].abs().sum() == 0
    with pytest.raises(ValueError, match="overlap"):
        make_loss("ce", overlap="tversky")


def test_clip_grad_norm_bounds_every_step_and_is_recorded(store, tmp_path, monkeypatch):
    import torch

    norms: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        norms.append(float(clip(parameters, max_norm, *args, **kwargs)))
        return norms[-1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    spec = train(store, tmp_path / "off", train_config(TINY))
    assert norms == []  # off by default
    spec = train(store, tmp_path / "on", train_config(TINY, clip_grad_norm=1e-3))
    assert len(norms) == 2  # one per step: 8 chips in batches of 4
    assert all(n > 1e-3 for n in norms)  # so every step was scaled down to the bound
    assert spec.training["config"]["clip_grad_norm"] == 1e-3


@pytest.mark.parametrize("keep", ["best", "last"])
def test_early_stopping_and_class_balancing(store, tmp_path, monkeypatch, keep):
    import segpipe.stages.train.loop as loop

    losses = iter([0.5, 0.4, 0.45, 0.6, 0.7, 0.8])  # best at epoch 2, then worse

    def fake_evaluate(net, sampler, windows, spec, device, batch_size):
        k = len(spec.classes)
        return next(losses), np.eye(k, k + 1, dtype=np.int64)

    monkeypatch.setattr(loop, "evaluate_chips", fake_evaluate)
    settings = {**TINY, "epochs": 6, "patience": 2, "monitor": "valid_loss", "keep": keep}
    cfg = train_config(settings, class_balancing=True)
    spec = train(store, tmp_path / "m", cfg)
    history = spec.training["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["early_stop"] and "early_stop" not in history[2]
    weights = spec.training["class_weights"]
    assert len(weights) == len(spec.classes) and min(weights) > 0
    assert spec.training["kept_epoch"] == 2  # stopped early: the best epoch, whatever ``keep`` says


@pytest.mark.parametrize(("keep", "kept"), [("last", 4), ("best", 2)])
def test_the_package_keeps_the_last_epoch_or_the_best(store, tmp_path, monkeypatch, keep, kept):
    import segpipe.stages.train.loop as loop
    from segpipe.stages.train.outputs import final_metrics

    losses = iter([0.5, 0.4, 0.45, 0.6])  # best at epoch 2; the run ends at epoch 4
    matrices = []

    def fake_evaluate(net, sampler, windows, spec, device, batch_size):
        k = len(spec.classes)
        cm = np.eye(k, k + 1, dtype=np.int64) * 10
        cm[0, 1] = len(matrices)  # each epoch's matrix, and so its mIoU, differs
        matrices.append(cm)
        return next(losses), cm

    monkeypatch.setattr(loop, "evaluate_chips", fake_evaluate)
    cfg = train_config(**{**TINY, "epochs": 4}, monitor="valid_loss", keep=keep)
    spec = train(store, tmp_path / "m", cfg)
    history = spec.training["history"]
    assert spec.training["kept_epoch"] == kept
    assert [r["epoch"] for r in history if r.get("kept")] == [kept]
    assert spec.metrics["miou"] == pytest.approx(final_metrics(matrices[kept - 1], spec.classes)["miou"])
    scores = [final_metrics(cm, spec.classes)["miou"] for cm in matrices]
    assert scores[1] != scores[3]


EVERY_OTHER = [2, 4, 6, 8, 10, 12, 14, 16, 17]


@pytest.mark.parametrize(("keep", "scored"), [("last", EVERY_OTHER), ("best", list(range(1, 18)))])
def test_held_out_scores_that_choose_nothing_make_the_curve_and_the_end(store, tmp_path, keep, scored):
    # Under keep="last" the held-out cells choose no weights: 16 points of the curve (every
    # second of 17 epochs) and the last epoch are enough; under "best" every epoch counts.
    cfg = train_config(**{**TINY, "epochs": 17, "samples_per_epoch": 4, "chip_size": 32}, keep=keep)
    history = train(store, tmp_path / "m", cfg).training["history"]
    assert [r["epoch"] for r in history if "valid_miou" in r] == scored
    assert len(history) == 17 and (keep == "best" or history[-1]["kept"])


def test_a_run_the_time_budget_ends_is_scored_where_it_ends(store, tmp_path):
    import dataclasses
    import time

    from segpipe.stages.train.loop import plan_training

    cfg = train_config(**{**TINY, "epochs": 17, "samples_per_epoch": 4, "chip_size": 32}, keep="last")
    plan = dataclasses.replace(plan_training(store, cfg), deadline=time.time())  # spent already
    history = train(store, tmp_path / "m", plan=plan).training["history"]
    assert len(history) == 1 and history[0]["stopped_by"] == "time budget"
    assert "valid_miou" in history[0] and history[0]["kept"]


def test_train_config_chooses_the_family_by_arch():
    from segpipe.stages.train import ForestConfig, TrainConfig

    network = train_config()
    assert isinstance(network, NetworkConfig) and isinstance(network, TrainConfig)
    assert network.arch == "unet" and network.chip_size is None  # auto: chosen from the data
    forest = train_config({"arch": "random_forest", "trees": 3}, seed=4)
    assert isinstance(forest, ForestConfig) and isinstance(forest, TrainConfig)
    assert (forest.trees, forest.seed) == (3, 4)
    assert not hasattr(forest, "epochs") and not hasattr(network, "trees")
    # Fields override the mapping; the family follows the arch they settle on.
    assert isinstance(train_config({"arch": "random_forest"}, arch="pspnet"), NetworkConfig)
    assert train_config({"epochs": 2}, epochs=5).epochs == 5
    # The dump is of one family only: a forest records no network settings.
    assert "chip_size" not in forest.model_dump() and forest.model_dump()["trees"] == 3
    assert forest.fit_region(20, 20) == (forest, None)


def test_settings_of_the_other_family_are_one_line_naming_setting_and_arch():
    from segpipe.stages.train import ForestConfig, SettingError

    with pytest.raises(SettingError) as refused:
        train_config(trees=5)
    message = str(refused.value)
    assert "--arch unet" in message and "trees=5" in message and "\n" not in message
    assert "leave them at their defaults" in message and refused.value.key == "trees"
    with pytest.raises(SettingError, match=r"--arch random_forest does not use chip_size=64, loss='focal'"):
        train_config(arch="random_forest", chip_size=64, loss="focal")
    with pytest.raises(SettingError, match="--arch random_forest does not use device='cpu'"):
        train_config(arch="random_forest", device="cpu")  # a forest always runs on the CPU
    # At its default the other family's setting changes nothing, so it passes (dropped).
    assert train_config(arch="random_forest", epochs=None, loss="ce") == ForestConfig()
    assert train_config(trees=100, forest_context=1) == NetworkConfig()


def test_refused_settings_name_the_setting_and_the_value():
    from segpipe.stages.train import SettingError

    cases = [
        ({"chip_size": 100}, "chip_size", "chip_size=100: Input should be a multiple of 32"),
        ({"epochs": "ten"}, "epochs", "epochs='ten': Input should be a valid integer"),
        (
            {"arch": "random_forest", "forest_context": 4},
            "forest_context",
            "forest_context=4: must be an odd window edge",
        ),
        ({"clip_percentiles": (5, 2)}, "clip_percentiles", "0 <= low < high <= 100"),
        ({"epoch": 3}, "epoch", "epoch=3: unknown setting (known: arch, valid_fraction"),
    ]
    for settings, key, text in cases:
        with pytest.raises(SettingError) as refused:
            train_config(settings)
        assert refused.value.key == key and text in str(refused.value), str(refused.value)
        assert "\n" not in str(refused.value)
    with pytest.raises(SettingError) as unknown:
        train_config(arch="random_forest", epoch=3)
    reason = unknown.value.reason
    assert unknown.value.unknown and "trees" in reason and "chip_size" not in reason
    known = "unet, pspnet, deeplabv3, deeplabv3plus, linear, random_forest"
    with pytest.raises(ArchitectureError, match=rf"'segformer': unknown architecture: choose one of {known}"):
        train_config(arch="segformer")
    assert unknown.value.in_file("t.yaml", "epoch").startswith("t.yaml: epoch: unknown setting")
    with pytest.raises(SettingError) as wrong:
        train_config(epochs="x" * 100)
    assert wrong.value.in_file("t.yaml", "epochs").endswith("(got '" + "x" * 56 + "...)")


def test_network_architectures_are_the_models():
    from segpipe.models import ARCHITECTURES
    from segpipe.models.networks import CLASSICAL_ARCHITECTURES
    from segpipe.stages.train.config import FOREST_ARCH, NETWORK_ARCHITECTURES

    assert NETWORK_ARCHITECTURES == ARCHITECTURES and CLASSICAL_ARCHITECTURES == (FOREST_ARCH,)


def test_settings_load_without_torch():
    import subprocess
    import sys

    code = "import sys, segpipe.stages.train as t; t.train_config(epochs=2); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_resume_key_leaves_out_what_changes_no_result():
    import json

    key = json.loads(train_config(threads=3, checkpoint_every=5, checkpoint_seconds=9.0).resume_key())
    assert key == json.loads(NetworkConfig().resume_key())
    assert "threads" not in key and key["lr"] is None and "trees" not in key  # lr: auto
    # keep came later: at its default (the behaviour before it) a run checkpointed without it
    # resumes; set to "last" it is part of the key.
    assert "keep" not in key and json.loads(train_config(keep="last").resume_key())["keep"] == "last"
    # copy_paste left at auto is left out, like keep; given, even as 0, it is part of the key.
    assert "copy_paste" not in key
    assert json.loads(train_config(copy_paste=0.0).resume_key())["copy_paste"] == 0.0


def test_a_checkpoint_chosen_before_copy_paste_was_chosen_resumes_at_zero():
    # Such a checkpoint's chosen settings lack copy_paste (0 was its default, left out).
    from segpipe.stages.train.adapt import Facts, resolve
    from segpipe.stages.train.checkpoint import _CHOSEN_BEFORE, _differences

    land_cover = Facts(320, 320, 0.5, (320, 320), np.array([5000, 4000, 3000]), False)
    now = resolve(NetworkConfig(), land_cover)[0]
    assert now.copy_paste == 0.0
    saved = now.model_dump_json(exclude={"copy_paste"})
    assert _differences(saved, now.model_dump_json(), before=_CHOSEN_BEFORE) == ""
    pasting = now.model_copy(update={"copy_paste": 0.5}).model_dump_json()
    assert _differences(saved, pasting, before=_CHOSEN_BEFORE) == "copy_paste: 0.0 there, 0.5 now"


def test_validation_scores_and_package_metrics_are_one_definition():
    from segpipe.stages.train.outputs import class_scores, final_metrics, validation_scores
    from segpipe.types import ClassInfo

    classes = (ClassInfo(1, "water", "#0000ff"), ClassInfo(4, "forest", "#00ff00"))
    cm = np.array([[3, 1, 0], [0, 4, 2]], dtype=np.int64)  # rows: reference; last column: no prediction
    score = class_scores(cm, classes)
    assert validation_scores(0.5, cm, classes) == {
        "valid_loss": 0.5,
        "valid_miou": score["miou"],
        "valid_accuracy": score["overall_accuracy"],
    }
    assert final_metrics(None, classes) == {}
    assert json.loads(json.dumps(final_metrics(cm, classes)))["miou"] == pytest.approx(score["miou"])
