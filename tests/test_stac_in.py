"""STAC in: Items, ItemCollections and Catalogs of per-band COGs become scenes of band files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from rasterio.warp import transform_bounds
from stac_support import (
    BAND_20M,
    BANDS,
    BANDS_10M,
    EDGE,
    NODATA,
    OFFSET,
    SCALE,
    SCENES,
    scene_bands,
    scene_classes,
    write_stac_label_polygons,
    write_stac_labels,
    write_stac_scenes,
)
from test_s3 import s3  # noqa: F401  (the moto server fixture)

from segpipe.errors import MissingInputError, StacError
from segpipe.io.remote import filesystem, gdal_env, gdal_path
from segpipe.io.sources import BandFile, SceneSet
from segpipe.io.stac_in import is_stac, read_stac


@pytest.fixture(scope="module")
def stac_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both scenes with absolute hrefs in ``items.json`` and a self-contained Catalog."""
    root = tmp_path_factory.mktemp("stac")
    write_stac_scenes(root, catalog=True)
    return root


def _edit(src: Path, dest: Path, change: Callable[[list[pystac.Item]], None]) -> Path:
    """A copy of the ItemCollection ``src`` at ``dest`` after ``change`` edited its Items."""
    items = list(pystac.ItemCollection.from_file(str(src)))
    change(items)
    pystac.ItemCollection(items).save_object(dest_href=str(dest))
    return dest


def _read(band: BandFile) -> np.ndarray:
    with gdal_env(band.href), rasterio.open(gdal_path(band.href)) as ds:
        return np.asarray(ds.read(band.band))


def _check_scenes(got: SceneSet, root: Path) -> None:
    """Both scenes, every band in order, with their files, metadata and pixels."""
    assert got.band_names == BANDS
    assert [s.id for s in got.scenes] == [s.id for s in SCENES]
    for scene, spec in zip(got.scenes, SCENES, strict=True):
        assert scene.datetime == spec.datetime and scene.cloud_cover == spec.cloud_cover
        assert scene.start_datetime is None and scene.end_datetime is None
        want = scene_bands(spec)
        for name, band in zip(BANDS, scene.bands, strict=True):
            assert band.href == str(root / "cogs" / spec.id / f"{name}.tif")
            assert (band.band, band.nodata, band.scale, band.offset) == (1, NODATA, SCALE, OFFSET)
            np.testing.assert_array_equal(_read(band), want[name])


def test_item_collection_default_assets(stac_dir: Path) -> None:
    source = stac_dir / "items.json"
    assert is_stac(source) and is_stac(str(source))
    got = read_stac(source)
    assert got.source == str(source)
    # the 20 m band is there, the PNG thumbnail (an image, but not data) is not
    _check_scenes(got, stac_dir)


def test_catalog_walks_items_and_resolves_relative_hrefs(stac_dir: Path) -> None:
    catalog = stac_dir / "catalog" / "catalog.json"
    item_json = json.loads((catalog.parent / "scene-a" / "scene-a.json").read_text())
    assert (
        item_json["assets"]["B02"]["href"] == "../../cogs/scene-a/B02.tif"
    )  # relative to the item's own file
    assert is_stac(catalog)
    _check_scenes(read_stac(catalog), stac_dir)


def test_single_item(stac_dir: Path) -> None:
    item = stac_dir / "catalog" / "scene-b" / "scene-b.json"
    assert is_stac(item)
    got = read_stac(item)
    assert [s.id for s in got.scenes] == ["scene-b"] and got.band_names == BANDS
    assert got.scenes[0].bands[3].href == str(stac_dir / "cogs" / "scene-b" / "B11.tif")


def test_relative_hrefs_of_an_item_collection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_stac_scenes(tmp_path, relative=True)
    assert json.loads(source.read_text())["features"][0]["assets"]["B02"]["href"] == "cogs/scene-a/B02.tif"
    # relative to the file, not to the working folder, also when the file is named relatively
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    _check_scenes(read_stac(Path("..") / "items.json"), tmp_path)


