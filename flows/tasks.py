"""Prefect tasks: each one call into segpipe, timed, returning a small JSON-able record.

Tasks are coarse (a whole stage) because Prefect costs ~0.1 s per task. Only
segpipe's transient errors are retried; an input error fails at once.

Every stage skips work already done for the same inputs, and says so in its log and
with ``skipped: True`` in its record: ingest and train by fingerprints in the store and
the model package, predict by its per-block markers (checked before any cluster
starts), export and evaluate by a record beside their product (:mod:`flows.resume`),
the baseline by a record on its layer.

On a ``DaskTaskRunner`` the tasks run inside dask workers: each leaves the worker's
thread pool while it runs, so the dask work it starts itself (prediction blocks, the
windows of an evaluation) can run on the same cluster without a deadlock.
"""

# No `from __future__ import annotations`: modules in flows/ keep evaluated annotations
# (Prefect builds parameter models from them in served deployments).
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from segpipe.cluster import in_dask_worker, release_worker_thread
from segpipe.cores import usable_cores
from segpipe.errors import TransientError
from segpipe.stages.train import TrainConfig, TrainProgress

BASELINE_LAYER = "classes_rf"


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
    """A stage's record: wall time, pixels, throughput (Mpx/s) and where it ran.

    ``mpx_per_s`` is None for a stage that processed nothing (skipped); ``worker`` and
    ``cluster`` are the addresses of the dask worker and its scheduler on a
    ``DaskTaskRunner``, else None.
    """
    seconds = time.perf_counter() - started
    worker = in_dask_worker()
    return {
        "stage": stage,
        "seconds": seconds,
        "megapixels": pixels / 1e6,
        "mpx_per_s": pixels / 1e6 / seconds if pixels and seconds > 0 else None,
        "worker": str(worker.address) if worker is not None else None,
        "cluster": str(worker.scheduler.address) if worker is not None else None,
        **extra,
    }


def _skipped(stage: str, started: float, **extra: Any) -> dict[str, Any]:
    return _record(stage, started, 0, skipped=True, **extra)


@contextlib.contextmanager
def _torch_threads_in_worker(config: TrainConfig) -> Iterator[None]:
    """Train with the host's cores inside a dask worker, which pins torch to one thread.

    Dask workers start with ``OMP_NUM_THREADS=1``; ``threads=0`` means "all cores", so
    the stage sets them here rather than in the config (whose dump fingerprints the
    model, and must not depend on where training ran).
    """
    if in_dask_worker() is None or config.threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


