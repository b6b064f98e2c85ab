"""Predict: classify every pixel of a region store on a Dask cluster, seamlessly and resumably.

The driver (:func:`predict`) pre-creates the output layers as Zarr templates, groups
store blocks into tasks large enough that few windows are computed twice at task
borders (:func:`segpipe.grid.plan.plan_superblocks`), and maps
:func:`segpipe.stages.predict.worker.run_block` over the tasks that still have unfinished blocks.
Windows lie on the raster's global grid and are blended (:mod:`segpipe.stages.predict.blend`), so the
result does not depend on the blocking, the plan or the cluster. A per-block marker in
the ``progress_predict`` layer lets a rerun skip finished blocks.

Before anything is written or a cluster started, every input is checked
(:func:`check_predict_inputs`: the store, the whole model package with its weights
loaded, bands, window settings). A new result is staged in the store's hidden
``_predict`` group, under a lock that refuses a concurrent predict, and published over
the earlier result only once complete (:mod:`segpipe.io.runs`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from segpipe.errors import InputError, StoreBusyError, StoreError
from segpipe.grid.plan import plan_superblocks
from segpipe.grid.tiling import check_blend, window_starts
from segpipe.io.remote import is_remote
from segpipe.io.runs import STAGING, RunLock, acquire_lock, finish_promotion, has_staged_progress, promote
from segpipe.io.store import NODATA_U8, RegionInfo, create_layer, open_layer, read_region_info
from segpipe.models import check_bands, model_hash, read_spec, validate_package
from segpipe.models.forest import default_overlap as forest_overlap
from segpipe.models.networks import CLASSICAL_ARCHITECTURES
from segpipe.stages.predict.worker import PROGRESS_LAYER, BlockJob, run_block, usable_cores, worker_host
from segpipe.types import classes_to_json

if TYPE_CHECKING:
    import distributed

    from segpipe.models import ModelSpec

__all__ = [
    "PROGRESS_LAYER",
    "BlockJob",
    "PredictInputs",
    "PredictSummary",
    "check_predict_inputs",
    "choose_batch_size",
    "predict",
    "pending_blocks",
    "run_block",
]

log = logging.getLogger(__name__)

# Every task's output buffers are uint8 over its box; the float accumulator is rolling.
MAX_TASK_PIXELS = 2048 * 2048
# Default windows per forward call. GPUs want large batches. On one CPU core the time
# per 256 px window is flat from 2 to 7 windows per call (about 5 % more at 1, 30 % more
# at 8, measured on U-Net/ResNet-18), so CPU calls stay small: a task's calls then spread
# evenly over its single-threaded streams, where 5 calls of 5 left one of 2 streams a
# third call alone (see docs/benchmarks.md).
GPU_BATCH = 8
CPU_BATCH = 2
# Larger windows cost GBs of activations each (a 100,000 px tile asked for 112 GiB).
MAX_TILE = 4096


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
        slots: Window slots of all forward calls (windows plus batch padding).
        tasks: Dask tasks run.
        batch_size: Windows per forward call used.
        task_blocks: Blocks per task along (y, x) chosen by the plan.
    """

    blocks_total: int
    blocks_done: int
    blocks_skipped: int
    pixels: int
    seconds: float
    windows: int
    tile_size: int = 0
    overlap: int = 0
    slots: int = 0
    tasks: int = 0
    batch_size: int = 0
    task_blocks: tuple[int, int] = (1, 1)