def test_assets_choose_and_order_the_bands(stac_dir: Path) -> None:
    source = stac_dir / "items.json"
    got = read_stac(source, [BAND_20M, "B02"])
    assert got.band_names == (BAND_20M, "B02")
    assert [Path(b.href).name for b in got.scenes[1].bands] == [f"{BAND_20M}.tif", "B02.tif"]
    # a comma-separated string, as the command line gives it
    assert read_stac(source, "B04,B03").band_names == ("B04", "B03")
    assert read_stac(source, []).band_names == BANDS  # empty: the default


def test_stac_1_0_band_fields(tmp_path: Path) -> None:
    source = write_stac_scenes(tmp_path, style="1.0", catalog=True)
    asset = json.loads(source.read_text())["features"][0]["assets"]["B02"]
    assert "bands" not in asset and asset["raster:bands"][0]["scale"] == SCALE
    assert asset["eo:bands"][0]["name"] == "B02"
    _check_scenes(read_stac(source), tmp_path)
    # pystac reads a catalogue's Items through its migration: the same bands come out
    _check_scenes(read_stac(tmp_path / "catalog" / "catalog.json"), tmp_path)


def test_other_ways_to_name_the_file(stac_dir: Path, tmp_path: Path) -> None:
    source = stac_dir / "items.json"
    _check_scenes(read_stac(source.as_uri()), stac_dir)
    search = tmp_path / "search.geojson"
    search.write_bytes(source.read_bytes())
    assert is_stac(search) and read_stac(search).band_names == BANDS
    with pytest.raises(StacError, match=r"catalog is a folder: give the STAC file itself"):
        read_stac(stac_dir / "catalog")
    assert not is_stac(stac_dir / "catalog")


@pytest.mark.parametrize("style", ["1.1", "1.0"])
def test_multiband_asset(tmp_path: Path, style: str) -> None:
    source = write_stac_scenes(tmp_path, multiband=True, style=style)  # type: ignore[arg-type]
    got = read_stac(source)
    assert got.band_names == BANDS
    for scene, spec in zip(got.scenes, SCENES, strict=True):
        visual = str(tmp_path / "cogs" / spec.id / "visual.tif")
        assert [(b.href, b.band) for b in scene.bands[:3]] == [(visual, 1), (visual, 2), (visual, 3)]
        assert all((b.nodata, b.scale, b.offset) == (NODATA, SCALE, OFFSET) for b in scene.bands)
        want = scene_bands(spec)
        for name, band in zip(BANDS, scene.bands, strict=True):
            np.testing.assert_array_equal(_read(band), want[name])
    # asking for the asset gives all its bands
    assert read_stac(source, ["visual"]).band_names == BANDS_10M


def test_band_names_fall_back_to_asset_keys(stac_dir: Path, tmp_path: Path) -> None:
    def unnamed(items: list[pystac.Item]) -> None:
        for item in items:
            item.assets["blue"] = item.assets.pop("B02")
            for asset in item.assets.values():
                for band in asset.extra_fields.get("bands", []):
                    band.pop("name")

    got = read_stac(_edit(stac_dir / "items.json", tmp_path / "items.json", unnamed))
    assert got.band_names == ("B03", "B04", BAND_20M, "blue")


def test_default_assets_are_geotiff_data(stac_dir: Path, tmp_path: Path) -> None:
    def more(items: list[pystac.Item]) -> None:
        for item in items:
            b02 = item.assets["B02"]
            # a true-colour preview is a COG too, but an overview, not data
            item.add_asset("visual", pystac.Asset(b02.href, media_type=b02.media_type, roles=["overview"]))
            # no roles and no media type: a .tif file is taken for data
            item.add_asset("extra", pystac.Asset(b02.href))
            item.add_asset("notes", pystac.Asset(b02.href + ".txt", media_type="text/plain", roles=["data"]))

    got = read_stac(_edit(stac_dir / "items.json", tmp_path / "items.json", more))
    assert got.band_names == (*BANDS, "extra")


