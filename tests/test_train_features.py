"""Pretrained encoders, percentile clipping, balanced sampling, jitter, schedules, chip export."""

import csv
import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from train_support import TINY, tiny_store

import segpipe.stages.train.loop as loop
from segpipe.errors import MissingInputError, PretrainedWeightsError
from segpipe.io.store import open_layer, read_region_info
from segpipe.models import normalise, read_spec
from segpipe.stages.train import NetworkConfig, adapt, augment, train, train_config
from segpipe.stages.train.pretrained import adapt_first_conv
from segpipe.stages.train.sampling import PER_BLOCK, Candidates, CentreSampler, find_candidates
from segpipe.stages.train.split import min_train_share, plan_split, split_cells
from segpipe.stages.train.stats import band_percentiles


@pytest.fixture(autouse=True)
def few_valid_chips(monkeypatch):
    monkeypatch.setattr(loop, "_MAX_VALID_CHIPS", 4)  # validation is beside the point here


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    """A fake "pretrained" torchvision ResNet-18 (random init), saved the DataParallel way."""
    import torchvision

    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def test_pretrained_weights_initialise_the_encoder(store, tmp_path, resnet_file):
    path, state = resnet_file
    cfg = train_config(pretrained=str(path), **TINY)
    net, report = loop.initial_network(cfg, 4, 3)
    encoder = net.encoder.state_dict()
    for key, value in state.items():
        if key.startswith("fc.") or key == "conv1.weight":
            continue
        assert torch.equal(encoder[key], value), key
    rgb = state["conv1.weight"]
    conv = encoder["conv1.weight"]
    assert conv.shape == (64, 4, 7, 7)
    assert torch.allclose(conv[:, :3], rgb * 0.75) and torch.allclose(conv[:, 3], rgb[:, 0] * 0.75)
    assert report is not None and report.adapted == ("conv1.weight",)
    assert not report.missing and not report.unexpected and len(report.loaded) == len(encoder) - 1

    spec = train(store, tmp_path / "m", cfg)
    assert spec.training["pretrained"]["loaded"] == len(encoder) - 1
    assert spec.training["pretrained"]["adapted"] == ["conv1.weight"]


def test_pretrained_checkpoint_files_and_errors(tmp_path, resnet_file):
    _, state = resnet_file
    pth = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in state.items()}}, pth)
    net, report = loop.initial_network(NetworkConfig(pretrained=str(pth), **TINY), 3, 2)
    assert report is not None and not report.adapted  # 3 bands: the first conv fits as it is
    assert torch.equal(net.encoder.state_dict()["conv1.weight"], state["conv1.weight"])

    wrong = tmp_path / "wrong.safetensors"
    save_file({"head.weight": torch.zeros(2, 2), "other.bias": torch.zeros(3)}, str(wrong))
    with pytest.raises(PretrainedWeightsError, match="backbone"):
        loop.initial_network(NetworkConfig(pretrained=str(wrong), **TINY), 4, 3)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="cannot read"):
        loop.initial_network(NetworkConfig(pretrained=str(junk), **TINY), 4, 3)
    with pytest.raises(MissingInputError):
        loop.initial_network(NetworkConfig(pretrained=str(tmp_path / "absent.pth"), **TINY), 4, 3)


def test_first_conv_adaptation_keeps_the_response_to_grey_images():
    weight = torch.randn(8, 3, 3, 3)
    for bands in (1, 2, 3, 6, 9):
        adapted = adapt_first_conv(weight, bands)
        assert adapted.shape == (8, bands, 3, 3)
        assert torch.allclose(adapted.sum(1), weight.sum(1), atol=1e-5)


def test_percentiles_are_exact_for_integers_and_close_for_floats():
    import dask.array as da

    rng = np.random.default_rng(0)
    image = rng.integers(1, 5000, (3, 90, 70)).astype(np.uint16)
    image[:, :10] = 0  # nodata
    valid = (image != 0).all(axis=0)
    low, high = band_percentiles(da.from_array(image, chunks=(3, 32, 32)), 0, (2, 98))
    for b in range(3):
        assert (low[b], high[b]) == tuple(np.percentile(image[b][valid], [2, 98]))
    floats = rng.normal(size=(2, 80, 80))
    got = np.array(band_percentiles(da.from_array(floats, chunks=(2, 40, 40)), None, (5, 95)))
    want = np.percentile(floats.reshape(2, -1), [5, 95], axis=1)
    assert np.allclose(got, want, atol=(floats.max() - floats.min()) / 30000)


