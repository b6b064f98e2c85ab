"""Shared test configuration: GPU tests skip where CUDA is absent; a throwaway Prefect engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from engine_support import prefect_home  # noqa: F401  (a session fixture, shared by the flow tests)

if TYPE_CHECKING:
    from distributed import Client


def _cores_line() -> str:
    """The cores the tests may use against those the machine shows.

    A CPU quota below the visible count is where pools sized by the visible count
    oversubscribe: a slow or stuck run on another machine is read with this line.
    """
    import os

    from segpipe.cores import usable_cores

    return f"cores: {usable_cores()} usable, {os.cpu_count()} visible"


def pytest_report_header() -> str:
    """The cores line in pytest's header (shown unless the run is quiet)."""
    return _cores_line()


def pytest_configure(config: pytest.Config) -> None:
    """Each test process of an xdist run pinned to its own share of the usable cores.

    Every process otherwise sizes torch's threads and its clusters' workers by all the
    usable cores, so two processes on two cores run four or more busy threads that wait
    on each other: pinned, the suite took 10:40 instead of 12:58 (x86_64, 2 cores; see
    docs/benchmarks.md). Children (CLI subprocesses, dask workers) inherit the pin.
    """
    import os

    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not (worker and count and hasattr(os, "sched_setaffinity")):
        return
    from pin_support import process_cores

    from segpipe.cores import usable_cores

    n = int(worker.removeprefix("gw"))
    cores = process_cores(sorted(os.sched_getaffinity(0)), n, int(count), usable_cores())
    if cores is not None:
        os.sched_setaffinity(0, cores)


def pytest_sessionstart(session: pytest.Session) -> None:
    """The cores line atop a quiet run (``-q``, as ``make test`` runs), which hides the header."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.get_verbosity() < 0:
        reporter.write_line(_cores_line())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained U-Net package for the predict tests' 3-band stores (weights seeded)."""
    import torch
    from predict_support import CLASSES

    from segpipe.models import ModelSpec, build_network, save_model

    torch.manual_seed(0)
    spec = ModelSpec("unet", "resnet18", ("b1", "b2", "b3"), (700.0,) * 3, (300.0,) * 3, CLASSES, 64)
    return save_model(tmp_path_factory.mktemp("model"), spec, build_network("unet", "resnet18", 3, 3))


@pytest.fixture(scope="module")
def stub_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cheap model package for the predict tests' 3-band stores (see predict_support.stub_package).

    For tests about tiling, blending, staging and locking, where the network is beside
    the point; those where it matters (GPU, output stride, NaN spreading through
    convolutions, package checks) keep :func:`model_dir`'s U-Net.
    """
    from predict_support import stub_package

    return stub_package(tmp_path_factory.mktemp("stub"))


@pytest.fixture(scope="session")
def client() -> Iterator[Client]:
    """``cluster_support.two_worker_cluster``, one per test process for the whole session.

    A worker's first network task imports torch and the models' library (about 5
    CPU-seconds each), which a cluster per module paid again in every module. A module
    whose workers need an environment of their own (test_s3's AWS variables) overrides
    this fixture with a cluster of its own.
    """
    from cluster_support import two_worker_cluster

    with two_worker_cluster() as c:
        yield c