def test_names_from_metadata_win_over_keys(stac_dir: Path, tmp_path: Path) -> None:
    def renamed(items: list[pystac.Item]) -> None:
        for item in items:
            item.assets["blue"] = item.assets.pop("B02")  # as Earth Search keys Sentinel-2 bands

    got = read_stac(_edit(stac_dir / "items.json", tmp_path / "items.json", renamed), ["blue", "B03"])
    assert got.band_names == ("B02", "B03")


def test_nodata_scale_offset_per_band_and_per_asset(stac_dir: Path, tmp_path: Path) -> None:
    def varied(items: list[pystac.Item]) -> None:
        for item in items:
            b03 = item.assets["B03"].extra_fields
            b03["bands"][0].update({"nodata": "nan", "raster:scale": 2.5})
            del b03["bands"][0]["raster:offset"]
            b04 = item.assets["B04"].extra_fields
            # STAC 1.1: what the asset states holds for its bands unless they say otherwise
            for key in ("nodata", "raster:scale", "raster:offset"):
                del b04["bands"][0][key]
            b04.update({"nodata": 65535, "raster:scale": 0.5, "raster:offset": 3})
            for key in ("nodata", "raster:scale", "raster:offset"):
                del item.assets[BAND_20M].extra_fields["bands"][0][key]

    got = read_stac(_edit(stac_dir / "items.json", tmp_path / "items.json", varied))
    b02, b03, b04, b11 = got.scenes[1].bands
    assert (b02.nodata, b02.scale, b02.offset) == (NODATA, SCALE, OFFSET)
    assert b03.nodata is not None and np.isnan(b03.nodata) and (b03.scale, b03.offset) == (2.5, None)
    assert (b04.nodata, b04.scale, b04.offset) == (65535, 0.5, 3)
    assert (b11.nodata, b11.scale, b11.offset) == (None, None, None)


def test_datetime_interval(stac_dir: Path, tmp_path: Path) -> None:
    def interval(items: list[pystac.Item]) -> None:
        items[0].datetime = None
        items[0].properties["datetime"] = None
        items[0].properties["start_datetime"] = "2024-05-30T00:00:00Z"
        items[0].properties["end_datetime"] = "2024-06-02T00:00:00Z"
        del items[1].properties["eo:cloud_cover"]

    a, b = read_stac(_edit(stac_dir / "items.json", tmp_path / "items.json", interval)).scenes
    assert (a.datetime, a.start_datetime, a.end_datetime) == (
        None,
        "2024-05-30T00:00:00Z",
        "2024-06-02T00:00:00Z",
    )
    assert a.cloud_cover == SCENES[0].cloud_cover
    assert b.datetime == SCENES[1].datetime and b.cloud_cover is None


def test_http_hrefs_are_not_touched(stac_dir: Path, tmp_path: Path) -> None:
    url = "https://data.example.invalid/scene-a/B02.tif"

    def remote(items: list[pystac.Item]) -> None:
        items[0].assets["B02"].href = url

    got = read_stac(_edit(stac_dir / "items.json", tmp_path / "items.json", remote))
    assert got.scenes[0].bands[0].href == url  # no request: GDAL reads it in place later


def test_fixture_scenes_straddle_two_utm_zones(stac_dir: Path) -> None:
    """The support module writes what it says: two zones, two resolutions, a little overlap."""
    got = read_stac(stac_dir / "items.json")
    bounds = []
    for scene, spec in zip(got.scenes, SCENES, strict=True):
        for band in scene.bands:
            with rasterio.open(band.href) as ds:
                assert ds.crs.to_string() == spec.crs and ds.nodata == NODATA
                res = 20.0 if band.href.endswith(f"{BAND_20M}.tif") else 10.0
                assert ds.res == (res, res) and ds.shape == (EDGE * 10 / res,) * 2
                assert ds.transform == spec.transform(res)
        with rasterio.open(scene.bands[0].href) as ds:
            bounds.append(transform_bounds(ds.crs, "EPSG:4326", *ds.bounds))
    (_, _, east_a, _), (west_b, _, _, _) = bounds
    assert west_b < -78.0 < east_a and 0.005 < east_a - west_b < 0.01  # about 600 m of overlap


