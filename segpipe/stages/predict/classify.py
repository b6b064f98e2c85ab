"""Classify any (band, y, x) DataArray with a model package, lazily, exactly as ``segpipe predict`` does.

:func:`classify` is predict without a store: the same window grid (anchored at the
array's first pixel, as predict's is at the store's), the same pixel preparation and
output encoding (:mod:`segpipe.stages.predict.pixels`), the same blend
(:func:`segpipe.stages.predict.blend.blend_windows`) and the same window and batch
settings, so a pixel gets the class ``segpipe predict`` would give it on a store holding
the same array. The output has the input's chunks, one dask task each; a task gets the
chunk's halo (what the windows reaching it read, cut from the input chunks where they
are) and loads the package once per process, so it runs in-process or on any dask
cluster.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from segpipe.errors import InputError
from segpipe.grid.box import Box
from segpipe.grid.tiling import grown, halo_bounds, window_count
from segpipe.io.store import NODATA_U8
from segpipe.models import check_bands, validate_package
from segpipe.stages.predict.blend import blend_windows, tta_forward
from segpipe.stages.predict.driver import (
    CPU_BATCH,
    GPU_BATCH,
    choose_batch_size,
    edge_margin,
    model_location,
    window_settings,
)
from segpipe.stages.predict.pixels import encode_probabilities, prepare_pixels
from segpipe.stages.predict.views import choose_tta
from segpipe.stages.predict.worker import cached_forward
from segpipe.types import classes_to_json

if TYPE_CHECKING:
    import dask.array
    import xarray as xr

    from segpipe.models import ModelSpec

__all__ = ["NUMPY_CHUNK", "band_names", "classify"]

# Chunk edge given to an in-memory (numpy) input, so its tasks still run in parallel;
# ingest's default block size.
NUMPY_CHUNK = 1024


@dataclass(frozen=True)
class _Job:
    """What every chunk's task needs: small and picklable, shipped once per graph.

    Attributes:
        model_dir: The package as every worker finds it.
        model_hash: Its content hash (the per-process model cache's key).
        raster: (height, width) of the whole array: the window grid's extent.
        tile: Window size.
        overlap: Window overlap.
        blend: Blend mode.
        tta: Average the 8 flips and rotations of every window.
        nodata: Nodata value of the input (None: only NaN is nodata).
        batch_size: Most windows per forward call, or None: by the worker's device, as predict.
        n_windows: Windows of the whole array (the batch size depends on it, never on a chunk).
        probabilities: Also return confidence and per-class probabilities.
        margin: Mirrored pixels around the array that the window grid covers, as predict's.
    """

    model_dir: str
    model_hash: str
    raster: tuple[int, int]
    tile: int
    overlap: int
    blend: str
    tta: bool
    nodata: float | None
    batch_size: int | None
    n_windows: int
    probabilities: bool
    margin: int = 0


def band_names(data: xr.DataArray) -> tuple[str, ...]:
    """The band names of a (band, y, x) DataArray, as ingest records them.

    The ``long_name`` attribute (rioxarray's and the region store's convention) when it
    names every band, else a coordinate of string band names, else ``band1``, ``band2``...
    (what a store without names says).
    """
    n = int(data.shape[0])
    names = data.attrs.get("long_name")
    listed = [names] if isinstance(names, str) else list(names) if names is not None else []
    if len(listed) == n:
        return tuple(str(name) for name in listed)
    coord = data.coords.get(data.dims[0])
    if coord is not None and coord.dtype.kind in "US":
        return tuple(str(name) for name in coord.values)
    return tuple(f"band{i + 1}" for i in range(n))


def _nodata(data: xr.DataArray) -> float | None:
    """The input's nodata: its ``_FillValue`` or ``nodata`` attribute, as rioxarray reads it."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)

    value = data.rio.nodata
    return None if value is None else float(value)


def _check(
    data: xr.DataArray, spec: ModelSpec, tile_size: int | None, overlap: int | None,
    blend: str, batch_size: int | None,
) -> tuple[int, int, int, int]:
    """Check the array and the settings against the package; return (tile, overlap, windows, margin).

    Raises:
        InputError: Not a (band, y, x) array, or a bad tile size, overlap, blend mode or
            batch size.
        BandMismatchError: The array's bands differ from the model's.
    """
    if data.ndim != 3 or min(data.shape) < 1:
        raise InputError(f"classify needs a (band, y, x) DataArray; got dims {data.dims}, {data.shape}")
    check_bands(spec, band_names(data))
    tile, ov = window_settings(spec, tile_size, overlap, blend)
    margin = edge_margin(spec, ov)
    n_windows = window_count(grown((int(data.shape[1]), int(data.shape[2])), margin), tile, tile - ov)
    if batch_size is not None:
        choose_batch_size(n_windows, batch_size)  # a bad value fails now, not in a task
    return tile, ov, n_windows, margin


def _stack(probs: np.ndarray, valid: np.ndarray, spec: ModelSpec, probabilities: bool) -> np.ndarray:
    """Blended probabilities as (K, h, w) uint8 layers: classes, then confidence and one per class."""
    layers = 2 + len(spec.classes) if probabilities else 1
    if probs.shape[0] == 0:  # no valid pixel within reach of the chunk
        return np.full((layers, *valid.shape), NODATA_U8, dtype=np.uint8)
    values = np.array([c.value for c in spec.classes], dtype=np.uint8)
    out = encode_probabilities(probs, valid, values, probabilities)
    if not probabilities:
        return out["classes"][None]
    return np.concatenate([out["classes"][None], out["confidence"][None], out["probabilities"]])


def _classify_chunk(pieces: list[list[np.ndarray]], job: _Job, box: Box, halo: Box) -> np.ndarray:
    """One output chunk: blend the windows reaching ``box`` from the pixels of its halo.

    Args:
        pieces: Raw (band, y, x) pixels of ``halo``, as rows of pieces of the input's chunks.
        job: The run's settings.
        box: The chunk, in the array's pixels.
        halo: What the windows reaching ``box`` read (:func:`segpipe.grid.tiling.halo_bounds`).

    Returns:
        (K, h, w) uint8: classes, then with ``job.probabilities`` confidence and one layer
        per class; 255 on nodata.
    """
    loaded = cached_forward(job.model_dir, job.model_hash)  # torch weights or an ONNX file
    spec = loaded.spec
    forward = tta_forward(loaded.forward) if job.tta else loaded.forward
    most = job.batch_size or (CPU_BATCH if loaded.on_cpu else GPU_BATCH)
    pixels, valid = prepare_pixels(np.block(pieces), job.nodata, spec)
    probs, _ = blend_windows(pixels, valid, forward, job.tile, job.overlap, (halo.y0, halo.x0), job.raster,
                             box, choose_batch_size(job.n_windows, most), True, job.blend, job.margin)
    return _stack(probs, valid[box.within(halo)], spec, job.probabilities)


def _edges(chunks: tuple[int, ...]) -> np.ndarray:
    """Start of every chunk along an axis, and the axis's end."""
    return np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)


