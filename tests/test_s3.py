"""Object storage end to end, against a real S3-compatible server (moto) on loopback.

The server runs as a separate process; credentials and the endpoint reach segpipe (and
the dask workers it starts) only through the usual AWS environment variables.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import rasterio
import zarr
from rio_cogeo.cogeo import cog_validate

from segpipe.errors import InputError, MissingInputError, StoreError, TransientError
from segpipe.io.fingerprint import files_fingerprint, store_inputs
from segpipe.io.labels import open_labels
from segpipe.io.mosaic import open_mosaic
from segpipe.io.remote import filesystem, gdal_env, gdal_options, gdal_path, is_remote, storage_options
from segpipe.io.store import open_region, read_region_info
from segpipe.stages.evaluate.assess import evaluate
from segpipe.stages.export.cog import write_cog
from segpipe.stages.ingest.driver import ingest
from segpipe.stages.predict.driver import predict
from segpipe.synth import synthesize

if TYPE_CHECKING:
    from distributed import Client

BUCKET = "segpipe-test"
BLOCK = 128
SIZE = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server in its own process, the AWS variables pointing at it, one bucket."""
    port = _free_port()
    server = Path(sys.executable).with_name("moto_server")
    log = (tmp_path_factory.mktemp("moto") / "server.log").open("w")
    proc = subprocess.Popen([str(server), "-p", str(port), "-H", "127.0.0.1"], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    mp = pytest.MonkeyPatch()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        # nothing from the developer's own AWS set-up, and no proxy between us and loopback
        "AWS_CONFIG_FILE": str(tmp_path_factory.getbasetemp() / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path_factory.getbasetemp() / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1,localhost",
    }.items():
        mp.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL_S3", "AWS_S3_ENDPOINT"):
        mp.delenv(name, raising=False)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        filesystem().mkdir(BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        mp.undo()


@pytest.fixture(scope="module")
def client(s3: str) -> Iterator[Client]:
    """A cluster of this module's own, started once the AWS variables point at the moto server.

    Its workers read S3 from their own environment, which the session's cluster (started
    before them) lacks.
    """
    from cluster_support import two_worker_cluster

    with two_worker_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory, s3: str):  # type: ignore[no-untyped-def]
    """A tiny synthetic region (3 bands, 2 x 2 tiles), also uploaded under ``s3://.../inputs``."""
    reg = synthesize(tmp_path_factory.mktemp("region"), size=SIZE, bands=3, tiles=2, seed=1)
    fs = filesystem()
    root = reg.image.parent
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        fs.put_file(str(f), f"{s3}/inputs/{f.relative_to(root).as_posix()}")
    return reg


def _url(s3: str, reg, path: Path) -> str:  # type: ignore[no-untyped-def]
    return f"{s3}/inputs/{path.relative_to(reg.image.parent).as_posix()}"


def _local_image(reg) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(open_mosaic(list(reg.tiles), chunk_size=BLOCK).values)


def test_remote_helpers(s3: str) -> None:
    assert is_remote("s3://b/k") and is_remote(Path("s3://b/k")) and not is_remote("/data/x.tif")
    assert gdal_path("s3://b/k/x.tif") == "/vsis3/b/k/x.tif"
    assert gdal_path(Path("s3://b/k/x.tif")) == "/vsis3/b/k/x.tif"
    assert gdal_path("/data/x.tif") == "/data/x.tif"
    opts = gdal_options()
    port = os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]
    assert opts["AWS_S3_ENDPOINT"] == f"127.0.0.1:{port}"
    assert opts["AWS_HTTPS"] == "NO" and opts["AWS_VIRTUAL_HOSTING"] == "FALSE"
    assert "key" not in storage_options() and "secret" not in storage_options()


def test_ingest_local_tiles_to_s3_store(s3: str, region) -> None:  # type: ignore[no-untyped-def]
    out = f"{s3}/stores/from-local.zarr"
    info = ingest(list(region.tiles), out, labels=region.labels, classes=region.classes, block_size=BLOCK)
    assert info.path == out and (info.height, info.width) == (SIZE, SIZE)
    assert info.blocks == (2, 2) and info.classes
    ds = open_region(out)
    np.testing.assert_array_equal(ds["image"].values, _local_image(region))
    assert ds["image"].rio.crs is not None
    assert int(ds["labels"].values.astype(bool).sum()) > 0
    assert store_inputs(out) is not None
    # the hidden build prefix is gone; only the published store remains
    assert [k.rsplit("/", 1)[-1] for k in filesystem().ls(f"{s3}/stores")] == ["from-local.zarr"]


