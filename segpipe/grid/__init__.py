"""Pixel geometry shared by the stages: windows, task plans and blend weights (numpy only)."""
