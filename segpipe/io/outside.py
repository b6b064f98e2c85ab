"""What readers outside segpipe see of a region store: xarray, Pangeo notebooks, zarr tools.

``xr.open_zarr(store)`` should open a region with no argument and no warning:
- consolidated metadata (the root ``zarr.json``'s ``consolidated_metadata``, the Zarr v3
  form zarr-python and xarray read), so xarray does not warn that it fell back;
- the root attribute ``coordinates: spatial_ref`` (CF), so the CRS variable is a
  coordinate and ``ds.rio.crs`` works without ``decode_coords="all"``;
- class layers with CF ``flag_values``, ``flag_meanings`` and ``flag_colors``
  (:func:`segpipe.types.class_flags`, set where the layers are written).

Consolidated metadata is a snapshot: each stage that changes the store rewrites it when
it ends (:func:`publish_metadata`), so it describes the last complete state. segpipe
itself never reads it (:func:`segpipe.io.store.store_group`), so a stage killed before
rewriting it leaves outside readers on the previous complete result, never segpipe
confused.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import zarr
import zarr.storage

from segpipe.io.remote import is_remote, storage_options_for
from segpipe.io.store import store_group, store_location

__all__ = ["publish_metadata"]


def _writable(path: str) -> zarr.storage.StoreLike:
    if is_remote(path):
        options = storage_options_for(path)
        return zarr.storage.FsspecStore.from_url(path, storage_options=options, read_only=False)
    return str(Path(path))


def publish_metadata(store: str | Path) -> None:
    """Refresh what outside readers see: the ``coordinates`` attribute, then consolidated metadata."""
    group = store_group(store, mode="r+")
    if group.attrs.get("coordinates") != "spatial_ref":
        group.attrs["coordinates"] = "spatial_ref"
    with warnings.catch_warnings():
        # zarr-python notes that Zarr v3 has no consolidated metadata in its specification
        # yet; xarray and zarr-python read it, which is what it is written for.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(_writable(store_location(store)), zarr_format=3)
