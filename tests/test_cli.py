"""The command line: help for every command, one-line errors with exit code 2, no half-written output."""

import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

COMMANDS = ["synth", "ingest", "train", "predict", "export", "evaluate", "demo"]


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
            *("--device", "cpu", "--valid-fraction", "0.3"),
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