def test_clipped_statistics_are_packaged_and_applied(store, tmp_path):
    spec = train(store, tmp_path / "m", train_config(clip_percentiles=(2, 98), **TINY))
    image = np.asarray(open_layer(store, "image")[:]).astype(float)
    valid = (image != 0).all(axis=0)
    low = np.percentile(image[:, valid], 2, axis=1)
    high = np.percentile(image[:, valid], 98, axis=1)
    assert np.allclose(spec.clip_low, low) and np.allclose(spec.clip_high, high)
    clipped = np.clip(image[:, valid], low[:, None], high[:, None])
    assert np.allclose(spec.mean, clipped.mean(axis=1), rtol=1e-6)
    assert np.allclose(spec.std, clipped.std(axis=1), rtol=1e-5)
    loaded = read_spec(tmp_path / "m")
    assert loaded.clip_low == spec.clip_low and loaded.clip_high == spec.clip_high
    # Values beyond the clip normalise like the clip value itself, in prediction too.
    extreme = np.array(loaded.clip_high)[:, None, None] * np.array([1.0, 10.0]).reshape(1, 1, 2)
    out = normalise(extreme, loaded)
    assert np.allclose(out[..., 0], out[..., 1])
    assert (tmp_path / "m" / "samples.png").stat().st_size > 0


def test_balanced_sampling_draws_every_class_equally():
    values = np.array([1] * 980 + [2] * 15 + [3] * 5)
    cand = Candidates(np.arange(1000), np.arange(1000), values)
    rng = np.random.default_rng(0)
    balanced = values[CentreSampler(cand, balanced=True).draw(rng, 30000)]
    share = np.bincount(balanced, minlength=4)[1:] / balanced.size
    assert np.allclose(share, 1 / 3, atol=0.02)
    plain = values[CentreSampler(cand).draw(rng, 30000)]
    assert np.mean(plain == 1) > 0.95