@task(name="ingest", retries=2, retry_condition_fn=_retry_transient)
def ingest_stage(
    images: list[str],
    store: str,
    labels: str | None,
    label_field: str | None,
    classes: str | None,
    block_size: int,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the region store, unless it was already built from the same inputs and settings.

    ``options`` are :func:`segpipe.stages.ingest.ingest`'s further keywords (grid, warp,
    label layer and background value).
    """
    from segpipe.io.fingerprint import store_inputs
    from segpipe.stages.ingest.driver import ingest
    from segpipe.stages.ingest.plan import GridRequest, LabelRequest, plan_warp, store_fingerprint

    log = get_run_logger()
    started = time.perf_counter()
    opts = dict(options or {})
    request = GridRequest(opts.get("crs"), opts.get("resolution"), opts.get("bounds"), opts.get("aoi"),
                          opts.get("resampling", "bilinear"), opts.get("order", "given"),
                          tuple(opts.get("assets") or ()))
    wanted = LabelRequest(labels, label_field, opts.get("label_layer"), opts.get("background_value"))
    made_from = store_fingerprint(images, wanted, classes, block_size, request, plan_warp(images, request))
    if store_inputs(store) == made_from:
        log.info("ingest: %s is up to date with its inputs; skipped", store)
        return _skipped("ingest", started, output=store)
    with release_worker_thread():
        info = ingest(
            images,
            store,
            labels=labels,
            label_field=label_field,
            classes=classes,
            block_size=block_size,
            overwrite=True,
            progress=log.info,
            **opts,
        )
    return _record("ingest", started, info.height * info.width, output=store)


def _pixels_trained(model: str, training: dict[str, Any]) -> int:
    """Pixels a training went through: every chip's for a network, the sampled ones for a forest.

    An ``--arch auto`` package counts every candidate it trained (``candidates/``).
    """
    from segpipe.models import read_spec

    if training.get("selection"):
        names = [n for n in training["selection"]["models"] if n != "ensemble"]
        return sum(_pixels_trained(model, read_spec(f"{model}/candidates/{n}").training) for n in names)
    used = training["config"]  # the settings as training chose them (auto ones too)
    if "samples_per_epoch" in used:
        return int(used["epochs"]) * int(used["samples_per_epoch"]) * int(used["chip_size"]) ** 2
    return int(training["train_pixels_sampled"]) + int(training["valid_pixels_sampled"])


def _asked(training: dict[str, Any]) -> Any:
    """The settings a package was trained with, as asked (before auto settings were chosen)."""
    selection = training.get("selection") or {}  # --arch auto: the selection's settings
    return selection.get("requested", training.get("requested", training.get("config")))


@task(name="train", retries=1, retry_condition_fn=_retry_transient)
def train_stage(store: str, model: str, config: TrainConfig) -> dict[str, Any]:
    """Train a model package from the store's labels, unless one exists for the same store and settings."""
    from segpipe.errors import ModelPackageError
    from segpipe.io.fingerprint import store_inputs
    from segpipe.io.store import read_region_info
    from segpipe.models import read_spec
    from segpipe.stages.train import train

    log = get_run_logger()
    started = time.perf_counter()
    try:
        done = read_spec(model).training
    except ModelPackageError:
        done = {}
    current = store_inputs(store)
    # Compared as JSON, as the package keeps them (a tuple comes back a list).
    if current and done.get("store_inputs") == current and _asked(done) == config.model_dump(mode="json"):
        log.info("train: %s was trained on this store with these settings; skipped", model)
        return _skipped("train", started, output=model)

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

    with release_worker_thread(), _torch_threads_in_worker(config):
        spec = train(store, model, config, progress=report)
    info = read_region_info(store)
    return _record(
        "train",
        started,
        _pixels_trained(model, spec.training),
        output=model,
        valid_miou=spec.metrics.get("miou"),
        region_megapixels=info.height * info.width / 1e6,
    )


@task(name="predict", retries=2, retry_condition_fn=_retry_transient)
def predict_stage(
    store: str, model: str, tile_size: int | None, overlap: int | None, scheduler: str | None,
    allow_resolution_mismatch: bool = False, tta: bool | None = None,
) -> dict[str, Any]:
    """Classify every pixel on a Dask cluster (local by default), unless every block is finished."""
    from segpipe.cluster import describe_cluster, get_client
    from segpipe.stages.predict.driver import check_predict_inputs, pending_blocks, predict

    log = get_run_logger()
    started = time.perf_counter()
    output = f"{store} (classes, confidence)"
    # Checked before any cluster is started or joined: a bad package or setting fails at
    # once (its weights are loaded here, once), and a finished region costs nothing.
    check_predict_inputs(store, model, tile_size, overlap, tta=tta,
                         allow_resolution_mismatch=allow_resolution_mismatch)
    pending, total = pending_blocks(store, model, tile_size, overlap, tta=tta)
    if pending == 0:
        log.info("predict: all %d blocks are finished for this model and settings; skipped", total)
        return _skipped("predict", started, output=output, blocks=total, blocks_skipped=total)
    with get_client(scheduler) as client:
        log.info("predict: dask cluster %s; dashboard %s", describe_cluster(client), client.dashboard_link)
        last = [0]

        def report(done: int, total: int) -> None:
            if done == total or done - last[0] >= max(1, total // 10):
                last[0] = done
                log.info("predict: %d/%d blocks", done, total)

        summary = predict(store, model, tile_size=tile_size, overlap=overlap, client=client, progress=report,
                          tta=tta, allow_resolution_mismatch=allow_resolution_mismatch)
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
        output=output,
        blocks=summary.blocks_total,
        blocks_skipped=summary.blocks_skipped,
        tta=summary.tta,
    )


