"""Ingest: tiles, VRTs and folders into a region store; labels onto its grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from rasterio.transform import from_origin

from segpipe.errors import LabelsError, MissingInputError, StoreError, TileMismatchError
from segpipe.io.mosaic import mosaic_vrt_xml, open_mosaic
from segpipe.io.store import open_region, read_region_info
from segpipe.stages.ingest.driver import ingest
from segpipe.types import ClassInfo, write_classes_file

CRS = "EPSG:32617"
RES = 10.0
X0, Y0 = 500_000.0, 4_000_000.0
TILE_H, TILE_W = 45, 70
NAMES = ("blue", "green", "nir")


def write_tif(
    path: Path,
    data: np.ndarray,
    *,
    x: float = X0,
    y: float = Y0,
    res: float = RES,
    crs: str = CRS,
    nodata: float | None = 0,
    names: tuple[str, ...] | None = NAMES,
) -> Path:
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
        dtype=data.dtype, crs=crs, transform=from_origin(x, y, res, res), nodata=nodata,
    ) as ds:
        ds.write(data)
        for i, name in enumerate(names or ()):
            ds.set_band_description(i + 1, name)
    return path


@pytest.fixture
def tiles(tmp_path: Path) -> tuple[list[Path], np.ndarray]:
    """2 x 2 tiles of a seeded 3-band uint16 mosaic, plus the mosaic itself."""
    rng = np.random.default_rng(42)
    full = rng.integers(1, 5000, (3, 2 * TILE_H, 2 * TILE_W), dtype=np.uint16)
    full[:, :4, :4] = 0  # some nodata
    folder = tmp_path / "tiles"
    folder.mkdir()
    paths = []
    for r in range(2):
        for c in range(2):
            part = full[:, r * TILE_H : (r + 1) * TILE_H, c * TILE_W : (c + 1) * TILE_W]
            x, y = X0 + c * TILE_W * RES, Y0 - r * TILE_H * RES
            paths.append(write_tif(folder / f"t{r}{c}.tif", np.ascontiguousarray(part), x=x, y=y))
    return paths, full


@pytest.mark.parametrize("block", [32, 512])
def test_tiles_round_trip(tiles: tuple[list[Path], np.ndarray], tmp_path: Path, block: int) -> None:
    paths, full = tiles
    messages: list[str] = []
    out = tmp_path / "region.zarr"
    info = ingest(paths, out, block_size=block, progress=messages.append)

    assert messages
    assert (info.height, info.width) == full.shape[1:]
    assert info.block_size == block
    assert info.band_names == NAMES
    assert info.nodata == 0
    assert info.dtype == "uint16"
    assert info.transform == (RES, 0.0, X0, 0.0, -RES, Y0)
    assert rasterio.crs.CRS.from_wkt(info.crs_wkt) == rasterio.crs.CRS.from_string(CRS)

    ds = open_region(out)
    image = ds["image"]
    np.testing.assert_array_equal(image.values, full)
    assert image.rio.crs == rasterio.crs.CRS.from_string(CRS)
    assert image.rio.nodata == 0
    assert tuple(image.rio.transform())[:6] == info.transform
    assert list(ds["band"].values) == [1, 2, 3]
    assert image.data.chunks[1][0] == min(block, full.shape[1])

    arr = zarr.open_group(str(out), mode="r")["image"]
    assert arr.shards == (3, block, block)
    assert arr.chunks == (3, min(block, 256), min(block, 256))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_open_mosaic_is_lazy_and_named(tiles: tuple[list[Path], np.ndarray]) -> None:
    paths, full = tiles
    da = open_mosaic(paths, chunk_size=40)
    assert da.dims == ("band", "y", "x")
    assert da.chunks is not None and da.chunks[1][0] == 40 and da.chunks[0] == (3,)
    assert da.attrs["long_name"] == NAMES
    assert da.rio.nodata == 0
    np.testing.assert_array_equal(da.isel(x=slice(60, 80), y=slice(40, 50)).values, full[:, 40:50, 60:80])


def test_vrt_and_folder_inputs(tiles: tuple[list[Path], np.ndarray], tmp_path: Path) -> None:
    paths, full = tiles
    vrt = tmp_path / "mosaic.vrt"
    vrt.write_text(mosaic_vrt_xml(paths))
    for name, images in (("vrt", [vrt]), ("folder", [paths[0].parent])):
        info = ingest(images, tmp_path / f"{name}.zarr", block_size=64)
        assert info.band_names == NAMES
        np.testing.assert_array_equal(open_region(info.path)["image"].values, full)


def test_no_band_names_and_no_nodata(tmp_path: Path) -> None:
    data = np.arange(2 * 20 * 30, dtype=np.float32).reshape(2, 20, 30)
    tif = write_tif(tmp_path / "a.tif", data, nodata=None, names=None)
    info = ingest([tif], tmp_path / "r.zarr", block_size=256)
    assert info.band_names == ("band1", "band2")
    assert info.nodata is None
    np.testing.assert_array_equal(open_region(info.path)["image"].values, data)


def _pair(tmp_path: Path, **changes: object) -> tuple[Path, Path]:
    a = write_tif(tmp_path / "a.tif", np.ones((3, 10, 10), np.uint16))
    kw: dict = {"x": X0 + 100}
    data = np.ones((3, 10, 10), np.uint16)
    if "count" in changes:
        data = np.ones((int(changes.pop("count")), 10, 10), np.uint16)  # type: ignore[call-overload]
        kw["names"] = None
    if "dtype" in changes:
        data = data.astype(changes.pop("dtype"))  # type: ignore[call-overload]
    kw.update(changes)
    return a, write_tif(tmp_path / "b.tif", data, **kw)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"crs": "EPSG:4326"}, ["CRS", "EPSG:4326", "EPSG:32617"]),
        ({"count": 4}, ["band count", "4", "3"]),
        ({"dtype": "float32"}, ["dtype", "float32", "uint16"]),
        ({"res": 20.0}, ["pixel size", "20", "10"]),
        ({"nodata": 7}, ["nodata", "7", "0"]),
        ({"x": X0 + 105}, ["pixel grid", "0.500"]),
    ],
)
def test_mismatched_tiles(tmp_path: Path, change: dict, words: list[str]) -> None:
    a, b = _pair(tmp_path, **change)
    grid = {"crs", "res", "x"} & set(change)
    with pytest.raises(TileMismatchError) as err:
        # Tiles on different grids are warped by ingest now; the mosaic itself still refuses them.
        open_mosaic([a, b]) if grid else ingest([a, b], tmp_path / "r.zarr")
    assert "b.tif" in str(err.value)
    for word in words:
        assert word in str(err.value)
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.parametrize("change", [{"res": 20.0}, {"x": X0 + 105}])
def test_tiles_on_different_grids_are_warped_onto_one(tmp_path: Path, change: dict) -> None:
    a, b = _pair(tmp_path, **change)
    info = ingest([a, b], tmp_path / "r.zarr")
    with rasterio.open(a) as src:
        assert (info.transform[0], info.crs_wkt != "") == (src.transform.a, True)  # the finest pixel size
    attrs = zarr.open_group(str(tmp_path / "r.zarr"), mode="r").attrs["segpipe"]
    assert attrs["warp"]["scenes"] == [str(a), str(b)] == attrs["sources"]


def test_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match=r"nope\.tif"):
        ingest([tmp_path / "nope.tif"], tmp_path / "r.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match="empty"):
        ingest([tmp_path / "empty"], tmp_path / "r.zarr")
    tif = write_tif(tmp_path / "a.tif", np.ones((3, 8, 8), np.uint16))
    with pytest.raises(MissingInputError, match=r"labels\.gpkg"):
        ingest([tif], tmp_path / "r.zarr", labels=tmp_path / "labels.gpkg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "empty"]


def _labels_tif(path: Path, data: np.ndarray, **kw: object) -> Path:
    return write_tif(path, data[None], names=None, **{"nodata": None, **kw})  # type: ignore[arg-type]


def test_labels_raster_other_crs_nearest(tiles: tuple[list[Path], np.ndarray], tmp_path: Path) -> None:
    paths, _ = tiles
    # Class cells in geographic coordinates, over the image (UTM 17N, near 81W 36N).
    from rasterio.warp import transform_bounds

    left, bottom, right, top = transform_bounds(CRS, "EPSG:4326", X0, Y0 - 90 * RES, X0 + 140 * RES, Y0)
    src = np.choose((np.indices((60, 80)) // 10).sum(0) % 3, [1, 5, 9]).astype(np.uint8)
    res = max((right - left) / 70, (top - bottom) / 50)
    lab = _labels_tif(tmp_path / "lab.tif", src, crs="EPSG:4326", x=left - 5 * res, y=top + 5 * res, res=res)

    info = ingest(paths, tmp_path / "r.zarr", labels=lab, block_size=32)
    labels = open_region(info.path)["labels"].values
    # Nearest: only the source's class ids, never blends like 3 or 7.
    assert set(np.unique(labels)) <= {0, 1, 5, 9}
    assert set(np.unique(labels)) >= {1, 5, 9}
    assert [c.value for c in info.classes] == [1, 5, 9]
    assert [c.name for c in info.classes] == ["class 1", "class 5", "class 9"]

    # Each pixel centre, projected to EPSG:4326, falls in the source cell it was given.
    from rasterio.warp import transform

    rows, cols = np.indices(labels.shape)
    xs, ys = X0 + (cols.ravel() + 0.5) * RES, Y0 - (rows.ravel() + 0.5) * RES
    lon, lat = transform(CRS, "EPSG:4326", xs, ys)
    with rasterio.open(lab) as ds:
        r, c = rasterio.transform.rowcol(ds.transform, lon, lat)
    expected = src[np.asarray(r), np.asarray(c)].reshape(labels.shape)
    assert (labels == expected).mean() > 0.99


def test_labels_outside_image_leave_nothing(tiles: tuple[list[Path], np.ndarray], tmp_path: Path) -> None:
    paths, _ = tiles
    lab = _labels_tif(tmp_path / "far.tif", np.ones((10, 10), np.uint8), x=X0 + 1e5)
    with pytest.raises(LabelsError, match="do not overlap the image"):
        ingest(paths, tmp_path / "r.zarr", labels=lab)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["far.tif", "tiles"]


def test_labels_without_labelled_pixel(tiles: tuple[list[Path], np.ndarray], tmp_path: Path) -> None:
    paths, _ = tiles
    lab = _labels_tif(tmp_path / "zero.tif", np.zeros((90, 140), np.uint8))
    with pytest.raises(LabelsError, match="no labelled pixel"):
        ingest(paths, tmp_path / "r.zarr", labels=lab)
    assert not (tmp_path / "r.zarr").exists()


def test_classes_file_must_cover_labels(tiles: tuple[list[Path], np.ndarray], tmp_path: Path) -> None:
    paths, _ = tiles
    data = np.zeros((90, 140), np.uint8)
    data[:30] = 1
    data[30:60] = 2
    data[60:, :10] = 8
    lab = _labels_tif(tmp_path / "lab.tif", data, nodata=255)
    classes_json = tmp_path / "classes.json"
    write_classes_file(classes_json, [ClassInfo(1, "water", "#0000ff"), ClassInfo(2, "forest", "#00ff00")])
    with pytest.raises(LabelsError, match=r"value\(s\) 8"):
        ingest(paths, tmp_path / "r.zarr", labels=lab, classes=classes_json)

    given = [
        ClassInfo(1, "water", "#0000ff"),
        ClassInfo(2, "forest", "#00ff00"),
        ClassInfo(8, "rock", "#777777"),
    ]
    info = ingest(paths, tmp_path / "r.zarr", labels=lab, classes=given, block_size=64)
    assert list(info.classes) == given
    np.testing.assert_array_equal(open_region(info.path)["labels"].values, data)


def test_out_of_range_label_values(tiles: tuple[list[Path], np.ndarray], tmp_path: Path) -> None:
    paths, _ = tiles
    data = np.ones((90, 140), np.uint16)
    data[5, 5] = 300
    lab = _labels_tif(tmp_path / "lab.tif", data)
    with pytest.raises(LabelsError, match="300"):
        ingest(paths, tmp_path / "r.zarr", labels=lab, block_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab.tif", "tiles"]


def test_existing_output_kept_until_replaced(tiles: tuple[list[Path], np.ndarray], tmp_path: Path) -> None:
    paths, full = tiles
    out = tmp_path / "r.zarr"
    ingest(paths[:1], out, block_size=32)
    with pytest.raises(StoreError, match="exists; pass --overwrite"):
        ingest(paths, out)

    far = _labels_tif(tmp_path / "far.tif", np.ones((10, 10), np.uint8), x=X0 + 1e5)
    with pytest.raises(LabelsError):
        ingest(paths, out, labels=far, overwrite=True)
    kept = read_region_info(out)
    assert (kept.height, kept.width) == (TILE_H, TILE_W)
    np.testing.assert_array_equal(open_region(out)["image"].values, full[:, :TILE_H, :TILE_W])

    info = ingest(paths, out, overwrite=True, block_size=64)
    assert (info.height, info.width) == full.shape[1:]
    np.testing.assert_array_equal(open_region(out)["image"].values, full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["far.tif", "r.zarr", "tiles"]


def test_block_size_must_fit_inner_chunks(tiles: tuple[list[Path], np.ndarray], tmp_path: Path) -> None:
    paths, _ = tiles
    with pytest.raises(ValueError, match="block size 300"):
        ingest(paths, tmp_path / "r.zarr", block_size=300)


def test_on_a_multiprocess_cluster(tiles: tuple[list[Path], np.ndarray], tmp_path: Path) -> None:
    """Graphs pickle to worker processes, and a worker's LabelsError reaches the caller."""
    from distributed import Client, LocalCluster

    paths, full = tiles
    labels = np.zeros((90, 140), np.uint16)
    labels[10:50, 20:90] = 3
    good = _labels_tif(tmp_path / "good.tif", labels)
    broken = labels.copy()
    broken[80, 130] = 300
    bad = _labels_tif(tmp_path / "bad.tif", broken)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        with pytest.raises(LabelsError, match="300"):
            ingest(paths, tmp_path / "r.zarr", labels=bad, block_size=32)
        assert not (tmp_path / "r.zarr").exists()
        info = ingest(paths, tmp_path / "r.zarr", labels=good, block_size=32)
    ds = open_region(info.path)
    np.testing.assert_array_equal(ds["image"].values, full)
    np.testing.assert_array_equal(ds["labels"].values, labels)
    assert [c.value for c in info.classes] == [3]
