"""Shared test configuration: GPU tests skip where CUDA is absent; a throwaway Prefect engine."""

from __future__ import annotations

import pytest


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


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory):
    """A throwaway local Prefect engine, stopped before pytest closes its output streams."""
    from prefect.testing.utilities import prefect_test_harness

    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect")))
    mp.delenv("PREFECT_API_URL", raising=False)
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness():
        yield
    mp.undo()