def choose_batch_size(n_windows: int, most: int) -> int:
    """Windows per forward call: at most ``most``, padding the raster's windows least.

    Every call has one shape (bitwise reproducibility), so a short last batch is padded
    with zero windows. Among ``ceil(most / 2)`` to ``most`` (but not 1 unless ``most``
    is 1: single-window calls cost more per window), the size whose batches hold the
    raster's ``n_windows`` with the fewest padded slots wins (larger on ties). It
    depends only on the raster and the settings, never on the blocking.
    """
    if most < 1:
        raise InputError(f"batch size {most} must be at least 1")
    if n_windows <= most:
        return max(1, n_windows)
    least = min(most, max(2, (most + 1) // 2))
    return min(range(least, most + 1), key=lambda bs: (-(-n_windows // bs) * bs, -bs))


def _model_location(model_dir: str | Path) -> str:
    """Where every worker finds the package: an absolute path, or the ``s3://`` URL as given."""
    return str(model_dir).rstrip("/") if is_remote(model_dir) else str(Path(model_dir).resolve())


def _settings(
    spec: ModelSpec, tile_size: int | None, overlap: int | None, blend: str = "cosine"
) -> tuple[int, int]:
    """Window size and overlap for a package: the defaults filled in, every value checked.

    Raises:
        InputError: A tile that is not a positive multiple of the network's stride or is
            over :data:`MAX_TILE`, an overlap outside ``[0, tile)``, or an unknown blend mode.
    """
    stride = spec.output_stride
    tile = tile_size if tile_size is not None else max(256, -(-spec.chip_size // stride) * stride)
    if tile <= 0 or tile % stride:
        raise InputError(f"tile size {tile} must be a positive multiple of {stride} (the network's stride)")
    if tile > MAX_TILE:
        raise InputError(
            f"tile size {tile} is larger than {MAX_TILE} px: a window that large needs gigabytes per "
            "forward call and gains no context; use 256-1024"
        )
    # A forest's need follows its context window; networks overlap a quarter of the tile.
    default = forest_overlap(spec.options) if spec.arch in CLASSICAL_ARCHITECTURES else tile // 4
    ov = default if overlap is None else overlap
    check_blend(tile, ov, blend)
    return tile, ov


def _resume_key(mhash: str, tile: int, overlap: int, blend: str, tta: bool) -> dict[str, Any]:
    """What progress markers and outputs are tagged with: a rerun resumes only on an equal key."""
    return {"model_hash": mhash, "tile": tile, "overlap": overlap, "blend": blend, "tta": tta}


def _markers(
    store: str, blocks: tuple[int, int], key: dict[str, Any], probabilities: bool, prefix: str = ""
) -> np.ndarray | None:
    """The done markers of layers under ``prefix`` made with ``key``, or None (absent or another run's)."""
    try:
        progress = open_layer(store, prefix + PROGRESS_LAYER)
        layers = [open_layer(store, prefix + name)
                  for name in ("classes", "confidence", *(("probabilities",) if probabilities else ()))]
    except StoreError:
        return None
    if progress.shape != blocks or any(
        a.attrs.get(k) != v for a in (progress, *layers) for k, v in key.items()
    ):
        return None
    return np.asarray(progress[...]).astype(bool)


def _prepare_layers(
    store: str,
    spec: ModelSpec,
    blocks: tuple[int, int],
    key: dict[str, Any],
    force: bool,
    probabilities: bool = False,
    prefix: str = "",
) -> np.ndarray:
    """Create (or keep, to resume) output and progress layers under ``prefix``; return the done markers."""
    if not force:
        markers = _markers(store, blocks, key, probabilities, prefix)
        if markers is not None:
            return markers
    # Progress is cleared before outputs are replaced, so a crash in between never
    # leaves "done" markers over empty outputs.
    zarr.open_group(store, mode="r+").create_array(
        prefix + PROGRESS_LAYER, shape=blocks, dtype="uint8", chunks=(1, 1), fill_value=0,
        dimension_names=["block_y", "block_x"], attributes=key, overwrite=True,
    )
    classes_json = classes_to_json(spec.classes)
    classes_attrs = {**key, "long_name": "class", "classes": classes_json}
    create_layer(store, prefix + "classes", "uint8", NODATA_U8, attributes=classes_attrs, overwrite=True)
    conf_attrs = {**key, "long_name": "confidence", "units": "percent"}
    create_layer(store, prefix + "confidence", "uint8", NODATA_U8, attributes=conf_attrs, overwrite=True)
    if probabilities:
        prob_attrs = {**key, "long_name": "class probability", "units": "percent", "classes": classes_json}
        create_layer(store, prefix + "probabilities", "uint8", NODATA_U8,
                     leading=(("class", len(spec.classes)),), attributes=prob_attrs, overwrite=True)
    return np.zeros(blocks, dtype=bool)


@dataclass(frozen=True)
class PredictInputs:
    """Everything :func:`predict` checked before touching the store or a cluster.

    Attributes:
        store: Store location as workers open it.
        info: The region.
        spec: The model package's description (its weights loaded once, to check them).
        model_dir: The package as every worker finds it.
        key: The run's identity: model hash and window settings.
        tile: Window size.
        overlap: Window overlap.
        n_windows: Windows of the whole raster (for the batch size).
        batch_size: Most windows per forward call asked for, or None (by the cluster).
        probabilities: Whether the ``probabilities`` layer is wanted.
    """

    store: str
    info: RegionInfo
    spec: ModelSpec
    model_dir: str
    key: dict[str, Any]
    tile: int
    overlap: int
    n_windows: int
    batch_size: int | None
    probabilities: bool


def check_predict_inputs(
    store: str | Path,
    model_dir: str | Path,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    blend: str = "cosine",
    tta: bool = False,
    probabilities: bool = False,
) -> PredictInputs:
    """Check a predict run's inputs without writing anything or starting a cluster.

    The store must be readable, the model package valid in full (its weights are
    loaded into the network, once per process and package), its bands those of the
    image, and the window settings usable.

    Returns:
        The checked inputs.

    Raises:
        MissingInputError: The store does not exist.
        StoreError: The store is not a region store.
        ModelPackageError: The package is incomplete or invalid (the message names the
            file and the field).
        BandMismatchError: The image's bands differ from the model's.
        InputError: Bad tile size, overlap, batch size or blend mode.
    """
    store_s = str(store) if "://" in str(store) else str(Path(store).resolve())
    info = read_region_info(store_s)
    mdir = _model_location(model_dir)
    spec, mhash = validate_package(mdir)
    check_bands(spec, info.band_names)
    tile, ov = _settings(spec, tile_size, overlap, blend)
    stride = tile - ov
    n_global = len(window_starts(info.height, tile, stride)) * len(window_starts(info.width, tile, stride))
    if batch_size is not None:
        choose_batch_size(n_global, batch_size)  # a bad value fails before any write
    key = _resume_key(mhash, tile, ov, blend, tta)
    return PredictInputs(store_s, info, spec, mdir, key, tile, ov, n_global, batch_size, probabilities)


def _published(inputs: PredictInputs, force: bool) -> np.ndarray | None:
    """Markers of published layers made with this run's key (None: none, or ``force``)."""
    return None if force else _markers(inputs.store, inputs.info.blocks, inputs.key, inputs.probabilities)


def _target(inputs: PredictInputs, force: bool, published: np.ndarray | None) -> tuple[str, np.ndarray]:
    """Where this run writes (a layer name prefix) and the blocks already finished there.

    Published layers made with the same key (``published``, from :func:`_published`)
    are the result itself: complete, nothing is left to do; partial (a store written in
    place by an older segpipe, or edited), they resume in place, as nothing complete can
    be lost there. Anything else is a new result, staged beside the published one until
    it is complete.
    """
    if published is not None:
        return "", published
    prefix = f"{STAGING}/"
    done = _prepare_layers(inputs.store, inputs.spec, inputs.info.blocks, inputs.key, force,
                           inputs.probabilities, prefix)
    return prefix, done


@dataclass(frozen=True)
class _ClusterLayout:
    """Task slots of a cluster, whether tasks need a ``GPU`` resource, and its CPU hosts.

    Attributes:
        slots: Tasks that can run at once (GPUs, or worker threads on CPU clusters).
        gpu: Tasks must land on GPU workers.
        hosts: (host, cores, worker threads) of each CPU host.
    """

    slots: int
    gpu: bool
    hosts: tuple[tuple[str, int, int], ...] = ()

    def threads(self, n_tasks: int) -> tuple[tuple[str, int], ...]:
        """Torch threads per task on each host when ``n_tasks`` tasks share the cluster.

        A CPU host's cores are shared among the prediction tasks that can run on it at
        once: with fewer tasks than worker threads, each task gets more torch threads.
        """
        threads = []
        for host, n_cores, n_slots in self.hosts:
            concurrent = max(1, min(n_slots, math.ceil(n_tasks * n_slots / self.slots)))
            threads.append((host, max(1, n_cores // concurrent)))
        return tuple(threads)


def _cluster_layout(client: distributed.Client) -> _ClusterLayout:
    """Ask the scheduler (and, on CPU clusters, every worker's core count) once."""
    workers: dict[str, Any] = client.scheduler_info(n_workers=-1).get("workers", {})
    gpus = sum(int((w.get("resources") or {}).get("GPU", 0)) for w in workers.values())
    if gpus:
        return _ClusterLayout(gpus, True)
    slots = max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
    cores: dict[str, int] = client.run(usable_cores)
    per_host: dict[str, tuple[int, int]] = {}
    for addr, w in workers.items():
        host = worker_host(addr)
        n_cores, n_slots = per_host.get(host, (0, 0))
        per_host[host] = (max(n_cores, int(cores.get(addr) or 1)), n_slots + int(w.get("nthreads", 1)))
    return _ClusterLayout(slots, False, tuple((h, c, n) for h, (c, n) in sorted(per_host.items())))


def predict(
    store: str | Path,
    model_dir: str | Path,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    client: distributed.Client | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    blend: str = "cosine",
    tta: bool = False,
    probabilities: bool = False,
    max_task_pixels: int = MAX_TASK_PIXELS,
    scheduler: str | None = None,
) -> PredictSummary:
    """Classify every pixel of a region store with a model package.

    Writes ``classes`` (class values, 255 = nodata) and ``confidence`` (0-100 %, 255 =
    nodata) into the store, and with ``probabilities`` a (class, y, x) layer of per-class
    probabilities (0-100 %, 255 = nodata). Finished blocks are marked, so a rerun with
    the same model and settings resumes where the last one stopped.

    Every input is checked first (:func:`check_predict_inputs`), then the store is
    locked against other predict runs (:func:`segpipe.io.runs.acquire_lock`). A new
    result is written into the hidden ``_predict`` group and published only when every
    block is finished (:func:`segpipe.io.runs.promote`): an error or a kill leaves the
    earlier complete result readable and unchanged.

    Args:
        store: Region store (from ``segpipe ingest``).
        model_dir: Model package directory readable by every worker, or its ``s3://``
            URL (each machine fetches it once, see :mod:`segpipe.models.fetch`).
        tile_size: Window size; default: the model's chip size rounded up to a multiple
            of 32, at least 256.
        overlap: Overlap between windows; default: a quarter of the tile; for a
            random_forest none, or with a context window K, 4 * (K // 2) pixels.
        batch_size: Most windows per forward call (see :func:`choose_batch_size`);
            default 8 on GPU workers, 2 on CPU workers.
        client: Dask client; default: a cluster from :func:`segpipe.cluster.get_client`
            (started or joined only after every input is checked).
        force: Recompute every block even if marked finished.
        progress: Called as ``progress(done, total)`` in blocks after each task.
        blend: ``cosine`` (default), ``gaussian``, ``mean`` or ``crop``.
        tta: Average each window over its 8 flips and rotations (8x the compute).
        probabilities: Also write the ``probabilities`` layer.
        max_task_pixels: Largest area one task covers.
        scheduler: Scheduler address to join when no ``client`` is given (default:
            ``SEGPIPE_SCHEDULER``, else a local cluster).

    Returns:
        A summary of the run.

    Raises:
        ModelPackageError: An invalid package (before any write or cluster).
        BandMismatchError: The image's bands differ from the model's (before any write).
        InputError: Bad tile size, overlap, batch size or blend mode.
        StoreBusyError: Another predict run holds the store.
    """
    t0 = time.perf_counter()
    inputs = check_predict_inputs(store, model_dir, tile_size, overlap, batch_size, blend, tta, probabilities)
    with acquire_lock(inputs.store, inputs.key["model_hash"]) as lock, contextlib.ExitStack() as stack:
        finish_promotion(inputs.store)
        published = _published(inputs, force)
        # The cluster comes up before any layer is staged: a scheduler that cannot be
        # reached leaves the store exactly as it was.
        if client is None and not (published is not None and published.all()):
            from segpipe.cluster import get_client

            client = stack.enter_context(get_client(scheduler))
        prefix, done = _target(inputs, force, published)
        total, skipped = int(done.size), int(done.sum())
        if progress is not None:
            progress(skipped, total)
        run = _Run()
        if skipped < total:
            assert client is not None  # work is left, so the cluster was started above
            run = _run_tasks(client, inputs, prefix, done, max_task_pixels, progress)
        if prefix:
            _publish(inputs, prefix, lock)
    seconds = time.perf_counter() - t0
    skipped += run.skipped
    log.info("predicted %d blocks in %d tasks (%d skipped) in %.1f s",
             run.blocks, run.tasks, skipped, seconds)
    return PredictSummary(total, run.blocks, skipped, run.pixels, seconds, run.windows, inputs.tile,
                          inputs.overlap, run.slots, run.tasks, run.batch_size, run.plan)


@dataclass
class _Run:
    """Counters of the tasks one predict run ran."""

    pixels: int = 0
    windows: int = 0
    slots: int = 0
    blocks: int = 0
    skipped: int = 0
    tasks: int = 0
    batch_size: int = 0
    plan: tuple[int, int] = (1, 1)


def _jobs(inputs: PredictInputs, prefix: str, done: np.ndarray, layout: _ClusterLayout, bs: int,
          plan: tuple[int, int]) -> list[BlockJob]:
    """One job per group of ``plan`` blocks that still has unfinished blocks."""
    info = inputs.info
    b = info.block_size
    groups = []
    for sy in range(0, info.blocks[0], plan[0]):
        for sx in range(0, info.blocks[1], plan[1]):
            todo = [(by, bx) for by in range(sy, min(sy + plan[0], info.blocks[0]))
                    for bx in range(sx, min(sx + plan[1], info.blocks[1])) if not done[by, bx]]
            if todo:
                groups.append(todo)
    threads = layout.threads(len(groups))
    jobs = []
    for todo in groups:
        ys, xs = [t[0] for t in todo], [t[1] for t in todo]
        y0, x0 = min(ys) * b, min(xs) * b
        y1, x1 = min((max(ys) + 1) * b, info.height), min((max(xs) + 1) * b, info.width)
        key = inputs.key
        jobs.append(BlockJob(inputs.store, inputs.model_dir, key["model_hash"], y0, x0, y1 - y0, x1 - x0,
                             inputs.tile, inputs.overlap, bs, key["blend"], key["tta"], inputs.probabilities,
                             tuple(todo), threads, prefix))
    return jobs


def _run_tasks(
    client: distributed.Client,
    inputs: PredictInputs,
    prefix: str,
    done: np.ndarray,
    max_task_pixels: int,
    progress: Callable[[int, int], None] | None,
) -> _Run:
    """Map :func:`run_block` over the unfinished blocks; raise the first task's error."""
    from distributed import as_completed

    info = inputs.info
    layout = _cluster_layout(client)
    most = inputs.batch_size if inputs.batch_size is not None else GPU_BATCH if layout.gpu else CPU_BATCH
    run = _Run(batch_size=choose_batch_size(inputs.n_windows, most))
    run.plan = plan_superblocks(info.height, info.width, info.block_size, inputs.tile,
                                inputs.tile - inputs.overlap, layout.slots, max_task_pixels)
    jobs = _jobs(inputs, prefix, done, layout, run.batch_size, run.plan)
    run.tasks = len(jobs)
    skipped, total = int(done.sum()), int(done.size)
    # In a mixed cluster, the GPU resource keeps prediction on the GPU workers.
    resources = {"GPU": 1} if layout.gpu else None
    futures = client.map(run_block, jobs, pure=False, resources=resources)
    try:
        for future in as_completed(futures, loop=client.loop):
            stats = future.result()
            run.pixels += int(stats["pixels"])
            run.windows += int(stats["windows"])
            run.slots += int(stats["slots"])
            run.blocks += int(stats["blocks"])
            # Blocks marked after the plan was made (by a task of an interrupted run that
            # was still running, or an earlier attempt of this task) count as skipped.
            run.skipped += int(stats.get("skipped", 0))
            if progress is not None:
                progress(skipped + run.skipped + run.blocks, total)
    except BaseException:
        # A failed task or an interrupted driver: queued tasks are dropped; blocks
        # already marked stay done for the next run.
        client.cancel(futures)
        raise
    return run


def _publish(inputs: PredictInputs, prefix: str, lock: RunLock) -> None:
    """Publish the staged result once every block is marked (re-read from the store, not counted)."""
    markers = _markers(inputs.store, inputs.info.blocks, inputs.key, inputs.probabilities, prefix)
    if markers is None or not markers.all():
        missing = "no layers" if markers is None else f"{int((~markers).sum())} unfinished blocks"
        raise StoreError(f"the new predictions of {inputs.store} have {missing}; the earlier result is kept: "
                         "rerun predict to finish them")
    if not lock.still_held():
        raise StoreBusyError(
            f"the lock of {inputs.store} was taken over by another run while this one ran (its heartbeat "
            "stopped for too long); this run's result is not published: rerun predict when the other ends"
        )
    promote(inputs.store, inputs.key)


def pending_blocks(
    store: str | Path,
    model_dir: str | Path,
    tile_size: int | None = None,
    overlap: int | None = None,
    blend: str = "cosine",
    tta: bool = False,
    probabilities: bool = False,
) -> tuple[int, int]:
    """Blocks a :func:`predict` run with these arguments would still compute, without a cluster.

    Reads the progress markers with the rule :func:`predict` uses: the published
    layers when they were made with the same model and window settings, else the
    staged ones of an unfinished run with them; otherwise every block is pending. A
    staged result whose publication a crash cut short is published first (unless
    another run holds the store), as :func:`predict` would.

    Args:
        store: Region store.
        model_dir: Model package directory.
        tile_size: Window size, as given to :func:`predict`.
        overlap: Window overlap, as given to :func:`predict`.
        blend: Blend mode, as given to :func:`predict`.
        tta: Test-time augmentation, as given to :func:`predict`.
        probabilities: Whether the ``probabilities`` layer is wanted too.

    Returns:
        ``(pending, total)`` blocks.

    Raises:
        InputError: Bad tile size or overlap.
        ModelPackageError: An invalid package.
    """
    store_s = str(store) if "://" in str(store) else str(Path(store).resolve())
    info = read_region_info(store_s)
    spec = read_spec(model_dir)
    tile, ov = _settings(spec, tile_size, overlap)
    key = _resume_key(model_hash(_model_location(model_dir)), tile, ov, blend, tta)
    total = int(info.blocks[0] * info.blocks[1])
    if has_staged_progress(store_s):  # perhaps a publication cut short: finish it, as predict would
        with contextlib.suppress(StoreBusyError), acquire_lock(store_s, key["model_hash"]):
            finish_promotion(store_s)
    markers = _markers(store_s, info.blocks, key, probabilities)
    if markers is None:
        markers = _markers(store_s, info.blocks, key, probabilities, f"{STAGING}/")
    return (total if markers is None else total - int(markers.sum())), total
