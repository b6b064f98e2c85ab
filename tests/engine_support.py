"""The Prefect engine the flow tests share (a session fixture, imported by conftest)."""

from __future__ import annotations

import pytest


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
