"""``process_regions``: many regions from a manifest, a few at a time.

Each region runs the whole ``process_region`` flow (as a subflow) inside one task, so
regions proceed independently: one region's failure does not stop the others, and the
batch fails at the end, naming every failed region.

With ``task_runner: dask`` (for the whole manifest or per region) the regions' stages
run on a Dask cluster: the regions' ``scheduler``, else ``SEGPIPE_SCHEDULER``, else one
local cluster started for the batch and shared by its regions. The region tasks
themselves stay in the flow's process: they only wait on their stages.
"""

# No `from __future__ import annotations`: Prefect builds its parameter model from the
# evaluated annotations, and string annotations fail to resolve in served deployments.
import contextlib
import os
import threading
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.client.schemas.objects import State
from prefect.futures import wait

from flows.manifest import Manifest
from flows.process_region import RegionRun, run_region
from flows.signals import relays_signals
from segpipe.boundary import one_line
from segpipe.cluster import SCHEDULER_ENV, get_client, scheduler_address
from segpipe.errors import BatchError

__all__ = ["failure_cause", "process_regions"]

# One semaphore per batch run: the task runner's thread pool is shared, the limit is not.
_LIMITS: dict[str, threading.BoundedSemaphore] = {}


def _limit(key: str) -> threading.BoundedSemaphore:
    return _LIMITS[key]


def failure_cause(state: State) -> str:
    """A failed region's cause in one line: the error's type and message (its file, tile or address)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the result could not be read back (crashed run, lost storage)
        exc = None
    if isinstance(exc, BaseException):
        return one_line(exc)
    return " ".join(str(state.message or state.name).split())


@task(name="region")
def region_task(run: RegionRun, limit_key: str) -> dict[str, Any]:
    """Process one region, waiting for a free slot of the batch's concurrency limit."""
    # The semaphores are reached through a module function, not named here: a region's
    # stages on a DaskTaskRunner carry this task's context, and pickling this function
    # by value would then try to pickle every semaphore it names.
    with _limit(limit_key):
        return run_region(run)


def _write_collection(out: str, results: dict[str, Any], log: Any) -> None:
    """The STAC Collection of the Items beside every COG the finished regions exported (local ones)."""
    from segpipe.io.remote import is_remote
    from segpipe.stages.export.collection import write_collection
    from segpipe.stages.export.stac import stac_item_path

    cogs = [s["output"] for r in results.values() for s in r.get("stages", [])
            if str(s.get("stage", "")).startswith("export") and s.get("output")]
    local = [stac_item_path(c) for c in cogs if not is_remote(c)]
    if len(local) < len(cogs):
        log.warning("the STAC Collection lists local exports only: %d on object storage left out",
                    len(cogs) - len(local))
    if local:
        log.info("STAC Collection of %d items: %s", len(local), write_collection(local, out))


@flow(name="process-regions", log_prints=True)
@relays_signals
def process_regions(manifest: Manifest) -> dict[str, Any]:
    """Process every region of a manifest, ``manifest.concurrency`` at a time.

    Args:
        manifest: Regions, the concurrency limit and where the regions' stages run.

    Returns:
        ``{"regions": {name: result of process_region}}``.

    Raises:
        BatchError: One or more regions failed (the others ran to the end); its message
            names each failed region and its cause.
    """
    log = get_run_logger()
    key = str(runtime.flow_run.id)
    _LIMITS[key] = threading.BoundedSemaphore(manifest.concurrency)
    try:
        names = [r.name or f"region-{i + 1}" for i, r in enumerate(manifest.regions)]
        regions = [
            r.model_copy(update={"task_runner": manifest.task_runner}) if manifest.task_runner else r
            for r in manifest.regions
        ]
        with contextlib.ExitStack() as stack:
            if any(r.task_runner == "dask" and not r.scheduler for r in regions) and not os.environ.get(
                SCHEDULER_ENV
            ):
                # One local cluster for the batch, not one per region: regions share its workers.
                client = stack.enter_context(get_client())
                address = scheduler_address(client)
                log.info("dask cluster for the batch at %s; dashboard %s", address, client.dashboard_link)
                regions = [
                    r.model_copy(update={"scheduler": address})
                    if r.task_runner == "dask" and not r.scheduler
                    else r
                    for r in regions
                ]
            futures = [
                region_task.with_options(name=f"region {n}").submit(r, key)
                for n, r in zip(names, regions, strict=True)
            ]
            wait(futures)
        results: dict[str, Any] = {}
        failed: list[str] = []
        for name, future in zip(names, futures, strict=True):
            if future.state.is_completed():
                results[name] = future.result()
                r = results[name]
                log.info("region %s: done in %.1f s (mIoU %s)", name, r.get("seconds", 0.0), r.get("miou"))
            else:
                cause = failure_cause(future.state)
                failed.append(f"{name} ({cause})")
                log.error("region %s failed: %s", name, cause)
        if manifest.collection:
            _write_collection(manifest.collection, results, log)
        if failed:
            raise BatchError(f"{len(failed)} of {len(names)} regions failed: {'; '.join(failed)}")
        return {"regions": results}
    finally:
        _LIMITS.pop(key, None)
