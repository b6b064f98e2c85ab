"""Pixel geometry shared by the stages: boxes, windows, task plans and blend weights (numpy only)."""

from segpipe.grid.box import Box, iter_boxes

__all__ = ["Box", "iter_boxes"]
