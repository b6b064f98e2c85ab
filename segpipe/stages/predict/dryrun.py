"""A predict dry run: what a run would compute, and about how long it would take, writing nothing.

:func:`plan_predict` checks the inputs as :func:`segpipe.stages.predict.driver.predict`
does, reads the done markers, plans the tasks for the cluster the run would get (the
default local cluster, a dask local scheduler, or ``slots`` task slots given), counts
every task's windows with the blend's own rules, and times the model's forward on
real windows of the store in this process (no cluster is started, nothing is
written, no lock is taken). The jobs are walked lazily, one at a time.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segpipe.cores import usable_cores
from segpipe.grid.box import Box
from segpipe.grid.tiling import blend_weights, grown
from segpipe.stages.predict.blend import window_rows
from segpipe.stages.predict.driver import (
    PredictInputs,
    check_predict_inputs,
    plan_tasks,
)
from segpipe.stages.predict.execute import LOCAL_SCHEDULERS, local_layout
from segpipe.stages.predict.jobs import BlockJob, ClusterLayout, blocks_box
from segpipe.stages.predict.outputs import DEFAULT_OUTPUT
from segpipe.stages.predict.pixels import prepare_pixels
from segpipe.stages.predict.results import read_markers
from segpipe.stages.predict.worker import cached_forward
from segpipe.waves import in_flight_limit

__all__ = ["PredictPlan", "calibrate_forward", "format_plan", "plan_predict", "task_windows"]

CALIBRATION_CALLS = 3
"""Timed forward calls (after one warm-up call) in a calibration."""


@dataclass(frozen=True)
class PredictPlan:
    """What a :func:`segpipe.stages.predict.driver.predict` run with the same arguments would do.

    Attributes:
        blocks_total: Blocks of the region.
        blocks_pending: Blocks the run would compute (the others are marked finished).
        tasks: Dask tasks.
        task_blocks: Blocks per task along (y, x).
        in_flight: Most tasks submitted at once.
        batch_size: Windows per forward call.
        windows: Network windows (an upper bound: windows holding no valid pixel are skipped).
        output_pixels: Pixels of the pending blocks.
        window_pixels: Pixels the network computes (``windows * tile**2``).
        overhead: ``window_pixels / output_pixels``: the overlap-and-halo compute cost.
        seconds_per_window: Forward seconds per window measured here (0 without calibration).
        estimated_seconds: ``windows * seconds_per_window / machines``: the forward time
            on machines like this one (reading, blending and writing come on top).
        slots: Task slots the plan was made for.
    """

    blocks_total: int
    blocks_pending: int
    tasks: int
    task_blocks: tuple[int, int]
    in_flight: int
    batch_size: int
    windows: int
    output_pixels: int
    window_pixels: int
    overhead: float
    seconds_per_window: float
    estimated_seconds: float
    slots: int


@functools.lru_cache(maxsize=4096)
def _axis_reach(start: int, size: int, length: int, tile: int, overlap: int, mode: str) -> int:
    """Windows of the grid along one axis whose blend weight is non-zero in ``[start, start + size)``."""
    from segpipe.grid.tiling import axis_windows

    stride = tile - overlap
    count = 0
    for s in axis_windows(start, size, length, tile, stride):
        nz = np.flatnonzero(blend_weights(tile, overlap, s == 0, s + tile >= length, mode))
        count += int(s + nz[0] < start + size and s + nz[-1] + 1 > start)
    return count


def task_windows(job: BlockJob, raster: tuple[int, int], block_size: int, mode: str) -> int:
    """Windows one task runs (as :func:`segpipe.stages.predict.blend.blend_rows` picks them).

    A task of whole blocks is counted per axis (cached: a region's tasks share few
    distinct rows and columns); a task with some blocks finished, window by window.
    """
    s = job.settings
    m = s.margin
    targets = [blocks_box((b,), block_size, raster) for b in job.blocks] if job.blocks else [job.box]
    if sum(t.h * t.w for t in targets) == job.box.h * job.box.w:
        h, w = grown(raster, m)
        return (_axis_reach(job.box.y0 + m, job.box.h, h, s.tile, s.overlap, mode)
                * _axis_reach(job.box.x0 + m, job.box.w, w, s.tile, s.overlap, mode))
    moved = [Box(t.y0 + m, t.x0 + m, t.y1 + m, t.x1 + m) for t in targets]
    box = Box(job.box.y0 + m, job.box.x0 + m, job.box.y1 + m, job.box.x1 + m)
    grid = window_rows(grown(raster, m), box, s.tile, s.overlap, mode, moved)
    return sum(len(keep) for _, keep in grid.rows)


def calibrate_forward(
    inputs: PredictInputs, batch_size: int, at: Box, calls: int = CALIBRATION_CALLS
) -> float:
    """Forward seconds per window, timed in this process on a batch of the store's pixels at ``at``.

    One warm-up call (first-call allocations, lazy initialisation) is not timed.
    """
    from segpipe.io.store import open_layer
    from segpipe.stages.predict.blend import tta_forward

    loaded = cached_forward(inputs.model_dir, inputs.key["model_hash"])
    tile = inputs.tile
    box = Box(at.y0, at.x0, min(at.y0 + tile, inputs.info.height), min(at.x0 + tile, inputs.info.width))
    raw = np.asarray(open_layer(inputs.store, "image")[(slice(None), *box.slices)])
    pixels, _ = prepare_pixels(raw, inputs.info.nodata, loaded.spec)
    pixels = np.pad(pixels, ((0, 0), (0, tile - box.h), (0, tile - box.w)), mode="edge")
    batch = np.ascontiguousarray(np.broadcast_to(pixels, (batch_size, *pixels.shape)), dtype=np.float32)
    forward = tta_forward(loaded.forward) if inputs.key["tta"] else loaded.forward
    forward(batch)
    t0 = time.perf_counter()
    for _ in range(calls):
        forward(batch)
    return (time.perf_counter() - t0) / (calls * batch_size)


def _layout(scheduler: str | None, slots: int | None) -> ClusterLayout:
    """The layout of the cluster the run would get, without starting it: the default local cluster's."""
    if scheduler in LOCAL_SCHEDULERS:
        assert scheduler is not None
        return local_layout(scheduler)
    n = slots if slots is not None else usable_cores()
    return ClusterLayout(n, False, (("localhost", n, n),))


