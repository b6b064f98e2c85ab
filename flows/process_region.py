"""``process_region``: ingest -> train -> predict -> export -> evaluate for one region.

The stages after predict only read the store, so the exports, the evaluation and the
baseline run in parallel. Where the stages run is the run's ``task_runner``: threads of
the flow's process (``local``) or a Dask cluster (``dask``, see :mod:`flows.runners`).
A rerun skips every stage already done for the same inputs and model, and logs so.
"""

# No `from __future__ import annotations`: Prefect builds its parameter model from the
# evaluated annotations, and string annotations fail to resolve in served deployments.
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, wait
from pydantic import BaseModel, ConfigDict, Field

from flows.runners import TaskRunnerName, task_runner
from flows.signals import relays_signals
from flows.tasks import (
    BASELINE_LAYER,
    baseline_stage,
    evaluate_stage,
    export_stage,
    ingest_stage,
    predict_stage,
    train_stage,
)
from segpipe.io.remote import is_remote, join
from segpipe.stages.train import NetworkConfig, TrainConfigField

__all__ = ["RegionRun", "process_region", "run_region"]


class RegionRun(BaseModel):
    """One region to process.

    Attributes:
        name: Name of the region in logs and batch results.
        images: GeoTIFFs, a VRT or a folder of GeoTIFFs.
        store: Region store (Zarr) to write.
        labels: Label raster or polygons for training (0 = unlabelled).
        label_field: Class field of label polygons.
        label_layer: Layer of a multi-layer vector labels file (default: a class per layer).
        background_value: Label value meaning background, not unlabelled.
        crs: Target CRS of a warped ingest (see ``segpipe ingest --crs``).
        resolution: Target pixel size of a warped ingest.
        bounds: Target extent (left, bottom, right, top) in the target CRS.
        aoi: Area of interest (a vector file): pixels outside it become nodata.
        resampling: GDAL resampling of imagery onto the grid.
        order: Where scenes overlap: ``given``, ``latest`` or ``least-cloudy``.
        assets: STAC asset keys to stack as bands, in order (STAC inputs only).
        classes: classes.json with class names and colours.
        block_size: Block (shard) edge of the store in pixels.
        model: Model package directory: written when ``train`` is set, else read.
        train: Training settings (their ``arch`` chooses the family: a network, unet by
            default, or ``random_forest``); None to use an existing model package.
        tile_size: Prediction window edge (default: from the model).
        overlap: Prediction window overlap (default: a quarter of the window).
        tta: Average each window's 8 flips and rotations (default: a network does on a
            region of at most 4096 x 4096 px; see ``segpipe.stages.predict.views``).
        allow_resolution_mismatch: Predict even where the pixel size differs by more than
            25 % from the model's.
        scheduler: Dask scheduler address (``tcp://host:8786``) for prediction, and for
            every stage with ``task_runner: dask``; None: the ``SEGPIPE_SCHEDULER``
            environment variable, else a local cluster started for the run.
        task_runner: Where the stages run: ``local`` (threads of the flow's process) or
            ``dask`` (Prefect's DaskTaskRunner on the ``scheduler`` cluster).
        exports: Store layers to publish as Cloud-Optimized GeoTIFFs.
        export_dir: Folder of the exported GeoTIFFs.
        reference: Reference labels to evaluate against (None: no evaluation).
        report_dir: Folder of the evaluation reports.
        baseline: Also train and evaluate a per-pixel random forest.
    """

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    images: list[str] = Field(min_length=1)
    store: str
    labels: str | None = None
    label_field: str | None = None
    label_layer: str | None = None
    background_value: int | None = None
    classes: str | None = None
    block_size: int = 1024
    crs: str | None = None
    resolution: float | None = None
    bounds: tuple[float, float, float, float] | None = None
    aoi: str | None = None
    resampling: str = "bilinear"
    order: Literal["given", "latest", "least-cloudy"] = "given"
    assets: list[str] | None = None
    model: str
    train: TrainConfigField | None = Field(default_factory=NetworkConfig)
    tile_size: int | None = None
    overlap: int | None = None
    tta: bool | None = None
    allow_resolution_mismatch: bool = False
    scheduler: str | None = None
    task_runner: TaskRunnerName = "local"
    exports: list[Literal["classes", "confidence"]] = ["classes", "confidence"]
    export_dir: str
    reference: str | None = None
    report_dir: str | None = None
    baseline: bool = False


def _on_dask_task_runner() -> bool:
    from prefect.context import FlowRunContext
    from prefect_dask.task_runners import DaskTaskRunner

    ctx = FlowRunContext.get()
    return ctx is not None and isinstance(ctx.task_runner, DaskTaskRunner)


def _join(folder: str, name: str) -> str:
    """``folder/name`` for a local folder or an ``s3://`` prefix (pathlib would squash the URL)."""
    return join(folder, name) if is_remote(folder) else str(Path(folder) / name)


