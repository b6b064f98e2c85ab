"""Where a predict run's tasks execute: on a Dask cluster, or in this process.

On a cluster (:func:`run_on_cluster`) the tasks are mapped over the workers, with a
``GPU`` resource on GPU clusters. In this process (:func:`run_in_process`) dask's local
scheduler runs them, ``threads`` or ``synchronous`` (the random-forest baseline runs
this way, inside a flow's task). Either way each task's stats are handed to a
callback as it finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from segpipe.stages.predict.jobs import BlockJob, ClusterLayout
from segpipe.stages.predict.worker import run_block, usable_cores, worker_host

if TYPE_CHECKING:
    import distributed

__all__ = ["LOCAL_SCHEDULERS", "cluster_layout", "local_layout", "run_in_process", "run_on_cluster"]

LOCAL_SCHEDULERS = ("threads", "synchronous")
"""dask's in-process schedulers, accepted in place of a scheduler address."""

Record = Callable[[dict[str, float]], None]
"""Called with each task's stats (:func:`segpipe.stages.predict.worker.run_block`) as it finishes."""


def cluster_layout(client: distributed.Client) -> ClusterLayout:
    """Ask the scheduler (and, on CPU clusters, every worker's core count) once."""
    workers: dict[str, Any] = client.scheduler_info(n_workers=-1).get("workers", {})
    gpus = sum(int((w.get("resources") or {}).get("GPU", 0)) for w in workers.values())
    if gpus:
        return ClusterLayout(gpus, True)
    slots = max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
    cores: dict[str, int] = client.run(usable_cores)
    per_host: dict[str, tuple[int, int]] = {}
    for addr, w in workers.items():
        host = worker_host(addr)
        n_cores, n_slots = per_host.get(host, (0, 0))
        per_host[host] = (max(n_cores, int(cores.get(addr) or 1)), n_slots + int(w.get("nthreads", 1)))
    return ClusterLayout(slots, False, tuple((h, c, n) for h, (c, n) in sorted(per_host.items())))


def local_layout(scheduler: str) -> ClusterLayout:
    """The task slots of dask's local ``scheduler``: its threads, or one.

    No hosts are listed, so each task runs one forward stream with torch's own threads,
    and a task alone is planned as no faster than beside others: the plan then gives
    each of the scheduler's threads a task.
    """
    import dask
    from dask.system import CPU_COUNT

    slots = 1 if scheduler == "synchronous" else int(dask.config.get("num_workers", None) or CPU_COUNT)
    return ClusterLayout(max(1, slots), False, speedup=0.0)


def run_on_cluster(client: distributed.Client, jobs: Sequence[BlockJob], gpu: bool, record: Record) -> None:
    """Map :func:`run_block` over the jobs on a cluster; raise the first task's error.

    Args:
        client: The cluster's client.
        jobs: The tasks.
        gpu: Tasks must run on workers with a ``GPU`` resource.
        record: Called with each task's stats as it finishes.
    """
    from distributed import as_completed

    # In a mixed cluster, the GPU resource keeps prediction on the GPU workers. pure=False:
    # a rerun of an equal job after a failure must run again, not reuse the failed result.
    futures = client.map(run_block, list(jobs), pure=False, resources={"GPU": 1} if gpu else None)
    try:
        for future in as_completed(futures, loop=client.loop):  # untyped
            record(future.result())
    except BaseException:
        # A failed task or an interrupted driver: queued tasks are dropped; blocks
        # already marked stay done for the next run.
        client.cancel(futures)  # distributed is untyped here
        raise


def run_in_process(jobs: Sequence[BlockJob], scheduler: str, record: Record) -> None:
    """Run the jobs in this process with dask's local ``scheduler``; raise the first task's error.

    Args:
        jobs: The tasks.
        scheduler: ``threads`` or ``synchronous``.
        record: Called with each task's stats as it finishes (in this thread).
    """
    from dask.base import compute
    from dask.delayed import delayed

    # Keys from the jobs' deterministic tokens; no two jobs of a run are equal.
    tasks = [delayed(run_block, pure=True)(job) for job in jobs]
    keys = {task.key for task in tasks}

    def finished(key: Any, result: Any, *_: Any) -> None:
        if key in keys:
            record(result)

    # A callback of this computation only (start, start_state, pretask, posttask, finish):
    # dask's global Callback registry would see other threads' computations too.
    compute(*tasks, scheduler=scheduler,  # dask.base.compute is untyped
            callbacks=[(None, None, None, finished, None)])