def _span(edges: np.ndarray, lo: int, hi: int) -> range:
    """Indices of the chunks (between ``edges``) that overlap ``[lo, hi)``."""
    return range(int(np.searchsorted(edges, lo, "right")) - 1, int(np.searchsorted(edges, hi, "left")))


def _halo_pieces(
    name: str, halo: Box, ys: np.ndarray, xs: np.ndarray, prefix: tuple[Any, ...]
) -> tuple[dict[Any, Any], list[list[Any]]]:
    """Tasks cutting ``halo`` out of the input chunks it overlaps, and their keys as np.block nests them.

    Each piece is cut where its chunk is: only the halo, not the whole chunk, travels to
    the task that needs it.
    """
    tasks: dict[Any, Any] = {}
    rows = []
    for by in _span(ys, halo.y0, halo.y1):
        row = []
        for bx in _span(xs, halo.x0, halo.x1):
            chunk = Box(int(ys[by]), int(xs[bx]), int(ys[by + 1]), int(xs[bx + 1]))
            part = Box(max(chunk.y0, halo.y0), max(chunk.x0, halo.x0),
                       min(chunk.y1, halo.y1), min(chunk.x1, halo.x1))
            key = (*prefix, by, bx)
            tasks[key] = (operator.getitem, (name, 0, by, bx), (slice(None), *part.within(chunk)))
            row.append(key)
        rows.append(row)
    return tasks, rows


