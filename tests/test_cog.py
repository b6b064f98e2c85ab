"""Cloud-Optimized GeoTIFF export from a region store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from affine import Affine
from rasterio.crs import CRS
from rio_cogeo import cog_validate
from stac_schemas import check_item

import segpipe.stages.export.cog as cog
import segpipe.stages.export.geotiff as geotiff
from segpipe.errors import InputError, MissingInputError, MissingLayerError, SegpipeError, StoreError
from segpipe.io.store import RegionInfo, create_layer, read_region_info, write_block
from segpipe.stages.export.cog import write_cog
from segpipe.stages.export.layers import (
    ExportLayer,
    class_colormap,
    class_tags,
    classes_from_tags,
    describe_layer,
)
from segpipe.types import ClassInfo, classes_to_json

CLASSES = (
    ClassInfo(1, "forest", "#1f7a1f"),
    ClassInfo(3, "water", "#1f77b4"),
    ClassInfo(7, "urban", "#d62728"),
)
TRANSFORM = Affine(30.0, 0.0, 500000.0, 0.0, -30.0, 4000000.0)
# what an export of a class layer with known classes leaves in its folder
LEGEND_FILES = ["classes.qml", "classes.stac.json", "classes.tif", "classes.tif.aux.xml"]


def make_store(
    path: Path,
    height: int,
    width: int,
    block: int = 512,
    crs: str = "EPSG:32617",
    transform: Affine = TRANSFORM,
    classes: tuple[ClassInfo, ...] = CLASSES,
) -> RegionInfo:
    """A region store with store.py's layout and an all-zero one-band image."""
    ys = transform.f + transform.e * (np.arange(height) + 0.5)
    xs = transform.c + transform.a * (np.arange(width) + 0.5)
    image = xr.DataArray(
        np.zeros((1, height, width), np.uint16),
        dims=("band", "y", "x"),
        coords={"band": [1], "y": ys, "x": xs},
        name="image",
        attrs={"long_name": ["b1"]},
    )
    image = image.rio.write_crs(crs).rio.write_transform(transform)
    inner = min(256, block)
    encoding = {"image": {"chunks": (1, inner, inner), "shards": (1, block, block)}}
    image.to_dataset().to_zarr(path, mode="w", zarr_format=3, consolidated=False, encoding=encoding)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["segpipe"] = {"schema": 1, "block_size": block, "classes": classes_to_json(classes)}
    return read_region_info(path)


def fill_layer(store: Path, name: str, data: np.ndarray) -> None:
    info = read_region_info(store)
    array = create_layer(store, name, "uint8", 255, overwrite=True)
    b = info.block_size
    for y0 in range(0, info.height, b):
        for x0 in range(0, info.width, b):
            write_block(array, y0, x0, data[y0 : y0 + b, x0 : x0 + b], b)


