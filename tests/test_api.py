"""The Python API: the README's example runs as written; each function's typed result; open_region."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import rasterio
import zarr

import segpipe
from segpipe.io.store import NODATA_U8, create_layer
from segpipe.synth import synthesize

if TYPE_CHECKING:
    from distributed import Client

ROOT = Path(__file__).resolve().parents[1]
FOREST: dict[str, Any] = {"arch": "random_forest", "trees": 4, "valid_cell": 64, "threads": 1}


def readme_example() -> str:
    """The Python code block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text()
    _, found, rest = text.partition("\n## Python API\n")
    assert found, "README.md has no '## Python API' section"
    section = rest.split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    assert blocks, "the README's Python API section has no ```python block"
    return str(blocks[0])


def test_the_readmes_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = compile(readme_example(), str(ROOT / "README.md"), "exec")
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(code, namespace)
    # What the example shows is what it made.
    assert isinstance(namespace["region"], segpipe.IngestResult)
    assert isinstance(namespace["model"], segpipe.TrainResult)
    assert isinstance(namespace["summary"], segpipe.PredictSummary)
    assert isinstance(namespace["cog"], segpipe.ExportResult) and Path(namespace["cog"].path).is_file()
    assert isinstance(namespace["scores"], segpipe.EvaluateResult)
    assert Path(namespace["scores"].report).is_file()