def _lazy(data: xr.DataArray, job: _Job, layers: int) -> dask.array.Array:
    """The (layers, y, x) uint8 dask array of the outputs: one task per chunk of ``data``, its chunks."""
    import dask.array as darr
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    pixels = data.data
    if not isinstance(pixels, darr.Array):
        pixels = darr.from_array(np.asarray(pixels), chunks=(-1, NUMPY_CHUNK, NUMPY_CHUNK))
    pixels = pixels.rechunk({0: -1})  # every band of a pixel in one task
    name = f"segpipe-classify-{tokenize(pixels, job)}"
    ys, xs = _edges(pixels.chunks[1]), _edges(pixels.chunks[2])
    graph: dict[Any, Any] = {}
    for i in range(len(ys) - 1):
        for j in range(len(xs) - 1):
            box = Box(int(ys[i]), int(xs[j]), int(ys[i + 1]), int(xs[j + 1]))
            halo = halo_bounds(box, job.raster, job.tile, job.tile - job.overlap, job.margin)
            cuts, pieces = _halo_pieces(pixels.name, halo, ys, xs, (f"{name}-halo", i, j))
            graph.update(cuts)
            graph[(name, 0, i, j)] = (_classify_chunk, pieces, job, box, halo)
    deps = HighLevelGraph.from_collections(name, graph, dependencies=[pixels])
    chunks = ((layers,), *pixels.chunks[1:])
    return darr.Array(deps, name, chunks=chunks, meta=np.empty((0, 0, 0), dtype=np.uint8))


def _spatial_coords(data: xr.DataArray) -> dict[str, Any]:
    """The input's y/x coordinates and every coordinate on them alone (the CRS's ``spatial_ref``)."""
    spatial = set(data.dims[1:])
    return {str(name): coord for name, coord in data.coords.items() if set(coord.dims) <= spatial}


def _layer(
    data: xr.DataArray, values: dask.array.Array, attrs: dict[str, Any], lead: dict[str, Any] | None = None
) -> xr.DataArray:
    """One output layer on the input's grid: its coordinates, CRS and nodata 255."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    coords = {**(lead or {}), **_spatial_coords(data)}
    out = xr.DataArray(values, dims=(*(lead or {}), *data.dims[1:]), coords=coords, attrs=attrs)
    if data.rio.grid_mapping in coords:
        out = out.rio.write_grid_mapping(data.rio.grid_mapping)
    elif data.rio.crs is not None:
        out = out.rio.write_crs(data.rio.crs)
    layer: xr.DataArray = out.rio.write_nodata(NODATA_U8, encoded=False)
    return layer


def _outputs(
    data: xr.DataArray, stack: dask.array.Array, spec: ModelSpec, job: _Job, probabilities: bool
) -> xr.DataArray | xr.Dataset:
    """Wrap the lazy outputs as predict's layers: classes, or a Dataset with confidence and probabilities."""
    import xarray as xr

    settings = {"model": job.model_dir, "model_hash": job.model_hash, "tile": job.tile,
                "overlap": job.overlap, "blend": job.blend, "tta": job.tta}
    classes_json = classes_to_json(spec.classes)
    # CF's flag_values / flag_meanings say what each class value means to any netCDF-aware tool.
    cf = {"flag_values": [c.value for c in spec.classes],
          "flag_meanings": " ".join(c.name.replace(" ", "_") for c in spec.classes)}
    classes = _layer(data, stack[0], {**settings, "long_name": "class", "classes": classes_json, **cf})
    if not probabilities:
        return classes
    confidence = _layer(data, stack[1], {**settings, "long_name": "confidence", "units": "percent"})
    per_class = _layer(
        data, stack[2:], {**settings, "long_name": "class probability", "units": "percent",
                          "classes": classes_json},
        lead={"class": [c.value for c in spec.classes]},
    )
    return xr.Dataset({"classes": classes, "confidence": confidence, "probabilities": per_class})


@overload
def classify(
    data: xr.DataArray, model: str | Path, *, tile_size: int | None = None, overlap: int | None = None,
    blend: str = "cosine", tta: bool | None = None, probabilities: Literal[False] = False,
    batch_size: int | None = None,
) -> xr.DataArray: ...


