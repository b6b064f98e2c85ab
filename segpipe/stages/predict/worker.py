"""The worker side of prediction: one task predicts one box of store blocks.

:func:`run_block` reads its windows plus halo straight from the store's ``image``, a
window row at a time, runs batched forward passes, blends them with a rolling
accumulator (:func:`segpipe.stages.predict.blend.blend_rows`) and writes each row of finished blocks
(``classes``, ``confidence``, optionally ``probabilities``) as soon as it is complete,
followed by that block's marker in the ``progress_predict`` layer. Tasks carry only a
small frozen :class:`BlockJob`; each worker process loads the model once, by path.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from segpipe.grid.tiling import Box, Forward
from segpipe.io.store import NODATA_U8, open_layer, read_region_info, write_block
from segpipe.models import load_verified
from segpipe.stages.predict.allocator import tune_allocator
from segpipe.stages.predict.blend import BlendStats, blend_rows, tta_forward
from segpipe.stages.predict.pixels import encode_probabilities, prepare_pixels

if TYPE_CHECKING:
    import torch
    import zarr
    from torch import nn

    from segpipe.models import ModelSpec

__all__ = ["PROGRESS_LAYER", "BlockJob", "run_block", "torch_forward", "usable_cores",
           "worker_host"]

PROGRESS_LAYER = "progress_predict"


@dataclass(frozen=True)
class BlockJob:
    """One box of store blocks to predict: small, hashable, cheap to ship in a task graph.

    Attributes:
        store: Region store location.
        model_dir: Model package directory (readable by every worker).
        model_hash: Expected package hash (the worker's model cache key).
        y0: Box start row (on a block border).
        x0: Box start column (on a block border).
        h: Box rows (whole blocks, or up to the raster's edge).
        w: Box columns.
        tile: Window size.
        overlap: Window overlap.
        batch_size: Windows per forward call (every call has this shape).
        blend: Blend mode (``cosine``, ``gaussian``, ``mean`` or ``crop``).
        tta: Average the 8 flips and rotations of every window.
        probabilities: Also write the per-class ``probabilities`` layer.
        blocks: (row, column) indices of the blocks to compute; empty = every block of
            the box. Others (finished earlier) are neither recomputed nor rewritten.
        threads: (host, cores) pairs: CPU cores for this task on each host, used as
            concurrent single-threaded forward streams.
        prefix: Where the run's layers are: ``""`` (the published ones) or
            ``"_predict/"`` (a new run's staging layers).
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
    blend: str = "cosine"
    tta: bool = False
    probabilities: bool = False
    blocks: tuple[tuple[int, int], ...] = ()
    threads: tuple[tuple[str, int], ...] = ()
    prefix: str = ""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a cgroup)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def worker_host(address: str) -> str:
    """Host part of a dask address (``tcp://10.0.0.5:4321`` -> ``10.0.0.5``)."""
    return address.split("://")[-1].rsplit(":", 1)[0]


def _cpu_streams(job: BlockJob) -> int:
    """Forward streams for this task: the cores the driver planned for it on this host.

    Torch runs single-threaded in each stream (dask workers start with one thread):
    independent single-threaded calls keep every core busy, where one call's threads
    would wait on each other at every layer.
    """
    try:
        from distributed import get_worker

        host = worker_host(get_worker().address)
    except (ImportError, ValueError):  # not inside a dask worker: one stream, torch's default threads
        return 1
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return max(1, dict(job.threads).get(host, 1))


@functools.lru_cache(maxsize=2)
def _model_for(model_dir: str, expected_hash: str) -> tuple[nn.Module, ModelSpec, torch.device]:
    """Load a package once per process; the hash in the key makes a changed package reload."""
    import torch

    net, spec, _ = load_verified(model_dir, expected_hash)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # A copy: the CPU network is shared with this process's package cache.
        net = copy.deepcopy(net).to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    # On CPU, dask workers start torch with OMP_NUM_THREADS=1; _cpu_streams gives each
    # task as many single-threaded forward streams as the driver planned cores for it.
    return net, spec, device


def torch_forward(net: nn.Module, device: torch.device) -> Forward:
    """A :data:`segpipe.grid.tiling.Forward` of a network: softmax probabilities as numpy.

    On CUDA, inputs go channels-last and run under bf16 (or fp16) autocast; softmax is
    taken in float32. Always under ``torch.inference_mode``.
    """
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




def _unfinished(progress: zarr.Array, blocks: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The blocks whose marker is not set, reading only the markers' bounding box."""
    ys, xs = [by for by, _ in blocks], [bx for _, bx in blocks]
    y0, x0 = min(ys), min(xs)
    marks = np.asarray(progress[y0 : max(ys) + 1, x0 : max(xs) + 1])
    return tuple((by, bx) for by, bx in blocks if not marks[by - y0, bx - x0])


def run_block(job: BlockJob) -> dict[str, float]:
    """Predict one box of blocks; write its layers and a marker per finished block.

    Runs on a dask worker (or in-process). A block row is written, then marked, as soon
    as the rolling blend has finished its rows, so a crash loses at most the block row
    in progress. Blocks already marked when the task starts (by an earlier attempt of
    this task, on a worker that died) are skipped, and only windows that reach the
    other blocks are computed.

    Returns:
        Stats: ``pixels`` (pixels written), ``valid`` (valid pixels written), ``blocks``
        (blocks written), ``skipped`` (blocks found already marked), ``windows`` (windows
        computed), ``slots`` (window slots of the forward calls, padding included),
        ``seconds`` (task time).
    """
    t0 = time.perf_counter()
    tune_allocator()  # dask's nanny settings make every activation tensor page-fault
    info = read_region_info(job.store)
    b = info.block_size
    progress = open_layer(job.store, job.prefix + PROGRESS_LAYER, mode="r+")
    # Markers are re-read at task start: when dask reruns this task after its worker
    # died, the blocks that worker finished are neither recomputed nor rewritten.
    planned = job.blocks or tuple(
        (by, bx) for by in range(job.y0 // b, -(-(job.y0 + job.h) // b))
        for bx in range(job.x0 // b, -(-(job.x0 + job.w) // b))
    )
    blocks = _unfinished(progress, planned)
    if not blocks:
        return {"pixels": 0, "valid": 0, "blocks": 0, "skipped": len(planned), "windows": 0,
                "slots": 0, "seconds": time.perf_counter() - t0}
    net, spec, device = _model_for(job.model_dir, job.model_hash)
    streams = _cpu_streams(job) if device.type == "cpu" else 1
    forward = torch_forward(net, device)
    forward = tta_forward(forward) if job.tta else forward
    boxes = {
        (by, bx): Box(by * b, bx * b, min((by + 1) * b, info.height), min((bx + 1) * b, info.width))
        for by, bx in blocks
    }
    image = open_layer(job.store, "image")

    def read(box: Box) -> tuple[np.ndarray, np.ndarray]:
        return prepare_pixels(np.asarray(image[:, box.y0 : box.y1, box.x0 : box.x1]), info.nodata, spec)

    names = ("classes", "confidence", *(("probabilities",) if job.probabilities else ()))
    layers = {name: open_layer(job.store, job.prefix + name, mode="r+") for name in names}
    values = np.array([c.value for c in spec.classes], dtype=np.uint8)
    box = Box(job.y0, job.x0, job.y0 + job.h, job.x0 + job.w)
    out = {name: np.full((*layer.shape[:-2], job.h, job.w), NODATA_U8, dtype=np.uint8)
           for name, layer in layers.items()}
    stats = BlendStats()
    todo = sorted(boxes.items(), key=lambda kv: kv[1].y1)
    written = valid_written = 0
    for band in blend_rows(read, forward, job.tile, job.overlap, (info.height, info.width), box,
                           job.batch_size, True, job.blend, list(boxes.values()), stats, streams):
        r0, r1 = band.y0 - job.y0, band.y0 - job.y0 + band.valid.shape[0]
        if band.probs is not None:
            for name, rows in encode_probabilities(band.probs, band.valid, values, job.probabilities).items():
                out[name][..., r0:r1, :] = rows
        # Blocks whose rows are all finished: write them, then mark them done.
        while todo and todo[0][1].y1 <= band.y0 + band.valid.shape[0]:
            (by, bx), bb = todo.pop(0)
            sl = (slice(bb.y0 - job.y0, bb.y1 - job.y0), slice(bb.x0 - job.x0, bb.x1 - job.x0))
            for name, layer in layers.items():
                write_block(layer, bb.y0, bb.x0, out[name][(Ellipsis, *sl)], b)
            progress[by, bx] = 1
            written += (bb.y1 - bb.y0) * (bb.x1 - bb.x0)
            valid_written += int((out["classes"][sl] != NODATA_U8).sum())
    return {
        "pixels": written,
        "valid": valid_written,
        "blocks": len(boxes),
        "skipped": len(planned) - len(boxes),
        "windows": stats.windows,
        "slots": stats.slots,
        "seconds": time.perf_counter() - t0,
    }
