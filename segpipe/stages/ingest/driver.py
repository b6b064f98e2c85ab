"""The ingest stage: tiles (and optional labels) in, one region store out.

The mosaic is streamed block by block into a Zarr v3 store (dask chunks == shards ==
``block_size``); labels are warped or rasterized onto the same grid one block per dask
task. Nothing holds the whole region in memory, and nothing half-written is ever left
at ``out``: the store is built in a hidden sibling directory and renamed into place
only when complete.

On object storage (``out`` an ``s3://`` URL) there is no rename. Dask tasks write the
store straight to a hidden sibling prefix (no local disk, no single machine in the data
path); once it is complete its objects are copied server-side to ``out``, the root
``zarr.json`` last, and the sibling prefix is deleted. Readers open a region through its
root ``zarr.json``, so they see either no store or the complete one, never a half store.
Replacing a store (``overwrite``) first deletes the old root ``zarr.json``, then the old
objects: for the length of the copy there is no store at ``out``, never a mix of two.
A killed ingest can leave a hidden ``.NAME.tmp-*`` prefix behind, never a store at ``out``; the
next local ingest to the same place removes trees whose process is gone, and puts back a
store that a kill between the two renames of a replacement left aside
(:mod:`segpipe.io.swap`).

A failed ingest (a damaged tile, a full disk) removes its hidden tree only once no task
of it still runs: dask's schedulers raise at the first failed task while the others keep
writing, and a tree removed under them would come back as leftovers.
Imagery without a single valid pixel (all nodata or NaN) is refused: it would train
into NaN statistics and weights.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import dask.threaded
import numpy as np
import xarray as xr
import zarr
from affine import Affine
from dask.base import compute, get_scheduler
from dask.delayed import delayed
from rasterio.features import geometry_mask

from segpipe.cores import usable_cores
from segpipe.errors import InputError, LabelsError, StoreError
from segpipe.io.labels import (
    LabelSource,
    background_class,
    check_overlap,
    label_classes,
    labels_window,
    open_labels,
    warn_single_class,
)
from segpipe.io.mosaic import open_mosaic
from segpipe.io.outside import publish_metadata
from segpipe.io.remote import (
    as_url,
    check_bucket,
    filesystem,
    is_remote,
    join,
    remote_errors,
    remote_exists,
    remove_tree,
    storage_errors,
    storage_options_for,
    url_name,
    url_parent,
)
from segpipe.io.store import (
    INNER_CHUNK,
    STORE_SCHEMA,
    RegionInfo,
    create_layer,
    open_layer,
    read_region_info,
    set_region_classes,
    write_block,
)
from segpipe.io.swap import recover, run_tag, staging_path, swap_in
from segpipe.io.warp import open_warped
from segpipe.stages.ingest.plan import (
    GridRequest,
    LabelRequest,
    WarpPlan,
    aoi_in_store_crs,
    image_names,
    plan_warp,
    store_fingerprint,
    warp_attrs,
)
from segpipe.types import ClassInfo, Grid, classes_from_bytes, read_classes_file
from segpipe.waves import block_spans, compute_in_threads, drain

__all__ = ["ingest"]

# Encoding keys xarray's Zarr backend accepts; rioxarray's reader adds others
# ("source", "rasterio_dtype") that an explicit encoding would reject.
_ZARR_ENCODING_KEYS = {"grid_mapping", "dtype", "compressors", "filters", "serializer", "coordinates"}

Progress = Callable[[str], None]

# How long a failed ingest waits for a cluster's running tasks before cleaning up anyway.
_SETTLE_TIMEOUT_S = 120.0


def _key_token(key: Any) -> str:
    """The token of a dask key's name (``('store-map-<token>', 0, 1)`` -> ``<token>``).

    A failed ingest waits for its tasks by token, not key: graph optimisation may rename
    fused tasks, which keep the token of one of their layers.
    """
    name = str(key[0] if isinstance(key, tuple) else key)
    return name.rsplit("-", 1)[-1]


def _compute(*collections: Any) -> tuple[Any, ...]:
    """``dask.compute`` that, when it fails, returns only once none of its tasks still runs.

    Dask's schedulers raise at the first failed task while the other running ones carry
    on; cleaning up after them would leave what they write next. On the local threaded
    scheduler the tasks run in a pool of our own that is drained on failure; on a
    distributed cluster the futures are cancelled and the workers polled until idle.
    """
    scheduler = get_scheduler(collections=list(collections))
    client = getattr(scheduler, "__self__", None)
    if client is not None and type(client).__name__ == "Client":
        futures = client.compute(list(collections))
        try:
            return tuple(client.gather(futures))
        except BaseException:
            client.cancel(futures)
            keys = [k for c in collections for k in c.__dask_graph__()]
            drain(client, keys, _SETTLE_TIMEOUT_S, _key_token)
            raise
    results: tuple[Any, ...]
    if scheduler is not dask.threaded.get:
        results = compute(*collections)  # synchronous or user-chosen
        return results
    return compute_in_threads(*collections, threads=usable_cores())


def _grid(image: xr.DataArray) -> Grid:
    crs = image.rio.crs
    t = image.rio.transform()
    return Grid(
        crs_wkt="" if crs is None else crs.to_wkt(),
        transform=(t.a, t.b, t.c, t.d, t.e, t.f),
        height=int(image.sizes["y"]),
        width=int(image.sizes["x"]),
    )


def _resolve_classes(classes: Sequence[ClassInfo] | str | Path | None) -> list[ClassInfo] | None:
    if classes is None:
        return None
    if isinstance(classes, str | Path) and is_remote(classes):
        url = as_url(classes)
        with remote_errors(url, "classes file"):
            text = filesystem().cat_file(url)
        return classes_from_bytes(text, url)
    if isinstance(classes, str | Path):
        return read_classes_file(classes)
    return sorted(classes, key=lambda c: c.value) or None


def _valid_mask(image: xr.DataArray | da.Array, nodata: float | None) -> da.Array | None:
    """Pixels whose every band is valid (not nodata, finite), as the training statistics count them.

    None when every pixel is (integers without a nodata value).
    """
    data = image.data if isinstance(image, xr.DataArray) else image
    valid: da.Array | None = da.isfinite(data).all(axis=0) if np.issubdtype(data.dtype, np.floating) else None
    if nodata is not None and not np.isnan(nodata):
        ok = (data != nodata).all(axis=0)
        valid = ok if valid is None else valid & ok
    return valid


def _write_image(
    image: xr.DataArray, store: str, block_size: int, sources: str, reread: bool = False
) -> None:
    """Stream the mosaic into ``store``'s ``image`` array, one dask task per shard.

    ``reread`` counts the valid pixels from the written store rather than beside the
    write (for images whose blocks cost more to make than to read back: warped ones).

    Raises:
        InputError: The mosaic has no valid pixel (counted in the same pass as the write).
    """
    var = image.copy()
    var.attrs["long_name"] = list(var.attrs["long_name"])  # JSON has no tuples
    nodata = var.attrs.pop("_FillValue", None)
    nbands = int(var.sizes["band"])
    inner = min(INNER_CHUNK, block_size)
    # Merge the variable's own encoding: an explicit dict replaces it, and with it
    # rioxarray's grid_mapping (the CRS would be silently lost).
    encoding = {
        **{k: v for k, v in var.encoding.items() if k in _ZARR_ENCODING_KEYS},
        "chunks": (nbands, inner, inner),
        "shards": (nbands, block_size, block_size),
        # Explicit None: without nodata, xarray must not invent a NaN fill value.
        "_FillValue": nodata,
    }
    # Arrays, attributes and coordinates only: the pixels are written below in waves,
    # so that no dask graph covers the whole region (segpipe.waves).
    var.to_dataset(name="image").to_zarr(
        store,
        mode="w-",
        zarr_format=3,
        consolidated=False,
        encoding={"image": encoding},
        storage_options=storage_options_for(store),
        compute=False,
    )
    target = open_layer(store, "image", mode="r+")
    valid = _valid_mask(image, nodata)
    count = 0
    spans = list(_pixel_spans(int(var.sizes["y"]), int(var.sizes["x"]), block_size))
    for ys, xs in spans:
        part = image.data[:, ys, xs]
        # dask documents zarr arrays as targets; its annotation omits them.
        write = da.store(part, target, regions=(slice(None), ys, xs), lock=False, compute=False)  # type: ignore[arg-type]
        if valid is None or reread:
            _compute(write)
        else:
            # One graph: the count reuses the blocks the write reads, so the image is read once.
            count += int(_compute(write, valid[ys, xs].sum())[1])
    if valid is None:  # every pixel counts, and a mosaic has at least one
        return
    if reread:
        # Counted from the written store: computed beside the write, the count would warp
        # every block a second time (dask fuses the source blocks into the write's tasks).
        stored = da.from_zarr(target, chunks=(nbands, block_size, block_size))
        again = _valid_mask(stored, nodata)
        assert again is not None  # same dtype and nodata as ``valid``
        count = sum(int(_compute(again[ys, xs].sum())[0]) for ys, xs in spans)
    if count == 0:
        raise InputError(
            f"image {sources} has no valid pixel (every pixel is nodata {nodata} or NaN in some band): "
            "check the files and their nodata value"
        )


def _pixel_spans(height: int, width: int, block_size: int) -> Iterator[tuple[slice, slice]]:
    """The region in waves of whole blocks (:func:`segpipe.waves.block_spans`), as pixel slices."""
    rows, cols = -(-height // block_size), -(-width // block_size)
    for r, c in block_spans(rows, cols):
        yield (slice(r.start * block_size, min(height, r.stop * block_size)),
               slice(c.start * block_size, min(width, c.stop * block_size)))


def _label_block(
    src: LabelSource, grid: Grid, store: str, y0: int, x0: int, size: int, aoi: dict[str, Any] | None = None
) -> np.ndarray | LabelsError:
    """Rasterize one block of labels into the store (0 outside ``aoi``); return its class histogram."""
    h, w = min(size, grid.height - y0), min(size, grid.width - x0)
    try:
        data = labels_window(src, grid, y0, x0, h, w)
    except LabelsError as exc:
        # Returned, not raised: the driver raises it once every task has finished, so no
        # task still running writes into the store after the failed ingest removed it.
        return exc
    if aoi is not None:
        # Outside the area of interest the image is nodata: its labels must not count.
        t = Affine(*grid.transform) * Affine.translation(x0, y0)
        data[geometry_mask([aoi], out_shape=(h, w), transform=t)] = 0
    write_block(open_layer(store, "labels", mode="r+"), y0, x0, data, size)
    return np.bincount(data.ravel(), minlength=256)


def _write_labels(
    src: LabelSource, grid: Grid, store: str, block_size: int, aoi: dict[str, Any] | None = None
) -> np.ndarray:
    """Fill the ``labels`` layer block by block; return the per-value pixel counts."""
    create_layer(store, "labels", "uint8", 0)
    block = delayed(_label_block, pure=True)
    counts = np.zeros(256, np.int64)
    for ys, xs in _pixel_spans(grid.height, grid.width, block_size):
        # One wave at a time (segpipe.waves): a region's worth of tasks is never one graph.
        tasks = [
            block(src, grid, store, y0, x0, block_size, aoi)
            for y0 in range(ys.start, ys.stop, block_size)
            for x0 in range(xs.start, xs.stop, block_size)
        ]
        for result in _compute(*tasks):
            if isinstance(result, LabelsError):
                raise result
            counts += result
    return counts


def _region_classes(src: LabelSource, counts: np.ndarray, given: list[ClassInfo] | None) -> list[ClassInfo]:
    present = [int(v) for v in np.flatnonzero(counts[1:255]) + 1]
    if not present:
        raise LabelsError(f"labels {src.path} hold no labelled pixel (all 0 or nodata) inside the image")
    if given is None:
        found = label_classes(src, values=present)  # warns itself when there is one class
    else:
        # A remapped background value is the labels' own: the file need not define it.
        background = background_class(src)
        missing_bg = background is not None and background.value not in {c.value for c in given}
        found = [*given, *([background] if background is not None and missing_bg else [])]
        warn_single_class(src, [c for c in found if c.value in present])
    missing = sorted(set(present) - {c.value for c in found})
    if missing:
        raise LabelsError(
            f"labels {src.path} hold class value(s) {', '.join(map(str, missing))} that the "
            "classes do not define: add them to the classes file"
        )
    return found


def _discard(path: str | Path) -> None:
    """Remove a tree, a file or an object prefix, best effort (cleaning up)."""
    if is_remote(path):
        remove_tree(str(path))
        return
    local = Path(path)
    if local.is_dir():
        shutil.rmtree(local, ignore_errors=True)
    else:
        local.unlink(missing_ok=True)


def _move_into_place(tmp: Path, out: Path, overwrite: bool, tag: str) -> None:
    """Rename the finished store to ``out``; an old one is removed only after that."""
    if out.exists() and not overwrite:
        raise StoreError(f"{out} exists; pass --overwrite to replace it")
    swap_in(tmp, out, tag)


def _publish_remote(tmp: str, out: str, overwrite: bool) -> None:
    """Copy the finished store at prefix ``tmp`` to ``out``, root ``zarr.json`` last (see module doc)."""
    fs = filesystem()
    root = join(out, "zarr.json")
    with remote_errors(out, "region store"):
        if fs.exists(root):
            if not overwrite:
                raise StoreError(f"{out} exists; pass --overwrite to replace it")
            fs.rm_file(root)  # the old store stops being a store before any of it changes
        if fs.exists(out):
            fs.rm(out, recursive=True)
        # Leftovers of an interrupted publish (objects without a root zarr.json) go too.
        tmp_key, out_key = tmp[len("s3://") :], out[len("s3://") :]
        body = [k for k in sorted(fs.find(tmp)) if k != f"{tmp_key}/zarr.json"]
        if body:  # server-side copies, concurrent within s3fs
            fs.copy(body, [out_key + k[len(tmp_key) :] for k in body])
        fs.copy(f"{tmp_key}/zarr.json", f"{out_key}/zarr.json")
    remove_tree(tmp)


def _destination(out: str | Path, block_size: int, overwrite: bool) -> str:
    """``out`` as a path or URL, once a store of ``block_size`` blocks may be written there.

    Raises:
        InputError: The block size is no shard size, or ``out`` is a file.
        StoreError: A store exists at ``out`` and ``overwrite`` is False.
        MissingInputError: ``out``'s bucket does not exist.
    """
    inner = min(INNER_CHUNK, block_size)
    if block_size < 1 or block_size % inner:
        raise InputError(f"block size {block_size} is invalid: use at most {INNER_CHUNK} or a multiple of it")
    remote = is_remote(out)
    out_s = as_url(out) if remote else str(Path(out))
    if remote:
        check_bucket(out_s)
    exists = remote_exists(join(out_s, "zarr.json")) if remote else Path(out_s).exists()
    if exists and not overwrite:
        raise StoreError(f"{out_s} exists; pass --overwrite to replace it")
    if exists and not remote and not Path(out_s).is_dir():
        raise InputError(f"{out_s} is a file, not a region store: choose another --out or remove it")
    return out_s


def ingest(
    images: Sequence[str | Path] | str | Path,
    out: str | Path,
    labels: str | Path | None = None,
    label_field: str | None = None,
    classes: Sequence[ClassInfo] | str | Path | None = None,
    block_size: int = 1024,
    overwrite: bool = False,
    progress: Progress | None = None,
    crs: str | None = None,
    resolution: float | tuple[float, float] | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    aoi: str | Path | None = None,
    resampling: str = "bilinear",
    order: str = "given",
    assets: Sequence[str] | None = None,
    label_layer: str | None = None,
    background_value: int | None = None,
) -> RegionInfo:
    """Build a region store from image tiles or STAC scenes and optional labels.

    Runs on whichever dask scheduler is active (it creates no cluster). Aligned tiles
    without grid options are mosaicked as they are (no resampling); STAC inputs, tiles in
    several CRSs, resolutions or grids, and any of ``crs``/``resolution``/``bounds``/``aoi``
    warp the scenes onto one target grid (:mod:`segpipe.io.warp`).

    Args:
        images: GeoTIFF files, VRTs and/or folders of GeoTIFFs forming one mosaic.
        out: Directory of the region store to create, or an ``s3://`` URL.
        labels: Optional class raster or class polygons.
        label_field: For polygons, the integer field with class values.
        classes: Classes (a list, or a classes JSON file); by default taken from the
            labels (polygon attributes, or the values found in a raster).
        block_size: Shard and dask chunk edge in pixels: at most 256, or a multiple of 256.
        overwrite: Replace an existing store at ``out`` (only once the new one is complete).
        progress: Called with a short message at each stage.
        crs: Target CRS (default: the CRS covering most of the scenes' area).
        resolution: Target pixel size in CRS units (default: the finest band's).
        bounds: Target (left, bottom, right, top) in the target CRS (default: the union
            of the footprints, or the AOI's bounding box).
        aoi: Vector file of the area of interest: pixels outside it become nodata.
        resampling: GDAL resampling of imagery onto the grid (labels always ``nearest``).
        order: Where scenes overlap, the first valid pixel of the ``given`` order, of
            the ``latest`` scene or of the ``least-cloudy`` one.
        assets: STAC asset keys to read as bands, in this order (STAC inputs only).
        label_layer: Layer of a multi-layer vector labels file (default: one class per
            layer when it has several).
        background_value: Label value meaning background, not unlabelled (0 in a 0/1
            mask): it becomes a class named ``background``.

    Returns:
        What the new store says about its region.

    Raises:
        StoreError: ``out`` exists and ``overwrite`` is False.
        MissingInputError: An image, the labels or the classes file does not exist, or
            an image is not a raster (empty, text, a VRT whose sources are missing).
        InputError: An image has no pixel, a tile cannot be read (named with the
            window), or the mosaic has no valid pixel (all nodata or NaN).
        StorageError: ``out`` cannot be written (full disk, read-only, no permission);
            nothing is left behind.
        TileMismatchError: The tiles cannot form one mosaic.
        LabelsError: The labels do not overlap the image, hold no labelled pixel,
            hold a value outside 0-254 or one the given classes do not define.
        StacError: A STAC input is unusable (missing asset, mixed band sets).
    """
    say = progress or (lambda _msg: None)
    out_s = _destination(out, block_size, overwrite)
    given = _resolve_classes(classes)
    wanted = LabelRequest(labels, label_field, label_layer, background_value)
    src = open_labels(labels, label_field, label_layer, background_value) if labels is not None else None
    request = GridRequest(crs, resolution, bounds, aoi, resampling, order, tuple(assets or ()))
    warp = plan_warp(images, request)
    classes_file = classes if isinstance(classes, str | Path) else None
    fingerprint = store_fingerprint(images, wanted, classes_file, block_size, request, warp)
    with storage_errors(out_s, "region store"):
        _build(images, out_s, src, given, block_size, overwrite, fingerprint, say, warp)
    say(f"region store written to {out_s}")
    return read_region_info(out_s)


def _staging(out_s: str, tag: str) -> tuple[str, Path | None]:
    """Where the store is built before it is published, and where the mosaic's VRT goes.

    A hidden sibling of ``out_s``; on a local disk, leftovers of killed ingests there are
    removed first, and the VRT lies beside the store (workers that can write the store can
    read it). On object storage the mosaic needs no VRT file (None).
    """
    if is_remote(out_s):
        return join(url_parent(out_s), f".{url_name(out_s)}.tmp-{tag}"), None
    local_out = Path(out_s)
    local_out.parent.mkdir(parents=True, exist_ok=True)
    # A SIGKILL gives an ingest no chance to clean up: its hidden trees (and a store it
    # had renamed aside when it died) are dealt with by the next ingest to the same place.
    recover(local_out)
    hidden = staging_path(local_out, tag)
    return str(hidden), hidden.with_name(f"{hidden.name}.vrt")


def _write_store(
    images: Sequence[str | Path] | str | Path,
    tmp: str,
    vrt: Path | None,
    src: LabelSource | None,
    given: list[ClassInfo] | None,
    block_size: int,
    fingerprint: str,
    say: Progress,
    warp: WarpPlan | None,
) -> None:
    """Write the whole store at ``tmp``: the image, the store's metadata, the labels and classes."""
    if warp is None:
        image = open_mosaic(images, chunk_size=block_size, vrt_path=vrt)
    else:
        how = warp.request
        say(f"warping {len(warp.scenes.scenes)} scene(s) onto one grid ({how.resampling})")
        image = open_warped(warp.scenes, warp.grid, how.resampling, block_size, warp.aoi, how.order)
    grid = _grid(image)
    if src is not None:
        check_overlap(src, grid)
    say(
        f"writing image: {grid.width} x {grid.height} px, {image.sizes['band']} bands, "
        f"{image.data.npartitions} blocks of {block_size} px"
    )
    _write_image(image, tmp, block_size, ", ".join(image_names(images)), reread=warp is not None)
    zarr.open_group(tmp, mode="r+", storage_options=storage_options_for(tmp)).attrs["segpipe"] = {
        "schema": STORE_SCHEMA,
        "block_size": block_size,
        "classes": [],
        # Lets a rerun of a batch recognise a store built from the same inputs.
        "inputs": fingerprint,
        # What the image was made from: the STAC Items of its exports link to them.
        "sources": [_absolute(n) for n in image_names(images)],
        **(warp_attrs(warp) if warp is not None else {}),
    }
    found = given or []
    if src is not None:
        say(f"writing labels from {src.path}")
        aoi = aoi_in_store_crs(warp) if warp is not None else None
        found = _region_classes(src, _write_labels(src, grid, tmp, block_size, aoi), given)
    if found:
        set_region_classes(tmp, found)
    publish_metadata(tmp)  # consolidated metadata for xr.open_zarr, before the store is published


def _absolute(name: str) -> str:
    """A local input as an absolute path; URLs as given."""
    return name if "://" in name else str(Path(name).resolve())


def _build(
    images: Sequence[str | Path] | str | Path,
    out_s: str,
    src: LabelSource | None,
    given: list[ClassInfo] | None,
    block_size: int,
    overwrite: bool,
    fingerprint: str,
    say: Progress,
    warp: WarpPlan | None = None,
) -> None:
    """Write the store under a hidden sibling, then publish it at ``out_s`` (see module doc)."""
    tag = run_tag()
    tmp, vrt = _staging(out_s, tag)
    try:
        _write_store(images, tmp, vrt, src, given, block_size, fingerprint, say, warp)
        if is_remote(out_s):
            _publish_remote(tmp, out_s, overwrite)
        else:
            _move_into_place(Path(tmp), Path(out_s), overwrite, tag)
    except BaseException:
        _discard(tmp)
        raise
    finally:
        if vrt is not None:
            vrt.unlink(missing_ok=True)
