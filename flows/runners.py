"""Where a flow's tasks run: Prefect's thread pool in the flow's process, or a Dask cluster.

``local`` (the default) runs tasks in threads of the flow's process. ``dask`` runs them
on a Dask cluster through prefect-dask's ``DaskTaskRunner``: the cluster at the given
scheduler address, else at ``SEGPIPE_SCHEDULER``, else a local cluster started for the
run (see :func:`segpipe.cluster.get_client`). The same cluster serves the tasks and
the prediction blocks they submit.
"""

# No `from __future__ import annotations`: modules in flows/ keep evaluated annotations
# (Prefect builds parameter models from them in served deployments).
import contextlib
from collections.abc import Iterator
from typing import Any, Literal

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

__all__ = ["TaskRunnerName", "task_runner"]

TaskRunnerName = Literal["local", "dask"]


@contextlib.contextmanager
def _api_for_workers() -> Iterator[None]:
    """Give task runs in worker processes this process's Prefect API.

    Without a configured API, every worker process would start an ephemeral Prefect
    server of its own (seconds each, all writing one SQLite file). Naming the one this
    process uses in the settings makes prefect-dask ship it to the workers with each
    task; a multi-host cluster needs a real Prefect server (``PREFECT_API_URL``).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the same instance Prefect's client starts on its own
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


@contextlib.contextmanager
def task_runner(
    name: TaskRunnerName, scheduler: str | None = None
) -> Iterator[tuple[TaskRunner[Any], str | None]]:
    """A task runner for ``flow.with_options(task_runner=...)``, with its cluster kept up meanwhile.

    Args:
        name: ``local`` (threads in this process) or ``dask`` (a Dask cluster).
        scheduler: Scheduler address for ``dask``; default ``SEGPIPE_SCHEDULER``, else a
            local cluster that lives as long as the context.

    Yields:
        The task runner and the scheduler address its tasks run on (None for ``local``).
    """
    if name == "local":
        yield ThreadPoolTaskRunner(), None
        return
    from prefect_dask.task_runners import DaskTaskRunner

    from segpipe.cluster import get_client, scheduler_address

    with _api_for_workers(), get_client(scheduler) as client:
        address = scheduler_address(client)
        yield DaskTaskRunner(address=address), address
