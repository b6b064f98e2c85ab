"""Evaluate: compare a prediction with reference labels or points; metrics, report, PNGs."""

from segpipe.stages.evaluate.assess import evaluate
from segpipe.stages.evaluate.report import write_report

__all__ = ["evaluate", "write_report"]
