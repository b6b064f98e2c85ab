import json

import numpy as np
import pytest
import rasterio
import rasterio.features
from affine import Affine

from segpipe.errors import InputError
from segpipe.io.labels import labels_window, open_labels
from segpipe.io.store import read_region_info
from segpipe.synth import SCENE_CLASSES, SceneSpec, synthesize
from segpipe.synth.scene import class_block, image_block
from segpipe.types import Grid


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("synth"), size=640, bands=4, tiles=3, seed=3)


def test_windows_agree_with_the_whole_scene():
    spec = SceneSpec(size=300, bands=3, seed=5)
    whole = image_block(spec, 0, 0, 300, 300)
    part = image_block(spec, 37, 101, 90, 150)
    assert np.array_equal(whole[:, 37:127, 101:251], part)
    assert np.array_equal(class_block(spec, 0, 0, 300, 300)[200:, :50], class_block(spec, 200, 0, 100, 50))


def test_mosaic_is_tiled_georeferenced_and_deterministic(region, tmp_path):
    assert len(region.tiles) == 9
    with rasterio.open(region.image) as src:
        assert (src.width, src.height, src.count) == (640, 640, 4)
        assert src.crs.to_epsg() == 32617
        assert src.nodata == 0
        assert src.descriptions == ("blue", "green", "red", "nir")
        mosaic = src.read()
    again = synthesize(tmp_path / "again", size=640, bands=4, tiles=3, seed=3)
    with rasterio.open(again.image) as src:
        assert np.array_equal(src.read(), mosaic)
    assert np.array_equal(mosaic, image_block(SceneSpec(size=640, bands=4, seed=3), 0, 0, 640, 640))


def test_truth_has_spatially_coherent_classes(region):
    with rasterio.open(region.truth) as src:
        truth = src.read(1)
    present = set(np.unique(truth)) - {0}
    assert present == {c.value for c in SCENE_CLASSES}
    # coherent patches: most horizontal neighbours share a class
    same = (truth[:, 1:] == truth[:, :-1]).mean()
    assert same > 0.95


def test_sparse_labels_are_sparse_correct_and_match_the_vector(region):
    with rasterio.open(region.truth) as src:
        truth = src.read(1)
        grid = Grid(src.crs.to_wkt(), tuple(src.transform)[:6], src.height, src.width)
    with rasterio.open(region.labels) as src:
        sparse = src.read(1)
    labelled = sparse > 0
    assert 0.005 < labelled.mean() <= 0.05
    assert region.labelled_fraction == pytest.approx(labelled.mean())
    assert np.array_equal(sparse[labelled], truth[labelled])
    from_vector = labels_window(open_labels(region.labels_vector, "class"), grid, 0, 0, 640, 640)
    assert np.array_equal(from_vector, sparse)
    classes = json.loads(region.classes.read_text())["classes"]
    assert [c["value"] for c in classes] == [1, 2, 3, 4, 5, 6]


def test_paired_classes_share_per_pixel_statistics():
    """Forest/grassland and cropland/built-up differ only in texture: same per-band mean and spread."""
    spec = SceneSpec(size=1024, bands=4, seed=0)
    image = image_block(spec, 0, 0, 1024, 1024).astype(float)
    classes = class_block(spec, 0, 0, 1024, 1024)
    for a, b in ((2, 3), (4, 5)):
        pa, pb = image[:, classes == a], image[:, classes == b]
        assert np.allclose(pa.mean(axis=1), pb.mean(axis=1), rtol=0.03)
        assert np.allclose(pa.std(axis=1), pb.std(axis=1), rtol=0.1)


def test_bad_parameters_are_named(tmp_path):
    with pytest.raises(InputError, match="--size"):
        synthesize(tmp_path, size=10)
    with pytest.raises(InputError, match="--tiles"):
        synthesize(tmp_path, size=128, tiles=50)


def test_ingest_keeps_what_synth_wrote(region, tmp_path):
    from segpipe.stages.ingest.driver import ingest

    info = ingest(
        [region.image],
        tmp_path / "r.zarr",
        labels=region.labels_vector,
        classes=region.classes,
        block_size=256,
    )
    again = read_region_info(tmp_path / "r.zarr")
    assert info == again
    assert again.band_names == ("blue", "green", "red", "nir")
    assert [c.name for c in again.classes] == [c.name for c in SCENE_CLASSES]


def test_tiles_and_windows_are_boxes_on_the_label_lattice():
    from segpipe.grid.box import Box
    from segpipe.synth import write

    assert write._tile_edge(640, 3) == 256  # 214 rounded up to the 64 px label cells
    assert write._tile_edge(2048, 2) == 1024
    windows = write._tile_windows(Box(1024, 0, 2500, 1500))
    assert windows == [
        Box(1024, 0, 2048, 1024),
        Box(1024, 1024, 2048, 1500),
        Box(2048, 0, 2500, 1024),
        Box(2048, 1024, 2500, 1500),
    ]
    with pytest.raises(InputError, match="--bands"):
        write._check_parameters(128, 65, 1)


def test_window_data_and_tally(tmp_path):
    from segpipe.grid.box import Box
    from segpipe.synth import write

    spec = SceneSpec(size=256, bands=2, seed=1)
    image, dense, labels, polys = write._window_data(spec, Box(64, 128, 192, 256))
    assert np.array_equal(image, image_block(spec, 64, 128, 128, 128))
    assert np.array_equal(dense, class_block(spec, 64, 128, 128, 128))
    assert labels.shape == (128, 128) and np.array_equal(labels[labels > 0], dense[labels > 0])
    seen = []
    layer = write._PolygonLayer(tmp_path / "labels.gpkg", Affine.identity())
    tally = write._Tally(2, lambda done, total: seen.append((done, total)), layer)
    tally.add(labels, polys)
    tally.add(np.zeros((2, 2), np.uint8), [])
    assert seen == [(1, 2), (2, 2)]
    assert tally.labelled == int(np.count_nonzero(labels)) and layer.pending == polys


def test_label_polygons_are_written_in_batches_and_moved_into_place(tmp_path, monkeypatch):
    import geopandas as gpd

    from segpipe.synth import write

    monkeypatch.setattr(write, "_POLYGON_BATCH", 3)  # many appends for a small scene
    region = synthesize(tmp_path / "r", size=512, bands=1, tiles=1, seed=5)
    frame = gpd.read_file(region.labels_vector, layer="labels")
    assert len(frame) > 9 and not list((tmp_path / "r").glob("*partial*"))
    with rasterio.open(region.labels) as src:
        burnt = rasterio.features.rasterize(
            zip(frame.geometry, frame["class"], strict=True), out_shape=src.shape, transform=src.transform
        )
        assert np.array_equal(burnt, src.read(1))
    # No polygon at all still gives the layer, empty.
    empty = write._PolygonLayer(tmp_path / "empty.gpkg", Affine.identity())
    empty.finish()
    assert len(gpd.read_file(empty.path, layer="labels")) == 0
