"""Warping scenes in several CRSs and resolutions onto one grid, checked against GDAL's own warp."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import geometry_mask
from rasterio.warp import Resampling, reproject, transform_geom
from shapely.geometry import Point, Polygon, box, mapping
from stac_support import BANDS, NODATA, OFFSET, SCALE, SCENES, write_stac_scenes

from segpipe.errors import InputError, MissingInputError
from segpipe.io.aoi import read_aoi
from segpipe.io.sources import BandFile, Scene, SceneSet
from segpipe.io.warp import open_warped, scenes_from_files, target_grid
from segpipe.types import Grid


def stac_sceneset(tmp: Path, scaled: bool = False) -> SceneSet:
    """The STAC fixture's per-band COGs as scenes, built by hand (independent of the STAC reader)."""
    write_stac_scenes(tmp)
    scale, offset = (SCALE, OFFSET) if scaled else (None, None)
    scenes = tuple(
        Scene(
            s.id,
            tuple(BandFile(str(tmp / "cogs" / s.id / f"{b}.tif"), 1, NODATA, scale, offset) for b in BANDS),
            datetime=s.datetime,
            cloud_cover=s.cloud_cover,
        )
        for s in SCENES
    )
    return SceneSet(scenes, BANDS, str(tmp))


def reference(sceneset: SceneSet, grid: Grid, resampling: Resampling) -> np.ndarray:
    """GDAL's warp of each whole band onto the whole grid (uint16), first scene valid in all bands wins."""
    out = np.zeros((len(sceneset.band_names), grid.height, grid.width), np.uint16)
    todo = np.ones((grid.height, grid.width), bool)
    for scene in sceneset.scenes:
        warped = np.zeros_like(out)
        for i, bf in enumerate(scene.bands):
            with rasterio.open(bf.href) as ds:
                # The nominal scale (target pixels per source pixel), as segpipe fixes it for every block.
                scale = repr(ds.res[0] / grid.transform[0])
                reproject(
                    rasterio.band(ds, bf.band), warped[i], src_nodata=NODATA, dst_nodata=NODATA,
                    dst_transform=Affine(*grid.transform), dst_crs=CRS.from_wkt(grid.crs_wkt),
                    resampling=resampling, XSCALE=scale, YSCALE=scale,
                )  # fmt: skip
        take = todo & (warped != NODATA).all(axis=0)
        out[:, take] = warped[:, take]
        todo &= ~take
    return out


@pytest.fixture(scope="module")
def stac_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stac")


def test_default_grid_is_finest_resolution_union_and_aligned(stac_dir: Path) -> None:
    ss = stac_sceneset(stac_dir)
    grid = target_grid(ss)
    # Equal areas: the first scene's CRS wins the tie; finest band 10 m, in that CRS exactly.
    assert CRS.from_wkt(grid.crs_wkt) == CRS.from_epsg(32617)
    a, _, left, _, e, top = grid.transform
    assert (a, e) == (10.0, -10.0)
    assert left % 10 == 0 and top % 10 == 0
    # Scene a lies in the grid's CRS: its whole footprint is inside, and scene b adds ~2 km east.
    sa = SCENES[0]
    assert left <= sa.west and top >= sa.north
    assert left + grid.width * a > sa.west + 2560 + 1500
    assert grid.width < 2 * 256 + 40 and grid.height < 256 + 60


def test_default_crs_is_the_one_covering_most_area(tmp_path: Path) -> None:
    def tif(name: str, crs: str, x: float, res: float) -> Path:
        path = tmp_path / name
        with rasterio.open(
            path, "w", driver="GTiff", width=40, height=40, count=1, dtype="uint8", crs=crs,
            transform=Affine(res, 0, x, 0, -res, 3880000.0), nodata=0,
        ) as ds:  # fmt: skip
            ds.write(np.full((1, 40, 40), 7, np.uint8))
        return path

    # One big 32617 scene outweighs two small 32618 ones, whatever the order.
    files = [tif("a.tif", "EPSG:32618", 226000.0, 20.0), tif("b.tif", "EPSG:32618", 226800.0, 20.0),
             tif("c.tif", "EPSG:32617", 772000.0, 60.0)]  # fmt: skip
    grid = target_grid(scenes_from_files(files))
    assert CRS.from_wkt(grid.crs_wkt) == CRS.from_epsg(32617)
    # The finest band (20 m in zone 18) converted into zone 17 units: near 20 m, finer than 60 m.
    assert 19.0 < grid.transform[0] < 21.5
    grid18 = target_grid(scenes_from_files([*files[:2], tif("d.tif", "EPSG:32617", 772000.0, 10.0)]))
    assert CRS.from_wkt(grid18.crs_wkt) == CRS.from_epsg(32618)
    # The same eastings in two zones lie 540 km apart: a grid holding both would be empty.
    far = [tif("e.tif", "EPSG:32617", 500000.0, 10.0), tif("f.tif", "EPSG:32618", 500000.0, 10.0)]
    with pytest.raises(InputError, match=r"\(e\.tif, f\.tif\) cover only 0\.0\d+ % .* --bounds or --aoi"):
        target_grid(scenes_from_files(far))
    given = target_grid(scenes_from_files(far), bounds=(500000.0, 3879600.0, 500400.0, 3880000.0))
    assert (given.width, given.height) == (40, 40)  # asked for: no refusal