@task(name="export", retries=2, retry_condition_fn=_retry_transient)
def export_stage(store: str, out: str, layer: str) -> dict[str, Any]:
    """Export one store layer as a Cloud-Optimized GeoTIFF, unless ``out`` was made from the same layer."""
    from flows.resume import forget, is_current, remember
    from segpipe.io.fingerprint import layer_fingerprint
    from segpipe.io.store import read_region_info
    from segpipe.stages.export.cog import write_cog

    log = get_run_logger()
    started = time.perf_counter()
    made_from = {"layer": layer, "predictions": layer_fingerprint(store, layer)}
    if is_current(out, made_from):
        log.info("export %s: %s was made from the same predictions; skipped", layer, out)
        return _skipped(f"export {layer}", started, output=out)
    forget(out)
    with release_worker_thread():
        write_cog(store, out, layer=layer)
    remember(out, made_from, stage="export")
    info = read_region_info(store)
    return _record(f"export {layer}", started, info.height * info.width, output=out)


@task(name="evaluate")
def evaluate_stage(store: str, reference: str, out_dir: str, layer: str) -> dict[str, Any]:
    """Evaluate a store layer against a reference, unless the report was made from the same inputs."""
    from flows.resume import forget, is_current, record_of, remember
    from segpipe.io.fingerprint import files_fingerprint, layer_fingerprint
    from segpipe.io.remote import is_remote, join
    from segpipe.stages.evaluate.assess import evaluate

    log = get_run_logger()
    started = time.perf_counter()
    metrics = join(out_dir, "metrics.json") if is_remote(out_dir) else str(Path(out_dir) / "metrics.json")
    made_from = {
        "layer": layer,
        "predictions": layer_fingerprint(store, layer),
        "reference": files_fingerprint([reference]),
    }
    record = record_of(metrics) or {}
    if is_current(metrics, made_from) and isinstance(record.get("result"), dict):
        result = record["result"]
        log.info("evaluate %s: %s was made from the same predictions and reference; skipped", layer, metrics)
        return _skipped(
            f"evaluate {layer}",
            started,
            output=out_dir,
            miou=result["miou"],
            overall_accuracy=result["overall_accuracy"],
        )
    forget(metrics)
    with release_worker_thread():
        result = evaluate(store, reference, out_dir, layer=layer)
    remember(
        metrics,
        made_from,
        stage="evaluate",
        result={"miou": result["miou"], "overall_accuracy": result["overall_accuracy"]},
    )
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
    """Per-pixel random forest on the same labels, for comparison, unless made from the same store."""
    from segpipe.errors import StoreError
    from segpipe.io.fingerprint import store_inputs
    from segpipe.io.store import open_layer
    from segpipe.stages.predict.baseline import random_forest_baseline

    log = get_run_logger()
    started = time.perf_counter()
    stage, output = "baseline (random forest)", f"{store} ({BASELINE_LAYER})"
    # The forest is seeded, so the same store gives the same layer: the store's inputs
    # fingerprint, recorded on the layer once it is complete, identifies it.
    made_from = {"store_inputs": store_inputs(store)}
    try:
        done = open_layer(store, BASELINE_LAYER).attrs.get("segpipe_baseline")
    except StoreError:
        done = None
    if made_from["store_inputs"] and done == made_from:
        log.info("baseline: %s was made from this store; skipped", BASELINE_LAYER)
        return _skipped(stage, started, output=output)
    with release_worker_thread():
        result = random_forest_baseline(store, layer=BASELINE_LAYER)
    open_layer(store, BASELINE_LAYER, mode="r+").attrs.update({"segpipe_baseline": made_from})
    return _record(stage, started, result["pixels"], output=output)