def _majority_cells(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Classes where every 2 x 2 cell holds 3 pixels of one class and 1 of another.

    The first overview (factor 2) of a MODE resampling is then exactly the majority
    class of each cell; averaging (of ids or of palette colours) would not give it.
    """
    ids = np.array([1, 3, 7], np.uint8)
    major = rng.integers(0, 3, size=(height // 2, width // 2))
    minor = (major + rng.integers(1, 3, size=major.shape)) % 3
    cells = np.repeat(ids[major][:, :, None], 4, axis=2)
    corner = rng.integers(0, 4, size=major.shape)
    np.put_along_axis(cells, corner[:, :, None], ids[minor][:, :, None], axis=2)
    return cells.reshape(height // 2, width // 2, 2, 2).transpose(0, 2, 1, 3).reshape(height, width)


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 1500 x 1300 store whose classes are random 1/3 with a nodata corner."""
    store = tmp_path_factory.mktemp("cog") / "region.zarr"
    make_store(store, 1500, 1300)
    rng = np.random.default_rng(7)
    classes = _majority_cells(rng, 1500, 1300)
    classes[:300, :200] = 255
    classes[1400:, 1200:] = 7
    fill_layer(store, "classes", classes)
    confidence = rng.integers(0, 255, size=(1500, 1300), dtype=np.uint8)
    confidence[:300, :200] = 255
    fill_layer(store, "confidence", confidence)
    return store, classes


def test_classes_cog_is_valid_and_keeps_everything(region: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    store, expected = region
    out = write_cog(store, tmp_path / "sub" / "classes.tif")
    assert out == tmp_path / "sub" / "classes.tif"
    assert cog_validate(out, strict=False, quiet=True)[0]
    info = read_region_info(store)
    with rasterio.open(out) as src:
        assert src.crs == CRS.from_wkt(info.crs_wkt) == CRS.from_epsg(32617)
        assert src.transform == TRANSFORM
        assert (src.height, src.width, src.count, src.dtypes[0]) == (1500, 1300, 1, "uint8")
        assert src.nodata == 255
        assert src.block_shapes[0] == (512, 512)
        factors = src.overviews(1)
        assert factors  # >= 1024 px gets internal overviews
        assert src.descriptions == ("classes",)
        assert src.compression.name.upper() == "DEFLATE"
        assert src.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR") == "2"
        np.testing.assert_array_equal(src.read(1), expected)
        cmap = src.colormap(1)
        for c in CLASSES:
            assert cmap[c.value][:3] == c.rgb
        assert cmap[255][3] == 0  # nodata transparent
        assert cmap[0][:3] == (0, 0, 0)
        tags = src.tags(1)
        assert tags["CLASS_1"] == "forest" and tags["CLASS_3"] == "water" and tags["CLASS_7"] == "urban"
        assert json.loads(tags["classes"])[1] == {"value": 3, "name": "water", "colour": "#1f77b4"}
        assert classes_from_tags(tags) == list(CLASSES)
    # MODE overviews: the majority class of each 2 x 2 cell, exactly
    with rasterio.open(out, overview_level=0) as ovr:
        assert ovr.shape == (750, 650)
        first = ovr.read(1)
    cells = expected.reshape(750, 2, 650, 2).transpose(0, 2, 1, 3).reshape(750, 650, 4)
    candidates = np.array([1, 3, 7, 255], np.uint8)
    counts = (cells[:, :, :, None] == candidates).sum(axis=2)
    majority = candidates[counts.argmax(axis=2)]
    np.testing.assert_array_equal(first, majority)
    assert (first[:150, :100] == 255).all()
    # coarser overviews hold class ids or nodata only, never an average such as 2 from {1, 3}
    with rasterio.open(out, overview_level=len(factors) - 1) as ovr:
        assert set(np.unique(ovr.read(1)).tolist()) <= {1, 3, 7, 255}
    # no temporaries left; the STAC Item, GDAL's sidecar and the QGIS style beside the COG
    assert sorted(p.name for p in out.parent.iterdir()) == LEGEND_FILES


def test_confidence_cog_uses_average_overviews(region: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    store, _ = region
    out = write_cog(store, tmp_path / "confidence.tif", layer="confidence", compress="ZSTD")
    assert cog_validate(out, quiet=True)[0]
    with rasterio.open(out) as src:
        assert src.descriptions == ("confidence",)
        assert src.nodata == 255
        assert src.compression.name.upper() == "ZSTD"
        overview = src.read(1, out_shape=(750, 650))
        # averages of uniform 0-254 values cluster near the middle; MODE/NEAREST would not
        valid = overview[overview != 255]
        assert 100 < valid.mean() < 155 and valid.std() < 60
        assert "CLASS_1" not in src.tags(1)
        # The values are percent as stored: GDAL and the Item say so.
        assert (src.units, src.scales, src.offsets) == (("percent",), (1.0,), (0.0,))
    item = json.loads(out.with_suffix(".stac.json").read_text())
    band = item["assets"]["data"]["bands"][0]
    assert (band["unit"], band["raster:scale"], band["raster:offset"]) == ("percent", 1.0, 0.0)
    assert any("/raster/" in ext for ext in item["stac_extensions"])


def test_missing_layer_and_bad_arguments(tmp_path: Path) -> None:
    store = tmp_path / "empty.zarr"
    make_store(store, 64, 64, block=64)
    with pytest.raises(StoreError, match="segpipe predict"):
        write_cog(store, tmp_path / "x.tif")
    assert not (tmp_path / "x.tif").exists()
    with pytest.raises(MissingInputError):
        write_cog(tmp_path / "nope.zarr", tmp_path / "x.tif")
    fill_layer(store, "classes", np.ones((64, 64), np.uint8))
    with pytest.raises(InputError, match="cannot export"):
        write_cog(store, tmp_path / "x.tif", layer="labels")
    (tmp_path / "x.tif").write_bytes(b"old")
    with pytest.raises(InputError, match="overwrite"):
        write_cog(store, tmp_path / "x.tif", overwrite=False)
    assert (tmp_path / "x.tif").read_bytes() == b"old"


def test_small_raster_and_store_without_classes(tmp_path: Path) -> None:
    store = tmp_path / "small.zarr"
    make_store(store, 100, 70, block=64, classes=())
    data = np.full((100, 70), 2, np.uint8)
    data[:10] = 255
    fill_layer(store, "classes", data)
    out = write_cog(store, tmp_path / "small.tif")
    assert cog_validate(out, quiet=True)[0]
    with rasterio.open(out) as src:
        np.testing.assert_array_equal(src.read(1), data)
        assert "classes" not in src.tags(1)
        assert src.colormap(1)[2][:3] == ClassInfo(2, "x", "#e8c547").rgb  # default palette


def _gdal_cache_max() -> int | None:
    """GDAL's block cache size in bytes now (None where rasterio's bundled GDAL is not found)."""
    import ctypes
    import glob

    libs = glob.glob(str(Path(rasterio.__file__).parent.parent / "rasterio.libs" / "libgdal*"))
    if not libs:
        return None
    gdal = ctypes.CDLL(libs[0])
    gdal.GDALGetCacheMax64.restype = ctypes.c_int64
    return int(gdal.GDALGetCacheMax64())


def test_every_step_of_an_export_runs_under_a_cache_set_in_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rasterio reads GDAL_CACHEMAX as bytes: 256 meant as MB once gave GDAL a 256-byte cache,
    and the steps without one ran under GDAL's default, 5 % of RAM (1.2 GB at 32,768^2)."""
    assert geotiff.stream_cache_bytes(4096) == 16 * 2**20 and geotiff.stream_cache_bytes(131072) == 64 * 2**20
    if _gdal_cache_max() is None:
        pytest.skip("rasterio's bundled GDAL library not found")
    seen: dict[str, int | None] = {}

    def spy(name: str, fn):
        def run(*a, **k):
            seen[name] = _gdal_cache_max()
            return fn(*a, **k)
        return run

    monkeypatch.setattr(cog.rasterio.shutil, "copy", spy("copy", cog.rasterio.shutil.copy))
    monkeypatch.setattr(cog, "_check_survived", spy("check", cog._check_survived))
    monkeypatch.setattr(geotiff, "read_ahead", spy("stream", geotiff.read_ahead))
    store = tmp_path / "s.zarr"
    make_store(store, 100, 70, block=64, classes=())
    fill_layer(store, "classes", np.full((100, 70), 2, np.uint8))
    before = _gdal_cache_max()
    write_cog(store, tmp_path / "c.tif")
    assert seen == {"stream": 16 * 2**20, "copy": cog.COPY_CACHE_BYTES, "check": cog.READ_CACHE_BYTES}
    assert _gdal_cache_max() == before  # the process's own cache is given back


def _old_file(path: Path) -> bytes:
    path.write_bytes(b"previous export")
    return path.read_bytes()


def test_failed_validation_leaves_old_file(
    region: tuple[Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = region
    out = tmp_path / "classes.tif"
    old = _old_file(out)
    monkeypatch.setattr(cog, "cog_validate", lambda *a, **k: (False, ["broken IFD"], []))
    with pytest.raises(SegpipeError, match="broken IFD"):
        write_cog(store, out)
    assert out.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["classes.tif"]


def test_exception_mid_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "s.zarr"
    make_store(store, 1100, 600)
    fill_layer(store, "classes", np.ones((1100, 600), np.uint8))
    calls = []

    def fail_third(y0: int, x0: int) -> None:
        calls.append((y0, x0))
        if len(calls) == 3:
            raise OSError("disk full")

    real = geotiff.write_geotiff_layer
    monkeypatch.setattr(
        cog, "write_geotiff_layer", lambda *a, **k: real(*a, **{**k, "on_window": fail_third})
    )
    out = tmp_path / "out" / "classes.tif"
    with pytest.raises(OSError, match="disk full"):
        write_cog(store, out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []
    old = _old_file(out)
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        write_cog(store, out)
    assert out.read_bytes() == old
    assert [p.name for p in out.parent.iterdir()] == ["classes.tif"]


def test_probabilities_layer_exports_one_band_per_class(tmp_path: Path) -> None:
    store = tmp_path / "p.zarr"
    make_store(store, 700, 600)
    rng = np.random.default_rng(2)
    probs = rng.integers(0, 101, size=(3, 700, 600), dtype=np.uint8)
    probs[:, :50, :60] = 255
    array = create_layer(store, "probabilities", "uint8", 255, leading=(("class", 3),))
    for y0 in range(0, 700, 512):
        for x0 in range(0, 600, 512):
            write_block(array, y0, x0, probs[:, y0 : y0 + 512, x0 : x0 + 512], 512)
    out = write_cog(store, tmp_path / "probabilities.tif", layer="probabilities", compress="zstd")
    assert cog_validate(out, quiet=True)[0]
    with rasterio.open(out) as src:
        assert (src.count, src.dtypes, src.nodata) == (3, ("uint8",) * 3, 255)
        assert src.descriptions == ("forest", "water", "urban")
        assert [src.tags(b)["CLASS_VALUE"] for b in (1, 2, 3)] == ["1", "3", "7"]
        assert src.compression.name.upper() == "ZSTD"
        np.testing.assert_array_equal(src.read(), probs)
        assert src.overviews(1) == [2]
        half = src.read(out_shape=(3, 350, 300))
    # AVERAGE overviews: each overview pixel is the rounded mean of its valid 2 x 2 cell
    cells = probs[1].reshape(350, 2, 300, 2).astype(float)
    valid = half[1] != 255
    mean = cells.mean(axis=(1, 3))
    assert np.abs(half[1][valid] - mean[valid]).max() <= 1.0
    item = check_item(out)  # validates offline; statistics and histograms of all 3 bands
    assert [b["name"] for b in item["assets"]["data"]["bands"]] == ["forest", "water", "urban"]
    assert "classification:classes" not in item["assets"]["data"]


def test_image_layer_keeps_dtype_nodata_and_band_names(tmp_path: Path) -> None:
    store = tmp_path / "img.zarr"
    h, w = 600, 520
    image = np.random.default_rng(4).integers(1, 4000, size=(2, h, w), dtype=np.uint16)
    image[:, :40, :40] = 0
    ys = TRANSFORM.f + TRANSFORM.e * (np.arange(h) + 0.5)
    xs = TRANSFORM.c + TRANSFORM.a * (np.arange(w) + 0.5)
    da = xr.DataArray(
        image,
        dims=("band", "y", "x"),
        coords={"band": [1, 2], "y": ys, "x": xs},
        name="image",
        attrs={"long_name": ["red", "nir"]},
    )
    da = da.rio.write_crs("EPSG:32617").rio.write_transform(TRANSFORM)
    enc = {"image": {"chunks": (2, 256, 256), "shards": (2, 512, 512), "_FillValue": 0}}
    da.to_dataset().to_zarr(store, mode="w", zarr_format=3, consolidated=False, encoding=enc)
    zarr.open_group(str(store), mode="r+").attrs["segpipe"] = {"schema": 1, "block_size": 512, "classes": []}
    out = write_cog(store, tmp_path / "image.tif", layer="image")
    assert cog_validate(out, quiet=True)[0]
    with rasterio.open(out) as src:
        assert (src.count, src.dtypes[0], src.nodata) == (2, "uint16", 0)
        assert src.descriptions == ("red", "nir")
        assert src.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR") == "2"
        np.testing.assert_array_equal(src.read(), image)
        assert src.crs == CRS.from_epsg(32617)
    item = check_item(out)  # uint16: the histogram spans the values found, in 256 buckets
    red = item["assets"]["data"]["bands"][0]
    assert {k: red[k] for k in ("name", "description", "data_type", "nodata")} == {
        "name": "red", "description": "red", "data_type": "uint16", "nodata": 0}
    valid = image[0][image[0] != 0]
    histogram = red["raster:histogram"]
    assert (histogram["min"], histogram["max"]) == (valid.min() - 0.5, valid.max() + 0.5)
    expected = np.histogram(valid, bins=256, range=(valid.min() - 0.5, valid.max() + 0.5))[0]
    assert histogram["buckets"] == expected.tolist()
    assert item["assets"]["data"]["roles"] == ["data", "visual"]


_KILL_SCRIPT = """
import sys, time
import segpipe.stages.export.cog as cog
stage = sys.argv[3]
if stage == "stream":
    real = cog.write_geotiff_layer
    cog.write_geotiff_layer = lambda *a, **k: real(*a, **{**k, "on_window": lambda y, x: time.sleep(0.5)})
else:
    cog._check_survived = lambda *a, **k: time.sleep(60)  # the converted COG sits in its temporary
cog.write_cog(sys.argv[1], sys.argv[2])
"""


@pytest.mark.parametrize("stage", ["stream", "convert"])
def test_export_killed_midway_leaves_no_file_and_keeps_the_old_one(
    region: tuple[Path, np.ndarray], tmp_path: Path, stage: str
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    store, expected = region
    for dest in (tmp_path / "new" / "classes.tif", tmp_path / "old" / "classes.tif"):
        dest.parent.mkdir()
        old = _old_file(dest) if dest.parent.name == "old" else None
        proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(store), str(dest), stage])
        suffix = ".stream.tif" if stage == "stream" else ".cog.tif"
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(suffix) for p in dest.parent.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "export ended before it was killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if old is None:
            assert not dest.exists()
        else:
            assert dest.read_bytes() == old
        assert not (dest.parent / "classes.stac.json").exists()
        assert not any((dest.parent / name).exists() for name in ("classes.tif.aux.xml", "classes.qml"))
        leftovers = [p for p in dest.parent.iterdir() if p.name.startswith(".classes.tif.")]
        assert leftovers  # a SIGKILL runs no cleanup: only hidden temporaries remain...
        write_cog(store, dest)  # ...and the next export to the same destination removes them
        assert sorted(p.name for p in dest.parent.iterdir()) == LEGEND_FILES
        with rasterio.open(dest) as src:
            np.testing.assert_array_equal(src.read(1), expected)


# ---- the named pieces of an export ---------------------------------------------------------


def test_each_layer_says_its_bands_colours_and_tags(tmp_path: Path) -> None:
    store = tmp_path / "layers.zarr"
    make_store(store, 64, 48, block=64)
    fill_layer(store, "classes", np.ones((64, 48), np.uint8))
    fill_layer(store, "confidence", np.ones((64, 48), np.uint8))
    probs = create_layer(store, "probabilities", "uint8", 255, leading=(("class", 2),))
    write_block(probs, 0, 0, np.zeros((2, 64, 48), np.uint8), 64)
    classes, _ = describe_layer(store, "classes")
    assert (classes.count, classes.dtype, classes.nodata, classes.resampling) == (1, "uint8", 255, "MODE")
    assert classes.dataset_tags(store) == {"SEGPIPE_LAYER": "classes", "SEGPIPE_STORE": "layers.zarr"}
    assert classes.colormap() == class_colormap(CLASSES)
    assert classes.band_tags() == (class_tags(CLASSES),)
    confidence, _ = describe_layer(store, "confidence")
    assert confidence.colormap() is None and confidence.band_tags() == ({},)
    assert confidence.resampling == "AVERAGE" and confidence.classes == ()
    probabilities, _ = describe_layer(store, "probabilities")
    # two bands, three store classes: the bands are named by number
    assert probabilities.descriptions == ("class 1", "class 2")
    assert probabilities.band_tags() == (
        {"CLASS_VALUE": "1", "CLASS_NAME": "class 1"},
        {"CLASS_VALUE": "2", "CLASS_NAME": "class 2"},
    )
    image, _ = describe_layer(store, "image")
    assert (image.count, image.dtype, image.descriptions, image.band_tags()) == (1, "uint16", ("b1",), ({},))


def test_missing_and_malformed_layers_say_what_to_run(tmp_path: Path) -> None:
    store = tmp_path / "bare.zarr"
    make_store(store, 64, 64, block=64)
    with pytest.raises(MissingLayerError, match=r"no 'classes' layer: run 'segpipe predict' first") as caught:
        describe_layer(store, "classes")
    assert isinstance(caught.value, StoreError) and isinstance(caught.value, MissingInputError)
    with pytest.raises(MissingLayerError, match=r"'segpipe predict' with probabilities first"):
        describe_layer(store, "probabilities")
    create_layer(store, "confidence", "uint16", 0)
    with pytest.raises(StoreError, match=r"expected uint8 \(64, 64\): rerun 'segpipe predict'"):
        describe_layer(store, "confidence")
    create_layer(store, "probabilities", "float32", 0, leading=(("class", 2),))
    with pytest.raises(StoreError, match=r"is float32, expected uint8"):
        describe_layer(store, "probabilities")


def test_stream_step_and_profile() -> None:
    assert geotiff.WINDOW == 512
    steps = [geotiff.stream_step(b) for b in (256, 512, 1000, 1024, 2048, 4096)]
    assert steps == [512, 512, 512, 1024, 2048, 512]
    info = RegionInfo("s", 100, 70, 64, ("a", "b"), "uint16", 0.0, "", tuple(TRANSFORM)[:6], ())  # type: ignore[arg-type]
    spec = ExportLayer("image", 2, "uint16", 0, ("a", "b"), (), "AVERAGE")
    profile = geotiff.geotiff_profile(info, spec)
    assert (profile["height"], profile["width"], profile["count"], profile["dtype"]) == (100, 70, 2, "uint16")
    assert profile["crs"] is None and profile["transform"] == TRANSFORM and profile["nodata"] == 0
    assert profile["interleave"] == "pixel" and profile["blockxsize"] == profile["blockysize"] == 512
    classes = ExportLayer("classes", 1, "uint8", 255, ("classes",), (), "MODE")
    one_band = geotiff.geotiff_profile(info, classes)
    assert "interleave" not in one_band


def test_read_ahead_yields_every_box_once_in_order() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from segpipe.grid.box import iter_boxes

    data = np.arange(3 * 70 * 50).reshape(3, 70, 50)
    boxes = list(iter_boxes(70, 50, 32))
    with ThreadPoolExecutor(1) as pool:
        seen = list(geotiff.read_ahead(pool, data, boxes))  # type: ignore[arg-type]
    assert [box for box, _ in seen] == boxes
    for box, block in seen:
        np.testing.assert_array_equal(block, data[(Ellipsis, *box.slices)])
    with ThreadPoolExecutor(1) as pool:
        assert list(geotiff.read_ahead(pool, data, [])) == []  # type: ignore[arg-type]


def test_write_geotiff_layer_streams_pixels_metadata_and_levels(
    region: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    store, expected = region
    windows: list[tuple[int, int]] = []
    plain = geotiff.write_geotiff_layer(
        store, tmp_path / "plain.tif", on_window=lambda y, x: windows.append((y, x))
    )
    assert plain == tmp_path / "plain.tif"
    assert windows == [(y, x) for y in (0, 512, 1024) for x in (0, 512, 1024)]
    with rasterio.open(plain) as src:
        np.testing.assert_array_equal(src.read(1), expected)
        assert src.descriptions == ("classes",) and src.tags()["SEGPIPE_LAYER"] == "classes"
        assert classes_from_tags(src.tags(1)) == list(CLASSES)
        assert src.colormap(1)[7][:3] == CLASSES[2].rgb
    vrt = geotiff.write_geotiff_layer(store, tmp_path / "levels.tif", overviews=True)
    assert vrt == tmp_path / "levels.vrt"
    assert sorted(p.name for p in tmp_path.glob("levels.*")) == [
        "levels.ovr1.tif",
        "levels.ovr2.tif",
        "levels.tif",
        "levels.vrt",
    ]
    with rasterio.open(vrt) as src:
        assert src.overviews(1) == [2, 4]
        np.testing.assert_array_equal(src.read(1), expected)
        assert src.colormap(1)[7][:3] == CLASSES[2].rgb and src.nodata == 255
    # confidence has AVERAGE overviews: none are built while streaming
    confidence = geotiff.write_geotiff_layer(store, tmp_path / "c.tif", "confidence", overviews=True)
    assert confidence == tmp_path / "c.tif"


def test_staging_removes_only_its_own_temporaries(tmp_path: Path) -> None:
    dest = tmp_path / "classes.tif"
    other = tmp_path / ".classes.tif.1-00000000.cog.tif"
    other.write_bytes(b"someone else's")
    with pytest.raises(OSError, match="boom"), cog._staging(dest) as token:
        assert token.startswith(f"{os.getpid()}-")
        assert cog._temporary(dest, token, "cog.tif") == tmp_path / f".classes.tif.{token}.cog.tif"
        cog._temporary(dest, token, "cog.tif").write_bytes(b"x")
        cog._temporary(dest, token, "stac.json").write_text("{}")
        raise OSError("boom")
    assert [p.name for p in tmp_path.iterdir()] == [other.name]


def test_publish_renames_the_cog_then_its_sidecars_and_item(tmp_path: Path) -> None:
    dest = tmp_path / "classes.tif"
    cog_tmp, item_tmp = tmp_path / ".a.cog.tif", tmp_path / ".a.stac.json"
    aux_tmp, qml_tmp = tmp_path / ".a.aux.xml", tmp_path / ".a.qml"
    staged = {cog_tmp: "cog", item_tmp: "item", aux_tmp: "aux", qml_tmp: "<!-- segpipe class style -->"}
    for path, text in staged.items():
        path.write_text(text)
    cog._publish(dest, cog_tmp, (aux_tmp, qml_tmp), item_tmp)
    assert sorted(p.name for p in tmp_path.iterdir()) == LEGEND_FILES
    assert dest.read_bytes() == b"cog" and (tmp_path / "classes.stac.json").read_text() == "item"
    assert (tmp_path / "classes.tif.aux.xml").read_text() == "aux"
    cog_tmp.write_bytes(b"new")
    cog._publish(dest, cog_tmp, None, None)  # no legend: the earlier sidecar and segpipe's style go
    assert dest.read_bytes() == b"new" and (tmp_path / "classes.stac.json").read_text() == "item"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.stac.json", "classes.tif"]


def test_check_survived_names_what_the_conversion_lost(
    region: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    store, _ = region
    info = read_region_info(store)
    spec, _ = describe_layer(store, "classes", info)
    path = geotiff.write_geotiff_layer(store, tmp_path / "c.tif", info=info)
    cog._check_survived(path, spec, info)  # intact
    lost = ExportLayer("classes", 1, "uint8", 0, ("other",), (ClassInfo(9, "x", "#010203"),), "MODE")
    lost_all = r"nodata is 255\.0; band descriptions lost; colour table lost; class tags lost"
    with pytest.raises(SegpipeError, match=lost_all):
        cog._check_survived(path, lost, info)
    moved = RegionInfo(**{**info.__dict__, "transform": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)})
    with pytest.raises(SegpipeError, match="transform changed"):
        cog._check_survived(path, spec, moved)


def test_band_colormap_is_empty_without_a_colour_table(tmp_path: Path) -> None:
    from segpipe.stages.export.layers import band_colormap

    plain = tmp_path / "plain.tif"
    profile = {"driver": "GTiff", "height": 2, "width": 2, "count": 1, "dtype": "uint8", "crs": "EPSG:32617"}
    with rasterio.open(plain, "w", **profile, transform=TRANSFORM) as dst:
        dst.write(np.zeros((1, 2, 2), np.uint8))
    with rasterio.open(plain) as src:
        assert band_colormap(src) == {}
    with rasterio.open(plain, "r+") as dst:
        dst.write_colormap(1, class_colormap(CLASSES))
    with rasterio.open(plain) as src:
        assert band_colormap(src)[3] == (*CLASSES[1].rgb, 255)


def test_cog_overviews_equal_gdal_mode_on_ties(tmp_path: Path) -> None:
    """The exported levels are GDAL's own ``-r mode`` levels, ties and odd edges included."""
    from rasterio.enums import Resampling

    store = tmp_path / "ties.zarr"
    make_store(store, 1100, 1030)  # level 1 is 550 x 515, level 2 275 x 258: an odd axis
    data = np.random.default_rng(9).choice(np.array([1, 3, 7, 255], np.uint8), size=(1100, 1030))
    fill_layer(store, "classes", data)
    out = write_cog(store, tmp_path / "classes.tif", stac=False)
    plain = tmp_path / "plain.tif"
    with rasterio.open(out) as src:
        profile = {**src.profile, "driver": "GTiff"}
        assert src.overviews(1) == [2, 4]
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(data, 1)
    with rasterio.open(plain, "r+") as dst:
        dst.build_overviews([2, 4], Resampling.mode)  # what gdaladdo -r mode runs
    for level in (0, 1):
        ours, ref = rasterio.open(out, overview_level=level), rasterio.open(plain, overview_level=level)
        with ours, ref:
            np.testing.assert_array_equal(ours.read(1), ref.read(1), err_msg=f"level {level + 1}")