def test_validation_split_never_costs_a_class():
    # Random small layouts with conflicts: moving one cell for a class can strand another.
    for seed in range(200):
        rng = np.random.default_rng(seed)
        y, x, value = rng.integers(0, 256, 60), rng.integers(0, 256, 60), rng.integers(1, 12, 60)
        cand = Candidates(y, x, value)
        split = plan_split(cand, 64, 0.2, seed)
        valid = split.in_valid
        cells = (y // 64) * 8 + x // 64
        for c in np.unique(cells):
            assert valid[cells == c].all() or not valid[cells == c].any()
        for v in np.unique(value):
            # Most of every class trains; a class without validation is named as such.
            assert np.mean(~valid[value == v]) >= min_train_share(0.2), (seed, v)
            assert valid[value == v].any() or v in split.train_only, (seed, v)
        assert split_cells(cand, 64, 0.2, seed).tolist() == valid.tolist()


def test_split_of_a_small_scene_keeps_the_labels_for_training():
    # Issue 18: a 320 px scene, dense labels, one rare class in a single patch. A fixed
    # 256 px cell held most of the labels out; the chosen cell cuts them finely instead.
    yy, xx = np.mgrid[0:320, 0:320]
    value = np.where(xx < 160, 1, 2)
    value[300:306, 10:16] = 3  # 36 px of water in one corner
    cand = Candidates(yy.ravel(), xx.ravel(), value.ravel())
    for seed in range(5):
        split = plan_split(cand, None, 0.15, seed)
        assert split.cell <= 48 and split.scheme == "spatial-cells"
        train = ~split.in_valid
        assert 0.7 <= train.mean() < 1.0
        for v in (1, 2, 3):
            assert np.mean(train[cand.value == v]) >= 0.7, (seed, v)
        record = split.record(0.15)
        assert record["cell"] == split.cell and set(record["candidates"]) == {"1", "2", "3"}
    one_cell = Candidates(np.array([1, 2, 3]), np.array([1, 2, 3]), np.array([1, 2, 2]))
    alone = plan_split(one_cell, 64, 0.15, 0)
    assert alone.scheme == "none" and not alone.in_valid.any() and alone.warnings


def _polygons(n: int, rng: np.random.Generator) -> tuple[Candidates, np.ndarray]:
    """``n`` separate 6-14 px squares of 3 classes on a 600 px scene, and each pixel's polygon."""
    ys, xs, values, which = [], [], [], []
    for i in range(n):
        y0, x0 = (i // 6) * 100 + rng.integers(0, 80), (i % 6) * 100 + rng.integers(0, 80)
        h, w = rng.integers(6, 15, 2)
        yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
        ys.append(yy.ravel())
        xs.append(xx.ravel())
        values.append(np.full(yy.size, 1 + i % 3))
        which.append(np.full(yy.size, i))
    cand = Candidates(np.concatenate(ys), np.concatenate(xs), np.concatenate(values))
    return cand, np.concatenate(which)


def _assert_held_whole(in_valid: np.ndarray, polygon: np.ndarray, seed: int) -> None:
    """Every polygon's candidates are all held out or all kept for training."""
    for i in np.unique(polygon):
        held = in_valid[polygon == i]
        assert held.all() or not held.any(), (seed, i)


def test_sparse_polygons_are_held_out_whole():
    # Issue 18: 24 px cells (chosen to give 40 of them) cut polygons in two, so validation
    # pixels had training pixels of the same polygon beside them.
    for seed in range(10):
        cand, polygon = _polygons(36, np.random.default_rng(seed))
        split = plan_split(cand, None, 0.15, seed)
        assert split.scheme == "spatial-patches" and split.cell == 8, seed
        assert split.in_valid.any()
        _assert_held_whole(split.in_valid, polygon, seed)
        # the chip samplers' cells agree: every validation pixel's cell holds no training pixel
        cells = split.valid_cells(cand)
        assert split.assign(cand, cells).tolist() == split.in_valid.tolist()
        for v in (1, 2, 3):
            assert np.mean(~split.in_valid[cand.value == v]) >= min_train_share(0.15)
    # a cell given by the user is kept; dense labels are one patch and keep square cells
    cand, _ = _polygons(36, np.random.default_rng(0))
    assert plan_split(cand, 64, 0.15, 0).scheme == "spatial-cells"
    yy, xx = np.mgrid[0:320, 0:320]
    dense = Candidates(yy.ravel(), xx.ravel(), np.where(xx < 160, 1, 2).ravel())
    assert plan_split(dense, None, 0.15, 0).scheme == "spatial-cells"


def test_a_thinly_sampled_dense_map_keeps_square_cells_and_thinned_polygons_stay_whole():
    # A network samples at most 4,096 labelled pixels a block, so on a dense 1,024 px map
    # most 8 px cells held no sampled pixel: the map broke into some 170 "patches", each
    # held out with an 8 px ring, beside training pixels (a split that is spatial in name).
    yy, xx = np.mgrid[0:1024, 0:1024]
    dense = (1 + (yy // 200 + xx // 300) % 3).astype(np.uint8)
    cand = find_candidates(dense, 1024)
    assert cand.y.size == PER_BLOCK
    for seed in range(3):
        split = plan_split(cand, None, 0.15, seed)
        assert split.scheme == "spatial-cells" and split.cell >= 64, seed
    # 36 polygons of 40 x 40 px, 60 px apart, thinned alike: still held out whole
    polygons = np.zeros((1024, 1024), dtype=np.uint8)
    which = np.full(polygons.shape, -1)
    for i in range(36):
        y0, x0 = 20 + (i // 6) * 100, 20 + (i % 6) * 100
        polygons[y0 : y0 + 40, x0 : x0 + 40] = 1 + i % 3
        which[y0 : y0 + 40, x0 : x0 + 40] = i
    cand = find_candidates(polygons, 1024)
    assert cand.y.size == PER_BLOCK < int((polygons > 0).sum())
    polygon = which[cand.y, cand.x]
    for seed in range(3):
        split = plan_split(cand, None, 0.15, seed)
        assert split.scheme == "spatial-patches" and split.cell == 16, seed
        assert split.in_valid.any()
        _assert_held_whole(split.in_valid, polygon, seed)


def test_pixels_the_sample_missed_stay_with_their_held_out_polygon():
    # The split is planned on a sample of the labels (at most 4,096 per block for a
    # network); the forest, the linear fit and the chip samplers place every other labelled
    # pixel by its cell. A held-out polygon's edge pixel whose cell no sampled pixel fell
    # in must not train.
    for seed in range(10):
        every, polygon = _polygons(36, np.random.default_rng(seed))
        keep = np.random.default_rng(seed + 100).random(every.y.size) < 0.2
        sample = every.subset(keep)
        split = plan_split(sample, None, 0.15, seed)
        assert split.scheme == "spatial-patches", seed
        cells = split.valid_cells(sample)
        placed = split.assign(every, cells)
        assert placed[keep].tolist() == split.in_valid.tolist()  # the sample's own pixels do not move
        for i in np.unique(polygon[keep][split.in_valid]):
            assert placed[polygon == i].all(), (seed, i)


def test_color_jitter_changes_valid_pixels_only():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 8, 8)).astype(np.float32)
    valid = np.ones((8, 8), dtype=bool)
    valid[:2] = False
    image[:, ~valid] = 0.0
    out = augment.jitter(image, valid, 0.2, rng)
    assert np.all(out[:, ~valid] == 0.0)
    # One affine change for the whole chip: out = a * image + b on valid pixels.
    a, b = np.polyfit(image[:, valid].ravel(), out[:, valid].ravel(), 1)
    assert 0.8 <= a <= 1.2 and -0.2 <= b <= 0.2 and (a, b) != (1.0, 0.0)
    assert np.allclose(out[:, valid], a * image[:, valid] + b, atol=1e-5)


def test_the_eight_turns_are_distinct_and_the_same_for_every_array():
    image = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)  # no symmetry of its own
    labels = (image[0] % 7).astype(np.uint8)
    views = [augment.dihedral((image, labels), k) for k in range(8)]
    assert np.array_equal(views[0][0], image)  # k = 0 leaves a chip as it is
    assert len({v[0].tobytes() for v in views}) == 8  # every flip and rotation once
    for k, (img, lab) in enumerate(views):
        assert img.shape == image.shape and lab.shape == labels.shape
        # The labels turn with the image: a pixel keeps its label wherever it lands.
        assert np.array_equal((img[0] % 7).astype(np.uint8), lab), k
    # k >= 4 flips before it turns: chips and pasted objects share this one mapping.
    assert np.array_equal(views[5][0], np.rot90(image[..., ::-1], 1, axes=(-2, -1)))


def test_schedules(store, tmp_path):
    params = [torch.nn.Parameter(torch.zeros(1))]
    for name, first_is_peak in (("cosine", True), ("onecycle", False)):
        opt = torch.optim.AdamW(params, lr=0.1)
        sched = loop._schedule(opt, NetworkConfig(schedule=name, lr=0.1), 20)
        lrs = []
        for _ in range(20):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert (lrs[0] == pytest.approx(0.1)) is first_is_peak
        assert lrs[-1] < 0.01
        if name == "cosine":
            assert all(a >= b for a, b in itertools.pairwise(lrs))
    cfg = train_config(schedule="cosine", balanced_sampling=True, color_jitter=0.1, **TINY)
    spec = train(store, tmp_path / "m", cfg)
    assert spec.training["config"]["schedule"] == "cosine"
    assert np.isfinite(spec.training["history"][0]["train_loss"])


def test_export_chips_writes_georeferenced_pairs(store, tmp_path):
    import rasterio
    from typer.testing import CliRunner

    from segpipe.cli import app

    out = tmp_path / "chips"
    result = CliRunner().invoke(
        app, ["export-chips", str(store), str(out), "--chip-size", "32", "--count", "5", "--seed", "4"]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "index.csv").open()))
    assert len(rows) == 5
    info = read_region_info(store)
    image = open_layer(store, "image")
    labels = open_layer(store, "labels")
    for row in rows:
        y0, x0 = int(row["row"]), int(row["col"])
        with rasterio.open(out / row["image"]) as src:
            assert src.count == 4 and src.crs.to_wkt() == rasterio.crs.CRS.from_wkt(info.crs_wkt).to_wkt()
            assert src.transform.almost_equals(info.affine * rasterio.Affine.translation(x0, y0))
            assert np.array_equal(src.read(), image[:, y0 : y0 + 32, x0 : x0 + 32])
        with rasterio.open(out / row["label"]) as src:
            chip = src.read(1)
            assert np.array_equal(chip, labels[y0 : y0 + 32, x0 : x0 + 32])
        assert int(row["centre_class"]) in np.unique(chip)  # the centre lies inside its chip
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["band_names"] == list(info.band_names) and meta["chip_size"] == 32

    from segpipe.stages.train.chips import export_chips

    again = export_chips(store, tmp_path / "again", chip_size=32, count=5, seed=4)
    assert (tmp_path / "again" / "index.csv").read_text() == (out / "index.csv").read_text()
    assert again.count == 5
    balanced = export_chips(store, tmp_path / "bal", chip_size=32, count=40, seed=1, balanced=True)
    centres = [int(r["centre_class"]) for r in csv.DictReader(balanced.index.open())]
    assert len(set(centres)) == len(np.unique(labels[:][labels[:] > 0]))


