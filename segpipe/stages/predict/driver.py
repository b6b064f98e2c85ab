"""Predict: classify every pixel of a region store on a Dask cluster, seamlessly and resumably.

The driver (:func:`predict`) pre-creates the output layers as Zarr templates
(:mod:`segpipe.stages.predict.results`), groups store blocks into tasks large enough
that few windows are computed twice at task borders
(:func:`segpipe.grid.plan.plan_superblocks`, :func:`segpipe.stages.predict.jobs.iter_jobs`),
and runs :func:`segpipe.stages.predict.worker.run_block` over the tasks that still have
unfinished blocks (:mod:`segpipe.stages.predict.execute`: on a cluster, or in process).
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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.errors import InputError, StoreBusyError
from segpipe.grid.plan import plan_superblocks
from segpipe.grid.tiling import check_blend, grown, window_count
from segpipe.io.outside import publish_metadata
from segpipe.io.remote import is_remote
from segpipe.io.runs import PROGRESS_LAYER, acquire_lock, finish_promotion, has_staged_progress
from segpipe.io.store import RegionInfo, read_region_info
from segpipe.models import check_bands, model_hash, read_spec
from segpipe.models.catalog import default_overlap as forest_overlap
from segpipe.models.package import check_resolution
from segpipe.models.verify import verify_package
from segpipe.stages.predict.execute import (
    LOCAL_SCHEDULERS,
    cluster_layout,
    local_layout,
    run_in_process,
    run_on_cluster,
)
from segpipe.stages.predict.jobs import BlockJob, ClusterLayout, JobSettings, count_jobs, iter_jobs
from segpipe.stages.predict.outputs import DEFAULT_LAYERS, DEFAULT_OUTPUT, OutputLayers, output_layers
from segpipe.stages.predict.results import prepare_layers, publish, read_markers
from segpipe.stages.predict.views import choose_tta, parts, per_pixel

if TYPE_CHECKING:
    import distributed

    from segpipe.models import ModelSpec

__all__ = [
    "PROGRESS_LAYER",
    "PredictInputs",
    "PredictSummary",
    "check_predict_inputs",
    "choose_batch_size",
    "model_location",
    "pending_blocks",
    "plan_tasks",
    "predict",
    "edge_margin",
    "window_settings",
]

log = logging.getLogger(__name__)

# Windows straddling a task's border are computed by both tasks: at 32768² px, tasks of
# 2048² px compute 18 % more windows than the image holds, tasks of 4096² px 8 %
# (docs/benchmarks.md). A task holds a block row of uint8 outputs and a rolling float
# accumulator (a window row of its width per class), so a larger task costs little memory.
MAX_TASK_PIXELS = 4096 * 4096
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
        valid_pixels: Pixels with data written by this run (the others hold 255).
        tta: Whether each window was averaged over its 8 flips and rotations.
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
    valid_pixels: int = 0
    tta: bool = False


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


def model_location(model_dir: str | Path) -> str:
    """Where every worker finds the package: an absolute path, or the ``s3://`` URL as given."""
    return str(model_dir).rstrip("/") if is_remote(model_dir) else str(Path(model_dir).resolve())


def window_settings(
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
    ov = _default_overlap(spec, tile) if overlap is None else overlap
    check_blend(tile, ov, blend)
    return tile, ov


def _default_overlap(spec: ModelSpec, tile: int) -> int:
    """A network's quarter of the tile; a per-pixel model's context (an ensemble's widest member's)."""
    if not per_pixel(spec):
        return tile // 4
    return max(forest_overlap(m.get("options") or {}) for m in parts(spec))


def edge_margin(spec: ModelSpec, overlap: int) -> int:
    """Mirrored pixels around the raster that the window grid covers: half the overlap for networks.

    A network is least reliable on the pixels along a window's border (its zero padding,
    strided layers that do not centre there); inside the raster the blend weights those
    pixels down, but on the raster's edge no other window covers them (tests/test_edges.py
    measures it on a real Landsat scene). Mirroring half the overlap
    puts the outermost pixels as deep inside a window as the crop blend keeps any pixel.
    A forest's context features are cut at the raster's edge in training as in
    prediction, so it gets none, nor does an ensemble of per-pixel models.
    """
    return 0 if per_pixel(spec) else overlap // 2


def _resume_key(mhash: str, tile: int, overlap: int, blend: str, tta: bool, margin: int) -> dict[str, Any]:
    """What progress markers and outputs are tagged with: a rerun resumes only on an equal key."""
    return {"model_hash": mhash, "tile": tile, "overlap": overlap, "blend": blend, "tta": tta,
            "margin": margin}


def _store_location(store: str | Path) -> str:
    """Where every worker finds the store: an absolute path, or the URL as given."""
    return str(store) if "://" in str(store) else str(Path(store).resolve())


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
        layers: The result's published layers (``classes``... or a named output's).
        margin: Mirrored pixels around the raster that the window grid covers (:func:`edge_margin`).
        views_why: Why test-time augmentation is on or off (``key["tta"]`` holds which).
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
    layers: OutputLayers = DEFAULT_LAYERS
    margin: int = 0
    views_why: str = ""

    def log_views(self) -> None:
        """Log the test-time augmentation decision (once per run: the check may run more often)."""
        on = "on, 8 views a window" if self.key["tta"] else "off"
        log.info("test-time augmentation %s (%s)", on, self.views_why)


