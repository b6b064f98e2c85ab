"""Ingest onto one target grid: STAC scenes and mixed tiles warped, aligned tiles on the fast path."""

from __future__ import annotations

import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import geometry_mask
from rasterio.warp import Resampling, reproject
from shapely.geometry import Polygon
from stac_support import BANDS, NODATA, OFFSET, SCALE, SCENES, write_stac_labels, write_stac_scenes
from test_warp import reference, stac_sceneset

import segpipe.stages.ingest.driver as driver
from segpipe.errors import InputError
from segpipe.io.fingerprint import ingest_fingerprint
from segpipe.io.mosaic import open_mosaic
from segpipe.io.store import open_region, read_region_info, valid_mask
from segpipe.io.warp import open_warped, scenes_from_files, target_grid
from segpipe.stages.ingest.driver import ingest
from segpipe.types import Grid


def grid_of(store: Path) -> Grid:
    info = read_region_info(store)
    return Grid(info.crs_wkt, info.transform, info.height, info.width)


def segpipe_attrs(store: Path) -> dict[str, object]:
    attrs = zarr.open_group(str(store), mode="r").attrs["segpipe"]
    assert isinstance(attrs, dict)
    return attrs


@pytest.fixture(scope="module")
def stac(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The STAC fixture: an ItemCollection, its per-band COGs and one multi-band COG per scene."""
    tmp = tmp_path_factory.mktemp("stac")
    write_stac_scenes(tmp / "multi", multiband=True)
    return write_stac_scenes(tmp)


def test_aligned_tiles_keep_the_fast_path_bitwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    full = rng.integers(1, 4000, (2, 40, 60), dtype=np.uint16)
    paths = []
    for c in range(2):
        path = tmp_path / f"t{c}.tif"
        with rasterio.open(
            path, "w", driver="GTiff", width=30, height=40, count=2, dtype="uint16", crs="EPSG:32617",
            transform=Affine(10, 0, 500000 + c * 300, 0, -10, 4000000), nodata=0,
        ) as ds:  # fmt: skip
            ds.write(np.ascontiguousarray(full[:, :, c * 30 : (c + 1) * 30]))
        paths.append(path)

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("aligned tiles must not be warped")

    monkeypatch.setattr(driver, "open_warped", refuse)
    ingest(paths, tmp_path / "store", block_size=256)
    stored = zarr.open_group(str(tmp_path / "store"), mode="r")["image"][...]
    expected = open_mosaic(paths, chunk_size=256).values
    assert stored.dtype == expected.dtype and stored.tobytes() == expected.tobytes()
    np.testing.assert_array_equal(stored, full)
    attrs = segpipe_attrs(tmp_path / "store")
    assert "warp" not in attrs and "acquired" not in attrs and "aoi" not in attrs
    # The fingerprint of the fast path is the one earlier versions recorded.
    assert attrs["inputs"] == ingest_fingerprint([str(p) for p in paths], None, None, None, 256)


def test_tiles_in_two_crs_are_warped(stac: Path, tmp_path: Path) -> None:
    tiles = [stac.parent / "multi" / "cogs" / s.id / "visual.tif" for s in SCENES]
    ingest(tiles, tmp_path / "store", block_size=256)
    grid = grid_of(tmp_path / "store")
    scenes = scenes_from_files(tiles)
    assert grid == target_grid(scenes)
    assert CRS.from_wkt(grid.crs_wkt) == CRS.from_epsg(32617)  # equal areas: the first scene's
    stored = open_region(tmp_path / "store")["image"].values
    expected = open_warped(scenes, grid, chunk_size=256).values
    np.testing.assert_array_equal(stored, expected)
    assert stored.dtype == np.uint16 and (stored != NODATA).all(axis=0).mean() > 0.5
    assert segpipe_attrs(tmp_path / "store")["warp"]["resampling"] == "bilinear"  # type: ignore[index]


def test_mixed_resolutions_in_one_crs_are_warped_to_the_finest(stac: Path, tmp_path: Path) -> None:
    cogs = stac.parent / "cogs" / SCENES[0].id
    ingest([cogs / "B11.tif", cogs / "B02.tif"], tmp_path / "store", block_size=256, resampling="nearest")
    info = read_region_info(tmp_path / "store")
    assert info.transform[0] == 10.0 and info.width == info.height == 256
    stored = open_region(tmp_path / "store")["image"].values[0]
    with rasterio.open(cogs / "B11.tif") as ds:
        coarse = np.kron(ds.read(1), np.ones((2, 2), np.uint16))
    with rasterio.open(cogs / "B02.tif") as ds:
        fine = ds.read(1)
    # Nearest from 20 m to 10 m: each 20 m pixel becomes 2 x 2; B11, first, wins where valid.
    np.testing.assert_array_equal(stored, np.where(coarse != NODATA, coarse, fine))
    assert (coarse == NODATA).any() and (fine[coarse == NODATA] != NODATA).any()


def test_stac_end_to_end_with_labels(stac: Path, tmp_path: Path) -> None:
    labels = write_stac_labels(tmp_path)
    ingest(stac, tmp_path / "store", labels=labels, block_size=1024)
    info = read_region_info(tmp_path / "store")
    grid = grid_of(tmp_path / "store")
    assert info.band_names == BANDS and info.dtype == "float32" and math.isnan(info.nodata or 0.0)
    attrs = segpipe_attrs(tmp_path / "store")
    assert attrs["acquired"] == {"start": SCENES[0].datetime, "end": SCENES[1].datetime}
    assert attrs["warp"]["scenes"] == [s.id for s in SCENES]  # type: ignore[index]
    # Physical values: GDAL's warp of the stored DN, scaled (bilinear: within one DN).
    ref = reference(stac_sceneset(tmp_path / "ref"), grid, Resampling.bilinear)
    image = open_region(tmp_path / "store")["image"].values
    np.testing.assert_array_equal(np.isnan(image), ref == NODATA)
    valid = ref != NODATA
    assert np.abs(image[valid] - (ref[valid] * SCALE + OFFSET)).max() <= SCALE * 1.001
    # Labels follow the grid: nearest warp of the label raster, 0 where it has none.
    stored = zarr.open_group(str(tmp_path / "store"), mode="r")["labels"][...]
    expected = np.zeros((grid.height, grid.width), np.uint8)
    with rasterio.open(labels) as ds:
        reproject(
            rasterio.band(ds, 1), expected, dst_transform=Affine(*grid.transform),
            dst_crs=CRS.from_wkt(grid.crs_wkt), resampling=Resampling.nearest, dst_nodata=0,
        )  # fmt: skip
    np.testing.assert_array_equal(stored, expected)
    assert {c.value for c in info.classes} == set(np.unique(expected)) - {0}


def test_stac_with_aoi_and_options(stac: Path, tmp_path: Path) -> None:
    tri = Polygon([(-78.02, 35.02), (-77.985, 35.02), (-78.0, 35.04)])
    aoi = tmp_path / "aoi.gpkg"
    gpd.GeoDataFrame({"id": [1]}, geometry=[tri], crs="EPSG:4326").to_file(aoi)
    labels = write_stac_labels(tmp_path)
    ingest(
        stac, tmp_path / "store", labels=labels, aoi=aoi, crs="EPSG:32618", assets=["B04", "B02"],
        order="latest", block_size=256,
    )  # fmt: skip
    info = read_region_info(tmp_path / "store")
    grid = grid_of(tmp_path / "store")
    assert info.band_names == ("B04", "B02") and CRS.from_wkt(info.crs_wkt) == CRS.from_epsg(32618)
    attrs = segpipe_attrs(tmp_path / "store")
    assert attrs["aoi"]["source"] == str(aoi)  # type: ignore[index]
    assert attrs["warp"]["order"] == "latest"  # type: ignore[index]
    outside = geometry_mask(
        [attrs["aoi"]["geometry"]],
        out_shape=(grid.height, grid.width),
        transform=Affine(*grid.transform),  # type: ignore[index]
    )
    assert 0.2 < outside.mean() < 0.8
    image = open_region(tmp_path / "store")["image"].values
    assert np.isnan(image[:, outside]).all() and np.isfinite(image[:, ~outside]).any()
    # The validity rule predict and train apply to the image leaves every pixel outside out.
    valid = valid_mask(image, info.nodata)
    assert not valid[outside].any() and valid[~outside].mean() > 0.5
    stored = zarr.open_group(str(tmp_path / "store"), mode="r")["labels"][...]
    assert (stored[outside] == 0).all() and (stored[~outside] > 0).any()


def test_options_change_the_fingerprint_and_assets_need_stac(stac: Path, tmp_path: Path) -> None:
    base = ingest_fingerprint([str(stac)], None, None, None, 256)
    nearest = ingest_fingerprint([str(stac)], None, None, None, 256, options={"resampling": "nearest"})
    bilinear = ingest_fingerprint([str(stac)], None, None, None, 256, options={"resampling": "bilinear"})
    assert len({base, nearest, bilinear}) == 3
    tile = stac.parent / "cogs" / SCENES[0].id / "B02.tif"
    with pytest.raises(InputError, match="--assets chooses bands of STAC items"):
        ingest([tile], tmp_path / "store", assets=["B02"])
    with pytest.raises(InputError, match="resampling 'bicubic' is unknown"):
        ingest([tile], tmp_path / "store", resolution=20.0, resampling="bicubic")
    assert not (tmp_path / "store").exists()


def test_warped_image_without_valid_pixel_is_refused(tmp_path: Path) -> None:
    paths = []
    for name, crs, x in (("a.tif", "EPSG:32617", 772000.0), ("b.tif", "EPSG:32618", 226000.0)):
        path = tmp_path / name
        with rasterio.open(
            path, "w", driver="GTiff", width=20, height=20, count=2, dtype="uint16", crs=crs,
            transform=Affine(10, 0, x, 0, -10, 3880000.0), nodata=0,
        ) as ds:  # fmt: skip
            ds.write(np.zeros((2, 20, 20), np.uint16))
        paths.append(path)
    with pytest.raises(InputError, match="has no valid pixel"):
        ingest(paths, tmp_path / "store", block_size=256)
    assert not (tmp_path / "store").exists()
    assert not list(tmp_path.glob(".store*"))