def test_fixture_labels(tmp_path: Path) -> None:
    import geopandas as gpd
    from rasterio.features import rasterize

    want = scene_classes(SCENES[0])
    assert set(np.unique(want)) == {0, 1, 2, 3, 4, 5, 6}
    with rasterio.open(write_stac_labels(tmp_path)) as ds:
        assert ds.crs.to_string() == SCENES[0].crs and ds.transform == SCENES[0].transform()
        np.testing.assert_array_equal(ds.read(1), want)
    with rasterio.open(write_stac_labels(tmp_path, SCENES[1], resolution=20)) as ds:
        assert ds.crs.to_string() == SCENES[1].crs and ds.transform == SCENES[1].transform(20.0)
        np.testing.assert_array_equal(ds.read(1), scene_classes(SCENES[1])[1::2, 1::2])
    frame = gpd.read_file(write_stac_label_polygons(tmp_path, crs="EPSG:4326"), layer="labels")
    assert frame.crs.to_epsg() == 4326 and set(frame["class"]) == {1, 2, 3, 4, 5, 6}
    back = frame.to_crs(SCENES[0].crs)
    burnt = rasterize(
        zip(back.geometry, back["class"], strict=True), (EDGE, EDGE), transform=SCENES[0].transform()
    )
    assert (burnt == want).mean() > 0.995  # exact but for vertices moved by the round trip through degrees


# --- errors -----------------------------------------------------------------------------