def check_predict_inputs(
    store: str | Path,
    model_dir: str | Path,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    blend: str = "cosine",
    tta: bool | None = None,
    probabilities: bool = False,
    output: str = DEFAULT_OUTPUT,
    allow_resolution_mismatch: bool = False,
    load_here: bool | None = None,
) -> PredictInputs:
    """Check a predict run's inputs without writing anything or starting a cluster.

    The store must be readable, the model package valid in full (its weights are
    loaded into the network, once per process and package: in this process if
    ``load_here``, in a child process if not, by default here only if torch is already
    imported; see :mod:`segpipe.models.verify`), its bands those of the image, its
    training pixel size within 25 % of the image's (unless ``allow_resolution_mismatch``),
    and the window settings and output name usable. ``tta`` left at None is decided by
    :func:`segpipe.stages.predict.views.choose_tta`; the key holds the decision, ``views_why``
    the reason (logged by :func:`predict` and the dry run, not here, as callers such as
    the flow check before they predict).

    Returns:
        The checked inputs.

    Raises:
        MissingInputError: The store does not exist.
        StoreError: The store is not a region store.
        ModelPackageError: The package is incomplete or invalid (the message names the
            file and the field).
        BandMismatchError: The image's bands differ from the model's.
        ResolutionMismatchError: The image's pixel size differs from the model's
            training pixel size by more than 25 % (see :func:`check_resolution`).
        InputError: Bad tile size, overlap, batch size, blend mode or output name.
    """
    layers = output_layers(output)
    store_s = _store_location(store)
    info = read_region_info(store_s)
    mdir = model_location(model_dir)
    spec, mhash = verify_package(mdir, load_here)
    check_bands(spec, info.band_names, f"store {store_s}", f"model {mdir}")
    check_resolution(spec, info.crs_wkt, info.transform, allow_resolution_mismatch, f"model {mdir}")
    tile, ov = window_settings(spec, tile_size, overlap, blend)
    margin = edge_margin(spec, ov)
    n_global = window_count(grown((info.height, info.width), margin), tile, tile - ov)
    if batch_size is not None:
        choose_batch_size(n_global, batch_size)  # a bad value fails before any write
    views, why = choose_tta(tta, spec, info.height, info.width)
    key = _resume_key(mhash, tile, ov, blend, views, margin)
    return PredictInputs(store_s, info, spec, mdir, key, tile, ov, n_global, batch_size, probabilities,
                         layers, margin, why)


def _published(inputs: PredictInputs, force: bool) -> np.ndarray | None:
    """Markers of published layers made with this run's key (None: none, or ``force``)."""
    if force:
        return None
    return read_markers(inputs.store, inputs.info.blocks, inputs.key, inputs.probabilities, inputs.layers)


def _target(
    inputs: PredictInputs, force: bool, published: np.ndarray | None
) -> tuple[OutputLayers, np.ndarray]:
    """Where this run writes and the blocks already finished there.

    Published layers made with the same key (``published``, from :func:`_published`)
    are the result itself: complete, nothing is left to do; partial (a store written in
    place by an older segpipe, or edited), they resume in place, as nothing complete can
    be lost there. Anything else is a new result, staged beside the published one until
    it is complete. A named output is written in place: :mod:`segpipe.io.runs` stages
    and publishes the default layers only.
    """
    if published is not None:
        return inputs.layers, published
    layers = inputs.layers.staged() if inputs.layers.publishable else inputs.layers
    model = {"package": inputs.model_dir, "arch": inputs.spec.arch, "encoder": inputs.spec.encoder}
    done = prepare_layers(inputs.store, inputs.spec, inputs.info.blocks, inputs.key, force,
                          inputs.probabilities, layers, model)
    return layers, done


