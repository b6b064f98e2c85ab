"""process_region end to end on a small synthetic region, with Prefect's ephemeral engine."""

import json

import numpy as np
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate


def test_process_region_runs_every_stage(tmp_path, prefect_home):
    from flows.process_region import RegionRun, process_region
    from segpipe.synth import synthesize
    from segpipe.train import TrainConfig

    region = synthesize(tmp_path / "region", size=384, tiles=2, seed=2)
    run = RegionRun(
        images=[str(region.image)],
        store=str(tmp_path / "r.zarr"),
        labels=str(region.labels_vector),
        classes=str(region.classes),
        block_size=256,
        model=str(tmp_path / "model"),
        train=TrainConfig(epochs=2, samples_per_epoch=32, chip_size=64, batch_size=8),
        export_dir=str(tmp_path / "cog"),
        reference=str(region.truth),
        report_dir=str(tmp_path / "report"),
        baseline=True,
    )
    result = process_region(run)
    stages = [s["stage"] for s in result["stages"]]
    assert stages == [
        "ingest",
        "train",
        "predict",
        "export classes",
        "export confidence",
        "evaluate classes",
        "baseline (random forest)",
        "evaluate classes_rf",
    ]
    assert all(s["seconds"] > 0 for s in result["stages"])
    assert 0.0 <= result["miou"] <= 1.0 and 0.0 <= result["baseline_miou"] <= 1.0

    cog = tmp_path / "cog" / "classes.tif"
    valid, errors, _ = cog_validate(str(cog))
    assert valid, errors
    with rasterio.open(cog) as src, rasterio.open(region.truth) as truth:
        assert src.crs == truth.crs and src.transform == truth.transform
        assert src.nodata == 255
        assert src.colormap(1)[2][:3] == (31, 122, 31)  # forest's colour
        classes = src.read(1)
        ref = truth.read(1)
    assert np.array_equal(classes == 255, ref == 0)  # nodata corner stays nodata
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["miou"] == pytest.approx(result["miou"])
    assert (tmp_path / "report" / "confusion_matrix.png").stat().st_size > 0

    # A rerun with the same inputs and settings skips every finished stage and block.
    weights = (tmp_path / "model" / "weights.safetensors").stat().st_mtime_ns
    again = {s["stage"]: s for s in process_region(run)["stages"]}
    assert again["ingest"].get("skipped") and again["train"].get("skipped")
    assert again["predict"]["blocks_skipped"] == again["predict"]["blocks"]
    assert (tmp_path / "model" / "weights.safetensors").stat().st_mtime_ns == weights
    # Changed labels are new inputs: the store is rebuilt and the model retrained.
    region.labels_vector.touch()
    third = {s["stage"]: s for s in process_region(run)["stages"]}
    assert not third["ingest"].get("skipped") and not third["train"].get("skipped")


def test_a_failing_stage_fails_the_flow(tmp_path, prefect_home):
    from flows.process_region import RegionRun, process_region
    from segpipe.errors import MissingInputError

    run = RegionRun(
        images=[str(tmp_path / "missing.tif")],
        store=str(tmp_path / "r.zarr"),
        model=str(tmp_path / "m"),
        export_dir=str(tmp_path / "cog"),
    )
    with pytest.raises(MissingInputError):
        process_region(run)
    assert not (tmp_path / "r.zarr").exists()


def test_run_config_rejects_unknown_fields():
    from pydantic import ValidationError

    from flows.process_region import RegionRun

    with pytest.raises(ValidationError):
        RegionRun(images=["a.tif"], store="s", model="m", export_dir="e", epochs=3)
