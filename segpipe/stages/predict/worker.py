"""The worker side of prediction: one task predicts one box of store blocks.

:func:`run_block` reads its windows plus halo straight from the store's ``image``, a
window row at a time, runs batched forward passes, blends them with a rolling
accumulator (:func:`segpipe.stages.predict.blend.blend_rows`) and writes each row of finished blocks
(``classes``, ``confidence``, optionally ``probabilities``) as soon as it is complete,
followed by that block's marker in the progress layer. Tasks carry only a small frozen
:class:`segpipe.stages.predict.jobs.BlockJob`; each worker process loads the model once, by path.
"""

from __future__ import annotations

import copy
import functools
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from segpipe.grid.box import Box
from segpipe.grid.tiling import Forward
from segpipe.io.store import NODATA_U8, RegionInfo, open_layer, read_region_info, write_block
from segpipe.models import load_verified
from segpipe.models.loading import load_network
from segpipe.models.onnx import OnnxNetwork
from segpipe.stages.predict.allocator import tune_allocator
from segpipe.stages.predict.blend import BlendStats, RowBand, blend_rows, tta_forward
from segpipe.stages.predict.jobs import BlockJob, Blocks, blocks_box
from segpipe.stages.predict.pixels import encode_probabilities, prepare_pixels
from segpipe.stages.predict.rows import RowSlab
from segpipe.waves import task_cancelled

if TYPE_CHECKING:
    import torch
    import zarr
    from torch import nn

    from segpipe.models import ModelSpec

__all__ = [
    "LoadedForward",
    "cached_forward",
    "cached_model",
    "onnx_forward",
    "run_block",
    "torch_forward",
    "worker_host",
]


def worker_host(address: str) -> str:
    """Host part of a dask address (``tcp://10.0.0.5:4321`` -> ``10.0.0.5``)."""
    return address.split("://")[-1].rsplit(":", 1)[0]


def _cpu_streams(job: BlockJob, uses_torch: bool = True) -> int:
    """Forward streams for this task: the cores the driver planned for it on this host.

    Torch runs single-threaded in each stream (dask workers start with one thread):
    independent single-threaded calls keep every core busy, where one call's threads
    would wait on each other at every layer. (An ONNX network's session is made
    single-threaded in a dask worker when it is loaded: segpipe.models.onnx.load_onnx.)
    """
    try:
        from distributed import get_worker

        host = worker_host(get_worker().address)
    except (ImportError, ValueError):  # not inside a dask worker: one stream, torch's default threads
        return 1
    if uses_torch:
        import torch

        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
    return max(1, dict(job.threads).get(host, 1))


@functools.lru_cache(maxsize=2)
def cached_model(model_dir: str, expected_hash: str) -> tuple[nn.Module, ModelSpec, torch.device]:
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


def onnx_forward(net: OnnxNetwork) -> Forward:
    """A :data:`segpipe.grid.tiling.Forward` of an ONNX network: softmax probabilities, float32 numpy.

    The same contract as :func:`torch_forward`, without torch: onnxruntime gives the
    logits, the softmax (over classes, max subtracted for stability) is numpy's.
    """

    def forward(batch: np.ndarray) -> np.ndarray:
        logits = net(batch).astype(np.float32, copy=False)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs: np.ndarray = e / e.sum(axis=1, keepdims=True)
        return probs

    return forward


class LoadedForward(NamedTuple):
    """What prediction runs for a package (see :func:`cached_forward`).

    Attributes:
        forward: (N, bands, H, W) normalised pixels -> (N, classes, H, W) probabilities.
        spec: The package's description.
        on_cpu: Whether it runs on the CPU (then in as many streams as the task has cores).
        uses_torch: Whether torch runs it (False: onnxruntime).
    """

    forward: Forward
    spec: ModelSpec
    on_cpu: bool
    uses_torch: bool


@functools.lru_cache(maxsize=2)
def cached_forward(model_dir: str, expected_hash: str) -> LoadedForward:
    """A package's probabilities forward, from torch weights or an ONNX file, once per process.

    The one place prediction turns a package into the function it runs: an ONNX package
    (``weights_format`` ``onnx``) runs through onnxruntime with no torch call, a torch
    package through :func:`cached_model` and :func:`torch_forward`.
    """
    net, spec, _ = load_network(model_dir, expected_hash)
    if isinstance(net, OnnxNetwork):
        return LoadedForward(onnx_forward(net), spec, net.on_cpu, False)
    torch_net, spec, device = cached_model(model_dir, expected_hash)
    return LoadedForward(torch_forward(torch_net, device), spec, device.type == "cpu", True)


def _unfinished(progress: zarr.Array[Any], blocks: Blocks) -> Blocks:
    """The blocks whose marker is not set, reading only the markers' bounding box."""
    ys, xs = [by for by, _ in blocks], [bx for _, bx in blocks]
    y0, x0 = min(ys), min(xs)
    marks = np.asarray(progress[y0 : max(ys) + 1, x0 : max(xs) + 1])
    return tuple((by, bx) for by, bx in blocks if not marks[by - y0, bx - x0])


