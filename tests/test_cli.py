"""The command line: help for every command, one-line errors with exit code 2, no half-written output."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

COMMANDS = ["synth", "ingest", "train", "predict", "export", "export-model", "preview", "evaluate", "demo"]


def segpipe(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "segpipe.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def write_tile(path, crs="EPSG:32617", origin=(500000.0, 4000000.0), bands=3, dtype="uint16"):
    data = np.arange(bands * 64 * 64, dtype=dtype).reshape(bands, 64, 64) % 1000 + 1
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=bands,
        dtype=dtype,
        crs=crs,
        transform=from_origin(*origin, 10, 10),
        nodata=0,
    ) as dst:
        dst.write(data)
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = segpipe(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_missing_input_is_one_line_and_exit_2(tmp_path):
    result = segpipe("ingest", tmp_path / "nope.tif", "--out", tmp_path / "s.zarr")
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope.tif" in lines[0]
    assert not (tmp_path / "s.zarr").exists()


def test_mismatched_tiles_name_the_file(tmp_path):
    a = write_tile(tmp_path / "a.tif")
    b = write_tile(tmp_path / "b.tif", crs="EPSG:32618", origin=(500640.0, 4000000.0))
    result = segpipe("ingest", a, b, "--out", tmp_path / "s.zarr")
    assert result.returncode == 2
    assert "b.tif" in result.stderr and "error:" in result.stderr
    assert not (tmp_path / "s.zarr").exists()
    assert not list(tmp_path.glob(".s.zarr*"))


def test_labels_outside_the_image_leave_nothing(tmp_path):
    image = write_tile(tmp_path / "a.tif")
    labels = tmp_path / "labels.tif"
    with rasterio.open(
        labels,
        "w",
        driver="GTiff",
        width=16,
        height=16,
        count=1,
        dtype="uint8",
        crs="EPSG:32617",
        transform=from_origin(900000.0, 1000000.0, 10, 10),
    ) as dst:
        dst.write(np.ones((1, 16, 16), dtype="uint8"))
    result = segpipe("ingest", image, "--out", tmp_path / "s.zarr", "--labels", labels)
    assert result.returncode == 2
    assert "overlap" in result.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_unknown_architecture(tmp_path):
    result = segpipe("train", tmp_path / "s.zarr", "--out", tmp_path / "m", "--arch", "segformer")
    assert result.returncode == 2
    assert "segformer" in result.stderr and "unet" in result.stderr
    assert not (tmp_path / "m").exists()


def test_bad_option_values_are_named(tmp_path):
    write_tile(tmp_path / "a.tif")
    result = segpipe("train", tmp_path / "s.zarr", "--out", tmp_path / "m", "--chip-size", "100")
    assert result.returncode == 2
    assert "--chip-size" in result.stderr


def test_missing_store_for_predict_and_export(tmp_path):
    for args in (
        ("predict", tmp_path / "none.zarr", "--model", tmp_path / "m"),
        ("export", tmp_path / "none.zarr", "--out", tmp_path / "o.tif"),
    ):
        result = segpipe(*args)
        assert result.returncode == 2, result.stderr
        assert "none.zarr" in result.stderr
    assert not (tmp_path / "o.tif").exists()


def test_ingest_prints_sizes_width_first(tmp_path):
    tile = tmp_path / "wide.tif"
    with rasterio.open(
        tile,
        "w",
        driver="GTiff",
        width=96,
        height=32,
        count=1,
        dtype="uint16",
        crs="EPSG:32617",
        transform=from_origin(500000.0, 4000000.0, 10, 10),
    ) as dst:
        dst.write(np.arange(96 * 32, dtype="uint16").reshape(1, 32, 96) + 1)
    result = segpipe("ingest", tile, "--out", tmp_path / "s.zarr", "--block-size", "32")
    assert result.returncode == 0, result.stderr
    assert "96 x 32 px" in result.stderr and "32 x 96" not in result.stderr


def test_train_reports_progress_within_the_first_epoch_to_a_pipe(tmp_path):
    from segpipe.stages.ingest.driver import ingest
    from segpipe.synth import synthesize

    region = synthesize(tmp_path / "region", size=256, bands=3, tiles=1, seed=3)
    store = tmp_path / "r.zarr"
    ingest([region.image], store, labels=region.labels, classes=region.classes, block_size=128)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "segpipe.cli", "train", str(store), "--out", str(tmp_path / "m")),
            *("--epochs", "1", "--samples-per-epoch", "8", "--chip-size", "32", "--batch-size", "2"),
            # One network: this small scene would otherwise train three (tests/test_members.py).
            *("--device", "cpu", "--valid-fraction", "0.3", "--members", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SEGPIPE_PROGRESS_INTERVAL": "0"},
    )
    assert result.returncode == 0, result.stderr
    steps = [ln for ln in result.stderr.splitlines() if ln.strip().startswith("train: ")]
    # Four steps of the only epoch, each a line, before the epoch's summary: a log
    # file shows training move long before an epoch ends.
    assert any(ln.strip().startswith("train: 0.25/1 (25%) epoch 1/1 loss") for ln in steps), result.stderr
    assert len(steps) >= 4
    assert (tmp_path / "m" / "model.json").is_file()


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("epochs: 2\nepoch: 3\n", ["epoch: unknown setting", "samples_per_epoch"]),
        ("epochs: ten\n", ["epochs:", "valid integer", "'ten'"]),
        ("chip_size: 100\n", ["chip_size:", "multiple of 32", "100"]),
        ("arch: random_forest\nloss: focal\n", ["loss:", "--arch random_forest does not use loss='focal'"]),
        ("trees: 5\n", ["trees:", "--arch unet does not use trees=5"]),
        ("arch: segformer\n", ["arch:", "unknown architecture", "'segformer'", "random_forest"]),
        ("- epochs: 2\n", ["mapping", "list"]),
        ("epochs: [1\n", ["not valid YAML", "line"]),
    ],
)
def test_train_config_file_errors_name_the_file_and_the_key(tmp_path, text, needles):
    config = tmp_path / "train.yaml"
    config.write_text(text)
    result = segpipe("train", tmp_path / "s.zarr", "--out", tmp_path / "m", "--config", config)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(config) in lines[0], result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "m").exists()


def test_missing_train_config_file_is_named(tmp_path):
    result = segpipe("train", tmp_path / "s.zarr", "--out", tmp_path / "m", "--config", tmp_path / "no.yaml")
    assert result.returncode == 2 and "no.yaml" in result.stderr


@pytest.fixture
def settings_seen(monkeypatch):
    """Runs ``segpipe train`` in-process up to the settings; what the training would get."""
    import segpipe.cli as cli

    seen = {}

    def fake_run(store, out, cfg, resume, scheduler):
        seen.update(cfg=cfg, resume=resume, scheduler=scheduler)
        return type("Spec", (), {"metrics": {"miou": 0.5}, "training": {"kept_epoch": 2}})(), None

    monkeypatch.setattr(cli, "_run_training", fake_run)
    # The fake training writes no package for the forest baseline to be scored beside.
    monkeypatch.setattr("segpipe.stages.train.select.compare_with_forest", lambda *args: None)

    def invoke(*args):
        from typer.testing import CliRunner

        result = CliRunner().invoke(cli.app, ["train", "s.zarr", "--out", "m", *map(str, args)])
        return result, seen.get("cfg")

    return invoke


def test_options_override_the_config_file(tmp_path, settings_seen):
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 2\nchip_size: 64\nloss: focal\nclip_percentiles: [2, 98]\n")
    result, cfg = settings_seen("--config", config, "--epochs", "5", "--seed", "0")
    assert result.exit_code == 0, result.output
    assert (cfg.epochs, cfg.chip_size, cfg.loss, cfg.seed) == (5, 64, "focal", 0)
    assert "valid mIoU 0.500, the weights of epoch 2" in result.output
    assert cfg.clip_percentiles == (2.0, 98.0)
    # An option left at its default does not hide the file's value.
    config.write_text("arch: random_forest\ntrees: 7\n")
    result, cfg = settings_seen("--config", config)
    assert result.exit_code == 0, result.output
    assert (cfg.arch, cfg.trees) == ("random_forest", 7)
    # A flag given explicitly wins over the file, even when it says the default.
    config.write_text("class_balancing: true\n")
    result, cfg = settings_seen("--config", config, "--no-class-balancing")
    assert result.exit_code == 0 and cfg.class_balancing is False


def test_option_of_the_other_family_over_a_file_is_named_as_an_option(tmp_path, settings_seen):
    from segpipe.errors import InputError

    config = tmp_path / "train.yaml"
    config.write_text("arch: random_forest\n")
    result, _ = settings_seen("--config", config, "--epochs", "3")
    assert isinstance(result.exception, InputError)
    assert str(result.exception).startswith("--arch random_forest does not use epochs=3")
    result, _ = settings_seen("--config", config, "--trees", "0")
    assert str(result.exception).startswith("--trees 0: Input should be greater than or equal to 1")


def test_keep_reaches_the_settings_and_a_wrong_value_is_named(settings_seen):
    from segpipe.errors import InputError

    result, cfg = settings_seen("--keep", "last")
    assert result.exit_code == 0, result.output
    assert cfg.keep == "last"
    result, _ = settings_seen("--keep", "sideways")
    assert isinstance(result.exception, InputError)
    assert str(result.exception).startswith("--keep 'sideways': Input should be 'best' or 'last'")
    result, _ = settings_seen("--arch", "random_forest", "--keep", "last")
    assert str(result.exception).startswith("--arch random_forest does not use keep='last'")


def test_old_option_names_still_work_but_the_help_shows_the_settings(settings_seen):
    from segpipe.cli import _DEFAULTS

    result, cfg = settings_seen("--backbone", "resnet34", "--dice", "0.3")
    assert result.exit_code == 0, result.output
    assert (cfg.encoder, cfg.dice_weight) == ("resnet34", 0.3)
    result, _ = settings_seen("--backbone", "resnet34", "--encoder", "resnet18")
    assert "--backbone is the old name of --encoder" in str(result.exception)
    wide = {**os.environ, "COLUMNS": "200", "TERMINAL_WIDTH": "200"}  # no option name cut short
    cli = [sys.executable, "-m", "segpipe.cli", "train", "--help"]
    help_text = subprocess.run(cli, capture_output=True, text=True, timeout=300, env=wide).stdout
    for name in _DEFAULTS:
        assert f"--{name.replace('_', '-')} " in help_text, name
    assert "--backbone" not in help_text and "--dice " not in help_text and "--config" in help_text


def test_train_progress_report_prints_epochs_and_moves_the_bar(capsys):
    from segpipe.cli import _train_report
    from segpipe.stages.train import TrainProgress

    updates = []

    class Bar:
        def update(self, task, **fields):
            updates.append((task, fields))

    report = _train_report(Bar(), 3)
    report(TrainProgress(2, 4, 1, 4, 0.5))
    report(TrainProgress(2, 4, 4, 4, 0.25, {"train_loss": 0.25, "valid_loss": 0.5, "valid_miou": 0.75}))
    assert updates == [
        (3, {"total": 4, "completed": 1.25, "info": "epoch 2/4 loss 0.500"}),
        (3, {"total": 4, "completed": 2.0, "info": "epoch 2/4 loss 0.250"}),
    ]
    printed = capsys.readouterr().err
    assert "epoch 2: train loss 0.250, valid loss 0.500, valid mIoU 0.750" in printed


def test_train_with_a_config_file_end_to_end(tmp_path):
    from segpipe.stages.ingest.driver import ingest
    from segpipe.synth import synthesize

    region = synthesize(tmp_path / "region", size=128, bands=3, tiles=1, seed=3)
    store = tmp_path / "r.zarr"
    ingest([region.image], store, labels=region.labels, classes=region.classes, block_size=64)
    config = tmp_path / "train.yaml"
    config.write_text("arch: random_forest\ntrees: 4\nvalid_cell: 32\nthreads: 1\nforest_context: 3\n")
    result = segpipe("train", store, "--out", tmp_path / "m", "--config", config, "--trees", "6")
    assert result.returncode == 0, result.stderr
    model = json.loads((tmp_path / "m" / "model.json").read_text())
    assert model["arch"] == "random_forest" and model["options"]["n_trees"] == 6
    assert model["training"]["config"]["forest_context"] == 3


def test_gdal_block_cache_is_bounded_unless_the_user_sets_it(monkeypatch):
    import segpipe.cli as cli

    for given, expected in ((None, cli.GDAL_CACHE_DEFAULT), ("64", "64")):
        if given is None:
            monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
        else:
            monkeypatch.setenv("GDAL_CACHEMAX", given)
        monkeypatch.setattr(sys, "argv", ["segpipe", "--version"])
        cli.main()
        assert os.environ["GDAL_CACHEMAX"] == expected
