"""``process_regions``: many regions from a manifest, a few at a time.

Each region runs the whole ``process_region`` flow (as a subflow) inside one task, so
regions proceed independently: one region's failure does not stop the others, and the
batch fails at the end, naming every failed region.
"""

# No `from __future__ import annotations`: Prefect builds its parameter model from the
# evaluated annotations, and string annotations fail to resolve in served deployments.
import threading
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.futures import wait

from flows.manifest import Manifest
from flows.process_region import RegionRun, process_region
from segpipe.errors import BatchError

__all__ = ["process_regions"]

# One semaphore per batch run: the task runner's thread pool is shared, the limit is not.
_LIMITS: dict[str, threading.BoundedSemaphore] = {}


@task(name="region")
def region_task(run: RegionRun, limit_key: str) -> dict[str, Any]:
    """Process one region, waiting for a free slot of the batch's concurrency limit."""
    with _LIMITS[limit_key]:
        return process_region(run)


@flow(name="process-regions", log_prints=True)
def process_regions(manifest: Manifest) -> dict[str, Any]:
    """Process every region of a manifest, ``manifest.concurrency`` at a time.

    Args:
        manifest: Regions and the concurrency limit.

    Returns:
        ``{"regions": {name: result of process_region}}``.

    Raises:
        BatchError: One or more regions failed (the others ran to the end).
    """
    log = get_run_logger()
    key = str(runtime.flow_run.id)
    _LIMITS[key] = threading.BoundedSemaphore(manifest.concurrency)
    try:
        names = [r.name or f"region-{i + 1}" for i, r in enumerate(manifest.regions)]
        futures = [
            region_task.with_options(name=f"region {n}").submit(r, key)
            for n, r in zip(names, manifest.regions, strict=True)
        ]
        wait(futures)
        results: dict[str, Any] = {}
        failed: list[str] = []
        for name, future in zip(names, futures, strict=True):
            if future.state.is_completed():
                results[name] = future.result()
                log.info("region %s: done (mIoU %s)", name, results[name].get("miou"))
            else:
                failed.append(name)
                log.error("region %s failed: %s", name, future.state.message)
        if failed:
            raise BatchError(f"{len(failed)} of {len(names)} regions failed: {', '.join(failed)}")
        return {"regions": results}
    finally:
        _LIMITS.pop(key, None)
