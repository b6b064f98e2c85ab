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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import distributed

__all__ = [
    "IN_FLIGHT_PER_SLOT", "MIN_IN_FLIGHT", "WAVE_BLOCKS", "block_spans", "in_flight_limit", "submit_bounded",
    "waves",
]

IN_FLIGHT_PER_SLOT = 4
"""Tasks in flight per task slot: enough queued that no slot idles while the driver refills."""
MIN_IN_FLIGHT = 8
"""Fewest tasks in flight, whatever the cluster (a 1-slot cluster still pipelines)."""

WAVE_BLOCKS = 1024
"""Most blocks (or windows) one dask graph of ingest or evaluate covers: a few thousand
tasks, enough that every slot of a large cluster is busy, small enough that the driver and
the scheduler hold a wave, not the region. A wave waits for its slowest task before the
next starts; at 1024 blocks that tail is about one task per slot in a thousand."""

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
            live.discard(future)
            count += 1
            record(result)
            if len(live) <= limit - refill:
                submit(limit - len(live))
    except BaseException:
        client.cancel(list(live))
        raise
    return count