def _box_blocks(box: Box, block_size: int) -> Blocks:
    """Every block of a box that lies on block borders."""
    b = block_size
    rows, cols = range(box.y0 // b, -(-box.y1 // b)), range(box.x0 // b, -(-box.x1 // b))
    return tuple((by, bx) for by in rows for bx in cols)


class _CancelledError(Exception):
    """The task was cancelled (its run failed or stopped): it writes no further block."""


class _BlockWriter:
    """A task's encoded rows, one block row at a time; each block is written, then marked done, once finished.

    Only the block row in progress is held (a task's rows arrive top to bottom and its box
    is whole blocks), so a task's output buffers do not grow with its height.

    Attributes:
        targets: The boxes of the blocks to write (the parts of the task's box needed).
        pixels: Pixels written.
        valid: Pixels with data written.
    """

    def __init__(
        self, job: BlockJob, info: RegionInfo, spec: ModelSpec, blocks: Blocks, progress: zarr.Array[Any]
    ) -> None:
        s = job.settings
        self.box = job.box
        self.block_size = info.block_size
        self.progress = progress
        self.probabilities = s.probabilities
        self.values = np.array([c.value for c in spec.classes], dtype=np.uint8)
        # Stored even when a chunk is all nodata: zarr would otherwise compare every chunk
        # with the fill value before writing it (2-3 % of a worker's time with a free model).
        self.layers = {name: open_layer(s.store, path, mode="r+").with_config({"write_empty_chunks": True})
                       for name, path in s.layers.data(s.probabilities).items()}
        self._top = job.box.y0  # global row of the buffers' first row: a block row's top
        rows = min(job.box.h, info.block_size)
        self.out = {name: np.full((*layer.shape[:-2], rows, job.box.w), NODATA_U8, dtype=np.uint8)
                    for name, layer in self.layers.items()}
        raster = (info.height, info.width)
        boxes = [(block, blocks_box((block,), info.block_size, raster)) for block in blocks]
        self.targets = [bb for _, bb in boxes]
        self._todo = sorted(boxes, key=lambda kv: kv[1].y1)  # in the order their rows finish
        self.pixels = self.valid = 0

    def add(self, band: RowBand) -> None:
        """Encode finished rows; write and mark the blocks they complete."""
        start, end = band.y0, band.y0 + band.valid.shape[0]
        while start < end:
            stop = min(end, self._top + self.block_size)  # the part of the band in this block row
            if band.probs is not None:
                a, b = start - band.y0, stop - band.y0
                encoded = encode_probabilities(band.probs[:, a:b], band.valid[a:b], self.values,
                                               self.probabilities)
                for name, rows in encoded.items():
                    self.out[name][..., start - self._top : stop - self._top, :] = rows
            while self._todo and self._todo[0][1].y1 <= stop:
                self._write(*self._todo.pop(0))
            if stop == self._top + self.block_size:  # the block row is complete: start the next
                self._top = stop
                for buffer in self.out.values():
                    buffer.fill(NODATA_U8)
            start = stop

    def _write(self, block: tuple[int, int], bb: Box) -> None:
        if task_cancelled():  # the run that sent this task has failed: write nothing more
            raise _CancelledError
        sl = (slice(bb.y0 - self._top, bb.y1 - self._top), slice(bb.x0 - self.box.x0, bb.x1 - self.box.x0))
        for name, layer in self.layers.items():
            write_block(layer, bb.y0, bb.x0, self.out[name][(Ellipsis, *sl)], self.block_size)
        self.progress[block] = 1  # after the data: a marker never stands over an unwritten block
        self.pixels += bb.h * bb.w
        self.valid += int((self.out["classes"][sl] != NODATA_U8).sum())


def _predict_blocks(
    job: BlockJob, info: RegionInfo, blocks: Blocks, progress: zarr.Array[Any]
) -> dict[str, int]:
    """Blend the windows reaching ``blocks`` and write them; return the pixel and window counts."""
    s = job.settings
    loaded = cached_forward(s.model_dir, s.model_hash)
    spec = loaded.spec
    streams = _cpu_streams(job, loaded.uses_torch) if loaded.on_cpu else 1
    forward = tta_forward(loaded.forward) if s.tta else loaded.forward
    image = open_layer(s.store, "image")

    def read(box: Box) -> tuple[np.ndarray, np.ndarray]:
        return prepare_pixels(np.asarray(image[(slice(None), *box.slices)]), info.nodata, spec)

    rows = RowSlab(read, image.chunks[1], info.height)
    writer = _BlockWriter(job, info, spec, blocks, progress)
    stats = BlendStats()
    for band in blend_rows(rows, forward, s.tile, s.overlap, (info.height, info.width), job.box, s.batch_size,
                           True, s.blend, writer.targets, stats, streams, s.margin):
        writer.add(band)
    return {"pixels": writer.pixels, "valid": writer.valid, "windows": stats.windows, "slots": stats.slots}


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
    s = job.settings
    info = read_region_info(s.store)
    progress = open_layer(s.store, s.layers.progress, mode="r+")
    # Markers are re-read at task start: when dask reruns this task after its worker
    # died, the blocks that worker finished are neither recomputed nor rewritten.
    planned = job.blocks or _box_blocks(job.box, info.block_size)
    blocks = _unfinished(progress, planned)
    done = {"pixels": 0, "valid": 0, "windows": 0, "slots": 0}
    if blocks:
        try:
            done = _predict_blocks(job, info, blocks, progress)
        except _CancelledError:  # nobody reads a cancelled task's stats: stop quietly
            return {"cancelled": 1, "seconds": time.perf_counter() - t0}
    return {**done, "blocks": len(blocks), "skipped": len(planned) - len(blocks),
            "seconds": time.perf_counter() - t0}