@flow(name="process-region", log_prints=True)
@relays_signals
def process_region(run: RegionRun) -> dict[str, Any]:
    """Process one region end to end.

    Args:
        run: What to read, where to write, how to train and predict, and where the
            stages run.

    Returns:
        ``{"stages": [stage records...], "miou": ..., "baseline_miou": ..., "seconds": ...}``;
        a stage record holds ``seconds``, ``megapixels``, ``mpx_per_s`` and ``skipped``
        (True when the stage was already done for the same inputs).
    """
    if run.task_runner == "dask" and not _on_dask_task_runner():
        # Called with another task runner (a deployment run, a plain call): the task
        # runner is fixed when a flow starts, so run again as a subflow on Dask.
        return run_region(run)
    name = run.name or Path(run.store).stem
    t0 = time.perf_counter()
    # Each stage is submitted so it runs where the task runner puts it (a Dask worker
    # for `dask`), and its .result() raises a failed stage's error: a flow that only
    # waited on futures would report success.
    stages: list[dict[str, Any]] = []
    stages.append(
        ingest_stage.submit(
            run.images, run.store, run.labels, run.label_field, run.classes, run.block_size,
            _ingest_options(run),
        ).result()
    )
    if run.train is not None:
        stages.append(train_stage.submit(run.store, run.model, run.train).result())
    stages.append(
        predict_stage.submit(run.store, run.model, run.tile_size, run.overlap, run.scheduler,
                             run.allow_resolution_mismatch, run.tta).result()
    )
    tail = _submit_readers(run)
    wait(tail)  # every parallel stage ends before the first failure is raised
    stages.extend(f.result() for f in tail)
    result: dict[str, Any] = {"stages": stages, **_mious(stages), "seconds": time.perf_counter() - t0}
    _log_stages(stages, name, result["seconds"])
    return result


def _ingest_options(run: RegionRun) -> dict[str, Any]:
    """The ingest settings beyond the inputs (grid, warp, labels), as ``segpipe.stages.ingest`` names them."""
    return {"crs": run.crs, "resolution": run.resolution, "bounds": run.bounds, "aoi": run.aoi,
            "resampling": run.resampling, "order": run.order, "assets": run.assets,
            "label_layer": run.label_layer, "background_value": run.background_value}


def _submit_readers(run: RegionRun) -> list[PrefectFuture[dict[str, Any]]]:
    """Submit the stages that only read the predictions, all at once: exports, evaluations, baseline."""
    if not is_remote(run.export_dir):
        Path(run.export_dir).mkdir(parents=True, exist_ok=True)
    tail: list[PrefectFuture[dict[str, Any]]] = [
        export_stage.submit(run.store, _join(run.export_dir, f"{layer}.tif"), layer) for layer in run.exports
    ]
    if not run.reference:
        return tail
    report = run.report_dir or _join(run.export_dir, "report")
    tail.append(evaluate_stage.submit(run.store, run.reference, report, "classes"))
    if run.baseline:
        baseline = baseline_stage.submit(run.store)
        tail.append(baseline)
        tail.append(
            evaluate_stage.submit(
                run.store,
                run.reference,
                f"{report}_baseline",
                BASELINE_LAYER,
                wait_for=[baseline],
                return_state=False,  # selects the typed overload that takes wait_for
            )
        )
    return tail


def _mious(stages: list[dict[str, Any]]) -> dict[str, float | None]:
    """``miou`` and ``baseline_miou`` from the evaluations' records (None when not evaluated)."""
    found: dict[str, float | None] = {"miou": None, "baseline_miou": None}
    for s in stages:
        if s["stage"] == "evaluate classes":
            found["miou"] = s["miou"]
        elif s["stage"] == f"evaluate {BASELINE_LAYER}":
            found["baseline_miou"] = s["miou"]
    return found


def _log_stages(stages: list[dict[str, Any]], name: str, seconds: float) -> None:
    """One log line per stage (its time and throughput, or that it was skipped), then the total."""
    log = get_run_logger()
    for s in stages:
        if s.get("skipped"):
            log.info("%-26s %7.1f s   skipped: already done for these inputs", s["stage"], s["seconds"])
        else:
            rate = s.get("mpx_per_s")
            log.info("%-26s %7.1f s %9s Mpx/s", s["stage"], s["seconds"], f"{rate:.2f}" if rate else "-")
    done = sum(1 for s in stages if s.get("skipped"))
    log.info("region %s: %.1f s in all; %d of %d stages skipped", name, seconds, done, len(stages))


def run_region(run: RegionRun) -> dict[str, Any]:
    """Run :func:`process_region` on the task runner ``run.task_runner`` names.

    With ``dask`` and no scheduler (argument or ``SEGPIPE_SCHEDULER``), a local cluster
    serves the run's stages and its prediction blocks, and is closed afterwards.
    """
    with task_runner(run.task_runner, run.scheduler) as (runner, _address):
        return process_region.with_options(task_runner=runner)(run)