@dataclass
class _Run:
    """Counters of the tasks one predict run ran."""

    pixels: int = 0
    valid: int = 0
    windows: int = 0
    slots: int = 0
    blocks: int = 0
    skipped: int = 0
    tasks: int = 0
    batch_size: int = 0
    plan: tuple[int, int] = (1, 1)

    def add(self, stats: dict[str, float]) -> None:
        """Count one task's stats (see :func:`segpipe.stages.predict.worker.run_block`)."""
        self.pixels += int(stats["pixels"])
        self.valid += int(stats.get("valid", 0))
        self.windows += int(stats["windows"])
        self.slots += int(stats["slots"])
        self.blocks += int(stats["blocks"])
        # Blocks marked after the plan was made (by a task of an interrupted run that
        # was still running, or an earlier attempt of this task) count as skipped.
        self.skipped += int(stats.get("skipped", 0))


def plan_tasks(
    inputs: PredictInputs, layers: OutputLayers, done: np.ndarray, layout: ClusterLayout, max_task_pixels: int
) -> tuple[_Run, Iterator[BlockJob]]:
    """The batch size, the task shape and the lazy jobs of the unfinished blocks, for this cluster.

    Shared by :func:`predict` and the dry run (:func:`segpipe.stages.predict.dryrun.plan_predict`),
    so a plan counts exactly the tasks a run submits.
    """
    info = inputs.info
    most = inputs.batch_size if inputs.batch_size is not None else GPU_BATCH if layout.gpu else CPU_BATCH
    run = _Run(batch_size=choose_batch_size(inputs.n_windows, most))
    run.plan = plan_superblocks(info.height, info.width, info.block_size, inputs.tile,
                                inputs.tile - inputs.overlap, layout.slots, max_task_pixels, layout.speedup)
    settings = JobSettings(
        store=inputs.store, model_dir=inputs.model_dir, model_hash=inputs.key["model_hash"], tile=inputs.tile,
        overlap=inputs.overlap, batch_size=run.batch_size, blend=inputs.key["blend"], tta=inputs.key["tta"],
        probabilities=inputs.probabilities, layers=layers, margin=inputs.margin,
    )
    jobs = iter_jobs(~done, raster=(info.height, info.width), block_size=info.block_size,
                     task_blocks=run.plan, layout=layout, settings=settings)
    run.tasks = count_jobs(~done, run.plan)
    return run, jobs


