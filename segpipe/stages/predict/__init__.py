"""Predict: run a model package over a region store with overlap-and-blend, block by block.

``driver`` checks, plans, locks, stages and publishes; ``worker`` runs one task on a
Dask worker; ``blend`` accumulates overlapping windows into blocks.
"""

from segpipe.stages.predict.driver import PredictSummary, predict

__all__ = ["PredictSummary", "predict"]
