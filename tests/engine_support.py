"""The Prefect engine the flow tests share (a session fixture, imported by conftest).

Starting a Prefect API server costs tens of seconds (imports, then the schema of a fresh
SQLite database), and every ``segpipe run`` or ``segpipe batch`` subprocess would start
one of its own. One server serves the whole session instead: the fixture exports its
address as ``PREFECT_API_URL``, which the flows in this process and the commands the
tests start as subprocesses both use (:func:`flows.engine.use_local_engine` starts
nothing when it is set). A test of a command's own engine start removes the variable
from its subprocess's environment, and gives it a home whose database already has its
schema (:meth:`Engine.home`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Seconds the session's server may take to start. Prefect's test harness allows 30 s,
# which a loaded 2-core machine exceeds ("Timed out while attempting to connect").
START_TIMEOUT_S = 300
_SQLITE_URL = "sqlite+aiosqlite:///"


@dataclass(frozen=True)
class Engine:
    """The session's Prefect API server.

    Attributes:
        url: Its API address (also in ``PREFECT_API_URL`` while the session runs).
        database: Its SQLite database file.
    """

    url: str
    database: Path

    def home(self, folder: Path) -> Path:
        """A ``PREFECT_HOME`` for a command that starts an engine of its own, its schema made.

        Creating the schema of a fresh database is most of an engine's start; the copy
        (SQLite's online backup, consistent while the server writes) only needs checking.
        """
        folder.mkdir(parents=True, exist_ok=True)
        with (
            contextlib.closing(sqlite3.connect(self.database)) as source,
            contextlib.closing(sqlite3.connect(folder / "prefect.db")) as copy,
        ):
            source.backup(copy)
        return folder


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """One throwaway Prefect API server for the session, its URL set in ``PREFECT_API_URL``.

    The server is stopped before pytest closes its output streams (session teardown).
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL
    from prefect.testing.utilities import prefect_test_harness

    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect")))
    mp.delenv("PREFECT_API_URL", raising=False)
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    timeout = int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", START_TIMEOUT_S))
    try:
        with prefect_test_harness(server_startup_timeout=timeout):
            url = str(PREFECT_API_URL.value())
            database = str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value()).removeprefix(_SQLITE_URL)
            mp.setenv("PREFECT_API_URL", url)  # for the segpipe commands tests run as subprocesses
            yield Engine(url, Path(database))
    finally:
        mp.undo()
