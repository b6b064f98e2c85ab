"""Where a predict run's tasks execute: on a Dask cluster, or in this process.

On a cluster (:func:`run_on_cluster`) the tasks are submitted a bounded number at a
time (:mod:`segpipe.waves`), with a ``GPU`` resource on GPU clusters. In
this process (:func:`run_in_process`) dask's local scheduler runs them in waves,
``threads`` or ``synchronous`` (the random-forest baseline runs this way, inside a
flow's task). Either way each task's stats are handed to a
callback as it finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from segpipe.cores import usable_cores
from segpipe.stages.predict.jobs import BlockJob, ClusterLayout
from segpipe.stages.predict.worker import run_block, worker_host
from segpipe.waves import compute_in_threads, in_flight_limit, submit_bounded, waves

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


def run_on_cluster(
    client: distributed.Client, jobs: Iterable[BlockJob], gpu: bool, record: Record, slots: int = 1
) -> int:
    """Run :func:`run_block` over the jobs on a cluster, a bounded number at a time; raise the first error.

    At most :func:`segpipe.waves.in_flight_limit` ``(slots)`` tasks are
    submitted and unfinished at once; the next jobs are pulled from ``jobs`` (a lazy
    generator on large regions) as earlier ones finish. On an error or an interrupted
    driver the queued tasks are cancelled; blocks already marked stay done.

    Args:
        client: The cluster's client.
        jobs: The tasks.
        gpu: Tasks must run on workers with a ``GPU`` resource.
        record: Called with each task's stats as it finishes.
        slots: The cluster's task slots (see :class:`segpipe.stages.predict.jobs.ClusterLayout`).

    Returns:
        The number of tasks run.
    """
    # In a mixed cluster, the GPU resource keeps prediction on the GPU workers.
    return submit_bounded(client, run_block, jobs, in_flight_limit(slots), record,
                          {"GPU": 1} if gpu else None)


def run_in_process(jobs: Iterable[BlockJob], scheduler: str, record: Record, slots: int = 1) -> int:
    """Run the jobs in this process with dask's local ``scheduler``, in waves; raise the first task's error.

    Each wave is :func:`segpipe.waves.in_flight_limit` ``(slots)`` jobs,
    pulled from ``jobs`` only when the previous wave has finished: the driver never
    holds a graph of the whole region.

    Args:
        jobs: The tasks.
        scheduler: ``threads`` or ``synchronous``.
        record: Called with each task's stats as it finishes (in this thread).
        slots: The local scheduler's threads (see :func:`local_layout`).

    Returns:
        The number of tasks run.
    """
    count = 0
    for wave in waves(jobs, in_flight_limit(slots)):
        _compute_wave(wave, scheduler, record, slots)
        count += len(wave)
    return count


def _compute_wave(jobs: list[BlockJob], scheduler: str, record: Record, slots: int) -> None:
    """Run one wave of jobs with dask's local ``scheduler``, handing each task's stats to ``record``.

    On ``threads`` the wave has a pool of its own (``slots`` threads): a failed wave raises
    only once its other tasks have stopped writing.
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
    callbacks = [(None, None, None, finished, None)]
    if scheduler == "threads":
        compute_in_threads(*tasks, threads=slots, callbacks=callbacks)
    else:
        compute(*tasks, scheduler=scheduler, callbacks=callbacks)  # dask.base.compute is untyped