def test_missing_stac_file(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match=r"STAC file .*nothing\.json does not exist"):
        read_stac(tmp_path / "nothing.json")
    assert not is_stac(tmp_path / "nothing.json")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}}]}', "not a STAC"),
        ('{"answer": 42}', "not a STAC"),
        ("[1, 2]", "JSON list"),
        ("{not json", "not valid JSON"),
    ],
)  # fmt: skip
def test_not_stac(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "other.json"
    path.write_text(text)
    assert not is_stac(path)
    with pytest.raises(StacError, match=why) as err:
        read_stac(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_raster_is_not_stac(stac_dir: Path) -> None:
    assert not is_stac(stac_dir / "cogs" / "scene-a" / "B02.tif")
    with pytest.raises(StacError, match="not valid JSON"):
        read_stac(stac_dir / "cogs" / "scene-a" / "B02.tif")


def test_no_items(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    pystac.ItemCollection([]).save_object(dest_href=str(empty))
    assert is_stac(empty)
    with pytest.raises(StacError, match=r"ItemCollection .*empty\.json holds no items"):
        read_stac(empty)
    catalog = pystac.Catalog("nothing", "an empty catalogue")
    catalog.normalize_hrefs(str(tmp_path / "cat"))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    with pytest.raises(StacError, match=r"Catalog .*catalog\.json holds no items"):
        read_stac(tmp_path / "cat" / "catalog.json")


def test_asked_asset_missing(stac_dir: Path, tmp_path: Path) -> None:
    def drop(items: list[pystac.Item]) -> None:
        del items[1].assets["B04"]

    source = _edit(stac_dir / "items.json", tmp_path / "items.json", drop)
    with pytest.raises(StacError) as err:
        read_stac(source, ["B02", "B04"])
    assert str(err.value) == (
        f"item scene-b in {source} has no asset B04 (it has B02, B03, {BAND_20M}, thumbnail): "
        "choose among those with --assets"
    )
    with pytest.raises(StacError, match="B02 asked more than once"):
        read_stac(stac_dir / "items.json", ["B02", "B03", "B02"])


def test_items_with_different_band_sets(stac_dir: Path, tmp_path: Path) -> None:
    def drop(items: list[pystac.Item]) -> None:
        del items[1].assets[BAND_20M]

    source = _edit(stac_dir / "items.json", tmp_path / "items.json", drop)
    with pytest.raises(StacError, match=r"items scene-a and scene-b in .* have different band sets"):
        read_stac(source)
    # the bands both have are fine
    assert read_stac(source, list(BANDS_10M)).band_names == BANDS_10M


def test_items_whose_bands_are_named_differently(stac_dir: Path, tmp_path: Path) -> None:
    def rename(items: list[pystac.Item]) -> None:
        items[1].assets["B03"].extra_fields["bands"][0]["name"] = "green"

    source = _edit(stac_dir / "items.json", tmp_path / "items.json", rename)
    with pytest.raises(
        StacError, match=r"different band sets \(B02, B03, B04, B11 vs B02, green, B04, B11\)"
    ):
        read_stac(source)


def test_item_without_image_assets(stac_dir: Path, tmp_path: Path) -> None:
    def only_thumbnail(items: list[pystac.Item]) -> None:
        for key in BANDS:
            del items[0].assets[key]

    source = _edit(stac_dir / "items.json", tmp_path / "items.json", only_thumbnail)
    with pytest.raises(StacError, match=r"item scene-a .* has no GeoTIFF data asset \(it has thumbnail\)"):
        read_stac(source)


def test_asset_file_that_does_not_exist(stac_dir: Path, tmp_path: Path) -> None:
    gone = tmp_path / "gone" / "B11.tif"

    def dangling(items: list[pystac.Item]) -> None:
        items[1].assets[BAND_20M].href = str(gone)

    source = _edit(stac_dir / "items.json", tmp_path / "items.json", dangling)
    with pytest.raises(StacError) as err:
        read_stac(source)
    assert str(err.value) == (
        f"item scene-b in {source} names {gone}, which does not exist: fix the asset href or upload the file"
    )
    # an asset nobody asked for may be missing (the thumbnail never exists)
    assert read_stac(source, ["B02"]).band_names == ("B02",)


def test_raster_metadata_that_is_not_a_number(stac_dir: Path, tmp_path: Path) -> None:
    def bad(items: list[pystac.Item]) -> None:
        items[0].assets["B03"].extra_fields["bands"][0]["raster:scale"] = "ten"

    source = _edit(stac_dir / "items.json", tmp_path / "items.json", bad)
    with pytest.raises(StacError, match="asset B03 of item scene-a: band 1 has a nodata, scale or offset"):
        read_stac(source)


# --- object storage ---------------------------------------------------------------------


def test_catalogue_on_s3(s3: str, tmp_path: Path) -> None:  # noqa: F811
    root = tmp_path / "local"
    write_stac_scenes(root, relative=True, catalog=True)
    fs = filesystem()
    prefix = f"{s3}/stac-in"
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        fs.put_file(str(f), f"{prefix}/{f.relative_to(root).as_posix()}")
    for source in (
        f"{prefix}/items.json",
        f"{prefix}/catalog/catalog.json",
        f"{prefix}/catalog/scene-a/scene-a.json",
    ):
        assert is_stac(source)
        got = read_stac(source)
        assert got.band_names == BANDS and got.source == source
        assert got.scenes[0].bands[0].href == f"{prefix}/cogs/scene-a/B02.tif"
    # GDAL reads the s3:// hrefs in place
    band = read_stac(f"{prefix}/items.json").scenes[1].bands[3]
    np.testing.assert_array_equal(_read(band), scene_bands(SCENES[1])[BAND_20M])

    fs.rm(f"{prefix}/cogs/scene-b/B03.tif")
    with pytest.raises(
        StacError, match=rf"item scene-b in {prefix}/items.json names {prefix}/cogs/scene-b/B03.tif, "
    ):
        read_stac(f"{prefix}/items.json")
    with pytest.raises(MissingInputError, match=rf"STAC file {s3}/nowhere/items.json does not exist"):
        read_stac(f"{s3}/nowhere/items.json")
    assert not is_stac(f"{s3}/nowhere/items.json")
