"""Prefect flows that chain segpipe's stages.

Each task is one call into the segpipe library; the library never imports Prefect.
"""

from flows.manifest import Manifest, read_manifest, read_region
from flows.process_region import RegionRun, process_region, run_region
from flows.process_regions import process_regions

__all__ = [
    "Manifest",
    "RegionRun",
    "process_region",
    "process_regions",
    "read_manifest",
    "read_region",
    "run_region",
]
