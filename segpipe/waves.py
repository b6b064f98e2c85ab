"""Bounded work: a run's tasks go to the cluster a few at a time, never as one graph.

A whole region is 10^4-10^6 blocks. Mapping every task at once makes the driver hold a
future per task and the scheduler a task state per task (hundreds of MB at a million).
Prediction submits at most :func:`in_flight_limit` tasks at a time (:func:`submit_bounded`),
pulling the next ones from a lazy job generator
(:func:`segpipe.stages.predict.jobs.iter_jobs`) as earlier ones finish; finished blocks
are tracked by the workers' markers in the store, not by the driver. Ingest and
evaluate build dask graphs; they compute them one wave of at most :data:`WAVE_BLOCKS`
blocks (or windows) at a time (:func:`block_spans`, :func:`waves`), so no graph grows
with the region.

A run that fails stops cleanly: its queued tasks are cancelled, and the driver raises only
once its tasks already running have left the workers (:func:`drain`; a cancelled task
stops at its next block, see :func:`task_cancelled`); in this process, dask's threaded
scheduler runs in a pool of the call's own, shut down waiting (:func:`compute_in_threads`).
Until then the run still holds its store, so no task of a failed run writes beside the
next run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar

from segpipe.stop import check_stop

if TYPE_CHECKING:
    import distributed

__all__ = [
    "DRAIN_SECONDS", "IN_FLIGHT_PER_SLOT", "MIN_IN_FLIGHT", "WAVE_BLOCKS", "block_spans",
    "compute_in_threads", "drain", "in_flight_limit", "submit_bounded", "task_cancelled", "waves",
]

log = logging.getLogger(__name__)

IN_FLIGHT_PER_SLOT = 4
"""Tasks in flight per task slot: enough queued that no slot idles while the driver refills."""
MIN_IN_FLIGHT = 8
"""Fewest tasks in flight, whatever the cluster (a 1-slot cluster still pipelines)."""

WAVE_BLOCKS = 1024
"""Most blocks (or windows) one dask graph of ingest or evaluate covers: a few thousand
tasks, enough that every slot of a large cluster is busy, small enough that the driver and
the scheduler hold a wave, not the region. A wave waits for its slowest task before the
next starts; at 1024 blocks that tail is about one task per slot in a thousand."""

DRAIN_SECONDS = 600.0
"""Longest a failed run waits for its running tasks to stop before it raises anyway."""
DRAIN_POLL_SECONDS = 0.2
"""How often :func:`drain` asks the workers what still runs."""

J = TypeVar("J")
Record = Callable[[Any], None]


def in_flight_limit(slots: int) -> int:
    """Most tasks submitted and unfinished at once on a cluster with ``slots`` task slots."""
    return max(MIN_IN_FLIGHT, IN_FLIGHT_PER_SLOT * max(1, slots))


def waves(jobs: Iterable[J], size: int | None = None) -> Iterator[list[J]]:
    """The jobs in lists of at most ``size`` (default :data:`WAVE_BLOCKS`, read when called).

    Jobs are pulled from ``jobs`` only as each list is asked for.
    """
    size = WAVE_BLOCKS if size is None else size
    if size < 1:
        raise ValueError(f"wave size {size} must be at least 1")
    it = iter(jobs)
    while wave := list(islice(it, size)):
        check_stop()  # a signal stops a run in a flow's thread between waves
        yield wave


def block_spans(rows: int, cols: int, most: int | None = None) -> Iterator[tuple[slice, slice]]:
    """A grid of ``rows`` x ``cols`` blocks in rectangles of at most ``most`` blocks, row-major.

    Whole block rows go together while they fit; a row longer than ``most`` is cut into
    pieces of ``most`` blocks. Slices are in block units. ``most`` defaults to
    :data:`WAVE_BLOCKS`, read when called.
    """
    most = WAVE_BLOCKS if most is None else most
    if most < 1:
        raise ValueError(f"wave size {most} must be at least 1")
    if rows < 1 or cols < 1:
        return
    for span in _spans(rows, cols, most):
        check_stop()  # a signal stops a run in a flow's thread between waves
        yield span


def _spans(rows: int, cols: int, most: int) -> Iterator[tuple[slice, slice]]:
    if cols <= most:
        step = most // cols
        for r0 in range(0, rows, step):
            yield slice(r0, min(rows, r0 + step)), slice(0, cols)
        return
    for r0 in range(rows):
        for c0 in range(0, cols, most):
            yield slice(r0, r0 + 1), slice(c0, min(cols, c0 + most))


def submit_bounded(
    client: distributed.Client,
    task: Callable[[J], Any],
    jobs: Iterable[J],
    limit: int,
    record: Record,
    resources: dict[str, float] | None = None,
) -> int:
    """Run ``task`` over ``jobs`` with at most ``limit`` in flight; raise the first task's error.

    Jobs are pulled from ``jobs`` lazily and submitted in small batches (a quarter of the
    limit: one scheduler message per batch, not per task) whenever that many have
    finished. On an error, or an interrupted driver, every task still queued or running
    is cancelled and no further job is pulled; blocks already marked stay done for the
    next run.

    Args:
        client: The cluster's client.
        task: The function each job runs through (picklable).
        jobs: The jobs (an iterator is consumed only as tasks finish).
        limit: Most tasks submitted and not yet finished (at least 1).
        record: Called with each task's result as it finishes (in this thread).
        resources: Worker resources every task needs (``{"GPU": 1}`` on GPU clusters).

    Returns:
        The number of tasks run.
    """
    from distributed import as_completed

    if limit < 1:
        raise ValueError(f"in-flight limit {limit} must be at least 1")
    it = iter(jobs)
    refill = max(1, limit // 4)
    live: set[Any] = set()
    # with_results: results are gathered in the background as tasks finish, not one
    # round trip per task from this loop.
    pending = as_completed(loop=client.loop, with_results=True)  # distributed is untyped here

    def submit(n: int) -> None:
        batch = list(islice(it, n))
        if batch:
            # pure=False: a rerun of an equal job after a failure must run again.
            futures = client.map(task, batch, pure=False, resources=resources)
            live.update(futures)
            pending.update(futures)

    count = 0
    try:
        submit(limit)
        for future, result in pending:
            check_stop()  # a signal stops a run in a flow's thread at its next finished task
            live.discard(future)
            count += 1
            record(result)
            if len(live) <= limit - refill:
                submit(limit - len(live))
    except BaseException:
        client.cancel(list(live))
        # A cancelled task keeps running on its worker; raising now would let it write
        # after this run has let go of its store (a rerun, or another run, in between).
        drain(client, [future.key for future in live])
        raise
    return count


def task_cancelled() -> bool:
    """Whether the Dask task calling this was cancelled (False outside a worker's task).

    Python cannot stop a thread from outside, so a cancelled task runs on until it
    returns; a long task asks this between its writes and stops early, writing nothing
    more.
    """
    try:
        from distributed import get_worker

        worker = get_worker()
        key = worker.get_current_task()
    except (ImportError, ValueError, KeyError):  # not in a worker's task (dask's local schedulers)
        return False
    state = worker.state.tasks.get(key)
    return state is not None and state.state == "cancelled"


def _running_keys(dask_worker: Any = None) -> list[Any]:
    """The keys of the tasks occupying a thread of this worker (run on each worker)."""
    return [ts.key for ts in dask_worker.state.all_running_tasks]


def _same(key: Any) -> Any:
    return key


def drain(
    client: distributed.Client,
    keys: Collection[Any],
    timeout: float | None = None,
    identify: Callable[[Any], Any] = _same,
) -> bool:
    """Wait until no task of ``keys`` (cancelled or not) still runs on a worker.

    Args:
        client: The cluster's client.
        keys: The tasks' keys (a future's ``key``).
        timeout: Most seconds to wait; default :data:`DRAIN_SECONDS`, read when called.
        identify: What two keys share when they are the same task (default the key
            itself; a graph whose optimisation renames fused tasks matches on the
            name's token instead).

    Returns:
        Whether they all stopped; False after the timeout (with a warning logged), or
        when the workers cannot be asked (the cluster itself failed).
    """
    wanted = {identify(key) for key in keys}
    deadline = time.monotonic() + (DRAIN_SECONDS if timeout is None else timeout)
    while wanted:
        try:
            running: dict[str, list[Any]] = client.run(_running_keys)
        except Exception as exc:  # a broken cluster (or a worker gone) runs nothing more of ours
            # debug, not warning: the run's own error line is what the user must read.
            log.debug("could not ask the workers which tasks still run (%s); not waiting for them", exc)
            return False
        still = sum(identify(key) in wanted for found in running.values() for key in found)
        if not still:
            return True
        if time.monotonic() > deadline:
            log.warning("%d tasks of the failed run still run on the workers; raising without them", still)
            return False
        time.sleep(DRAIN_POLL_SECONDS)
    return True


def compute_in_threads(*collections: Any, threads: int, **kwargs: Any) -> tuple[Any, ...]:
    """``dask.compute`` on dask's threaded scheduler that returns or raises only once none of its tasks runs.

    Dask's local scheduler raises at the first failed task while the others carry on in
    its shared pool; here they run in a pool of this call's own, shut down waiting for
    them, so a failed run's caller cleans up (or unlocks) after its last write.

    Args:
        *collections: What to compute.
        threads: Threads of the pool (at least 1).
        **kwargs: Passed on to ``dask.compute`` (callbacks, for instance).

    Returns:
        The computed values, as ``dask.compute`` returns them.
    """
    from concurrent.futures import ThreadPoolExecutor

    from dask.base import compute

    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="segpipe-compute")
    try:
        results: tuple[Any, ...] = compute(*collections, scheduler="threads", pool=pool, **kwargs)
        return results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
