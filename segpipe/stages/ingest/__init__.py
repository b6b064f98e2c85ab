"""Ingest: images and labels into one Zarr region store, block by block."""

from segpipe.stages.ingest.driver import ingest

__all__ = ["ingest"]
