"""Bounded submission: a run's tasks go to the cluster a few at a time, never as one graph.

A whole region is 10^4-10^6 blocks. Mapping every task at once makes the driver hold a
future per task and the scheduler a task state per task (hundreds of MB at a million);
here at most :func:`in_flight_limit` tasks are submitted and unfinished at any time, and
the next ones are pulled from a lazy job generator
(:func:`segpipe.stages.predict.jobs.iter_jobs`) as earlier ones finish. Finished blocks
are tracked by the workers' markers in the store, not by the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import distributed

__all__ = ["IN_FLIGHT_PER_SLOT", "MIN_IN_FLIGHT", "in_flight_limit", "submit_bounded", "waves"]

IN_FLIGHT_PER_SLOT = 4
"""Tasks in flight per task slot: enough queued that no slot idles while the driver refills."""
MIN_IN_FLIGHT = 8
"""Fewest tasks in flight, whatever the cluster (a 1-slot cluster still pipelines)."""

J = TypeVar("J")
Record = Callable[[Any], None]


def in_flight_limit(slots: int) -> int:
    """Most tasks submitted and unfinished at once on a cluster with ``slots`` task slots."""
    return max(MIN_IN_FLIGHT, IN_FLIGHT_PER_SLOT * max(1, slots))


def waves(jobs: Iterable[J], size: int) -> Iterator[list[J]]:
    """The jobs in lists of at most ``size``, pulled from ``jobs`` only as each list is asked for."""
    if size < 1:
        raise ValueError(f"wave size {size} must be at least 1")
    it = iter(jobs)
    while wave := list(islice(it, size)):
        yield wave


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