def test_ingest_from_s3_inputs(s3: str, region) -> None:  # type: ignore[no-untyped-def]
    tiles = [_url(s3, region, t) for t in region.tiles]
    expected = _local_image(region)
    # tiles as objects, with vector labels and the classes file on S3 as well
    out = f"{s3}/stores/from-s3.zarr"
    info = ingest(
        tiles,
        out,
        labels=_url(s3, region, region.labels_vector),
        classes=_url(s3, region, region.classes),
        block_size=BLOCK,
    )
    assert {c.value for c in info.classes}
    np.testing.assert_array_equal(open_region(out)["image"].values, expected)
    # the VRT on S3 (its tiles relative to it) and a prefix standing for a folder
    vrt_store = ingest(_url(s3, region, region.image), f"{s3}/stores/from-vrt.zarr", block_size=BLOCK)
    np.testing.assert_array_equal(open_region(vrt_store.path)["image"].values, expected)
    prefix = tiles[0].rsplit("/", 1)[0]
    folder_store = ingest(prefix, f"{s3}/stores/from-prefix.zarr", block_size=BLOCK)
    np.testing.assert_array_equal(open_region(folder_store.path)["image"].values, expected)
    # the same inputs fingerprint the same, and a changed object changes it
    before = files_fingerprint(tiles)
    assert files_fingerprint(tiles) == before
    filesystem().put_file(str(region.tiles[1]), tiles[0])  # other content: another ETag
    assert files_fingerprint(tiles) != before
    filesystem().put_file(str(region.tiles[0]), tiles[0])
    assert files_fingerprint([f"{s3}/inputs/none.tif"])  # missing: hashed, never raised


def test_overwrite_store_on_s3(s3: str, region) -> None:  # type: ignore[no-untyped-def]
    out = f"{s3}/stores/overwrite.zarr"
    ingest(list(region.tiles), out, block_size=BLOCK)
    with pytest.raises(StoreError, match="exists"):
        ingest(list(region.tiles), out, block_size=BLOCK)
    info = ingest(list(region.tiles), out, block_size=256, overwrite=True)
    assert info.block_size == 256 and read_region_info(out).block_size == 256


