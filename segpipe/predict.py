"""Predict: classify every pixel of a region store, block by block, on a Dask cluster.

Each output block is one task (:func:`run_block`) that reads its pixels plus the halo
its windows need straight from Zarr, runs the network on windows of the global grid
(:mod:`segpipe.tiling`), blends softmax probabilities with raised-cosine weights and
writes whole shards of ``classes`` and ``confidence``. A per-block marker in the
``progress_predict`` layer lets a rerun skip finished blocks. Tasks carry only a small
frozen :class:`BlockJob`; each worker process loads the model once, by path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from segpipe.errors import InputError, ModelPackageError, StoreError
from segpipe.io.store import NODATA_U8, create_layer, open_layer, read_region_info, write_block
from segpipe.models import check_bands, load_model, model_hash, normalise, output_stride, read_spec
from segpipe.tiling import Forward, blend_windows, halo_bounds
from segpipe.types import classes_to_json

if TYPE_CHECKING:
    import distributed
    import torch
    from torch import nn

    from segpipe.models import ModelSpec

__all__ = [
    "PROGRESS_LAYER",
    "BlockJob",
    "PredictSummary",
    "predict",
    "predict_block",
    "run_block",
    "valid_mask",
]

log = logging.getLogger(__name__)

PROGRESS_LAYER = "progress_predict"


def predict_block(
    image: np.ndarray,
    valid: np.ndarray,
    forward: Forward,
    tile: int,
    overlap: int,
    origin: tuple[int, int],
    raster: tuple[int, int],
    out_box: tuple[int, int, int, int],
    batch_size: int = 8,
    pad_batches: bool = True,
) -> np.ndarray:
    """Blend window predictions over one output block (see :func:`segpipe.tiling.blend_windows`).

    Windows lie on the raster's global grid, so the result for a pixel does not depend
    on the block that computes it. Windows past a small raster's edge are padded by
    reflection and cropped back before blending; invalid pixels get probability 0.

    Args:
        image: Normalised (band, y, x) float32 pixels covering the block's halo
            (see :func:`segpipe.tiling.halo_bounds`); nodata already set to 0.
        valid: (y, x) bool mask of ``image``: False on nodata.
        forward: Network call, (N, band, tile, tile) -> (N, C, tile, tile) probabilities.
        tile: Window size (a multiple of the network's output stride).
        overlap: Overlap of neighbouring windows (0 <= overlap < tile).
        origin: Global (row, column) of ``image[:, 0, 0]``.
        raster: Raster (height, width).
        out_box: Output block (y0, x0, h, w) in global pixels.
        batch_size: Windows per forward call.
        pad_batches: Pad the last batch with zero windows to ``batch_size`` so every call
            has one shape; makes outputs bitwise independent of the blocking.

    Returns:
        (C, h, w) float32 blended probabilities; (0, h, w) if no valid pixel is in reach.

    Raises:
        InputError: Arrays or forward outputs of the wrong shape, or an image that does
            not cover the halo.
    """
    probs, _ = blend_windows(
        image, valid, forward, tile, overlap, origin, raster, out_box, batch_size, pad_batches
    )
    return probs


@dataclass(frozen=True)
class BlockJob:
    """One output block to predict: small, hashable, cheap to ship in a task graph.

    Attributes:
        store: Region store location.
        model_dir: Model package directory (readable by every worker).
        model_hash: Expected package hash (the worker's model cache key).
        y0: Block start row.
        x0: Block start column.
        h: Block rows.
        w: Block columns.
        tile: Window size.
        overlap: Window overlap.
        batch_size: Windows per forward call.
    """

    store: str
    model_dir: str
    model_hash: str
    y0: int
    x0: int
    h: int
    w: int
    tile: int
    overlap: int
    batch_size: int


@dataclass(frozen=True)
class PredictSummary:
    """What a :func:`predict` run did.

    Attributes:
        blocks_total: Blocks of the region.
        blocks_done: Blocks computed by this run.
        blocks_skipped: Blocks already finished by an earlier run.
        pixels: Pixels written by this run.
        seconds: Wall-clock seconds of the run.
        windows: Network windows computed (``windows * tile**2 / pixels`` is the
            overlap-and-halo compute overhead).
        tile_size: Window size used.
        overlap: Window overlap used.
    """

    blocks_total: int
    blocks_done: int
    blocks_skipped: int
    pixels: int
    seconds: float
    windows: int
    tile_size: int = 0
    overlap: int = 0


def _torch_threads() -> int:
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError):  # not inside a dask worker
        return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=2)
def _model_for(model_dir: str, expected_hash: str) -> tuple[nn.Module, ModelSpec, torch.device]:
    """Load a package once per process; the hash in the key makes a changed package reload."""
    import torch

    found = model_hash(model_dir)
    if found != expected_hash:
        raise ModelPackageError(
            f"model package {model_dir} changed during prediction (hash {found}, expected "
            f"{expected_hash}): rerun predict"
        )
    net, spec = load_model(model_dir)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        net = net.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    else:
        device = torch.device("cpu")
        # Workers run with OMP_NUM_THREADS=1; match torch to the worker's task threads.
        torch.set_num_threads(_torch_threads())
    return net, spec, device


def _torch_forward(net: nn.Module, device: torch.device) -> Forward:
    import torch

    def forward(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        with torch.inference_mode():
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
                half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
                with torch.autocast("cuda", dtype=half):
                    logits = net(x)
            else:
                logits = net(x)
            probs = torch.softmax(logits.float(), dim=1)
        return probs.cpu().numpy()

    return forward


def valid_mask(raw: np.ndarray, nodata: float | None) -> np.ndarray:
    """(y, x) mask of pixels where no band is nodata (or NaN)."""
    valid = np.ones(raw.shape[1:], dtype=bool)
    if np.issubdtype(raw.dtype, np.floating):
        valid &= np.isfinite(raw).all(axis=0)
    if nodata is not None and not np.isnan(nodata):
        # Compare as a Python float: a nodata value outside the dtype's range simply
        # matches nothing (casting it to the dtype would wrap around).
        valid &= ~(raw == float(nodata)).any(axis=0)
    return valid


def run_block(job: BlockJob) -> dict[str, float]:
    """Predict one block and write its ``classes``, ``confidence`` and progress marker.

    Runs on a dask worker. Reads the block plus its halo from the store's ``image``.

    Returns:
        Stats: ``pixels`` (block pixels), ``valid`` (valid pixels), ``windows``
        (windows computed), ``seconds`` (task time).
    """
    t0 = time.perf_counter()
    info = read_region_info(job.store)
    net, spec, device = _model_for(job.model_dir, job.model_hash)
    box = halo_bounds(job.y0, job.x0, job.h, job.w, info.height, info.width, job.tile, job.tile - job.overlap)
    raw = np.asarray(open_layer(job.store, "image")[:, box.y0 : box.y1, box.x0 : box.x1])
    valid = valid_mask(raw, info.nodata)
    image = normalise(raw, spec, valid)
    # normalise zeroes nodata by multiplying, which leaves NaN nodata as NaN.
    image[:, ~valid] = 0.0
    probs, windows = blend_windows(
        image, valid, _torch_forward(net, device), job.tile, job.overlap, (box.y0, box.x0),
        (info.height, info.width), (job.y0, job.x0, job.h, job.w), job.batch_size, True,
    )
    vy, vx = job.y0 - box.y0, job.x0 - box.x0
    block_valid = valid[vy : vy + job.h, vx : vx + job.w]
    classes = np.full((job.h, job.w), NODATA_U8, dtype=np.uint8)
    confidence = np.full((job.h, job.w), NODATA_U8, dtype=np.uint8)
    if probs.shape[0]:
        values = np.array([c.value for c in spec.classes], dtype=np.uint8)
        classes[block_valid] = values[probs.argmax(axis=0)][block_valid]
        pct = np.rint(probs.max(axis=0) * 100).clip(0, 100).astype(np.uint8)
        confidence[block_valid] = pct[block_valid]
    b = info.block_size
    write_block(open_layer(job.store, "classes", mode="r+"), job.y0, job.x0, classes, b)
    write_block(open_layer(job.store, "confidence", mode="r+"), job.y0, job.x0, confidence, b)
    # The marker goes last: a block counts as done only once both layers are written.
    open_layer(job.store, PROGRESS_LAYER, mode="r+")[job.y0 // b, job.x0 // b] = 1
    return {
        "pixels": job.h * job.w,
        "valid": int(block_valid.sum()),
        "windows": windows,
        "seconds": time.perf_counter() - t0,
    }


def _settings(spec: ModelSpec, tile_size: int | None, overlap: int | None) -> tuple[int, int]:
    stride = output_stride(spec.arch)
    tile = tile_size if tile_size is not None else max(256, -(-spec.chip_size // stride) * stride)
    if tile <= 0 or tile % stride:
        raise InputError(f"tile size {tile} must be a positive multiple of {stride} (the network's stride)")
    ov = tile // 4 if overlap is None else overlap
    if not 0 <= ov < tile:
        raise InputError(f"overlap {ov} must be at least 0 and smaller than the tile size ({tile})")
    return tile, ov


def _prepare_layers(
    store: str, spec: ModelSpec, blocks: tuple[int, int], key: dict[str, Any], force: bool
) -> np.ndarray:
    """Create (or keep, to resume) output and progress layers; return the done markers."""
    reset = force
    try:
        progress = open_layer(store, PROGRESS_LAYER)
        if progress.shape != blocks or any(progress.attrs.get(k) != v for k, v in key.items()):
            reset = True
    except StoreError:
        reset = True
    for name in ("classes", "confidence"):
        try:
            open_layer(store, name)
        except StoreError:
            reset = True
    if not reset:
        return np.asarray(progress[...]).astype(bool)
    # Progress is cleared before outputs are replaced, so a crash in between never
    # leaves "done" markers over empty outputs.
    zarr.open_group(store, mode="r+").create_array(
        PROGRESS_LAYER, shape=blocks, dtype="uint8", chunks=(1, 1), fill_value=0,
        dimension_names=["block_y", "block_x"], attributes=key, overwrite=True,
    )
    classes_attrs = {**key, "long_name": "class", "classes": classes_to_json(spec.classes)}
    create_layer(store, "classes", "uint8", NODATA_U8, attributes=classes_attrs, overwrite=True)
    conf_attrs = {**key, "long_name": "confidence", "units": "percent"}
    create_layer(store, "confidence", "uint8", NODATA_U8, attributes=conf_attrs, overwrite=True)
    return np.zeros(blocks, dtype=bool)


def predict(
    store: str | Path,
    model_dir: str | Path,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int = 8,
    client: distributed.Client | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PredictSummary:
    """Classify every pixel of a region store with a model package.

    Writes ``classes`` (class values, 255 = nodata) and ``confidence`` (0-100 %, 255 =
    nodata) into the store, one task per block. Finished blocks are marked, so a rerun
    with the same model and settings resumes where the last one stopped.

    Args:
        store: Region store (from ``segpipe ingest``).
        model_dir: Model package directory, readable by every worker.
        tile_size: Window size; default: the model's chip size rounded up to a multiple
            of 32, at least 256.
        overlap: Overlap between windows; default: a quarter of the tile.
        batch_size: Windows per forward call.
        client: Dask client; default: a cluster from :func:`segpipe.cluster.get_client`.
        force: Recompute every block even if marked finished.
        progress: Called as ``progress(done, total)`` after each block.

    Returns:
        A summary of the run.

    Raises:
        BandMismatchError: The image's bands differ from the model's (before any write).
        InputError: Bad tile size, overlap or batch size.
    """
    t0 = time.perf_counter()
    store_s = str(store) if "://" in str(store) else str(Path(store).resolve())
    info = read_region_info(store_s)
    spec = read_spec(model_dir)
    check_bands(spec, info.band_names)
    tile, ov = _settings(spec, tile_size, overlap)
    if batch_size < 1:
        raise InputError(f"batch size {batch_size} must be at least 1")
    mdir = str(Path(model_dir).resolve())
    mhash = model_hash(mdir)
    key = {"model_hash": mhash, "tile": tile, "overlap": ov}
    done = _prepare_layers(store_s, spec, info.blocks, key, force)
    b = info.block_size
    jobs = [
        BlockJob(store_s, mdir, mhash, by * b, bx * b, min(b, info.height - by * b),
                 min(b, info.width - bx * b), tile, ov, batch_size)
        for by, bx in zip(*np.nonzero(~done), strict=True)
    ]
    total, skipped = int(done.size), int(done.sum())
    if progress is not None:
        progress(skipped, total)
    pixels = windows = 0
    if jobs:
        from distributed import as_completed

        with contextlib.ExitStack() as stack:
            if client is None:
                from segpipe.cluster import get_client

                client = stack.enter_context(get_client())
            futures = client.map(run_block, jobs, pure=False)
            for n, future in enumerate(as_completed(futures), start=1):
                try:
                    stats = future.result()
                except Exception:
                    client.cancel(futures)
                    raise
                pixels += int(stats["pixels"])
                windows += int(stats["windows"])
                if progress is not None:
                    progress(skipped + n, total)
    seconds = time.perf_counter() - t0
    log.info("predicted %d blocks (%d skipped) in %.1f s", len(jobs), skipped, seconds)
    return PredictSummary(total, len(jobs), skipped, pixels, seconds, windows, tile, ov)
