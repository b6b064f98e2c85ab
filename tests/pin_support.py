"""Which cores a test process of an xdist run keeps (see ``conftest.pytest_configure``)."""

from __future__ import annotations


def process_cores(cores: list[int], worker: int, count: int, usable: int) -> list[int] | None:
    """The cores test process ``worker`` of ``count`` is pinned to, or None to leave it as it is.

    Args:
        cores: The cores of the affinity mask, sorted.
        worker: The process's number (xdist's ``gwN``).
        count: How many test processes run.
        usable: The cores the CPU quota allows (``segpipe.cores.usable_cores``).

    Returns:
        An equal share of the usable cores, disjoint from every other process's; None where
        there are fewer cores than processes, since nothing can then be split.
    """
    if len(cores) < count:
        return None
    share = max(1, min(len(cores), usable) // count)
    return cores[worker * share : (worker + 1) * share]
