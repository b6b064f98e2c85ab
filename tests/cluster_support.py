"""The real multi-process dask cluster the tests predict on (the ``client`` fixtures)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distributed import Client


@contextlib.contextmanager
def two_worker_cluster() -> Iterator[Client]:
    """A local cluster of two single-threaded worker processes, and its client.

    The client is not made dask's default scheduler, so plain ``dask.compute`` calls
    elsewhere in the session still run where they would without it.
    """
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        yield c
