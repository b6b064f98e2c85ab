"""segpipe.classify: a model package on any DataArray, lazily, with the classes predict writes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as darr
import numpy as np
import pytest
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from predict_support import SETTINGS, make_store

import segpipe
from segpipe.errors import BandMismatchError, InputError
from segpipe.stages.predict import predict

if TYPE_CHECKING:
    from distributed import Client

# The window settings of SETTINGS, as classify takes them.
WINDOWS: dict[str, Any] = {name: SETTINGS[name] for name in ("tile_size", "overlap", "batch_size")}


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, client: Client) -> Path:
    """A store predicted by ``segpipe predict`` with the probabilities layer, on the test cluster."""
    store = make_store(tmp_path_factory.mktemp("classify") / "s.zarr", block=64)
    predict(store, model_dir, client=client, probabilities=True, **SETTINGS)
    return store


def _computed(result: xr.DataArray | xr.Dataset) -> xr.DataArray | xr.Dataset:
    """Computed in this process (the test cluster's client would otherwise take it)."""
    return result.compute(scheduler="threads")


def test_classes_equal_predicts_everywhere_with_the_inputs_grid(predicted: Path, model_dir: Path) -> None:
    ds = segpipe.open_region(predicted)
    classes = segpipe.classify(ds.image, model_dir, **WINDOWS)
    assert isinstance(classes, xr.DataArray)
    assert isinstance(classes.data, darr.Array) and classes.dtype == np.uint8
    assert classes.dims == ("y", "x") and classes.data.chunks == ds.classes.data.chunks
    out = _computed(classes)
    np.testing.assert_array_equal(out.values, ds.classes.values)
    assert np.count_nonzero(out.values == 255) == 30 * 25 + 5 * 170  # the nodata corner and stripe
    xr.testing.assert_equal(out.y, ds.y)
    xr.testing.assert_equal(out.x, ds.x)
    assert out.rio.crs == ds.image.rio.crs and out.rio.crs.to_epsg() == 32617
    assert out.rio.transform() == ds.image.rio.transform()
    assert out.rio.nodata == 255
    assert out.attrs["model"] == str(model_dir.resolve())
    assert out.attrs["model_hash"] == ds.classes.attrs["model_hash"]
    assert out.attrs["classes"] == ds.classes.attrs["classes"]
    assert list(out.attrs["flag_values"]) == [3, 7, 9]
    assert out.attrs["flag_meanings"] == "water forest urban"
    assert (out.attrs["tile"], out.attrs["overlap"], out.attrs["blend"]) == (64, 16, "cosine")


def test_an_onnx_package_classifies_as_its_torch_package(
    predicted: Path, model_dir: Path, tmp_path: Path
) -> None:
    from segpipe.models.onnx import export_onnx

    package = export_onnx(model_dir, tmp_path / "unet.onnx", package=tmp_path / "onnx").package
    ds = segpipe.open_region(predicted)
    classes = _computed(segpipe.classify(ds.image, package, **WINDOWS))
    np.testing.assert_array_equal(classes.values, ds.classes.values)


@pytest.mark.parametrize("chunks", [{"y": 50, "x": 33}, {"y": 128, "x": 170}, {"y": 70, "x": 100}])
def test_chunks_unlike_the_stores_blocks_give_the_same_classes(
    predicted: Path, model_dir: Path, chunks: dict[str, int]
) -> None:
    ds = segpipe.open_region(predicted)
    classes = segpipe.classify(ds.image.chunk(chunks), model_dir, **WINDOWS)
    np.testing.assert_array_equal(_computed(classes).values, ds.classes.values)


def test_numpy_backed_data_gives_the_same_classes_lazily(predicted: Path, model_dir: Path) -> None:
    ds = segpipe.open_region(predicted)
    image = ds.image.load()
    assert isinstance(image.data, np.ndarray)
    classes = segpipe.classify(image, model_dir, **WINDOWS)
    assert isinstance(classes.data, darr.Array)
    np.testing.assert_array_equal(_computed(classes).values, ds.classes.values)


def test_probabilities_are_predicts_three_layers(predicted: Path, model_dir: Path) -> None:
    ds = segpipe.open_region(predicted)
    result = segpipe.classify(ds.image, model_dir, probabilities=True, **WINDOWS)
    assert isinstance(result, xr.Dataset)
    assert result.probabilities.dims == ("class", "y", "x")
    assert list(result["class"].values) == [3, 7, 9]
    out = _computed(result)
    for name in ("classes", "confidence", "probabilities"):
        np.testing.assert_array_equal(out[name].values, ds[name].values)
        assert out[name].dtype == np.uint8 and out[name].rio.nodata == 255
        assert out[name].rio.crs == ds.image.rio.crs
    assert out.confidence.attrs["units"] == "percent"


def _store_of(path: Path, image: xr.DataArray, block: int) -> Path:
    """A region store holding ``image`` alone (its own grid), as make_store lays one out."""
    da = xr.DataArray(image.values, dims=image.dims, coords={d: image[d].values for d in image.dims},
                      attrs={"long_name": image.attrs["long_name"]})
    da = da.rio.write_crs(image.rio.crs).rio.write_transform(image.rio.transform(recalc=True))
    shape = (image.shape[0], block, block)
    enc = {"chunks": shape, "shards": shape, "_FillValue": image.rio.nodata}
    da.to_dataset(name="image").to_zarr(path, zarr_format=3, encoding={"image": enc}, consolidated=False,
                                        mode="w")
    zarr.open_group(path, mode="r+").attrs["segpipe"] = {"schema": 1, "block_size": block, "classes": []}
    return path


def test_a_subset_gives_what_predict_gives_on_that_subset(
    predicted: Path, model_dir: Path, client: Client, tmp_path: Path
) -> None:
    """The window grid starts at the array's own first pixel, as predict's starts at its store's."""
    subset = segpipe.open_region(predicted).image.isel(y=slice(37, 160), x=slice(11, 150))
    store = _store_of(tmp_path / "subset.zarr", subset, block=64)
    predict(store, model_dir, client=client, **SETTINGS)
    classes = _computed(segpipe.classify(subset, model_dir, **WINDOWS))
    np.testing.assert_array_equal(classes.values, segpipe.open_region(store).classes.values)
    xr.testing.assert_equal(classes.y, subset.y)


def test_nan_nodata_as_predict(model_dir: Path, client: Client, tmp_path: Path) -> None:
    store = make_store(tmp_path / "nan.zarr", block=64, nan_nodata=True)
    predict(store, model_dir, client=client, **SETTINGS)
    ds = segpipe.open_region(store)
    assert np.isnan(ds.image.rio.nodata)
    classes = _computed(segpipe.classify(ds.image, model_dir, **WINDOWS))
    np.testing.assert_array_equal(classes.values, ds.classes.values)
    assert np.count_nonzero(classes.values == 255) == 30 * 25 + 5 * 170


def test_on_a_distributed_cluster(predicted: Path, model_dir: Path, client: Client) -> None:
    ds = segpipe.open_region(predicted)
    classes = segpipe.classify(ds.image.chunk({"y": 100, "x": 85}), model_dir, **WINDOWS)
    np.testing.assert_array_equal(client.compute(classes).result().values, ds.classes.values)


def test_the_default_settings_are_predicts(tmp_path: Path, model_dir: Path, client: Client) -> None:
    store = make_store(tmp_path / "d.zarr", block=64)
    summary = predict(store, model_dir, client=client)
    ds = segpipe.open_region(store)
    classes = segpipe.classify(ds.image, model_dir)
    assert (classes.attrs["tile"], classes.attrs["overlap"]) == (summary.tile_size, summary.overlap)
    np.testing.assert_array_equal(_computed(classes).values, ds.classes.values)


def test_nothing_is_computed_before_compute(predicted: Path, model_dir: Path) -> None:
    reads: list[tuple[int, ...]] = []

    def counted(block: np.ndarray) -> np.ndarray:
        if block.size:  # dask may probe with empty arrays
            reads.append(block.shape)
        return block

    image = segpipe.open_region(predicted).image
    watched = image.copy(data=image.data.map_blocks(counted, meta=np.empty((0, 0, 0), image.dtype)))
    classes = segpipe.classify(watched, model_dir, probabilities=True, **WINDOWS)
    assert reads == []
    # One classify task per chunk, the input's chunks (beside the tasks cutting halos out of them).
    assert classes.classes.data.chunks == image.data.chunks[1:]
    graph = classes.classes.data.__dask_graph__()
    layer = next(name for name in graph.layers if name.startswith("segpipe-classify"))
    tasks = [key for key in graph.layers[layer] if key[0] == layer]
    assert len(tasks) == image.data.npartitions
    _computed(classes)
    assert len(reads) == image.data.npartitions  # each input block read once


def test_band_mismatch(predicted: Path, model_dir: Path) -> None:
    image = segpipe.open_region(predicted).image
    with pytest.raises(BandMismatchError, match="bands"):
        segpipe.classify(image.isel(band=[0, 1]), model_dir, **WINDOWS)
    with pytest.raises(BandMismatchError, match="differ"):
        segpipe.classify(image.assign_attrs(long_name=["b1", "b3", "b2"]), model_dir, **WINDOWS)


def test_bad_inputs_fail_before_any_task(predicted: Path, model_dir: Path, tmp_path: Path) -> None:
    image = segpipe.open_region(predicted).image
    with pytest.raises(InputError, match=r"\(band, y, x\)"):
        segpipe.classify(image.isel(band=0), model_dir)
    with pytest.raises(InputError, match="blend mode"):
        segpipe.classify(image, model_dir, blend="median")
    with pytest.raises(InputError, match="tile size"):
        segpipe.classify(image, model_dir, tile_size=50)
    with pytest.raises(InputError, match="batch size"):
        segpipe.classify(image, model_dir, batch_size=0)
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.json").write_text("{")
    with pytest.raises(segpipe.ModelPackageError):
        segpipe.classify(image, broken)