def _run_tasks(
    executor: distributed.Client | str,
    inputs: PredictInputs,
    layers: OutputLayers,
    done: np.ndarray,
    max_task_pixels: int,
    progress: Callable[[int, int], None] | None,
) -> _Run:
    """Run the unfinished blocks' tasks on a cluster or in this process; raise the first task's error.

    ``executor`` is a cluster's client, or the name of one of dask's local schedulers
    (:data:`segpipe.stages.predict.execute.LOCAL_SCHEDULERS`).
    """
    layout = local_layout(executor) if isinstance(executor, str) else cluster_layout(executor)
    run, jobs = plan_tasks(inputs, layers, done, layout, max_task_pixels)
    skipped, total = int(done.sum()), int(done.size)

    def record(stats: dict[str, float]) -> None:
        run.add(stats)
        if progress is not None:
            progress(skipped + run.skipped + run.blocks, total)

    # Jobs are made as they are submitted, a bounded number in flight (segpipe.waves).
    if isinstance(executor, str):
        run_in_process(jobs, executor, record, layout.slots)
    else:
        run_on_cluster(executor, jobs, layout.gpu, record, layout.slots)
    return run


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
    tta: bool | None = None,
    probabilities: bool = False,
    max_task_pixels: int = MAX_TASK_PIXELS,
    scheduler: str | None = None,
    output: str = DEFAULT_OUTPUT,
    allow_resolution_mismatch: bool = False,
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
    earlier complete result readable and unchanged. A named ``output`` is written in
    place, beside the default layers.

    Args:
        store: Region store (from ``segpipe ingest``).
        model_dir: Model package directory readable by every worker, or its ``s3://``
            URL (each machine fetches it once, see :mod:`segpipe.models.fetch`).
        tile_size: Window size; default: the model's chip size rounded up to a multiple
            of 32, at least 256.
        overlap: Overlap between windows; default: a quarter of the tile; for a
            per-pixel model (a forest, a linear model, an ensemble of them) none, or with a
            context window K, 4 * (K // 2) pixels.
        batch_size: Most windows per forward call (see :func:`choose_batch_size`);
            default 8 on GPU workers, 2 on CPU workers.
        client: Dask client; default: a cluster from :func:`segpipe.cluster.get_client`
            (started or joined only after every input is checked).
        force: Recompute every block even if marked finished.
        progress: Called as ``progress(done, total)`` in blocks after each task.
        blend: ``cosine`` (default), ``gaussian``, ``mean`` or ``crop``.
        tta: Average each window over its 8 flips and rotations (8x the forward calls);
            default: a network does on a region of at most 4096 x 4096 px
            (:mod:`segpipe.stages.predict.views`).
        probabilities: Also write the ``probabilities`` layer.
        max_task_pixels: Largest area one task covers.
        scheduler: Scheduler address to join when no ``client`` is given (default:
            ``SEGPIPE_SCHEDULER``, else a local cluster), or ``threads`` /
            ``synchronous`` to run the tasks in this process with dask's local scheduler.
        output: Name of the classes layer: ``classes``, or ``classes_<name>`` for a
            result beside it whose other layers get the suffix ``_<name>`` too
            (``confidence_<name>``, ``probabilities_<name>``, ``progress_predict_<name>``).
        allow_resolution_mismatch: Predict even where the image's pixel size differs from
            the model's training pixel size by more than 25 %.

    Returns:
        A summary of the run.

    Raises:
        ModelPackageError: An invalid package (before any write or cluster).
        BandMismatchError: The image's bands differ from the model's (before any write).
        ResolutionMismatchError: The image's pixel size differs from the training pixel
            size by more than 25 % (before any write or cluster).
        InputError: Bad tile size, overlap, batch size, blend mode or output name.
        StoreBusyError: Another predict run holds the store.
    """
    t0 = time.perf_counter()
    # Tasks run in this process with a local scheduler, so the weights are loaded here
    # anyway; otherwise they are checked in a child and the driver stays without torch.
    in_process = client is None and scheduler in LOCAL_SCHEDULERS
    inputs = check_predict_inputs(store, model_dir, tile_size, overlap, batch_size, blend, tta, probabilities,
                                  output, allow_resolution_mismatch, True if in_process else None)
    inputs.log_views()
    with acquire_lock(inputs.store, inputs.key["model_hash"]) as lock, contextlib.ExitStack() as stack:
        finish_promotion(inputs.store)
        published = _published(inputs, force)
        # The cluster comes up before any layer is staged: a scheduler that cannot be
        # reached leaves the store exactly as it was.
        executor: distributed.Client | str | None = client
        if client is None and scheduler in LOCAL_SCHEDULERS:
            executor = scheduler
        elif client is None and not (published is not None and published.all()):
            from segpipe.cluster import get_client

            executor = stack.enter_context(get_client(scheduler))
        layers, done = _target(inputs, force, published)
        if progress is not None:
            progress(int(done.sum()), int(done.size))
        run = _Run()
        if not done.all():
            assert executor is not None  # work is left, so the cluster was started above
            run = _run_tasks(executor, inputs, layers, done, max_task_pixels, progress)
        if layers != inputs.layers:
            publish(inputs.store, inputs.info.blocks, inputs.key, inputs.probabilities, lock)
    publish_metadata(inputs.store)  # what xr.open_zarr sees: the layers as they are now
    return _summary(inputs, done, run, time.perf_counter() - t0)


def _summary(inputs: PredictInputs, done: np.ndarray, run: _Run, seconds: float) -> PredictSummary:
    """The run's summary, logged."""
    skipped = int(done.sum()) + run.skipped
    log.info("predicted %d blocks in %d tasks (%d skipped) in %.1f s",
             run.blocks, run.tasks, skipped, seconds)
    return PredictSummary(int(done.size), run.blocks, skipped, run.pixels, seconds, run.windows, inputs.tile,
                          inputs.overlap, run.slots, run.tasks, run.batch_size, run.plan, run.valid,
                          bool(inputs.key["tta"]))


def pending_blocks(
    store: str | Path,
    model_dir: str | Path,
    tile_size: int | None = None,
    overlap: int | None = None,
    blend: str = "cosine",
    tta: bool | None = None,
    probabilities: bool = False,
    output: str = DEFAULT_OUTPUT,
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
        output: The result's classes layer, as given to :func:`predict`.

    Returns:
        ``(pending, total)`` blocks.

    Raises:
        InputError: Bad tile size, overlap or output name.
        ModelPackageError: An invalid package.
    """
    layers = output_layers(output)
    store_s = _store_location(store)
    info = read_region_info(store_s)
    spec = read_spec(model_dir)
    tile, ov = window_settings(spec, tile_size, overlap)
    views = choose_tta(tta, spec, info.height, info.width)[0]
    key = _resume_key(model_hash(model_location(model_dir)), tile, ov, blend, views, edge_margin(spec, ov))
    total = int(info.blocks[0] * info.blocks[1])
    if has_staged_progress(store_s):  # perhaps a publication cut short: finish it, as predict would
        with contextlib.suppress(StoreBusyError), acquire_lock(store_s, key["model_hash"]):
            finish_promotion(store_s)
    markers = read_markers(store_s, info.blocks, key, probabilities, layers)
    if markers is None and layers.publishable:
        markers = read_markers(store_s, info.blocks, key, probabilities, layers.staged())
    return (total if markers is None else total - int(markers.sum())), total