def test_predict_export_evaluate_on_s3(s3: str, region, client, stub_model_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Storage on S3 is under test, not the network: the stub package predicts."""
    model_dir = stub_model_dir
    store = f"{s3}/stores/predict.zarr"
    # S3 tiles read by the cluster's worker processes, which configure GDAL from their own env
    ingest([_url(s3, region, t) for t in region.tiles], store, block_size=BLOCK)
    np.testing.assert_array_equal(open_region(store)["image"].values, _local_image(region))
    settings = {"tile_size": 64, "overlap": 16, "batch_size": 4, "max_task_pixels": BLOCK * BLOCK}
    summary = predict(store, model_dir, client=client, **settings)
    assert summary.blocks_done == 4 and summary.tasks == 4
    classes = open_region(store)["classes"].values
    assert np.isin(classes, [3, 7, 9, 255]).all() and (classes != 255).any()
    # the progress markers live on S3 too: a rerun skips every block
    again = predict(store, model_dir, client=client, **settings)
    assert again.blocks_skipped == 4 and again.blocks_done == 0

    cog = write_cog(store, f"{s3}/exports/classes.tif")
    assert cog == f"{s3}/exports/classes.tif"
    with gdal_env(cog):
        with rasterio.open(gdal_path(cog)) as src:
            assert src.overviews(1) or src.width <= 512
            np.testing.assert_array_equal(src.read(1), classes)
        valid, errors, _ = cog_validate(gdal_path(cog), quiet=True)
    assert valid, errors
    item = json.loads(filesystem().cat_file(f"{s3}/exports/classes.stac.json"))
    assert item["assets"]["data"]["href"] == "./classes.tif"
    assert sorted(k.rsplit("/", 1)[-1] for k in filesystem().ls(f"{s3}/exports")) == [
        "classes.qml",
        "classes.stac.json",
        "classes.tif",
        "classes.tif.aux.xml",
    ]
    # Another layer over the same name: the earlier legend goes (GDAL would lend it its class names).
    write_cog(store, f"{s3}/exports/classes.tif", layer="confidence", overwrite=True)
    assert sorted(k.rsplit("/", 1)[-1] for k in filesystem().ls(f"{s3}/exports", refresh=True)) == [
        "classes.stac.json", "classes.tif"]
    write_cog(store, cog, overwrite=True)  # the class COG back, with its legend, for what follows

    reference = _url(s3, region, region.truth)
    report = f"{s3}/reports/store"
    metrics = evaluate(store, reference, report, preview=False)
    stored = json.loads(filesystem().cat_file(f"{report}/metrics.json"))
    assert stored["confusion_matrix"] == metrics["confusion_matrix"]
    assert filesystem().exists(f"{report}/report.md")
    # A point assessment, then a full one over it: the new report carries no points.csv.
    evaluate(store, reference, report, preview=False, points=50)
    assert filesystem().exists(f"{report}/points.csv")
    evaluate(store, reference, report, preview=False)
    names = sorted(k.rsplit("/", 1)[-1] for k in filesystem().ls(report, refresh=True))
    assert names == ["confusion_matrix.png", "metrics.json", "report.md"], names
    # the exported COG on S3 as the prediction, a local report folder
    local = evaluate(cog, reference, tmp_path / "report", preview=False)
    assert local["confusion_matrix"] == metrics["confusion_matrix"]
    assert (tmp_path / "report" / "metrics.json").is_file()


def test_model_package_on_s3(s3: str, client, model_dir: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Workers fetch the package from the bucket; the result is the local package's."""
    import torch
    from predict_support import SETTINGS, make_store

    from segpipe.io.remote import upload
    from segpipe.models import build_network, model_hash, read_spec, save_model
    from segpipe.models.fetch import local_package

    monkeypatch.setenv("SEGPIPE_CACHE", str(tmp_path / "cache"))
    url = f"{s3}/models/unet"
    for name in ("model.json", "weights.safetensors"):
        upload(model_dir / name, f"{url}/{name}")
    assert model_hash(url) == model_hash(model_dir) and read_spec(url) == read_spec(model_dir)
    fetched = local_package(url)
    assert fetched.parent == tmp_path / "cache" / "models" and local_package(url) == fetched  # fetched once

    local, remote = make_store(tmp_path / "a.zarr", block=64), make_store(tmp_path / "b.zarr", block=64)
    predict(local, model_dir, client=client, **SETTINGS)
    summary = predict(remote, url + "/", client=client, **SETTINGS)
    assert summary.blocks_done == 12
    np.testing.assert_array_equal(open_region(remote)["classes"].values, open_region(local)["classes"].values)

    # A package replaced on S3 is fetched again (new ETags), so its hash follows.
    torch.manual_seed(5)
    other = save_model(tmp_path / "other", read_spec(model_dir), build_network("unet", "resnet18", 3, 3))
    upload(other / "weights.safetensors", f"{url}/weights.safetensors")
    assert local_package(url) != fetched and model_hash(url) != model_hash(model_dir)
    with pytest.raises(MissingInputError, match=r"models/none/model\.json"):
        read_spec(f"{s3}/models/none")

    # An ONNX package on S3 is fetched with its model.onnx and predicts the same classes.
    from segpipe.models.onnx import export_onnx

    onnx_url = f"{s3}/models/unet-onnx"
    package = export_onnx(model_dir, tmp_path / "unet.onnx", package=tmp_path / "unet-onnx").package
    assert package is not None
    for item in package.iterdir():
        upload(item, f"{onnx_url}/{item.name}")
    assert (local_package(onnx_url) / "model.onnx").is_file()
    third = make_store(tmp_path / "c.zarr", block=64)
    predict(third, onnx_url, client=client, **SETTINGS)
    np.testing.assert_array_equal(open_region(third)["classes"].values, open_region(local)["classes"].values)


def test_missing_objects_name_the_url(s3: str, region) -> None:  # type: ignore[no-untyped-def]
    missing = f"{s3}/inputs/no-such-tile.tif"
    with pytest.raises(MissingInputError, match=re.escape(missing)):
        ingest([missing], f"{s3}/stores/never.zarr", block_size=BLOCK)
    with pytest.raises(MissingInputError, match=re.escape("s3://no-such-bucket/r.zarr")):
        read_region_info("s3://no-such-bucket/r.zarr")
    with pytest.raises(MissingInputError, match=re.escape(f"{s3}/stores/none.zarr")):
        read_region_info(f"{s3}/stores/none.zarr")
    with pytest.raises(MissingInputError, match=re.escape(f"{s3}/inputs/none.gpkg")):
        open_labels(f"{s3}/inputs/none.gpkg")
    with pytest.raises(MissingInputError, match=re.escape("no-such-bucket")):
        ingest(list(region.tiles), "s3://no-such-bucket/r.zarr", block_size=BLOCK)
    bad_classes = f"{s3}/inputs/bad-classes.json"
    filesystem().pipe_file(bad_classes, b'{"classes": [{"value": 1.5}]}')
    with pytest.raises(InputError, match=re.escape(f"classes file {bad_classes}: class entry 1")):
        ingest(list(region.tiles), f"{s3}/stores/never.zarr", classes=bad_classes, block_size=BLOCK)
    assert not filesystem().exists(f"{s3}/stores/never.zarr")


def test_failed_upload_leaves_no_object(s3: str, region, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import s3fs

    store = f"{s3}/stores/export-src.zarr"
    ingest(list(region.tiles), store, block_size=BLOCK)
    url = f"{s3}/exports/fail/image.tif"
    original = s3fs.S3FileSystem._call_s3

    async def flaky(self, method, *args, **kwargs):  # type: ignore[no-untyped-def]
        uploading = method in ("put_object", "complete_multipart_upload")
        if uploading and str(kwargs.get("Key", "")).endswith(".tif"):
            raise ConnectionError("connection reset during upload")
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", flaky)
    with pytest.raises(TransientError, match=re.escape(url)):
        write_cog(store, url, layer="image")
    monkeypatch.undo()
    fs = filesystem()
    assert not fs.exists(url) and not fs.exists(f"{s3}/exports/fail/image.stac.json")

    # a store whose publication breaks half-way is never a store at its destination
    out = f"{s3}/stores/half.zarr"
    copied: list[object] = []
    real_copy = fs.copy  # fsspec caches the instance segpipe gets, sync methods and all

    def broken_copy(path1, path2, *args, **kwargs):  # type: ignore[no-untyped-def]
        if copied:  # the body went over; the root zarr.json fails
            raise ConnectionError("connection reset during copy")
        copied.append(path1)
        return real_copy(path1, path2, *args, **kwargs)

    monkeypatch.setattr(fs, "copy", broken_copy)
    with pytest.raises(TransientError):
        ingest(list(region.tiles), out, block_size=BLOCK)
    monkeypatch.undo()
    assert copied and fs.find(out)  # shards were published...
    with pytest.raises(MissingInputError, match=re.escape(out)):
        read_region_info(out)  # ...but without its root metadata it is no store
    assert not [k for k in fs.ls(f"{s3}/stores") if ".half.zarr.tmp-" in k]
    with pytest.raises(Exception):  # noqa: B017 - zarr's own error type
        zarr.open_group(out, mode="r", storage_options=storage_options())


def test_cli_passes_urls_through(s3: str) -> None:
    from typer.testing import CliRunner

    from segpipe.cli import app

    url = f"{s3}/stores/absent.zarr"
    result = CliRunner().invoke(app, ["export", url, "--out", f"{s3}/exports/absent.tif"])
    assert isinstance(result.exception, MissingInputError)
    assert url in str(result.exception)


def test_process_region_on_s3_resumes(s3: str, region, client, prefect_home, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The whole flow with inputs, store, COGs and report under s3://; a rerun skips every stage.

    Prediction runs on the module's cluster (its workers read S3 from their own environment)
    rather than a local cluster started by each run that predicts.
    """
    from flows.process_region import RegionRun, process_region
    from segpipe.stages.train import NetworkConfig

    run = RegionRun(
        images=[_url(s3, region, region.image)],
        store=f"{s3}/flow/region.zarr",
        labels=_url(s3, region, region.labels),
        block_size=BLOCK,
        model=str(tmp_path / "model"),
        train=NetworkConfig(
            epochs=1, samples_per_epoch=16, chip_size=64, batch_size=8, threads=1, valid_fraction=0
        ),
        export_dir=f"{s3}/flow/cog",
        reference=_url(s3, region, region.truth),
        tile_size=64,
        overlap=16,
        scheduler=client.scheduler.address,
    )
    first = process_region(run)
    assert len(first["stages"]) == 6 and not any(s.get("skipped") for s in first["stages"])
    fs = filesystem()
    cog = f"{s3}/flow/cog/classes.tif"
    with gdal_env(cog):
        assert cog_validate(gdal_path(cog))[0]
        with rasterio.open(gdal_path(cog)) as src:
            classes = src.read(1)
            assert src.width == SIZE and src.height == SIZE
    with rasterio.open(region.truth) as truth:
        assert np.array_equal(classes == 255, truth.read(1) == 0)
    metrics = json.loads(fs.cat_file(f"{s3}/flow/cog/report/metrics.json"))
    assert metrics["miou"] == first["miou"]
    etag = fs.info(cog)["ETag"]

    again = process_region(run)
    assert [s["stage"] for s in again["stages"] if not s.get("skipped")] == []
    assert again["miou"] == first["miou"]
    assert fs.info(cog)["ETag"] == etag

    # Predict-only with the package on S3: the same model gives the same map.
    from segpipe.io.remote import upload

    for name in ("model.json", "weights.safetensors"):
        upload(tmp_path / "model" / name, f"{s3}/flow/model/{name}")
    remote_model = run.model_copy(update={
        "store": f"{s3}/flow/region2.zarr", "model": f"{s3}/flow/model", "train": None,
        "export_dir": f"{s3}/flow/cog2"})
    third = process_region(remote_model)
    assert "train" in [s["stage"] for s in first["stages"]]
    assert "train" not in [s["stage"] for s in third["stages"]]
    assert third["miou"] == first["miou"]


def test_markers_on_s3_come_from_the_listing(s3: str) -> None:
    from segpipe.io.remote import storage_options_for
    from segpipe.io.store import marked_cells

    url = f"{s3}/markers.zarr"
    group = zarr.open_group(url, mode="w", storage_options=storage_options_for(url))
    arr = group.create_array("_predict/progress_predict", shape=(5, 6), chunks=(1, 1), dtype="uint8",
                             fill_value=0)
    want = np.zeros((5, 6), bool)
    want[[0, 2, 4], [5, 1, 5]] = True
    for y, x in zip(*np.nonzero(want), strict=True):
        arr[y, x] = 1
    np.testing.assert_array_equal(marked_cells(arr), want)
    assert not marked_cells(group.create_array("empty", shape=(2, 2), chunks=(1, 1), dtype="uint8")).any()


def test_a_package_on_s3_is_checked_in_a_child_process(s3: str, model_dir: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                       monkeypatch) -> None:
    """The child that loads the weights for a torch-free driver reads the package from the bucket too."""
    from segpipe.errors import ModelPackageError
    from segpipe.io.remote import upload
    from segpipe.models import validate_package
    from segpipe.models.verify import verify_package

    monkeypatch.setenv("SEGPIPE_CACHE", str(tmp_path / "cache"))
    url = f"{s3}/models/child-check"
    for name in ("model.json", "weights.safetensors"):
        upload(model_dir / name, f"{url}/{name}")
    assert verify_package(url, here=False) == validate_package(model_dir)
    weights = (model_dir / "weights.safetensors").read_bytes()
    half = tmp_path / "half.safetensors"
    half.write_bytes(weights[: len(weights) // 2])
    upload(half, f"{url}/weights.safetensors")
    with pytest.raises(ModelPackageError, match="safetensors"):
        verify_package(url, here=False)