@pytest.mark.parametrize("method", [Resampling.nearest, Resampling.bilinear])
def test_warp_matches_gdal_reproject(stac_dir: Path, method: Resampling) -> None:
    ss = stac_sceneset(stac_dir)
    grid = target_grid(ss, crs="EPSG:32618", resolution=10.0)
    image = open_warped(ss, grid, resampling=method.name, chunk_size=1024)  # one block: the whole grid
    assert image.dtype == np.uint16 and image.rio.nodata == NODATA
    assert image.attrs["long_name"] == BANDS and list(image.band.values) == [1, 2, 3, 4]
    assert image.rio.crs == CRS.from_epsg(32618)
    assert image.rio.transform() == Affine(*grid.transform)
    got = image.values
    ref = reference(ss, grid, method)
    np.testing.assert_array_equal(got == NODATA, ref == NODATA)
    assert (got != NODATA).mean() > 0.5  # most of the grid holds data
    diff = np.abs(got.astype(np.int32) - ref.astype(np.int32))
    assert diff.max() <= (0 if method == Resampling.nearest else 1)


@pytest.mark.parametrize("method", [Resampling.nearest, Resampling.bilinear])
def test_blocks_agree_with_one_block(stac_dir: Path, method: Resampling) -> None:
    """Small blocks give the pixels of one big warp, but for GDAL's approximate transformer.

    rasterio's reproject always approximates the transformation (error under 1/8 pixel
    per warp call), so a pixel centre near a source pixel edge may fall to the other side.
    """
    ss = stac_sceneset(stac_dir)
    grid = target_grid(ss, crs="EPSG:32618", resolution=10.0)
    whole = open_warped(ss, grid, resampling=method.name, chunk_size=1024).values.astype(np.int32)
    small = open_warped(ss, grid, resampling=method.name, chunk_size=64)
    assert small.data.npartitions == 5 * 8
    got = small.values.astype(np.int32)
    np.testing.assert_array_equal(got == NODATA, whole == NODATA)
    differ = got != whole
    if method == Resampling.nearest:
        assert differ.mean() < 1e-3
    else:
        assert np.abs(got - whole).max() <= 2 and differ.mean() < 0.05


def test_one_task_per_block_and_skipped_scenes_never_opened(stac_dir: Path, tmp_path: Path) -> None:
    ss = stac_sceneset(stac_dir)
    grid = target_grid(ss)
    image = open_warped(ss, grid, chunk_size=64)
    assert len(dict(image.data.__dask_graph__())) == image.data.npartitions > 4
    # Scene b's band files gone after the headers were read: blocks west of it never open them...
    gone = tmp_path / "gone.tif"
    scene_b = dataclasses.replace(ss.scenes[1], bands=(BandFile(str(gone)),) * 4)
    shutil.copy(ss.scenes[1].bands[0].href, gone)
    broken = open_warped(dataclasses.replace(ss, scenes=(ss.scenes[0], scene_b)), grid, chunk_size=64)
    gone.unlink()
    west = broken[:, :, :64].values
    np.testing.assert_array_equal(west, image[:, :, :64].values)
    # ...and a block that needs them names the file and the window.
    with pytest.raises(InputError, match=r"gone\.tif.*window rows 0-64, columns"):
        broken[:, :64, -64:].compute()


def test_order_latest_and_least_cloudy(stac_dir: Path) -> None:
    ss = stac_sceneset(stac_dir)
    grid = target_grid(ss)
    given = open_warped(ss, grid, resampling="nearest").values
    flipped = SceneSet(ss.scenes[::-1], ss.band_names, ss.source)
    reverse = reference(flipped, grid, Resampling.nearest)
    # Scene b is the more recent and the less cloudy one: both rules put it first.
    for order in ("latest", "least-cloudy"):
        got = open_warped(ss, grid, resampling="nearest", order=order).values
        np.testing.assert_array_equal(got, reverse)
    assert (given != reverse).any()  # the scenes differ where they overlap
    with pytest.raises(InputError, match="order 'oldest' is unknown"):
        open_warped(ss, grid, order="oldest")