def test_importing_segpipe_stays_light() -> None:
    """``import segpipe`` loads neither torch nor Prefect; every public name resolves, Prefect never."""
    script = (
        "import sys, segpipe\n"
        "heavy = [m for m in ('torch', 'prefect', 'xarray', 'distributed') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "missing = [n for n in segpipe.__all__ if getattr(segpipe, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert 'prefect' not in sys.modules\n"
        "assert set(segpipe.__all__) <= set(dir(segpipe))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)


def test_the_public_names() -> None:
    from segpipe import api
    from segpipe.io import store
    from segpipe.stages.predict import classify, driver

    assert segpipe.predict is api.predict and segpipe.train is api.train
    assert segpipe.open_region is store.open_region
    assert segpipe.classify is classify.classify
    assert segpipe.PredictSummary is driver.PredictSummary
    assert issubclass(segpipe.BandMismatchError, segpipe.InputError)
    assert issubclass(segpipe.SettingError, segpipe.InputError)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = segpipe.no_such_name  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return synthesize(tmp_path_factory.mktemp("scene"), size=192, bands=4, tiles=2, seed=0)


@pytest.fixture(scope="module")
def region(scene: Any, tmp_path_factory: pytest.TempPathFactory) -> segpipe.IngestResult:
    out = tmp_path_factory.mktemp("region") / "r.zarr"
    return segpipe.ingest([scene.image], out, labels=scene.labels, classes=scene.classes, block_size=64)


@pytest.fixture(scope="module")
def forest(region: segpipe.IngestResult, tmp_path_factory: pytest.TempPathFactory) -> segpipe.TrainResult:
    return segpipe.train(region.store, tmp_path_factory.mktemp("forest") / "model", **FOREST)


@pytest.fixture(scope="module")
def summary(
    region: segpipe.IngestResult, forest: segpipe.TrainResult, client: Client
) -> segpipe.PredictSummary:
    return segpipe.predict(region.store, forest.package, client=client, probabilities=True, task_size=64)


def test_ingest_result(region: segpipe.IngestResult, scene: Any) -> None:
    assert isinstance(region, segpipe.IngestResult)
    assert region.shape == (192, 192) and region.block_size == 64
    assert region.bands == ("blue", "green", "red", "nir")
    assert region.dtype == "uint16" and region.nodata == 0
    assert [c.value for c in region.classes] and all(isinstance(c, segpipe.ClassInfo) for c in region.classes)
    assert rasterio.crs.CRS.from_wkt(region.crs).to_epsg() == 32617
    with pytest.raises(dataclasses.FrozenInstanceError):
        region.shape = (1, 1)  # type: ignore[misc]


def test_train_result(forest: segpipe.TrainResult, region: segpipe.IngestResult) -> None:
    assert isinstance(forest.package, Path) and (forest.package / "model.json").is_file()
    assert forest.arch == "random_forest"
    assert forest.bands == region.bands and forest.classes
    assert forest.miou is not None and 0 <= forest.miou <= 1
    assert forest.metrics["miou"] == forest.miou and "per_class" in forest.metrics
    # What the split had to say (e.g. classes in too few cells to hold out) comes back too.
    recorded = json.loads((forest.package / "model.json").read_text())["training"]["warnings"]
    assert forest.warnings == tuple(recorded)


def test_train_settings_from_a_mapping_and_fields(region: segpipe.IngestResult, tmp_path: Path) -> None:
    result = segpipe.train(region.store, tmp_path / "m", config={**FOREST, "trees": 9}, trees=2)
    recorded = json.loads((result.package / "model.json").read_text())["training"]["config"]
    assert recorded["trees"] == 2 and recorded["arch"] == "random_forest"


def test_train_refuses_a_bad_setting_before_training(region: segpipe.IngestResult, tmp_path: Path) -> None:
    with pytest.raises(segpipe.SettingError, match="epochs"):
        segpipe.train(region.store, tmp_path / "m", epochs=0)
    with pytest.raises(segpipe.ArchitectureError, match="unknown architecture"):
        segpipe.train(region.store, tmp_path / "m", arch="transformer")
    assert not (tmp_path / "m").exists()


def test_train_on_a_cluster(region: segpipe.IngestResult, client: Client, tmp_path: Path) -> None:
    result = segpipe.train(region.store, tmp_path / "m", scheduler=client.scheduler.address, **FOREST)
    assert isinstance(result, segpipe.TrainResult) and (tmp_path / "m" / "model.json").is_file()


def test_predict_summary(summary: segpipe.PredictSummary) -> None:
    assert isinstance(summary, segpipe.PredictSummary)
    assert summary.blocks_total == 9 and summary.blocks_done == 9 and summary.tasks == 9


def test_export_result(region: segpipe.IngestResult, summary: segpipe.PredictSummary, tmp_path: Path) -> None:
    result = segpipe.export(region.store, tmp_path / "out" / "classes.tif")
    assert isinstance(result, segpipe.ExportResult) and result.layer == "classes"
    assert result.path == tmp_path / "out" / "classes.tif" and Path(result.path).is_file()
    assert result.stac_item == tmp_path / "out" / "classes.stac.json" and Path(result.stac_item).is_file()
    out = tmp_path / "out"
    assert result.legend == (out / "classes.tif.aux.xml", out / "classes.qml")
    assert set(result.files) == set(out.iterdir())  # every file written, and only those
    plain = segpipe.export(region.store, tmp_path / "conf.tif", layer="confidence", stac=False)
    assert plain.stac_item is None and not (tmp_path / "conf.stac.json").exists()
    assert plain.files == (tmp_path / "conf.tif",)


def test_evaluate_result(
    region: segpipe.IngestResult, summary: segpipe.PredictSummary, scene: Any, tmp_path: Path
) -> None:
    result = segpipe.evaluate(region.store, scene.truth, tmp_path / "report")
    assert isinstance(result, segpipe.EvaluateResult)
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert result.metrics == saved
    assert result.miou == saved["miou"] and result.overall_accuracy == saved["overall_accuracy"]
    assert result.kappa == saved["kappa"]
    assert all(isinstance(c, segpipe.ClassScore) for c in result.per_class)
    expected = [(c["value"], c["iou"]) for c in saved["per_class"]]
    assert [(c.value, c.iou) for c in result.per_class] == expected
    assert result.report == tmp_path / "report" / "report.md" and Path(result.report).is_file()
    assert result.metrics_file == tmp_path / "report" / "metrics.json"
    assert [Path(f).name for f in result.figures] == ["confusion_matrix.png", "preview.png"]
    assert all(Path(f).is_file() for f in result.figures) and result.points_file is None
    points = segpipe.evaluate(region.store, scene.truth, tmp_path / "points", points=200, preview=False)
    assert points.points_file is not None and Path(points.points_file).is_file()
    assert [Path(f).name for f in points.figures] == ["confusion_matrix.png"]


def test_open_region_as_a_pangeo_user_expects(
    region: segpipe.IngestResult, summary: segpipe.PredictSummary
) -> None:
    # A run in progress: its staged layers live in the hidden _predict group.
    create_layer(region.store, "_predict/classes", "uint8", NODATA_U8, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = segpipe.open_region(region.store)
        image = ds.image.values
    assert set(ds.data_vars) == {"image", "labels", "classes", "confidence", "probabilities"}
    assert not [d for d in ds.dims if str(d).startswith("block")]
    assert "spatial_ref" in ds.coords and ds.image.rio.crs.to_epsg() == 32617
    assert ds.classes.rio.crs == ds.image.rio.crs and ds.image.rio.nodata == 0
    assert ds.image.shape == (4, 192, 192) and image.dtype == np.uint16
    for name in ds.data_vars:  # one dask chunk per shard (block), whole along band and class
        chunks = ds[name].data.chunks
        assert chunks[-2:] == ((64, 64, 64), (64, 64, 64)) and all(len(c) == 1 for c in chunks[:-2])
    assert zarr.open_array(region.store, path="image", mode="r").shards == (4, 64, 64)


def test_open_region_without_predictions(scene: Any, tmp_path: Path) -> None:
    region = segpipe.ingest([scene.image], tmp_path / "r.zarr", block_size=128)
    ds = segpipe.open_region(region.store)
    assert set(ds.data_vars) == {"image"} and ds.image.data.chunks[1] == (128, 64)
    with pytest.raises(segpipe.MissingInputError):
        segpipe.open_region(tmp_path / "absent.zarr")


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: segpipe.predict(None, "model"), "store"),  # type: ignore[arg-type]
        (lambda: segpipe.train("s.zarr", None), "out"),  # type: ignore[arg-type]
        (lambda: segpipe.export("s.zarr", 3), "out"),  # type: ignore[arg-type]
        (lambda: segpipe.evaluate("s.zarr", None, "report"), "reference"),  # type: ignore[arg-type]
        (lambda: segpipe.preview(["a.tif"], "p.png"), "cog"),  # type: ignore[arg-type]
    ],
)
def test_an_argument_that_is_no_path_is_named(call: Any, name: str) -> None:
    with pytest.raises(segpipe.InputError, match=rf"^{name} must be a path or an s3:// URL"):
        call()
