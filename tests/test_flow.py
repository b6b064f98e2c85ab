"""process_region end to end on a small synthetic region, with Prefect's ephemeral engine."""

import json

import numpy as np
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate


def test_process_region_runs_every_stage(tmp_path, prefect_home, client):
    from flows.process_region import RegionRun, process_region
    from segpipe.stages.train import AutoConfig, NetworkConfig
    from segpipe.synth import synthesize

    region = synthesize(tmp_path / "region", size=384, tiles=2, seed=2)
    run = RegionRun(
        images=[str(region.image)],
        store=str(tmp_path / "r.zarr"),
        labels=str(region.labels_vector),
        classes=str(region.classes),
        block_size=256,
        model=str(tmp_path / "model"),
        # The flow, not the network, is under test: one short epoch, no validation (which
        # would cost more than the training), and predict on the module's running cluster
        # rather than a local one started by each of the three runs that predict (the
        # flow starting its own is test_batch's and test_flow_dask's).
        train=NetworkConfig(epochs=1, samples_per_epoch=16, chip_size=64, batch_size=8, valid_fraction=0),
        scheduler=client.scheduler.address,
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
    # Each report names the layer and the model it evaluates: the network's and the
    # forest's of the same store are told apart.
    baseline = json.loads((tmp_path / "report_baseline" / "metrics.json").read_text())
    assert (metrics["layer"], metrics["model"]["arch"]) == ("classes", "unet")
    assert metrics["model"]["package"] == str((tmp_path / "model").resolve())
    assert (baseline["layer"], baseline["model"]["arch"]) == ("classes_rf", "random_forest")
    titles = [(tmp_path / d / "report.md").read_text().splitlines()[0] for d in ("report", "report_baseline")]
    assert titles == ["# Accuracy assessment: classes of r.zarr (unet resnet18)",
                      "# Accuracy assessment: classes_rf of r.zarr (random_forest)"]
    assert (tmp_path / "report" / "confusion_matrix.png").stat().st_size > 0

    # A rerun with the same inputs and settings skips every stage: nothing is rewritten.
    products = [
        tmp_path / "model" / "weights.safetensors",
        cog,
        tmp_path / "cog" / "confidence.tif",
        tmp_path / "report" / "metrics.json",
        tmp_path / "report_baseline" / "metrics.json",
    ]
    before = {p: p.stat().st_mtime_ns for p in products}
    again = {s["stage"]: s for s in process_region(run)["stages"]}
    assert list(again) == stages
    assert [k for k, s in again.items() if not s.get("skipped")] == []
    assert again["predict"]["blocks_skipped"] == again["predict"]["blocks"]
    assert {p: p.stat().st_mtime_ns for p in products} == before
    assert again["evaluate classes"]["miou"] == pytest.approx(result["miou"])
    # Another model (other training settings) makes new predictions: predict, the exports
    # and the evaluation of its classes rerun; the store and the random forest stay.
    retrained = run.model_copy(update={"train": run.train.model_copy(update={"seed": 1})})
    third = {s["stage"]: s for s in process_region(retrained)["stages"]}
    rerun = {k for k, s in third.items() if not s.get("skipped")}
    assert rerun == {"train", "predict", "export classes", "export confidence", "evaluate classes"}
    assert third["predict"]["blocks_skipped"] == 0
    changed = {p for p in products if p.stat().st_mtime_ns != before[p]}
    assert changed == set(products[:4])
    # --arch auto in a region's settings: the forest and the U-Net train, the better is
    # kept, and a rerun with the same settings reuses it.
    auto = AutoConfig(**{**run.train.model_dump(exclude={"arch"}), "trees": 8, "budget_minutes": 2})
    selected = run.model_copy(update={"train": auto})
    fifth = {s["stage"]: s for s in process_region(selected)["stages"]}
    kept = json.loads((tmp_path / "model" / "model.json").read_text())["training"]["selection"]
    assert not fifth["train"].get("skipped") and kept["requested"]["arch"] == "auto"
    assert {"unet", "random_forest"} <= set(kept["models"]) and fifth["train"]["megapixels"] > 0
    again = {s["stage"]: s for s in process_region(selected)["stages"]}
    assert again["train"].get("skipped") and again["predict"]["blocks_skipped"] == again["predict"]["blocks"]
    # Changed labels are new inputs: the store is rebuilt and the model retrained.
    region.labels_vector.touch()
    fourth = {s["stage"]: s for s in process_region(run)["stages"]}
    assert not fourth["ingest"].get("skipped") and not fourth["train"].get("skipped")


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