@overload
def classify(
    data: xr.DataArray, model: str | Path, *, tile_size: int | None = None, overlap: int | None = None,
    blend: str = "cosine", tta: bool | None = None, probabilities: Literal[True],
    batch_size: int | None = None,
) -> xr.Dataset: ...


@overload
def classify(
    data: xr.DataArray, model: str | Path, *, tile_size: int | None = None, overlap: int | None = None,
    blend: str = "cosine", tta: bool | None = None, probabilities: bool = False,
    batch_size: int | None = None,
) -> xr.DataArray | xr.Dataset: ...


def classify(
    data: xr.DataArray,
    model: str | Path,
    *,
    tile_size: int | None = None,
    overlap: int | None = None,
    blend: str = "cosine",
    tta: bool | None = None,
    probabilities: bool = False,
    batch_size: int | None = None,
) -> xr.DataArray | xr.Dataset:
    """Classify every pixel of a (band, y, x) DataArray with a model package, lazily.

    The result is what ``segpipe predict`` writes for the same pixels in a store holding
    ``data`` (the window grid starts at ``data``'s first pixel: a subset gives what
    predict gives on that subset as a store of its own). Nodata is ``data``'s
    ``_FillValue`` or ``nodata`` attribute (``data.rio.nodata``), plus NaN; a pixel
    where any band is nodata gets 255.

    Nothing is computed until the result is. It has ``data``'s chunks (a numpy-backed
    ``data`` is cut into :data:`NUMPY_CHUNK` px chunks), one dask task each, which reads
    the chunk's halo (the pixels its windows reach) and loads the package once per
    process. It runs on whichever dask scheduler computes it: in-process, or a
    distributed cluster (the package must be readable there: a shared path or an
    ``s3://`` URL).

    Args:
        data: (band, y, x) pixels, numpy- or dask-backed; the bands named as the model's
            (``long_name`` attribute, as in ``segpipe.open_region(store).image`` and
            ``rioxarray.open_rasterio``).
        model: Model package directory or ``s3://`` URL.
        tile_size: Window size; default as predict: the model's chip size rounded up to its
            stride, at least 256.
        overlap: Overlap between windows; default as predict (a quarter of the tile; for a
            random forest what its context window needs).
        blend: ``cosine`` (default), ``gaussian``, ``mean`` or ``crop``.
        tta: Average each window over its 8 flips and rotations (8x the forward calls);
            default as predict (a network does on at most 4096 x 4096 px of ``data``).
        probabilities: Return a Dataset of every predict layer instead of the classes alone.
        batch_size: Most windows per forward call; default as predict (8 on a GPU, 2 on a CPU).

    Returns:
        With ``probabilities`` False: ``classes``, a (y, x) uint8 DataArray of class values
        (255 = nodata) on ``data``'s coordinates and CRS. Its attributes name the model
        (``model``, ``model_hash``), the window settings and the classes (``classes`` as in
        the store, and CF ``flag_values``/``flag_meanings``). With ``probabilities`` True: a
        Dataset of ``classes``, ``confidence`` (y, x: the winning class's probability in
        percent) and ``probabilities`` ((class, y, x), percent; the ``class`` coordinate
        holds the class values), all uint8 with 255 = nodata, exactly as predict writes them
        with ``--probabilities``.

    Raises:
        ModelPackageError: An invalid package (checked in full before anything else).
        BandMismatchError: ``data``'s bands differ from the model's.
        InputError: ``data`` is not (band, y, x), or a bad tile size, overlap, blend mode or
            batch size.
    """
    location = model_location(model)
    spec, mhash = validate_package(location)
    tile, ov, n_windows, margin = _check(data, spec, tile_size, overlap, blend, batch_size)
    height, width = int(data.shape[1]), int(data.shape[2])
    views = choose_tta(tta, spec, height, width)[0]
    job = _Job(location, mhash, (height, width), tile, ov, blend, views, _nodata(data), batch_size,
               n_windows, probabilities, margin)
    stack = _lazy(data, job, 2 + len(spec.classes) if probabilities else 1)
    return _outputs(data, stack, spec, job, probabilities)
