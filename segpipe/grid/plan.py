"""How many store blocks one prediction task covers: a makespan model of the window grid (numpy only).

Windows that straddle a task's border are computed by both tasks (see
:mod:`segpipe.grid.tiling`): large tasks waste fewer windows, small ones keep more task
slots busy. :func:`plan_superblocks` scores every task shape by its estimated finish time.
"""

from __future__ import annotations

import numpy as np

from segpipe.grid.tiling import axis_windows

__all__ = ["TASK_SPEEDUP", "plan_superblocks"]

TASK_SPEEDUP = 0.9
"""Default exponent of a task's speedup given ``t`` torch threads (``t ** TASK_SPEEDUP``)."""


def _task_costs(length: int, block: int, n: int, tile: int, stride: int) -> np.ndarray:
    """Windows along one axis for each run of ``n`` blocks (the last run may be short)."""
    return np.array(
        [len(axis_windows(s, min(n * block, length - s), length, tile, stride))
         for s in range(0, length, n * block)],
        dtype=np.float64,
    )


def _makespan(costs: np.ndarray, slots: int, speedup: float) -> float:
    """Estimated finish time of independent tasks on ``slots`` task slots.

    Fewer tasks than slots leave slots free; their cores go to the tasks' torch
    threads, which speeds a task up by ``threads ** speedup``.
    """
    n = costs.size
    if n < slots:
        return float(costs.max()) / float((slots // n) ** speedup)
    if n > 64:  # dynamic scheduling of many tasks balances to within one task
        return max(float(costs.sum()) / slots, float(costs.max()))
    loads = np.zeros(slots)
    for c in np.sort(costs)[::-1]:  # longest task first onto the least loaded slot
        loads[loads.argmin()] += c
    return float(loads.max())


def plan_superblocks(
    height: int,
    width: int,
    block: int,
    tile: int,
    stride: int,
    slots: int,
    max_pixels: int = 2048 * 2048,
    speedup: float = TASK_SPEEDUP,
) -> tuple[int, int]:
    """How many store blocks (along y and x) one prediction task should cover.

    Windows that straddle a task's border are computed by both tasks: large tasks
    waste fewer windows, but too few tasks leave task slots idle. Every candidate
    shape up to ``max_pixels`` per task is scored by its estimated makespan in
    windows, and the fastest wins (ties go to fewer, larger tasks).

    Args:
        height: Raster rows.
        width: Raster columns.
        block: Store block (shard) edge.
        tile: Window size.
        stride: Window step.
        slots: Task slots of the cluster (worker threads).
        max_pixels: Largest task area; bounds a task's output buffers.
        speedup: Exponent of the speedup of a task given ``t`` torch threads (``t **
            speedup``), used when there are fewer tasks than slots.

    Returns:
        (blocks along y, blocks along x) per task.
    """
    if min(height, width, block, tile, stride, slots) <= 0:
        raise ValueError(f"bad plan inputs: {height}x{width}, block {block}, tile {tile}, slots {slots}")
    nby, nbx = -(-height // block), -(-width // block)
    limit = max(1, max_pixels // (block * block))
    best: tuple[float, int, int] | None = None
    for ny in range(1, min(nby, limit) + 1):
        cy = _task_costs(height, block, ny, tile, stride)
        for nx in range(1, min(nbx, limit // ny) + 1):
            costs = np.outer(cy, _task_costs(width, block, nx, tile, stride)).ravel()
            score = _makespan(costs, slots, speedup) * (1 + 1e-9 * costs.size)
            if best is None or score < best[0]:
                best = (score, ny, nx)
    assert best is not None
    return best[1], best[2]
