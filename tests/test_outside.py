"""A region store as readers outside segpipe see it: plain ``xr.open_zarr``, no warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from distributed import Client
from predict_support import CLASSES, SETTINGS, make_store

from segpipe.io.outside import publish_metadata
from segpipe.io.store import open_layer, store_group
from segpipe.stages.predict.driver import predict


def _plain(store: Path) -> xr.Dataset:
    """``xr.open_zarr`` with no argument, every warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(store)


def test_plain_open_zarr_after_predict(tmp_path: Path, stub_model_dir: Path, client: Client) -> None:
    store = make_store(tmp_path / "r.zarr", block=64)
    # An older segpipe's markers at the root, as a store made before 0.2 holds them.
    zarr.open_group(str(store), mode="r+").create_array("progress_predict", shape=(2, 2), dtype="uint8",
                                                       dimension_names=["block_y", "block_x"])
    predict(store, stub_model_dir, client=client, **SETTINGS)
    ds = _plain(store)
    assert "spatial_ref" in ds.coords and ds.rio.crs.to_epsg() == 32617
    assert set(ds.data_vars) == {"image", "classes", "confidence"}  # markers are not data
    classes = ds["classes"]
    assert classes.attrs["flag_values"] == [c.value for c in CLASSES]
    assert classes.attrs["flag_meanings"].split() == [c.name.replace(" ", "_") for c in CLASSES]
    assert classes.attrs["flag_colors"].split() == [c.colour for c in CLASSES]
    assert classes.rio.crs.to_epsg() == 32617 and np.isnan(classes.values).any()  # 255 decoded as missing
    assert "progress_predict" not in store_group(store)  # the legacy markers went with the old result
    assert open_layer(store, "_progress/predict")[...].all()


def test_consolidated_metadata_is_a_snapshot_segpipe_never_reads(tmp_path: Path) -> None:
    store = make_store(tmp_path / "r.zarr", block=64)
    publish_metadata(store)
    assert set(_plain(store).data_vars) == {"image"}
    # A layer added afterwards: segpipe sees it at once, outside readers at the next publication.
    group = store_group(store, mode="r+")
    group.create_array("extra", shape=(2, 2), dtype="uint8", dimension_names=["a", "b"])
    assert "extra" in store_group(store)
    assert "extra" not in _plain(store).data_vars
    publish_metadata(store)
    assert "extra" in _plain(store).data_vars


def test_a_store_without_consolidated_metadata_warns_plain_readers(tmp_path: Path) -> None:
    """What publish_metadata prevents (the test above would pass vacuously if xarray never warned)."""
    store = make_store(tmp_path / "r.zarr", block=64)
    with pytest.warns(RuntimeWarning, match="consolidated"):
        xr.open_zarr(store)