def test_the_pieces_of_a_rank_loop(store, tmp_path):
    from segpipe.stages.train.checkpoint import checkpoint_path

    # 4 steps in all; the best epoch kept, whose bookkeeping (stale epochs) is checked below.
    cfg = NetworkConfig(**{**TINY, "epochs": 2, "threads": 1, "valid_fraction": 0.3, "keep": "best"})
    plan = loop.plan_training(store, cfg)
    assert plan.valid_windows
    # Given settings pass unchanged; those left at auto are chosen and recorded.
    assert all(getattr(plan.cfg, k) == getattr(cfg, k) for k in cfg.model_fields_set)
    assert set(plan.auto) == {k for k in adapt.AUTO_SETTINGS if getattr(cfg, k) is None}
    out = tmp_path / "m"
    checkpoint_path(out).parent.mkdir(parents=True)
    checkpoint_path(out).write_bytes(b"old")
    rank = loop._RankLoop(0, 1, plan, str(out))
    assert (rank.steps, rank.per_rank) == (2, 2)
    assert rank._start(resume=False) is None and not checkpoint_path(out).exists()  # afresh: old one gone
    rank.pace = loop._Pace(cfg.checkpoint_every, cfg.checkpoint_seconds)

    before = {k: v.clone() for k, v in rank.net.state_dict().items()}
    loss = rank._step()
    assert np.isfinite(loss) and any(not torch.equal(before[k], v) for k, v in rank.net.state_dict().items())
    assert np.isfinite(rank._epoch(1, None))

    record: dict = {"epoch": 1}
    rank._validate(record)
    assert {"valid_loss", "valid_miou", "valid_accuracy"} <= set(record)
    assert rank.state.best_score == record["valid_miou"] and rank.state.stale == 0
    kept = rank.state.best_weights
    rank.state.best_score = 2.0  # no mIoU beats it: the next validation is stale
    rank._validate({})
    assert rank.state.stale == 1 and rank.state.best_weights is kept

    rank._save(2, 0, 0.0)
    assert checkpoint_path(out).is_file()
    state = load_checkpoint_state(out, cfg)
    assert (state.epoch, state.step, state.stale) == (2, 0, 1)

    training = loop._training_record(plan, [record], 1.5, "cpu", {"epoch": 1, "step": 1})
    assert training["config"] == plan.cfg.model_dump() and training["seconds"] == 1.5
    assert training["auto"] == plan.auto and training["split"]["cell"] == plan.split.cell
    assert training["resumed_from"] == {"epoch": 1, "step": 1} and training["history"] == [record]
    assert training["valid_pixels_sampled"] == plan.valid_pixels > 0


def load_checkpoint_state(out, cfg):
    from segpipe.stages.train.checkpoint import load_checkpoint

    return load_checkpoint(out, cfg.resume_key())


def test_export_chips_replaces_the_folder_whole(store, tmp_path, monkeypatch):
    """A smaller export leaves only its own chips; a failed one leaves the earlier folder as it was."""
    from segpipe.stages.train import chips
    from segpipe.stages.train.chips import export_chips

    out = tmp_path / "chips"
    export_chips(store, out, chip_size=32, count=12, seed=4)
    (out / "notes.txt").write_text("mine")
    export_chips(store, out, chip_size=32, count=3, seed=4)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["dataset.json", "index.csv", "notes.txt",
                            *(f"{k}_{n:04d}.tif" for k in ("image", "label") for n in range(3))])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(folder, rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(chips, "_write_index", broken)
    with pytest.raises(OSError):
        export_chips(store, out, chip_size=16, count=20, seed=5)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".chips")) == []
