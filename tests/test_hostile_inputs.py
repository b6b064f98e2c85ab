"""Hostile and broken inputs, tried as a new user would: a named error or a correct result, never a loss.

Every case runs the ``segpipe`` command (in-process through ``segpipe.cli.main``, or the
installed console script where the entry point itself is under test) and asserts:

- the exit code of its family (2 bad input or usage, 3 a fault of the environment,
  4 a store held by another run; 0 where segpipe copes and says so);
- stderr holds exactly one ``error:`` line, which names the culprit (the file, tile,
  store, option or address), and no traceback;
- an earlier complete result (a predicted store, a COG) is byte-identical afterwards;
- nothing half-written is left beside the destination.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import rasterio
from cli_support import Outcome, run_inprocess
from rasterio.transform import from_origin

if TYPE_CHECKING:
    from distributed import Client

SIZE = 128
BLOCK = 64


@dataclass(frozen=True)
class World:
    """A small finished project: a region, its store, a forest package, a predicted store and a COG."""

    root: Path
    image: Path
    tiles: tuple[Path, ...]
    labels: Path
    labels_vector: Path
    classes: Path
    store: Path
    model: Path
    predicted: Path
    cog: Path
    scheduler: str


@pytest.fixture(scope="module")
def threads_client() -> Iterator[Client]:
    """An in-process dask cluster (threads) for the world and the predict cases.

    Worker processes would add seconds of start-up and imports, and nothing here needs
    them: the world's prediction is set-up, and the predict cases are about what the
    command refuses.
    """
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, threads_client: Client) -> World:
    from segpipe.stages.export.cog import write_cog
    from segpipe.stages.ingest.driver import ingest
    from segpipe.stages.predict.driver import predict
    from segpipe.stages.train import ForestConfig, train
    from segpipe.synth import synthesize

    root = tmp_path_factory.mktemp("world")
    region = synthesize(root / "region", size=SIZE, bands=3, tiles=2, seed=1)
    store = root / "store.zarr"
    ingest(region.image, store, labels=region.labels, classes=region.classes, block_size=BLOCK)
    model = root / "forest"
    train(store, model, ForestConfig(trees=4))
    predicted = root / "predicted.zarr"
    shutil.copytree(store, predicted)
    predict(predicted, model, client=threads_client)
    cog = root / "classes.tif"
    write_cog(predicted, cog)
    return World(root, region.image, region.tiles, region.labels, region.labels_vector, region.classes,
                 store, model, predicted, cog, threads_client.scheduler.address)


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself), with a hash of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def console_script() -> str:
    found = Path(sys.executable).parent / "segpipe"
    return str(found) if found.exists() else (shutil.which("segpipe") or "segpipe")


def run_script(args: list[str], cwd: Path) -> Outcome:
    env = {k: v for k, v in os.environ.items() if k != "SEGPIPE_DEBUG"}
    done = subprocess.run([console_script(), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)
    return Outcome(done.returncode, done.stderr)


@dataclass
class Case:
    """One hostile input: the arguments, the expected exit code, the culprit the message names.

    Attributes:
        args: Command-line arguments.
        code: Expected exit code (a set where either family is defensible).
        culprit: Text the one ``error:`` line must contain (None: usage errors, any text).
        protected: Earlier results that must be byte-identical afterwards.
        absent: Paths that must not exist afterwards (nothing half-written).
        script: Run through the installed console script instead of in-process (the entry
            point itself, or commands that start Prefect, whose log handlers outlive a
            captured stream).
        env: Environment variables set for the command.
    """

    args: list[str]
    code: int | tuple[int, ...] = 2
    culprit: str | None = None
    protected: list[Path] = field(default_factory=list)
    absent: list[Path] = field(default_factory=list)
    script: bool = False
    env: dict[str, str] = field(default_factory=dict)


Builder = Callable[[World, Path], Case]
CASES: dict[str, Builder] = {}


def case(name: str) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        CASES[name] = fn
        return fn

    return register


# ---------------------------------------------------------------- inputs written for the cases


def write_raster(path: Path, data: np.ndarray, nodata: float | None = None, crs: str = "EPSG:32617",
                 origin: tuple[float, float] = (500000.0, 4000000.0)) -> Path:
    bands, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=bands, dtype=data.dtype,
                       crs=crs, transform=from_origin(*origin, 10, 10), nodata=nodata) as dst:
        dst.write(data)
    return path


def copy_model(w: World, tmp: Path) -> Path:
    return Path(shutil.copytree(w.model, tmp / "model"))


def edit_model_json(w: World, tmp: Path, edit: Callable[[dict], object]) -> Path:
    model = copy_model(w, tmp)
    spec = json.loads((model / "model.json").read_text())
    result = edit(spec)
    (model / "model.json").write_text(json.dumps(spec if result is None else result))
    return model


def predicted_copy(w: World, tmp: Path) -> Path:
    return Path(shutil.copytree(w.predicted, tmp / "predicted.zarr"))


def predict_case(w: World, tmp: Path, model: Path, culprit: str, *extra: str) -> Case:
    store = predicted_copy(w, tmp)
    return Case(["predict", str(store), "--model", str(model), "--scheduler", w.scheduler, *extra],
                culprit=culprit, protected=[store])


def cut_chunk(store: Path, layer: str) -> Path:
    """Cut the layer's first chunk file to half its bytes (a disk or a copy that lost its end)."""
    chunk = min(p for p in (store / layer / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    return store


def weights(model: Path) -> Path:
    return model / "weights.safetensors"


# ---------------------------------------------------------------- usage (the console script itself)


@case("usage: no arguments")
def _(w: World, tmp: Path) -> Case:
    return Case([], script=True)


@case("usage: unknown command")
def _(w: World, tmp: Path) -> Case:
    return Case(["frobnicate"], culprit="frobnicate", script=True)


@case("usage: synth without --out")
def _(w: World, tmp: Path) -> Case:
    return Case(["synth"], culprit="--out", script=True)


@case("usage: --size not a number")
def _(w: World, tmp: Path) -> Case:
    return Case(["synth", "--out", str(tmp / "s"), "--size", "abc"], culprit="abc", script=True,
                absent=[tmp / "s"])


@case("usage: unknown option")
def _(w: World, tmp: Path) -> Case:
    return Case(["export", str(w.predicted), "--out", str(tmp / "x.tif"), "--colour", "red"],
                culprit="--colour", absent=[tmp / "x.tif"])


@case("usage: --task-runner of another kind")
def _(w: World, tmp: Path) -> Case:
    region = tmp / "region.yaml"
    region.write_text("name: r\n")
    return Case(["run", str(region), "--task-runner", "celery"], culprit="celery", script=True)


# ---------------------------------------------------------------- ingest


@case("ingest: a STAC file that is not valid JSON")
def _(w: World, tmp: Path) -> Case:
    (tmp / "scene.stac.json").write_text('{"type": "Feature", ')
    return Case(["ingest", str(tmp / "scene.stac.json"), "--out", str(tmp / "s.zarr")],
                culprit="not valid JSON", absent=[tmp / "s.zarr"])


@case("ingest: image does not exist")
def _(w: World, tmp: Path) -> Case:
    return Case(["ingest", str(tmp / "nope.tif"), "--out", str(tmp / "s.zarr")], culprit="nope.tif",
                absent=[tmp / "s.zarr"])


@case("ingest: empty file named .tif")
def _(w: World, tmp: Path) -> Case:
    (tmp / "empty.tif").write_bytes(b"")
    return Case(["ingest", str(tmp / "empty.tif"), "--out", str(tmp / "s.zarr")], culprit="empty.tif",
                absent=[tmp / "s.zarr"])


@case("ingest: text file named .tif")
def _(w: World, tmp: Path) -> Case:
    (tmp / "notes.tif").write_text("these are my notes, not a raster\n")
    return Case(["ingest", str(tmp / "notes.tif"), "--out", str(tmp / "s.zarr")], culprit="notes.tif",
                absent=[tmp / "s.zarr"])


@case("ingest: a tile truncated in the middle of the mosaic")
def _(w: World, tmp: Path) -> Case:
    tiles = [Path(shutil.copy(t, tmp / t.name)) for t in w.tiles]
    broken = tiles[-1]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    return Case(["ingest", *map(str, tiles), "--out", str(tmp / "s.zarr")], culprit=broken.name,
                absent=[tmp / "s.zarr"])


@case("ingest: a VRT of width 0")
def _(w: World, tmp: Path) -> Case:
    vrt = tmp / "zero.vrt"
    vrt.write_text('<VRTDataset rasterXSize="0" rasterYSize="64"><SRS>EPSG:32617</SRS>'
                   '<GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform>'
                   '<VRTRasterBand dataType="UInt16" band="1"/></VRTDataset>')
    return Case(["ingest", str(vrt), "--out", str(tmp / "s.zarr")], culprit="zero.vrt",
                absent=[tmp / "s.zarr"])


@case("ingest: a VRT whose source is missing")
def _(w: World, tmp: Path) -> Case:
    vrt = tmp / "lost.vrt"
    vrt.write_text('<VRTDataset rasterXSize="64" rasterYSize="64"><SRS>EPSG:32617</SRS>'
                   '<GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform>'
                   '<VRTRasterBand dataType="UInt16" band="1"><SimpleSource>'
                   '<SourceFilename relativeToVRT="1">gone.tif</SourceFilename><SourceBand>1</SourceBand>'
                   '</SimpleSource></VRTRasterBand></VRTDataset>')
    return Case(["ingest", str(vrt), "--out", str(tmp / "s.zarr")], culprit="gone.tif",
                absent=[tmp / "s.zarr"])


@case("ingest: a folder without rasters")
def _(w: World, tmp: Path) -> Case:
    (tmp / "docs").mkdir()
    (tmp / "docs" / "readme.txt").write_text("nothing here")
    return Case(["ingest", str(tmp / "docs"), "--out", str(tmp / "s.zarr")], culprit="docs",
                absent=[tmp / "s.zarr"])


@case("ingest: float imagery that is all NaN")
def _(w: World, tmp: Path) -> Case:
    write_raster(tmp / "nan.tif", np.full((2, 64, 64), np.nan, dtype="float32"), nodata=float("nan"))
    return Case(["ingest", str(tmp / "nan.tif"), "--out", str(tmp / "s.zarr")], culprit="nan.tif",
                absent=[tmp / "s.zarr"])


@case("ingest: imagery that is all nodata")
def _(w: World, tmp: Path) -> Case:
    write_raster(tmp / "blank.tif", np.zeros((3, 64, 64), dtype="uint16"), nodata=0)
    return Case(["ingest", str(tmp / "blank.tif"), "--out", str(tmp / "s.zarr")], culprit="blank.tif",
                absent=[tmp / "s.zarr"])


@case("ingest: tiles in two CRSs")
def _(w: World, tmp: Path) -> Case:
    data = np.arange(3 * 64 * 64, dtype="uint16").reshape(3, 64, 64) % 1000 + 1
    a = write_raster(tmp / "a.tif", data, nodata=0)
    b = write_raster(tmp / "b.tif", data, nodata=0, crs="EPSG:32618", origin=(500640.0, 4000000.0))
    return Case(["ingest", str(a), str(b), "--out", str(tmp / "s.zarr")], culprit="b.tif",
                absent=[tmp / "s.zarr"])


@case("ingest: label raster does not exist")
def _(w: World, tmp: Path) -> Case:
    return Case(["ingest", str(w.image), "--out", str(tmp / "s.zarr"), "--labels", str(tmp / "truth.tif")],
                culprit="truth.tif", absent=[tmp / "s.zarr"])


@case("ingest: labels far outside the image")
def _(w: World, tmp: Path) -> Case:
    far = write_raster(tmp / "far.tif", np.ones((1, 16, 16), dtype="uint8"), origin=(900000.0, 1000000.0))
    return Case(["ingest", str(w.image), "--out", str(tmp / "s.zarr"), "--labels", str(far)],
                culprit="far.tif", absent=[tmp / "s.zarr"])


@case("ingest: polygons without the named class field")
def _(w: World, tmp: Path) -> Case:
    return Case(["ingest", str(w.image), "--out", str(tmp / "s.zarr"), "--labels", str(w.labels_vector),
                 "--label-field", "landcover_code"], culprit="landcover_code", absent=[tmp / "s.zarr"])


@case("ingest: classes.json that is not JSON")
def _(w: World, tmp: Path) -> Case:
    (tmp / "classes.json").write_text("{water: blue, forest: green")
    return Case(["ingest", str(w.image), "--out", str(tmp / "s.zarr"), "--labels", str(w.labels),
                 "--classes", str(tmp / "classes.json")], culprit="classes.json", absent=[tmp / "s.zarr"])


@case("ingest: onto an existing store without --overwrite")
def _(w: World, tmp: Path) -> Case:
    store = predicted_copy(w, tmp)
    return Case(["ingest", str(w.image), "--out", str(store)], culprit="predicted.zarr", protected=[store])


@case("ingest: a block size that is no shard size")
def _(w: World, tmp: Path) -> Case:
    return Case(["ingest", str(w.image), "--out", str(tmp / "s.zarr"), "--block-size", "300"],
                culprit="300", absent=[tmp / "s.zarr"])


# ---------------------------------------------------------------- train


@case("train: the store does not exist")
def _(w: World, tmp: Path) -> Case:
    return Case(["train", str(tmp / "nope.zarr"), "--out", str(tmp / "m"), "--arch", "random_forest"],
                culprit="nope.zarr", absent=[tmp / "m"])


@case("train: the store's zarr.json is garbage")
def _(w: World, tmp: Path) -> Case:
    store = Path(shutil.copytree(w.store, tmp / "damaged.zarr"))
    (store / "zarr.json").write_text("\x00\x01 not json")
    return Case(["train", str(store), "--out", str(tmp / "m"), "--arch", "random_forest"],
                culprit="damaged.zarr", absent=[tmp / "m"])


@case("train: the store's zarr.json is cut short")
def _(w: World, tmp: Path) -> Case:
    store = Path(shutil.copytree(w.store, tmp / "cut.zarr"))
    text = (store / "zarr.json").read_text()
    (store / "zarr.json").write_text(text[: len(text) // 3])
    return Case(["train", str(store), "--out", str(tmp / "m"), "--arch", "random_forest"],
                culprit="cut.zarr", absent=[tmp / "m"])


@case("train: a store without labels")
def _(w: World, tmp: Path) -> Case:
    from segpipe.stages.ingest.driver import ingest

    store = tmp / "unlabelled.zarr"
    ingest(w.image, store, block_size=BLOCK)
    return Case(["train", str(store), "--out", str(tmp / "m"), "--arch", "random_forest"],
                culprit="labels", absent=[tmp / "m"])


@case("train: an unknown architecture")
def _(w: World, tmp: Path) -> Case:
    return Case(["train", str(w.store), "--out", str(tmp / "m"), "--arch", "transformer9000"],
                culprit="transformer9000", absent=[tmp / "m"])


@case("train: zero epochs")
def _(w: World, tmp: Path) -> Case:
    return Case(["train", str(w.store), "--out", str(tmp / "m"), "--epochs", "0"], culprit="--epochs",
                absent=[tmp / "m"])


@case("train: an unknown loss")
def _(w: World, tmp: Path) -> Case:
    return Case(["train", str(w.store), "--out", str(tmp / "m"), "--loss", "hinge"], culprit="hinge",
                absent=[tmp / "m"])


@case("train: an even forest window")
def _(w: World, tmp: Path) -> Case:
    return Case(["train", str(w.store), "--out", str(tmp / "m"), "--arch", "random_forest",
                 "--forest-context", "4"], culprit="4", absent=[tmp / "m"])


@case("train: --out is an existing file")
def _(w: World, tmp: Path) -> Case:
    (tmp / "m").write_text("my notes")
    return Case(["train", str(w.store), "--out", str(tmp / "m"), "--arch", "random_forest"], code=(2, 3),
                culprit=str(tmp / "m"), protected=[tmp / "m"])


@case("train: --out is a region store")
def _(w: World, tmp: Path) -> Case:
    store = Path(shutil.copytree(w.store, tmp / "other.zarr"))
    return Case(["train", str(w.store), "--out", str(store), "--arch", "random_forest"], culprit="other.zarr",
                protected=[store])


@case("train: a network's --out is a file, refused before training")
def _(w: World, tmp: Path) -> Case:
    (tmp / "m").write_text("mine")
    # Thousands of epochs: the case would run for hours if the refusal came after training.
    return Case(["train", str(w.store), "--out", str(tmp / "m"), "--arch", "unet", "--epochs", "5000"],
                culprit="m", protected=[tmp / "m"])


@case("train: a band constant inside the labelled area")
def _(w: World, tmp: Path) -> Case:
    from segpipe.stages.ingest.driver import ingest

    rng = np.random.default_rng(0)
    data = rng.integers(100, 2000, size=(3, 64, 64)).astype("uint16")
    data[1] = 500
    image = write_raster(tmp / "flat.tif", data, nodata=0)
    classes = (1 + (np.arange(64 * 64) % 2)).reshape(1, 64, 64).astype("uint8")
    labels = write_raster(tmp / "labels.tif", classes, nodata=None)
    store = tmp / "flat.zarr"
    ingest(image, store, labels=labels, block_size=64)
    return Case(["train", str(store), "--out", str(tmp / "m"), "--arch", "random_forest"],
                culprit="band2", absent=[tmp / "m"])


# ---------------------------------------------------------------- predict over an earlier complete result


@case("predict: a chunk of the image cut short")
def _(w: World, tmp: Path) -> Case:
    store = cut_chunk(predicted_copy(w, tmp), "image")
    # The earlier prediction's layers stay; the run's staging is kept for a resume, as on any failure.
    return Case(["predict", str(store), "--model", str(w.model), "--scheduler", w.scheduler, "--force"],
                culprit="predicted.zarr", protected=[store / "classes", store / "confidence"])


@case("predict: the model package does not exist")
def _(w: World, tmp: Path) -> Case:
    return predict_case(w, tmp, tmp / "missing-model", "missing-model")


@case("predict: model.json is a JSON list")
def _(w: World, tmp: Path) -> Case:
    return predict_case(w, tmp, edit_model_json(w, tmp, lambda spec: [spec]), "model.json")


@case("predict: model.json is not JSON")
def _(w: World, tmp: Path) -> Case:
    model = copy_model(w, tmp)
    (model / "model.json").write_text("{ not json")
    return predict_case(w, tmp, model, "model.json")


@case("predict: model.json has output_stride 0")
def _(w: World, tmp: Path) -> Case:
    return predict_case(w, tmp, edit_model_json(w, tmp, lambda spec: spec.update(output_stride=0)),
                        "output_stride")


@case("predict: model.json names an unknown architecture")
def _(w: World, tmp: Path) -> Case:
    return predict_case(w, tmp, edit_model_json(w, tmp, lambda spec: spec.update(arch="transformer9000")),
                        "transformer9000")


@case("predict: normalisation for another number of bands")
def _(w: World, tmp: Path) -> Case:
    def drop_band(spec: dict) -> None:
        spec["mean"] = spec["mean"][:-1]

    return predict_case(w, tmp, edit_model_json(w, tmp, drop_band), "mean")


@case("predict: the package was trained on other bands")
def _(w: World, tmp: Path) -> Case:
    def rename(spec: dict) -> None:
        spec["band_names"] = ["coastal", "swir1", "swir2"]

    model = edit_model_json(w, tmp, rename)
    return predict_case(w, tmp, model, f"differ from model {model}'s ['coastal', 'swir1'")


@case("predict: truncated weights")
def _(w: World, tmp: Path) -> Case:
    model = copy_model(w, tmp)
    data = weights(model).read_bytes()
    weights(model).write_bytes(data[: len(data) // 2])
    return predict_case(w, tmp, model, "weights.safetensors")


@case("predict: a pickle where the safetensors should be")
def _(w: World, tmp: Path) -> Case:
    model = copy_model(w, tmp)
    weights(model).write_bytes(pickle.dumps({"weight": [1.0, 2.0, 3.0]}))
    return predict_case(w, tmp, model, "weights.safetensors")


@case("predict: the weights file is missing")
def _(w: World, tmp: Path) -> Case:
    model = copy_model(w, tmp)
    weights(model).unlink()
    return predict_case(w, tmp, model, "weights.safetensors")


@case("predict: a tile size of 0")
def _(w: World, tmp: Path) -> Case:
    return predict_case(w, tmp, w.model, "0", "--tile-size", "0", "--force")


@case("predict: an overlap as large as the tile")
def _(w: World, tmp: Path) -> Case:
    return predict_case(w, tmp, w.model, "64", "--tile-size", "64", "--overlap", "64")


@case("predict: an unknown blend mode")
def _(w: World, tmp: Path) -> Case:
    return predict_case(w, tmp, w.model, "median", "--blend", "median", "--force")


@case("predict: a batch size of 0")
def _(w: World, tmp: Path) -> Case:
    return predict_case(w, tmp, w.model, "0", "--batch-size", "0", "--force")


@case("predict: the store's zarr.json is garbage")
def _(w: World, tmp: Path) -> Case:
    store = predicted_copy(w, tmp)
    (store / "zarr.json").write_text("garbage")
    return Case(["predict", str(store), "--model", str(w.model), "--scheduler", w.scheduler],
                culprit="predicted.zarr")


@case("predict: an unreachable scheduler")
def _(w: World, tmp: Path) -> Case:
    store = predicted_copy(w, tmp)
    # Refused connections are retried until the connect timeout (10 s by default): 1 s proves as much.
    return Case(["predict", str(store), "--model", str(w.model), "--scheduler", "tcp://127.0.0.1:9",
                 "--force"], code=3, culprit="127.0.0.1:9", protected=[store],
                env={"SEGPIPE_CONNECT_TIMEOUT": "1"})


# ---------------------------------------------------------------- export over an earlier COG


@case("export: --out names an existing folder")
def _(w: World, tmp: Path) -> Case:
    (tmp / "maps").mkdir()
    (tmp / "maps" / "keep.txt").write_text("mine")
    return Case(["export", str(w.predicted), "--out", str(tmp / "maps")], code=(2, 3), culprit="maps",
                protected=[tmp / "maps"])


@case("export: --out inside a file, not a folder")
def _(w: World, tmp: Path) -> Case:
    (tmp / "notes.txt").write_text("mine")
    return Case(["export", str(w.predicted), "--out", str(tmp / "notes.txt" / "c.tif")], code=(2, 3),
                culprit="notes.txt", protected=[tmp / "notes.txt"])


@case("export: --out where nobody may write")
def _(w: World, tmp: Path) -> Case:
    return Case(["export", str(w.predicted), "--out", "/proc/segpipe-classes.tif"], code=(2, 3),
                culprit="/proc")


@case("export: an unknown layer, over an earlier COG")
def _(w: World, tmp: Path) -> Case:
    cog = Path(shutil.copy(w.cog, tmp / "classes.tif"))
    return Case(["export", str(w.predicted), "--out", str(cog), "--layer", "elevation"], culprit="elevation",
                protected=[cog])


@case("export: a store not predicted yet, over an earlier COG")
def _(w: World, tmp: Path) -> Case:
    cog = Path(shutil.copy(w.cog, tmp / "classes.tif"))
    return Case(["export", str(w.store), "--out", str(cog)], culprit="classes", protected=[cog])


@case("export: the store's zarr.json is cut short")
def _(w: World, tmp: Path) -> Case:
    store = predicted_copy(w, tmp)
    text = (store / "zarr.json").read_text()
    (store / "zarr.json").write_text(text[:40])
    return Case(["export", str(store), "--out", str(tmp / "c.tif")], culprit="predicted.zarr",
                absent=[tmp / "c.tif"])


@case("export: a chunk of the classes layer cut short, over an earlier COG")
def _(w: World, tmp: Path) -> Case:
    store = cut_chunk(predicted_copy(w, tmp), "classes")
    cog = Path(shutil.copy(w.cog, tmp / "classes.tif"))
    return Case(["export", str(store), "--out", str(cog)], culprit="predicted.zarr", protected=[cog])


@case("export: a negative --min-area over an earlier COG")
def _(w: World, tmp: Path) -> Case:
    # The confidence layer's COG would differ from the earlier (classes) one it must not replace.
    cog = Path(shutil.copy(w.cog, tmp / "classes.tif"))
    return Case(["export", str(w.predicted), "--out", str(cog), "--layer", "confidence", "--vector",
                 str(tmp / "c.gpkg"), "--min-area", "-3"], culprit="--min-area", protected=[cog],
                absent=[tmp / "c.gpkg"])


# ---------------------------------------------------------------- evaluate


@case("evaluate: the reference does not exist")
def _(w: World, tmp: Path) -> Case:
    return Case(["evaluate", str(w.predicted), "--reference", str(tmp / "truth.tif"), "--out",
                 str(tmp / "report")], culprit="truth.tif", absent=[tmp / "report"])


@case("evaluate: a store not predicted yet")
def _(w: World, tmp: Path) -> Case:
    return Case(["evaluate", str(w.store), "--reference", str(w.labels), "--out", str(tmp / "report")],
                culprit="classes", absent=[tmp / "report"])


@case("evaluate: an unknown point sampling")
def _(w: World, tmp: Path) -> Case:
    return Case(["evaluate", str(w.predicted), "--reference", str(w.labels), "--out", str(tmp / "report"),
                 "--points", "50", "--sampling", "lucky"], culprit="lucky", absent=[tmp / "report"])


@case("evaluate: a chunk of the classes layer cut short")
def _(w: World, tmp: Path) -> Case:
    store = cut_chunk(predicted_copy(w, tmp), "classes")
    return Case(["evaluate", str(store), "--reference", str(w.labels), "--out", str(tmp / "report")],
                culprit="predicted.zarr", absent=[tmp / "report"])


# ---------------------------------------------------------------- region files and manifests


@case("run: the region file does not exist")
def _(w: World, tmp: Path) -> Case:
    return Case(["run", str(tmp / "region.yaml")], culprit="region.yaml", script=True)


@case("run: an image the region file names does not exist")
def _(w: World, tmp: Path) -> Case:
    # Found by the flow's ingest task: Prefect logged it with the traceback before the error line.
    (tmp / "region.yaml").write_text("images: [nothere.vrt]\nstore: r.zarr\nmodel: m\nexport_dir: x\n"
                                     "train: {arch: random_forest}\n")
    return Case(["run", str(tmp / "region.yaml")], culprit="nothere.vrt", script=True)


@case("run: the region file is a list")
def _(w: World, tmp: Path) -> Case:
    (tmp / "region.yaml").write_text("- images: a.tif\n- store: b.zarr\n")
    return Case(["run", str(tmp / "region.yaml")], culprit="region.yaml", script=True)


@case("run: the region file is not YAML")
def _(w: World, tmp: Path) -> Case:
    (tmp / "region.yaml").write_text("images: [a.tif\nstore: {")
    return Case(["run", str(tmp / "region.yaml")], culprit="region.yaml", script=True)


@case("batch: regions that are strings")
def _(w: World, tmp: Path) -> Case:
    (tmp / "manifest.yaml").write_text("regions:\n  - north\n  - south\n")
    return Case(["batch", str(tmp / "manifest.yaml")], culprit="manifest.yaml", script=True)


@case("batch: an empty manifest")
def _(w: World, tmp: Path) -> Case:
    (tmp / "manifest.yaml").write_text("")
    return Case(["batch", str(tmp / "manifest.yaml")], culprit="manifest.yaml", script=True)


# ---------------------------------------------------------------- the cases, run


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


@pytest.fixture
def quiet_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    work = tmp_path / "case"
    work.mkdir()
    monkeypatch.chdir(work)
    yield work


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input(
    name: str,
    world: World,
    quiet_cwd: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = CASES[name](world, quiet_cwd)
    before = {p: snapshot(p) for p in spec.protected}
    world_before = snapshot(world.predicted)
    for key, value in spec.env.items():
        monkeypatch.setenv(key, value)
    if spec.script:
        outcome = run_script(spec.args, quiet_cwd)
    else:
        outcome = run_inprocess(spec.args, capsys, monkeypatch)
    codes = spec.code if isinstance(spec.code, tuple) else (spec.code,)
    assert outcome.code in codes, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert len(outcome.errors) == 1, outcome.stderr
    if spec.culprit is not None:
        assert spec.culprit in outcome.errors[0], outcome.errors[0]
    for path, files in before.items():
        assert snapshot(path) == files, f"{path} changed"
    assert snapshot(world.predicted) == world_before
    for path in spec.absent:
        assert not path.exists(), f"{path} was left behind"
    leftovers = [p.name for p in quiet_cwd.rglob(".*") if ".tmp" in p.name or p.name.startswith(".segpipe-")]
    assert not leftovers, leftovers


@case("predict: a tile far larger than any window needs")
def _(w: World, tmp: Path) -> Case:
    return predict_case(w, tmp, w.model, "100000", "--tile-size", "100000", "--force")


def test_sigterm_during_ingest_cleans_up_and_says_so(world: World, tmp_path: Path) -> None:
    """A scheduler's kill (SIGTERM) runs the cleanup: exit 143, one line, no hidden tree."""
    import signal
    import time

    vrt = tmp_path / "vast.vrt"
    tile = world.tiles[0]
    vrt.write_text(
        '<VRTDataset rasterXSize="100000" rasterYSize="100000"><SRS>EPSG:32617</SRS>'
        "<GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform>"
        '<VRTRasterBand dataType="UInt16" band="1"><SimpleSource>'
        f"<SourceFilename>{tile}</SourceFilename><SourceBand>1</SourceBand>"
        "</SimpleSource></VRTRasterBand></VRTDataset>"
    )
    proc = subprocess.Popen([console_script(), "ingest", str(vrt), "--out", str(tmp_path / "vast.zarr")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".vast.zarr.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(tmp_path.glob(".vast.zarr.tmp-*")), "the ingest never started writing"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # a failed test must not leave a vast ingest running
        proc.wait()
    assert proc.returncode == 143, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "Traceback" not in err
    assert not list(tmp_path.glob(".vast.zarr*")) and not (tmp_path / "vast.zarr").exists()


def test_a_killed_ingests_tree_is_removed_by_the_next(world: World, tmp_path: Path) -> None:
    """SIGKILL leaves a hidden tree; the next ingest to the same place removes it if its process is gone."""
    import socket

    from segpipe.stages.ingest.driver import ingest

    host = socket.gethostname()
    dead = tmp_path / f".s.zarr.tmp-{host}-{2**22 + 12345}-dead"  # above any pid_max default
    alive = tmp_path / f".s.zarr.tmp-{host}-{os.getpid()}-live"
    elsewhere = tmp_path / ".s.zarr.tmp-another-host-7-away"
    for tree in (dead, alive, elsewhere):
        (tree / "image").mkdir(parents=True)
    ingest(world.image, tmp_path / "s.zarr", block_size=BLOCK)
    assert not dead.exists() and alive.exists() and elsewhere.exists()