def _done(inputs: PredictInputs, force: bool) -> np.ndarray:
    """The blocks a run would skip: published markers made with this key, else an unfinished staged run's."""
    if force:
        return np.zeros(inputs.info.blocks, dtype=bool)
    markers = read_markers(inputs.store, inputs.info.blocks, inputs.key, inputs.probabilities, inputs.layers)
    if markers is None and inputs.layers.publishable:
        markers = read_markers(inputs.store, inputs.info.blocks, inputs.key, inputs.probabilities,
                               inputs.layers.staged())
    return markers if markers is not None else np.zeros(inputs.info.blocks, dtype=bool)


def plan_predict(
    store: str | Path,
    model_dir: str | Path,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    force: bool = False,
    blend: str = "cosine",
    tta: bool | None = None,
    probabilities: bool = False,
    max_task_pixels: int | None = None,
    scheduler: str | None = None,
    output: str = DEFAULT_OUTPUT,
    allow_resolution_mismatch: bool = False,
    slots: int | None = None,
    calibrate: bool = True,
    machines: int = 1,
) -> PredictPlan:
    """Plan a predict run without running it: tasks, windows, compute overhead and an estimated time.

    Takes :func:`segpipe.stages.predict.driver.predict`'s arguments (``client`` and
    ``progress`` aside) and writes nothing, takes no lock and starts no cluster. A
    staged result whose publication a crash cut short is counted as it stands
    (predict would publish it first).

    Args:
        store: Region store.
        model_dir: Model package.
        tile_size: As for predict.
        overlap: As for predict.
        batch_size: As for predict.
        force: As for predict: every block pending.
        blend: As for predict.
        tta: As for predict.
        probabilities: As for predict.
        max_task_pixels: As for predict (default its default).
        scheduler: As for predict; a scheduler address is planned as ``slots`` slots.
        output: As for predict.
        allow_resolution_mismatch: As for predict.
        slots: Task slots of the cluster (default: the default local cluster's, one per core).
        calibrate: Time the forward here (:func:`calibrate_forward`) for the estimate.
        machines: Machines like this one sharing the work (divides the estimate).

    Returns:
        The plan.

    Raises:
        The input errors of :func:`segpipe.stages.predict.driver.check_predict_inputs`.
    """
    from segpipe.stages.predict.driver import MAX_TASK_PIXELS

    # A calibrating dry run times forward calls here, so it loads the weights here anyway.
    inputs = check_predict_inputs(store, model_dir, tile_size, overlap, batch_size, blend, tta, probabilities,
                                  output, allow_resolution_mismatch, load_here=True if calibrate else None)
    inputs.log_views()
    done = _done(inputs, force)
    layout = _layout(scheduler, slots)
    run, jobs = plan_tasks(inputs, inputs.layers, done, layout, max_task_pixels or MAX_TASK_PIXELS)
    raster, block = (inputs.info.height, inputs.info.width), inputs.info.block_size
    windows = output_px = 0
    first: Box | None = None
    for job in jobs:  # lazily: one job at a time, whatever the region's size
        first = first or job.box
        windows += task_windows(job, raster, block, blend)
        output_px += sum(t.h * t.w for t in ([blocks_box((b,), block, raster) for b in job.blocks]
                                             if job.blocks else [job.box]))
    per_window = calibrate_forward(inputs, run.batch_size, first) if calibrate and first is not None else 0.0
    window_px = windows * inputs.tile**2
    return PredictPlan(
        blocks_total=int(done.size), blocks_pending=int((~done).sum()), tasks=run.tasks,
        task_blocks=run.plan, in_flight=in_flight_limit(layout.slots), batch_size=run.batch_size,
        windows=windows, output_pixels=output_px, window_pixels=window_px,
        overhead=window_px / output_px if output_px else 0.0,
        seconds_per_window=per_window, estimated_seconds=windows * per_window / max(1, machines),
        slots=layout.slots,
    )


def _duration(seconds: float) -> str:
    """``seconds`` as ``2 h 05 min``, ``3 min 20 s`` or ``12.5 s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


def format_plan(plan: PredictPlan) -> str:
    """The plan as ``segpipe predict --plan-only`` prints it: a few lines, numbers first."""
    ty, tx = plan.task_blocks
    lines = [
        f"blocks: {plan.blocks_pending:,} to compute of {plan.blocks_total:,}",
        f"tasks: {plan.tasks:,} of {ty}x{tx} blocks, at most {plan.in_flight} in flight "
        f"on {plan.slots} slots",
        f"windows: {plan.windows:,} in calls of {plan.batch_size}; compute overhead "
        f"{plan.overhead:.2f}x (window pixels / output pixels)",
    ]
    if plan.seconds_per_window > 0:
        lines.append(f"estimate: {_duration(plan.estimated_seconds)} of forward passes "
                     f"({plan.seconds_per_window * 1000:.2f} ms per window, timed here); "
                     "reading, blending and writing come on top")
    return "\n".join(lines)
