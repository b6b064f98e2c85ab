"""Bad input and faults of the machine end in a named error, with nothing half-written.

Each case asserts the error type, that its one-line message names the culprit (file,
tile, band, store or destination), that no hidden temporary is left beside the
destination, and where an earlier complete output exists that it is byte-identical
afterwards. Full disks and read-only folders are real where the sandbox allows a user
and mount namespace (a small tmpfs, the installed ``segpipe`` command); in-process
tests with a write that fails with ENOSPC or EROFS cover them everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr.storage._local as zarr_local
from distributed import Client, LocalCluster
from rasterio.transform import from_origin

import segpipe.stages.export.cog as cog
from segpipe.errors import InputError, LabelsError, MissingInputError, StorageError, StoreError
from segpipe.io.store import create_layer, open_layer, read_region_info, write_block
from segpipe.stages.export.cog import write_cog
from segpipe.stages.export.stac import stac_item_path
from segpipe.stages.ingest.driver import ingest
from segpipe.stages.train.config import ForestConfig, NetworkConfig, TrainConfig, fit_chip_size
from segpipe.stages.train.sampling import ChipSampler
from segpipe.stages.train.stats import check_statistics, package_spec

SEGPIPE = Path(sys.executable).with_name("segpipe")
TRUNCATED = r"t1\.tif cannot be read in window rows \d+-\d+, columns \d+-\d+"


def write_tif(
    path: Path, data: np.ndarray, nodata: float | None = None, x0: float = 500000.0, block: int = 16
) -> Path:
    """A tiled GeoTIFF of (band, y, x) ``data`` on a 10 m UTM grid."""
    bands, height, width = data.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=height,
        width=width,
        count=bands,
        dtype=data.dtype,
        crs="EPSG:32633",
        transform=from_origin(x0, 4000000.0, 10.0, 10.0),
        nodata=nodata,
        tiled=True,
        blockxsize=block,
        blockysize=block,
    ) as dst:
        dst.write(data)
    return path


def image(height: int = 64, width: int = 64, bands: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 1000, (bands, height, width)).astype(np.uint16)


def hidden(folder: Path) -> list[str]:
    """Hidden entries (segpipe's temporaries are all hidden) of ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A complete store at ``out/r.zarr`` and its bytes, for checks that it survives."""
    out = tmp_path / "out"
    out.mkdir()
    store = out / "r.zarr"
    ingest([write_tif(tmp_path / "early.tif", image(seed=9))], store, block_size=32)
    return store, snapshot(store)


# ---- ingest: unreadable inputs ---------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"this is not a raster\n"], ids=["empty", "text"])
def test_empty_or_text_file_named_tif(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.tif"
    bad.write_bytes(content)
    with pytest.raises(MissingInputError, match=r"bad\.tif.*cannot be read as a raster"):
        ingest([bad], tmp_path / "out" / "r.zarr", block_size=32)
    assert not (tmp_path / "out" / "r.zarr").exists()
    assert hidden(tmp_path / "out") == []


@pytest.mark.parametrize("on_cluster", [False, True], ids=["threads", "cluster"])
def test_truncated_tile_in_the_middle_of_a_mosaic_is_named(
    tmp_path: Path, earlier: tuple[Path, dict[str, bytes]], on_cluster: bool
) -> None:
    store, before = earlier
    tiles = [write_tif(tmp_path / f"t{i}.tif", image(seed=i), x0=500000.0 + 640 * i) for i in range(3)]
    size = tiles[1].stat().st_size
    with open(tiles[1], "r+b") as f:
        f.truncate(size // 2)  # header intact, pixels cut: only reading the pixels fails
    with contextlib.ExitStack() as stack:
        if on_cluster:  # dask's default scheduler becomes this cluster: ingest waits for its tasks there
            cluster = stack.enter_context(LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                                       dashboard_address=":0"))
            stack.enter_context(Client(cluster))
        with pytest.raises(InputError, match=TRUNCATED) as err:
            ingest(tiles, store, block_size=32, overwrite=True)
        time.sleep(0.3)  # a task of the failed run still running would write by now
    assert "\n" not in str(err.value)
    assert snapshot(store) == before
    assert hidden(store.parent) == []


def test_vrt_without_pixels(tmp_path: Path) -> None:
    vrt = tmp_path / "zero.vrt"
    vrt.write_text(
        '<VRTDataset rasterXSize="0" rasterYSize="10">\n'
        '  <VRTRasterBand dataType="Byte" band="1"/>\n</VRTDataset>\n'
    )
    with pytest.raises(MissingInputError, match=r"zero\.vrt"):
        ingest([vrt], tmp_path / "r.zarr", block_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zero.vrt"]


def test_vrt_whose_sources_are_missing(tmp_path: Path) -> None:
    a = write_tif(tmp_path / "a.tif", image())
    b = write_tif(tmp_path / "b.tif", image(seed=1), x0=500640.0)
    from segpipe.io.mosaic import mosaic_vrt_xml

    vrt = tmp_path / "m.vrt"
    vrt.write_text(mosaic_vrt_xml([a, b], relative_to=tmp_path))
    b.unlink()
    with pytest.raises(MissingInputError, match=r"m\.vrt.*missing source.*b\.tif"):
        ingest([vrt], tmp_path / "r.zarr", block_size=32)
    assert not (tmp_path / "r.zarr").exists()
    assert hidden(tmp_path) == []


def test_folder_without_rasters(tmp_path: Path) -> None:
    folder = tmp_path / "tiles"
    folder.mkdir()
    (folder / "notes.txt").write_text("no rasters here")
    with pytest.raises(MissingInputError, match=r"folder .*tiles holds no GeoTIFF"):
        ingest([folder], tmp_path / "r.zarr", block_size=32)
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.parametrize(
    ("data", "nodata"),
    [
        (np.full((2, 40, 40), np.nan, np.float32), None),
        (np.full((2, 40, 40), np.nan, np.float32), float("nan")),
        (np.full((2, 40, 40), 0, np.uint16), 0.0),
    ],
    ids=["nan", "nan-nodata", "all-nodata"],
)
def test_imagery_without_a_valid_pixel_is_refused(
    tmp_path: Path, data: np.ndarray, nodata: float | None, earlier: tuple[Path, dict[str, bytes]]
) -> None:
    store, before = earlier
    tif = write_tif(tmp_path / "blank.tif", data, nodata=nodata)
    with pytest.raises(InputError, match=r"blank\.tif has no valid pixel"):
        ingest([tif], store, block_size=32, overwrite=True)
    assert snapshot(store) == before
    assert hidden(store.parent) == []


def test_labels_without_a_labelled_pixel_leave_nothing(tmp_path: Path) -> None:
    tif = write_tif(tmp_path / "img.tif", image())
    labels = write_tif(tmp_path / "labels.tif", np.zeros((1, 64, 64), np.uint8))
    with pytest.raises(LabelsError, match=r"labels\.tif hold no labelled pixel"):
        ingest([tif], tmp_path / "out" / "r.zarr", labels=labels, block_size=32)
    assert list((tmp_path / "out").iterdir()) == []


# ---- ingest: faults of the destination, in process --------------------------------------


def _failing_put(monkeypatch: pytest.MonkeyPatch, code: int) -> list[str]:
    """Make zarr's local writes of image shards fail with ``code`` while the others lag.

    The first shard write fails at once; every other one waits, then writes: without
    waiting for them, ingest's clean-up would run first and they would leave a tree.
    """
    real = zarr_local._put
    late: list[str] = []
    lock = threading.Lock()
    failed = threading.Event()

    def put(path: Path, value: object, exclusive: bool = False) -> int:
        if "/image/c/" in str(path):
            with lock:
                first = not failed.is_set()
                failed.set()
            if first:
                raise OSError(code, "simulated", str(path))
            time.sleep(0.3)
            late.append(str(path))
        return real(path, value, exclusive)  # type: ignore[arg-type]

    monkeypatch.setattr(zarr_local, "_put", put)
    return late


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")],
    ids=["full", "read-only", "forbidden"],
)
def test_ingest_destination_fault_leaves_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    earlier: tuple[Path, dict[str, bytes]],
    code: int,
    words: str,
) -> None:
    store, before = earlier
    tif = write_tif(tmp_path / "big.tif", image(128, 128))
    _failing_put(monkeypatch, code)
    with pytest.raises(StorageError, match=rf"region store {store}: .*{words}") as err:
        ingest([tif], store, block_size=32, overwrite=True)
    assert "\n" not in str(err.value)
    time.sleep(0.5)  # anything still writing would show up now
    assert hidden(store.parent) == []
    assert snapshot(store) == before


# ---- region stores that are damaged ------------------------------------------------------


def _damage(store: Path, how: str) -> None:
    root, meta = store / "zarr.json", store / "image" / "zarr.json"
    if how == "cut":
        root.write_bytes(root.read_bytes()[: root.stat().st_size // 2])
    elif how == "garbage":
        root.write_bytes(b"\x00\xff\x13garbage")
    elif how == "list":
        root.write_text("[1, 2]")
    elif how == "no-metadata":
        root.write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"segpipe": {"schema": 1}}}')
    elif how == "no-root":
        root.unlink()
    elif how == "image-cut":
        meta.write_bytes(meta.read_bytes()[:50])
    elif how == "image-missing":
        shutil.rmtree(store / "image")


@pytest.mark.parametrize(
    "how", ["cut", "garbage", "list", "no-metadata", "no-root", "image-cut", "image-missing"]
)
def test_damaged_store_is_named(tmp_path: Path, how: str) -> None:
    store = tmp_path / "r.zarr"
    ingest([write_tif(tmp_path / "img.tif", image())], store, block_size=32)
    _damage(store, how)
    with pytest.raises(StoreError, match=r"r\.zarr.*(segpipe ingest)") as err:
        read_region_info(store)
    assert "\n" not in str(err.value)
    if how != "no-metadata":  # the layer itself is intact there
        with pytest.raises(StoreError, match=r"r\.zarr"):
            open_layer(store, "image")
    out = tmp_path / "export"
    with pytest.raises(StoreError, match=r"r\.zarr"):
        write_cog(store, out / "classes.tif")
    assert not out.exists() or list(out.iterdir()) == []


# ---- export ---------------------------------------------------------------------------------


@pytest.fixture
def classes_store(tmp_path: Path) -> Path:
    """A 96 x 96 store with a random classes layer."""
    store = tmp_path / "c.zarr"
    ingest([write_tif(tmp_path / "img.tif", image(96, 96))], store, block_size=32)
    arr = create_layer(store, "classes", "uint8", 255)
    data = np.random.default_rng(3).integers(1, 6, (96, 96)).astype(np.uint8)
    for y0 in range(0, 96, 32):
        for x0 in range(0, 96, 32):
            write_block(arr, y0, x0, data[y0 : y0 + 32, x0 : x0 + 32], 32)
    return store


def _exported(classes_store: Path, folder: Path) -> tuple[Path, dict[str, bytes]]:
    """An earlier complete export (COG and STAC Item) in ``folder`` and its bytes."""
    dest = write_cog(classes_store, folder / "classes.tif")
    assert isinstance(dest, Path)
    return dest, {**snapshot(dest), **snapshot(stac_item_path(dest))}


def _after(dest: Path) -> dict[str, bytes]:
    return {**snapshot(dest), **snapshot(stac_item_path(dest))}


def test_export_out_naming_a_folder(classes_store: Path, tmp_path: Path) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    with pytest.raises(InputError, match=rf"--out {folder} is a folder"):
        write_cog(classes_store, folder)
    assert list(folder.iterdir()) == []


def test_export_parent_is_a_file(classes_store: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(StorageError, match=r"blocker is a file, not a folder"):
        write_cog(classes_store, blocker / "sub" / "classes.tif")
    assert blocker.read_text() == "a file where a folder should be"


def test_export_full_disk_during_conversion(
    classes_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest, before = _exported(classes_store, tmp_path / "exports")

    def copy(src: object, dst: object, **kw: object) -> None:
        Path(str(dst)).write_bytes(b"II*\x00half a COG")  # what GDAL leaves when the disk fills
        raise rasterio.errors.RasterioIOError(f"{dst}: No space left on device")

    monkeypatch.setattr(cog.rasterio.shutil, "copy", copy)
    with pytest.raises(StorageError, match=rf"COG {dest}: the disk is full"):
        write_cog(classes_store, dest)
    assert _after(dest) == before
    assert hidden(dest.parent) == []


def test_export_full_disk_writing_the_stac_item(
    classes_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest, before = _exported(classes_store, tmp_path / "exports")
    real = Path.write_text

    def write_text(self: Path, data: str, *args: object, **kw: object) -> int:
        if self.name.endswith(".stac.json"):
            real(self, data[:10])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(StorageError, match=rf"COG {dest}: the disk is full"):
        write_cog(classes_store, dest)
    assert _after(dest) == before  # neither a new COG beside the old Item nor a cut Item
    assert hidden(dest.parent) == []


def test_export_read_only_folder(
    classes_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest, before = _exported(classes_store, tmp_path / "exports")
    real_open = rasterio.open

    def refuse(path: object, mode: str = "r", *args: object, **kw: object) -> object:
        if mode == "w":
            text = f"Attempt to create new tiff file '{path}' failed: Read-only file system"
            raise rasterio.errors.RasterioIOError(text)
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr(cog.rasterio, "open", refuse)
    with pytest.raises(StorageError, match=rf"COG {dest}: the filesystem is read-only"):
        write_cog(classes_store, dest)
    assert _after(dest) == before
    assert hidden(dest.parent) == []


# ---- real full and read-only filesystems, through the installed command -----------------


def _namespace_works(tmp: Path) -> bool:
    mnt = tmp / "probe"
    mnt.mkdir()
    try:
        done = subprocess.run(
            [
                "unshare",
                "--user",
                "--map-root-user",
                "--mount",
                "sh",
                "-c",
                f"mount -t tmpfs -o size=64k tmpfs {mnt}",
            ],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@pytest.fixture
def namespace(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or not _namespace_works(tmp_path):
        pytest.skip("this sandbox forbids user and mount namespaces (no tmpfs of our own)")
    if not SEGPIPE.exists():
        pytest.skip("the segpipe command is not installed beside this Python")


def _on_small_disk(
    tmp_path: Path, command: str, setup: str = "", size: str = "96k", read_only: bool = False
) -> dict:
    """Run ``command`` with ``$MNT`` a fresh tmpfs of ``size``; return rc, stderr and copies of $MNT."""
    mnt, snap = tmp_path / "mnt", tmp_path / "snap"
    mnt.mkdir()
    snap.mkdir()
    script = "\n".join(
        [
            "set -u",
            f"export MNT={mnt}",
            f"mount -t tmpfs -o size={size} tmpfs $MNT",
            setup,
            f"cp -a $MNT {snap}/before",
            f"mount -o remount,ro,size={size} $MNT" if read_only else "",
            f"{command} > {snap}/stdout 2> {snap}/stderr; echo $? > {snap}/rc",
            f"cp -a $MNT {snap}/after",
        ]
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (snap / "rc").exists(), done.stderr
    return {
        "rc": int((snap / "rc").read_text()),
        "stderr": (snap / "stderr").read_text(),
        "before": snap / "before",
        "after": snap / "after",
    }


def _one_error_line(stderr: str, *names: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    for name in names:
        assert name in lines[0], stderr


@pytest.mark.parametrize("read_only", [False, True], ids=["full", "read-only"])
def test_cli_ingest_onto_a_small_disk(tmp_path: Path, namespace: None, read_only: bool) -> None:
    # The earlier store is built here and copied onto the small disk: a second run of the
    # command (seconds of start-up) would make the same store.
    early = tmp_path / "early"
    early.mkdir()
    ingest([write_tif(tmp_path / "small.tif", image(32, 32))], early / "r.zarr", block_size=32)
    big = write_tif(tmp_path / "big.tif", image(256, 256, bands=4))
    result = _on_small_disk(
        tmp_path,
        f"{SEGPIPE} ingest {big} --out $MNT/r.zarr --block-size 64 --overwrite",
        setup=f"cp -a {early}/r.zarr $MNT/",
        read_only=read_only,
    )
    assert result["rc"] == 3, result["stderr"]
    _one_error_line(result["stderr"], "r.zarr", "read-only" if read_only else "full")
    assert snapshot(result["after"] / "r.zarr") == snapshot(result["before"] / "r.zarr") != {}
    assert hidden(result["after"]) == []


@pytest.mark.parametrize("read_only", [False, True], ids=["full", "read-only"])
def test_cli_export_onto_a_small_disk(tmp_path: Path, namespace: None, read_only: bool) -> None:
    store = tmp_path / "big.zarr"
    ingest([write_tif(tmp_path / "img.tif", image(512, 512, bands=1))], store, block_size=256)
    arr = create_layer(store, "classes", "uint8", 255)
    data = np.random.default_rng(5).integers(1, 30, (512, 512)).astype(np.uint8)
    for y0 in range(0, 512, 256):
        for x0 in range(0, 512, 256):
            write_block(arr, y0, x0, data[y0 : y0 + 256, x0 : x0 + 256], 256)
    early = tmp_path / "early"
    early.mkdir()
    small = tmp_path / "small.zarr"
    ingest([write_tif(tmp_path / "s.tif", image(32, 32, bands=1))], small, block_size=32)
    write_block(create_layer(small, "classes", "uint8", 255), 0, 0, np.ones((32, 32), np.uint8), 32)
    write_cog(small, early / "classes.tif")
    result = _on_small_disk(
        tmp_path,
        f"{SEGPIPE} export {store} --out $MNT/classes.tif",
        setup=f"cp {early}/* $MNT/",
        read_only=read_only,
    )
    assert result["rc"] == 3, result["stderr"]
    _one_error_line(result["stderr"], "classes.tif", "read-only" if read_only else "full")
    assert snapshot(result["after"]) == snapshot(result["before"])
    assert sorted(p.name for p in result["after"].iterdir()) == ["classes.stac.json", "classes.tif"]


# ---- training: garbage refused before training -------------------------------------------


def _labelled_store(tmp_path: Path, data: np.ndarray, nodata: float | None = None, size: int = 64) -> Path:
    tif = write_tif(tmp_path / "img.tif", data, nodata=nodata)
    labels = np.zeros((1, size, size), np.uint8)
    labels[0, 8:40, 8:40] = 1
    labels[0, 40:60, 40:60] = 2
    store = tmp_path / "r.zarr"
    ingest([tif], store, labels=write_tif(tmp_path / "labels.tif", labels), block_size=32)
    return store


def _spec(store: Path, cfg: TrainConfig | None = None) -> object:
    info = read_region_info(store)
    return package_spec(store, info, cfg or NetworkConfig(), "unet", "resnet18", info.classes)


def test_band_constant_inside_the_labelled_area(tmp_path: Path) -> None:
    data = image(bands=3).astype(np.float32)
    data[1, 8:60, 8:60] = 7.0  # varies outside the labels only
    (tmp_path / "b").mkdir()
    store = _labelled_store(tmp_path / "b", data)
    with pytest.raises(InputError, match=r"band 'band2' of .*r\.zarr is constant \(7\) inside the labelled"):
        _spec(store)


def test_band_all_nodata_inside_the_labelled_area(tmp_path: Path) -> None:
    data = image(bands=2).astype(np.float32)
    data[0, 4:64, 4:64] = np.nan  # valid pixels remain, none where labels are
    (tmp_path / "b").mkdir()
    store = _labelled_store(tmp_path / "b", data, nodata=float("nan"))
    with pytest.raises(InputError, match=r"band 'band1' of .*r\.zarr has no valid value inside the labelled"):
        _spec(store)


def test_nan_pixels_do_not_poison_the_statistics(tmp_path: Path) -> None:
    data = image(bands=2).astype(np.float32)
    data[:, :4, :] = np.nan
    (tmp_path / "b").mkdir()
    spec = _spec(_labelled_store(tmp_path / "b", data, nodata=float("nan")))
    assert np.isfinite(spec.mean).all() and np.isfinite(spec.std).all()  # type: ignore[attr-defined]


def test_non_finite_statistics_name_the_band() -> None:
    with pytest.raises(InputError, match=r"band 'nir' of s\.zarr has non-finite statistics"):
        check_statistics((1.0, float("nan")), (1.0, 2.0), ("red", "nir"), "s.zarr")
    check_statistics((1.0, 2.0), (1.0, 2.0), ("red", "nir"), "s.zarr")


def test_chip_larger_than_the_region_is_clamped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert fit_chip_size(128, 500, 600) == (128, None)
    chip, note = fit_chip_size(4096, 100, 200)
    assert chip == 96 and note is not None and "4096" in note and "96" in note
    with pytest.raises(InputError, match="smaller than the smallest training chip"):
        fit_chip_size(64, 20, 500)
    cfg, note = NetworkConfig(chip_size=4096).fit_region(100, 200)
    assert cfg.chip_size == 96 and note is not None
    forest = ForestConfig()
    assert forest.fit_region(20, 20) == (forest, None)

    (tmp_path / "b").mkdir()
    store = _labelled_store(tmp_path / "b", image(bands=2))
    with caplog.at_level(logging.WARNING, logger="segpipe.stages.train.stats"):
        spec = _spec(store, NetworkConfig(chip_size=4096))
    assert spec.chip_size == 64  # type: ignore[attr-defined]
    assert any("--chip-size 4096" in r.getMessage() for r in caplog.records)
    sampler = ChipSampler(
        open_layer(store, "image"),
        open_layer(store, "labels"),
        32,
        4096,
        np.arange(256, dtype=np.uint8),
        32,
        set(),
        "train",
    )
    img, lab = sampler.read(*sampler.window_for(20, 20, None))
    assert img.shape == (2, 64, 64) and lab.shape == (64, 64)


def test_stac_item_json_is_valid_after_export(classes_store: Path, tmp_path: Path) -> None:
    dest = write_cog(classes_store, tmp_path / "exports" / "classes.tif")
    item = json.loads(stac_item_path(Path(str(dest))).read_text())
    assert item["assets"]["data"]["href"] == "./classes.tif"
    assert hidden(tmp_path / "exports") == []


# ---- evaluate ------------------------------------------------------------------------------


def test_evaluate_report_destination(
    classes_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segpipe.stages.evaluate.assess import evaluate

    reference = np.zeros((1, 96, 96), np.uint8)
    reference[0, 10:50, 10:50] = 2
    ref = write_tif(tmp_path / "reference.tif", reference)
    blocker = tmp_path / "report"
    blocker.write_text("a file")
    with pytest.raises(InputError, match=r"--out .*report is a file"):
        evaluate(classes_store, ref, blocker, preview=False)
    assert blocker.read_text() == "a file"

    real = Path.write_text

    def write_text(self: Path, data: str, *args: object, **kw: object) -> int:
        if self.name == "metrics.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "reports"
    with pytest.raises(StorageError, match=rf"evaluation report {out}: the disk is full"):
        evaluate(classes_store, ref, out, preview=False)
    assert not (out / "metrics.json").exists()
