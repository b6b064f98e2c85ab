"""Prefect tasks: each one call into segpipe, timed, returning a small JSON-able record.

Tasks are coarse (a whole stage) because Prefect costs ~0.1 s per task. Only
segpipe's transient errors are retried; an input error fails at once.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task

from segpipe.errors import TransientError
from segpipe.train import TrainConfig, TrainProgress


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only segpipe's transient errors (storage hiccups, lost workers)."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:
        return False
    return False


def _record(stage: str, started: float, pixels: int, **extra: Any) -> dict[str, Any]:
    seconds = time.perf_counter() - started
    return {
        "stage": stage,
        "seconds": seconds,
        "megapixels": pixels / 1e6,
        "mpx_per_s": pixels / 1e6 / seconds if seconds > 0 else None,
        **extra,
    }


@task(name="ingest", retries=2, retry_condition_fn=_retry_transient)
def ingest_stage(
    images: list[str],
    store: str,
    labels: str | None,
    label_field: str | None,
    classes: str | None,
    block_size: int,
) -> dict[str, Any]:
    """Build the region store, unless it was already built from the same inputs."""
    from segpipe.fingerprint import ingest_fingerprint, store_inputs
    from segpipe.ingest import ingest

    log = get_run_logger()
    started = time.perf_counter()
    if store_inputs(store) == ingest_fingerprint(images, labels, label_field, classes, block_size):
        log.info("ingest: %s is up to date with its inputs; skipped", store)
        return _record("ingest", started, 0, output=store, skipped=True)
    info = ingest(
        images,
        store,
        labels=labels,
        label_field=label_field,
        classes=classes,
        block_size=block_size,
        overwrite=True,
        progress=log.info,
    )
    return _record("ingest", started, info.height * info.width, output=store)


@task(name="train", retries=1, retry_condition_fn=_retry_transient)
def train_stage(store: str, model: str, config: TrainConfig) -> dict[str, Any]:
    """Train a model package from the store's labels, unless one exists for the same store and settings."""
    from segpipe.errors import ModelPackageError
    from segpipe.fingerprint import store_inputs
    from segpipe.io.store import read_region_info
    from segpipe.models import read_spec
    from segpipe.train import train

    log = get_run_logger()
    started = time.perf_counter()
    try:
        done = read_spec(model).training
    except ModelPackageError:
        done = {}
    current = store_inputs(store)
    if current and done.get("store_inputs") == current and done.get("config") == config.model_dump():
        log.info("train: %s was trained on this store with these settings; skipped", model)
        return _record("train", started, 0, output=model, skipped=True)

    def report(p: TrainProgress) -> None:
        if p.record is not None:
            r = p.record
            log.info(
                "epoch %d/%d: train loss %.3f, valid loss %.3f, valid mIoU %.3f (%.0f s)",
                p.epoch,
                p.epochs,
                r["train_loss"],
                r.get("valid_loss", float("nan")),
                r.get("valid_miou", float("nan")),
                r["seconds"],
            )

    spec = train(store, model, config, progress=report)
    chips = config.epochs * config.samples_per_epoch
    info = read_region_info(store)
    return _record(
        "train",
        started,
        chips * config.chip_size**2,
        output=model,
        valid_miou=spec.metrics.get("miou"),
        region_megapixels=info.height * info.width / 1e6,
    )


@task(name="predict", retries=2, retry_condition_fn=_retry_transient)
def predict_stage(
    store: str, model: str, tile_size: int | None, overlap: int | None, scheduler: str | None
) -> dict[str, Any]:
    """Classify every pixel on a Dask cluster (local by default)."""
    from segpipe.cluster import describe_cluster, get_client
    from segpipe.predict import predict

    log = get_run_logger()
    started = time.perf_counter()
    with get_client(scheduler) as client:
        log.info("dask cluster: %s; dashboard %s", describe_cluster(client), client.dashboard_link)
        last = [0]

        def report(done: int, total: int) -> None:
            if done == total or done - last[0] >= max(1, total // 10):
                last[0] = done
                log.info("predict: %d/%d blocks", done, total)

        summary = predict(store, model, tile_size=tile_size, overlap=overlap, client=client, progress=report)
    if summary.blocks_skipped:
        log.info(
            "predict: %d of %d blocks were already finished; skipped",
            summary.blocks_skipped,
            summary.blocks_total,
        )
    return _record(
        "predict",
        started,
        summary.pixels,
        output=f"{store} (classes, confidence)",
        blocks=summary.blocks_total,
        blocks_skipped=summary.blocks_skipped,
    )


@task(name="export", retries=2, retry_condition_fn=_retry_transient)
def export_stage(store: str, out: str, layer: str) -> dict[str, Any]:
    """Export one store layer as a Cloud-Optimized GeoTIFF."""
    from segpipe.cog import write_cog
    from segpipe.io.store import read_region_info

    started = time.perf_counter()
    write_cog(store, out, layer=layer)
    info = read_region_info(store)
    return _record(f"export {layer}", started, info.height * info.width, output=out)


@task(name="evaluate")
def evaluate_stage(store: str, reference: str, out_dir: str, layer: str) -> dict[str, Any]:
    """Evaluate a store layer against a reference."""
    from segpipe.evaluate import evaluate

    started = time.perf_counter()
    result = evaluate(store, reference, out_dir, layer=layer)
    return _record(
        f"evaluate {layer}",
        started,
        int(result["pixels"]),
        output=out_dir,
        miou=result["miou"],
        overall_accuracy=result["overall_accuracy"],
    )


@task(name="baseline")
def baseline_stage(store: str) -> dict[str, Any]:
    """Per-pixel random forest on the same labels, for comparison."""
    from segpipe.baseline import random_forest_baseline

    started = time.perf_counter()
    result = random_forest_baseline(store)
    return _record(
        "baseline (random forest)", started, result["pixels"], output=f"{store} ({result['layer']})"
    )
