"""Run a training on a worker of an existing dask cluster.

Training is one long task: it goes to a GPU worker when the cluster has some (workers
that advertise a ``GPU`` resource, as segpipe's CUDA clusters do), else to any worker.
The store and the package directory must be reachable from that worker under the
same paths (a shared file system or object store). What crosses into the graph is
plain data: paths and the settings as a dict, never the pydantic model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segpipe.models import ModelSpec
from segpipe.stages.train.config import NetworkConfig, TrainConfig, train_config

if TYPE_CHECKING:
    import distributed

__all__ = ["cluster_has_gpus", "train_on_cluster", "train_on_scheduler"]


def cluster_has_gpus(client: distributed.Client) -> bool:
    """Whether any worker advertises a ``GPU`` resource."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return any(int((w.get("resources") or {}).get("GPU", 0)) for w in workers.values())


def _train_task(store: str, out: str, settings: dict[str, Any], resume: bool) -> str:
    from distributed import get_worker

    from segpipe.stages.train.entry import train

    cfg = train_config(settings)
    if cfg.threads == 0:
        # Dask workers run with OMP_NUM_THREADS=1; training should use the worker's share.
        cfg = cfg.model_copy(update={"threads": max(1, int(get_worker().state.nthreads))})
    # JSON text, as model.json holds it: the description comes back exactly as a reader of
    # the package would parse it (tuples, for one, become the lists the schema expects).
    return json.dumps(train(store, out, cfg, resume=resume).to_json())


def train_on_cluster(
    client: distributed.Client,
    store: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    resume: bool = False,
) -> ModelSpec:
    """Train on one worker of ``client``'s cluster and wait for the package.

    Args:
        client: Connected dask client.
        store: Region store, as the worker sees it.
        out: Package directory, as the worker sees it.
        config: Training settings (a network's defaults when None).
        resume: Continue from the checkpoint in ``out``.

    Returns:
        The written model's description.
    """
    cfg = config or NetworkConfig()
    resources = {"GPU": 1} if cluster_has_gpus(client) else None
    future = client.submit(
        _train_task,
        str(store),
        str(out),
        cfg.model_dump(mode="json"),
        resume,
        resources=resources,
        pure=False,
    )
    return ModelSpec.from_json(json.loads(future.result()), f"{out}/model.json")


def train_on_scheduler(
    scheduler: str,
    store: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    resume: bool = False,
    announce: Callable[[str], None] | None = None,
) -> ModelSpec:
    """Train on one worker of the dask cluster at ``scheduler``.

    The store is read first: a missing or damaged store fails here, before connecting.

    Args:
        scheduler: The cluster's scheduler address (``tcp://host:port``).
        store: Region store, as the worker sees it.
        out: Package directory, as the worker sees it.
        config: Training settings.
        resume: Continue from the checkpoint in ``out``.
        announce: Told which cluster trains, once connected (a line to show).

    Returns:
        The written model's description.
    """
    from segpipe.cluster import describe_cluster, get_client
    from segpipe.io.store import read_region_info

    read_region_info(store)
    with get_client(scheduler) as client:
        if announce is not None:
            announce(f"training on a worker of {describe_cluster(client)}")
        return train_on_cluster(client, store, out, config, resume=resume)
