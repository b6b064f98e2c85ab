"""``process_region``: ingest -> train -> predict -> export -> evaluate for one region."""

# No `from __future__ import annotations`: Prefect builds its parameter model from the
# evaluated annotations, and string annotations fail to resolve in served deployments.
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from flows.tasks import baseline_stage, evaluate_stage, export_stage, ingest_stage, predict_stage, train_stage
from segpipe.train import TrainConfig

__all__ = ["RegionRun", "process_region"]


class RegionRun(BaseModel):
    """One region to process.

    Attributes:
        name: Name of the region in logs and batch results.
        images: GeoTIFFs, a VRT or a folder of GeoTIFFs.
        store: Region store (Zarr) to write.
        labels: Label raster or polygons for training (0 = unlabelled).
        label_field: Class field of label polygons.
        classes: classes.json with class names and colours.
        block_size: Block (shard) edge of the store in pixels.
        model: Model package directory: written when ``train`` is set, else read.
        train: Training settings; None to use an existing model package.
        tile_size: Prediction window edge (default: from the model).
        overlap: Prediction window overlap (default: a quarter of the window).
        scheduler: Dask scheduler address; None starts a local cluster.
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
    classes: str | None = None
    block_size: int = 1024
    model: str
    train: TrainConfig | None = Field(default_factory=TrainConfig)
    tile_size: int | None = None
    overlap: int | None = None
    scheduler: str | None = None
    exports: list[Literal["classes", "confidence"]] = ["classes", "confidence"]
    export_dir: str
    reference: str | None = None
    report_dir: str | None = None
    baseline: bool = False


@flow(name="process-region", log_prints=True)
def process_region(run: RegionRun) -> dict[str, Any]:
    """Process one region end to end.

    Args:
        run: What to read, where to write and how to train and predict.

    Returns:
        ``{"stages": [stage records...], "miou": ..., "baseline_miou": ...}``.
    """
    log = get_run_logger()
    stages: list[dict[str, Any]] = []
    stages.append(
        ingest_stage(run.images, run.store, run.labels, run.label_field, run.classes, run.block_size)
    )
    if run.train is not None:
        stages.append(train_stage(run.store, run.model, run.train))
    stages.append(predict_stage(run.store, run.model, run.tile_size, run.overlap, run.scheduler))
    Path(run.export_dir).mkdir(parents=True, exist_ok=True)
    for layer in run.exports:
        stages.append(export_stage(run.store, str(Path(run.export_dir) / f"{layer}.tif"), layer))
    result: dict[str, Any] = {"stages": stages, "miou": None, "baseline_miou": None}
    if run.reference:
        report = run.report_dir or str(Path(run.export_dir) / "report")
        evaluation = evaluate_stage(run.store, run.reference, report, "classes")
        stages.append(evaluation)
        result["miou"] = evaluation["miou"]
        if run.baseline:
            stages.append(baseline_stage(run.store))
            base = evaluate_stage(run.store, run.reference, f"{report}_baseline", "classes_rf")
            stages.append(base)
            result["baseline_miou"] = base["miou"]
    for s in stages:
        log.info("%-26s %7.1f s", s["stage"], s["seconds"])
    return result
