"""Which Prefect engine runs the flows when the user has not configured one."""

import os
from pathlib import Path

__all__ = ["use_local_engine"]


def use_local_engine(home: Path | None = None) -> None:
    """Use Prefect's ephemeral engine, quietly, unless a Prefect API is configured.

    Args:
        home: Keep the engine's database in this folder (e.g. inside the demo's output).
    """
    if "PREFECT_API_URL" in os.environ:
        return
    if home is not None:
        os.environ.setdefault("PREFECT_HOME", str(home.resolve()))
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    # The telemetry service races the flow for the fresh SQLite file ("database is
    # locked") and has nothing to report from a throwaway engine.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
