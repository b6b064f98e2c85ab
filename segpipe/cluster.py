"""Dask clusters for segpipe stages: connect to one, or start a local one.

Order of preference: an explicit scheduler address, then ``SEGPIPE_SCHEDULER``, then
one worker per GPU (``dask_cuda.LocalCUDACluster``) where a GPU is present, then a
local CPU cluster of worker processes. A cluster this module started is closed on
exit; a cluster it only connected to is left running.

A local cluster's scheduler, workers and dashboard listen on 127.0.0.1 only: the
scheduler runs whatever code it is sent, and the dashboard shows the cluster's state.
``SEGPIPE_CLUSTER_HOST`` and ``SEGPIPE_DASHBOARD_ADDRESS`` (or the ``host`` and
``dashboard_address`` arguments) open them to a chosen interface. Connecting to a
scheduler gives up after ``SEGPIPE_CONNECT_TIMEOUT`` seconds (default 10) with a
:class:`~segpipe.errors.ClusterError` naming the address.

Code that already runs inside a task on a dask worker (a Prefect stage on a
``DaskTaskRunner``) uses that worker's cluster: it leaves the worker's thread pool while
it waits, so the work it submits can run even on single-threaded workers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from segpipe.cores import usable_cores

if TYPE_CHECKING:
    import distributed
    from distributed.deploy.cluster import Cluster

__all__ = [
    "CONNECT_TIMEOUT_ENV",
    "DASHBOARD_ENV",
    "HOST_ENV",
    "SCHEDULER_ENV",
    "describe_cluster",
    "get_client",
    "gpu_present",
    "in_dask_worker",
    "quiet_distributed_logs",
    "release_worker_thread",
    "scheduler_address",
]

log = logging.getLogger(__name__)

SCHEDULER_ENV = "SEGPIPE_SCHEDULER"
HOST_ENV = "SEGPIPE_CLUSTER_HOST"
DASHBOARD_ENV = "SEGPIPE_DASHBOARD_ADDRESS"
CONNECT_TIMEOUT_ENV = "SEGPIPE_CONNECT_TIMEOUT"
WORKER_CLOSE_TIMEOUT_ENV = "SEGPIPE_WORKER_CLOSE_TIMEOUT"

# Local clusters of regions processed in parallel threads overlap in time and close in
# any order: the logger is quietened by the first to start and restored by the last to stop.
_quiet_lock = threading.Lock()
_quiet_users = 0
_quiet_saved_level = logging.NOTSET


@contextlib.contextmanager
def quiet_distributed_logs() -> Iterator[None]:
    """Set the ``distributed`` logger to WARNING for the duration, safely from many threads.

    A local cluster's scheduler and nannies live in this process and log every worker
    start and stop at INFO, drowning the stage progress users read. Nested and
    overlapping uses are counted: the level in force before the first one is restored
    when the last one ends, whatever the order they end in.
    """
    global _quiet_users, _quiet_saved_level
    logger = logging.getLogger("distributed")
    with _quiet_lock:
        if _quiet_users == 0:
            _quiet_saved_level = logger.level
            logger.setLevel(logging.WARNING)
        _quiet_users += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if _quiet_users == 0:
                logger.setLevel(_quiet_saved_level)


def in_dask_worker() -> distributed.Worker | None:
    """The dask worker running the calling task, or None outside a dask task."""
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


@contextlib.contextmanager
def release_worker_thread() -> Iterator[None]:
    """Inside a dask task, leave the worker's thread pool for the duration; elsewhere a no-op.

    A Prefect stage running on a ``DaskTaskRunner`` worker holds one of its threads.
    Dask work the stage starts (``dask.compute`` runs on the worker's cluster there)
    would wait for a free thread that may never come when every thread holds a
    waiting stage; seceding frees the thread while the stage waits.
    """
    if in_dask_worker() is None:
        yield
        return
    from distributed import worker_client

    with worker_client():  # secedes; a nested use inside an already seceded task is a no-op
        yield


def _same_scheduler(address: str, worker: distributed.Worker) -> bool:
    from distributed.comm.addressing import resolve_address

    mine: str = worker.scheduler.address
    try:  # "localhost" and "127.0.0.1" name the same scheduler
        return bool(resolve_address(address) == resolve_address(mine))
    except (OSError, ValueError):
        return address == mine


def gpu_present() -> bool:
    """Whether an NVIDIA GPU looks usable, without initialising CUDA in this process.

    Checks for ``nvidia-smi`` and an importable ``dask_cuda``; CUDA itself is only
    touched by the workers.
    """
    return shutil.which("nvidia-smi") is not None and importlib.util.find_spec("dask_cuda") is not None


def _env_seconds(name: str, default: float) -> float:
    from segpipe.errors import InputError

    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise InputError(f"{name}={raw!r} must be a number of seconds") from None
    if value <= 0:
        raise InputError(f"{name}={raw!r} must be a number of seconds above 0")
    return value


def _patient_nanny() -> type:
    """A nanny that gives its worker process time to exit before killing it.

    A worker that has imported torch takes seconds to tear its interpreter down (1-4 s
    on a loaded machine), past the 4 s that distributed's nanny waits on close: every
    normal exit printed "Worker process still alive after 4.0 seconds, killing".
    dask_cuda's LocalCUDACluster does the same with its own nanny.
    """
    from distributed import Nanny

    default = _env_seconds(WORKER_CLOSE_TIMEOUT_ENV, 30.0)

    class PatientNanny(Nanny):
        async def close(self, timeout: float | None = default, reason: str = "nanny-close") -> Any:
            return await super().close(timeout=max(timeout or 0.0, default), reason=reason)

    return PatientNanny


def _local_cuda_cluster(host: str, dashboard_address: str) -> Any | None:
    try:
        from dask_cuda import LocalCUDACluster

        # Workers advertise a GPU resource: prediction tasks ask for it, so in a cluster
        # that mixes CPU and GPU workers they land on GPU workers only.
        return LocalCUDACluster(
            host=host,
            dashboard_address=dashboard_address,
            silence_logs=logging.WARNING,
            resources={"GPU": 1},
            preload=_worker_preload(),
        )
    except Exception as exc:  # NVML errors without a driver, missing CUDA libraries
        log.warning("no GPU cluster (%s); falling back to a CPU cluster", exc)
        return None


def _check_address(address: str) -> None:
    """Refuse an address distributed cannot parse, before a half-built Client lingers on it."""
    from distributed.comm.addressing import get_address_host_port, parse_address
    from distributed.comm.registry import get_backend

    from segpipe.errors import InputError

    try:
        scheme, _ = parse_address(address, strict=False)
        get_backend(scheme)
        if scheme in ("tcp", "tls", "ws", "wss"):
            get_address_host_port(address, strict=False)
    except ValueError as exc:  # an unknown scheme, no port, a port that is not a number
        raise InputError(f"scheduler address {address!r} is not usable ({exc}): use tcp://host:port") from exc


def _client(target: str | Cluster, **kwargs: Any) -> distributed.Client:
    """A client of ``target`` (an address or a cluster), not made the default (see :func:`get_client`)."""
    from distributed import Client

    return Client(target, set_as_default=False, **kwargs)


def _connect(address: str) -> distributed.Client:
    """A client of the scheduler at ``address``, or a ClusterError after the connect timeout."""
    from segpipe.errors import ClusterError

    _check_address(address)
    timeout = _env_seconds(CONNECT_TIMEOUT_ENV, 10.0)
    try:
        return _client(address, timeout=timeout)
    except (OSError, TimeoutError) as exc:  # refused, unreachable, timed out, closed comm
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address} within {timeout:g} s: check the address "
            f"and port, that the scheduler is running and that no firewall blocks it "
            f"(or set {CONNECT_TIMEOUT_ENV} to wait longer)"
        ) from exc


@contextlib.contextmanager
def get_client(
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    processes: bool = True,
    host: str | None = None,
    dashboard_address: str | None = None,
) -> Iterator[distributed.Client]:
    """Yield a dask client, starting a local cluster only when there is none to join.

    Args:
        scheduler: Scheduler address (e.g. ``tcp://host:8786``); default: the
            ``SEGPIPE_SCHEDULER`` environment variable, else a local cluster.
        n_workers: Local CPU workers; default: usable cores / threads per worker.
        threads_per_worker: Task threads per local CPU worker. Prediction sets each
            task's torch threads itself (a host's cores shared among the tasks it runs).
        processes: Local workers as separate processes (the GIL-free choice).
        host: Interface a local cluster's scheduler and workers listen on; default:
            ``SEGPIPE_CLUSTER_HOST``, else 127.0.0.1 (this machine only).
        dashboard_address: ``host:port`` of a local cluster's dashboard; default:
            ``SEGPIPE_DASHBOARD_ADDRESS``, else a free port on ``host``.

    Yields:
        A connected :class:`distributed.Client`. It is not made the process's default
        scheduler: regions processed in parallel threads each open one, and a default
        set by one and restored out of order by another left plain ``dask.compute``
        calls pointing at a closed cluster. Pass the client explicitly. Inside a task
        on a dask worker, with no address or the worker's own scheduler's, it is the
        worker's client and the task leaves the worker's thread pool while it runs (a
        local cluster cannot start inside a worker process, and a task waiting on a
        thread of its own cluster could wait forever).

    Raises:
        ClusterError: The scheduler at the address did not answer within
            ``SEGPIPE_CONNECT_TIMEOUT`` seconds (default 10).
        InputError: The address cannot be parsed, or a timeout setting is not a number.
    """
    address = scheduler or os.environ.get(SCHEDULER_ENV)
    worker = in_dask_worker()
    if worker is not None and (not address or _same_scheduler(address, worker)):
        from distributed import worker_client

        with worker_client() as client:
            log.info("inside a dask worker: using its cluster at %s", worker.scheduler.address)
            yield client
        return
    if address:
        with _connect(address) as client:
            log.info("connected to %s (dashboard %s)", address, client.dashboard_link)
            yield client
        return
    host = host or os.environ.get(HOST_ENV) or "127.0.0.1"
    dashboard_address = dashboard_address or os.environ.get(DASHBOARD_ENV) or f"{host}:0"
    with quiet_distributed_logs():
        cluster = _local_cuda_cluster(host, dashboard_address) if gpu_present() else None
        if cluster is None:
            cluster = _local_cluster(n_workers, threads_per_worker, processes, host, dashboard_address)
        try:
            # The client closes first (the with block), then the cluster: a cluster
            # closed under a connected client makes the client log reconnect attempts.
            with _client(cluster) as client:
                log.info("started %s; dashboard %s", describe_cluster(client), client.dashboard_link)
                yield client
        finally:
            cluster.close()


def _local_cluster(
    n_workers: int | None, threads_per_worker: int, processes: bool, host: str, dashboard_address: str
) -> distributed.LocalCluster:
    """A local CPU cluster (see :func:`get_client` for the arguments)."""
    from distributed import LocalCluster

    threads = max(1, threads_per_worker)
    return LocalCluster(
        n_workers=n_workers or max(1, usable_cores() // threads),
        threads_per_worker=threads,
        processes=processes,
        dashboard_address=dashboard_address,
        silence_logs=logging.WARNING,
        # In-process clusters talk over inproc://, which takes no host.
        **(
            {"host": host, "worker_class": _patient_nanny(), "preload": _worker_preload()}
            if processes else {}
        ),
    )


def _worker_preload() -> list[str]:
    """The preloads of a local cluster's workers: the user's (dask config), then segpipe's own."""
    import dask

    from segpipe.worker_setup import PRELOAD

    return [*(dask.config.get("distributed.worker.preload") or []), PRELOAD]


def scheduler_address(client: distributed.Client) -> str:
    """The address of the scheduler a connected client (as :func:`get_client` yields) talks to."""
    scheduler = client.scheduler
    assert scheduler is not None  # None only before a client connects
    return str(scheduler.address)


def describe_cluster(client: distributed.Client) -> str:
    """One line about the cluster: workers, threads, memory and GPUs."""
    info = client.scheduler_info(n_workers=-1)
    workers = info.get("workers", {})
    threads = sum(int(w.get("nthreads", 0)) for w in workers.values())
    memory = sum(int(w.get("memory_limit", 0) or 0) for w in workers.values())
    # Workers with NVML diagnostics (dask-cuda) report a "gpu" entry.
    gpus = sum(1 for w in workers.values() if w.get("gpu"))
    text = f"{len(workers)} workers, {threads} threads, {memory / 2**30:.1f} GiB"
    if gpus:
        text += f", {gpus} GPUs"
    return f"{text} at {info.get('address', '?')}"
