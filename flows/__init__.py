"""Prefect flows that chain segpipe's stages.

Each task is one call into the segpipe library; the library never imports Prefect.
"""

from flows.process_region import RegionRun, process_region

__all__ = ["RegionRun", "process_region"]