def test_scale_offset_gives_float_physical_values(stac_dir: Path) -> None:
    ss = stac_sceneset(stac_dir, scaled=True)
    grid = target_grid(ss)
    image = open_warped(ss, grid, resampling="nearest")
    assert image.dtype == np.float32 and math.isnan(image.rio.nodata)
    got = image.values
    ref = reference(ss, grid, Resampling.nearest)
    np.testing.assert_array_equal(np.isnan(got), ref == NODATA)
    valid = ref != NODATA
    np.testing.assert_allclose(got[valid], ref[valid] * SCALE + OFFSET, rtol=0, atol=1e-6)


def write_aoi(path: Path, geoms: list[object], crs: str = "EPSG:4326") -> Path:
    gpd.GeoDataFrame({"id": list(range(len(geoms)))}, geometry=geoms, crs=crs).to_file(path)
    return path


def test_aoi_limits_bounds_and_masks_outside(stac_dir: Path, tmp_path: Path) -> None:
    ss = stac_sceneset(stac_dir)
    # A triangle across the UTM border, in lon/lat.
    tri = Polygon([(-78.02, 35.02), (-77.985, 35.02), (-78.0, 35.04)])
    geom, crs = read_aoi(write_aoi(tmp_path / "aoi.gpkg", [tri]))
    assert crs == CRS.from_epsg(4326) and geom.equals(tri)
    grid = target_grid(ss, aoi=(geom, crs))
    full = target_grid(ss)
    assert grid.width < full.width and grid.height < full.height
    image = open_warped(ss, grid, aoi=(geom, crs), chunk_size=48).values
    plain = open_warped(ss, grid, chunk_size=48).values
    t = Affine(*grid.transform)
    inside = geometry_mask(
        # Densified: its straight lon/lat edges are curves in UTM.
        [transform_geom("EPSG:4326", CRS.from_wkt(grid.crs_wkt), mapping(shapely.segmentize(tri, 1e-4)))],
        out_shape=(grid.height, grid.width), transform=t, invert=True,
    )  # fmt: skip
    assert 0.2 < inside.mean() < 0.8
    assert (image[:, ~inside] == NODATA).all()
    np.testing.assert_array_equal(image[:, inside], plain[:, inside])
    # The grid's box is the triangle's box (in grid CRS) widened to whole pixels: only a
    # border row or column may hold no pixel centre inside it.
    for axis in (0, 1):
        used = np.flatnonzero(inside.any(axis=axis))
        assert used[0] <= 1 and used[-1] >= inside.shape[1 - axis] - 2


def test_aoi_outside_the_scenes_is_refused(stac_dir: Path, tmp_path: Path) -> None:
    ss = stac_sceneset(stac_dir)
    far = read_aoi(write_aoi(tmp_path / "far.gpkg", [box(10, 10, 11, 11)]))
    with pytest.raises(InputError, match="does not overlap the scenes"):
        target_grid(ss, aoi=far)


def test_read_aoi_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="does not exist"):
        read_aoi(tmp_path / "nope.gpkg")
    (tmp_path / "text.gpkg").write_text("not a vector file")
    with pytest.raises(MissingInputError, match="cannot be read as a vector file"):
        read_aoi(tmp_path / "text.gpkg")
    with pytest.raises(InputError, match="Point geometries: it must hold polygons"):
        read_aoi(write_aoi(tmp_path / "points.gpkg", [Point(0, 0)]))
    gpd.GeoDataFrame({"id": []}, geometry=[], crs="EPSG:4326").to_file(tmp_path / "empty.gpkg")
    with pytest.raises(InputError, match="holds no geometry"):
        read_aoi(tmp_path / "empty.gpkg")


def test_options_are_checked(stac_dir: Path) -> None:
    ss = stac_sceneset(stac_dir)
    grid = target_grid(ss)
    with pytest.raises(InputError, match="resampling 'bicubic' is unknown"):
        open_warped(ss, grid, resampling="bicubic")
    with pytest.raises(InputError, match="CRS 'EPSG:99999999' is not one GDAL knows"):
        target_grid(ss, crs="EPSG:99999999")
    with pytest.raises(InputError, match="not a positive pixel size"):
        target_grid(ss, resolution=0)
    with pytest.raises(InputError, match=r"bounds .* are empty"):
        target_grid(ss, bounds=(10, 10, 5, 20))
    bounded = target_grid(ss, bounds=(771000.5, 3877000.0, 772003.0, 3878000.0))
    assert bounded.transform[2] == 771000.0 and bounded.width == 101 and bounded.height == 100
