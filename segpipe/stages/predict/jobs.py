"""What one prediction task does, and how a run's unfinished blocks become tasks.

Pure: no cluster and no store IO. The driver reads the done markers and asks the
cluster its layout; :func:`iter_jobs` turns those into :class:`BlockJob` s lazily, small
frozen values that ship cheaply in a task graph and tokenize deterministically. Only
the markers array (one byte per block) spans the region; jobs are made as they are
submitted (:mod:`segpipe.waves`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from segpipe.grid.box import Box
from segpipe.grid.plan import TASK_SPEEDUP
from segpipe.stages.predict.outputs import DEFAULT_LAYERS, OutputLayers

__all__ = [
    "BlockJob", "Blocks", "ClusterLayout", "JobSettings", "blocks_box", "count_jobs", "group_grid",
    "iter_groups", "iter_jobs",
]

Blocks = tuple[tuple[int, int], ...]
"""(row, column) indices of store blocks."""


def _fields_token(obj: Any) -> tuple[Any, ...]:
    """A dataclass's type name and field values: what dask hashes it by."""
    return (type(obj).__qualname__, *(getattr(obj, f.name) for f in fields(obj)))


@dataclass(frozen=True, kw_only=True)
class JobSettings:
    """What every task of one predict run shares.

    Attributes:
        store: Region store location.
        model_dir: Model package directory (readable by every worker).
        model_hash: Expected package hash (the worker's model cache key).
        tile: Window size.
        overlap: Window overlap.
        batch_size: Windows per forward call (every call has this shape).
        blend: Blend mode (``cosine``, ``gaussian``, ``mean`` or ``crop``).
        tta: Average the 8 flips and rotations of every window.
        probabilities: Also write the per-class probabilities layer.
        margin: Mirrored pixels around the raster that the window grid covers
            (:func:`segpipe.stages.predict.driver.edge_margin`).
        layers: Where the run's layers are: the published names, or a new run's
            staging layers (``_predict/...``).
    """

    store: str
    model_dir: str
    model_hash: str
    tile: int
    overlap: int
    batch_size: int
    blend: str = "cosine"
    tta: bool = False
    probabilities: bool = False
    layers: OutputLayers = DEFAULT_LAYERS
    margin: int = 0

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        """Its fields: equal settings give equal dask tokens, in any process."""
        return _fields_token(self)


@dataclass(frozen=True, kw_only=True)
class BlockJob:
    """One box of store blocks to predict: small, hashable, cheap to ship in a task graph.

    Attributes:
        settings: The run's settings.
        box: Box to predict, in global pixels (on block borders; whole blocks, or up to
            the raster's edge).
        blocks: (row, column) indices of the blocks to compute; empty = every block of
            the box. Others (finished earlier) are neither recomputed nor rewritten.
        threads: (host, cores) pairs: CPU cores for this task on each host, used as
            concurrent single-threaded forward streams.
    """

    settings: JobSettings
    box: Box
    blocks: Blocks = ()
    threads: tuple[tuple[str, int], ...] = ()

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        """Its fields: equal jobs give equal dask tokens, in any process."""
        return _fields_token(self)


@dataclass(frozen=True)
class ClusterLayout:
    """Task slots of a cluster, whether tasks need a ``GPU`` resource, and its CPU hosts.

    Attributes:
        slots: Tasks that can run at once (GPUs, or worker threads on CPU clusters).
        gpu: Tasks must land on GPU workers.
        hosts: (host, cores, worker threads) of each CPU host.
        speedup: Exponent of a task's speedup given the cores of ``t`` idle slots (``t **
            speedup``, see :func:`segpipe.grid.plan.plan_superblocks`): on a cluster those
            cores become the task's forward streams; in process they do not (0).
    """

    slots: int
    gpu: bool
    hosts: tuple[tuple[str, int, int], ...] = ()
    speedup: float = TASK_SPEEDUP

    def threads(self, n_tasks: int) -> tuple[tuple[str, int], ...]:
        """Torch threads per task on each host when ``n_tasks`` tasks share the cluster.

        A CPU host's cores are shared among the prediction tasks that can run on it at
        once: with fewer tasks than worker threads, each task gets more torch threads.
        """
        threads = []
        for host, n_cores, n_slots in self.hosts:
            concurrent = max(1, min(n_slots, math.ceil(n_tasks * n_slots / self.slots)))
            threads.append((host, max(1, n_cores // concurrent)))
        return tuple(threads)


def group_grid(pending: np.ndarray, task_blocks: tuple[int, int]) -> np.ndarray:
    """Whether each ``task_blocks`` group of blocks has a pending block: a (group rows, group columns) mask.

    Vectorised over the whole markers array (one bool per block, no Python object per
    block), so a million-block region is counted in milliseconds.
    """
    nby, nbx = pending.shape
    ty, tx = task_blocks
    gy, gx = -(-nby // ty), -(-nbx // tx)
    padded = np.zeros((gy * ty, gx * tx), dtype=bool)
    padded[:nby, :nbx] = pending
    return np.asarray(padded.reshape(gy, ty, gx, tx).any(axis=(1, 3)))


def iter_groups(pending: np.ndarray, task_blocks: tuple[int, int]) -> Iterator[Blocks]:
    """The pending blocks of each ``task_blocks`` group of blocks that has any, row-major, lazily.

    Only the group being yielded becomes Python tuples; the rest stays in the markers array.
    """
    nby, nbx = pending.shape
    ty, tx = task_blocks
    live = group_grid(pending, task_blocks)
    for gy in range(live.shape[0]):  # a row of groups at a time: no index array over the region
        sy = gy * ty
        for gx in np.flatnonzero(live[gy]):
            sx = int(gx) * tx
            sub = pending[sy : min(sy + ty, nby), sx : min(sx + tx, nbx)]
            yield tuple((sy + int(y), sx + int(x)) for y, x in zip(*np.nonzero(sub), strict=True))


def blocks_box(blocks: Blocks, block_size: int, raster: tuple[int, int]) -> Box:
    """The pixels of the smallest rectangle of blocks holding ``blocks``, cut at the raster's edge.

    Args:
        blocks: (row, column) block indices (at least one).
        block_size: Store block edge.
        raster: Raster (height, width).
    """
    ys, xs = [by for by, _ in blocks], [bx for _, bx in blocks]
    return Box(min(ys) * block_size, min(xs) * block_size,
               min((max(ys) + 1) * block_size, raster[0]), min((max(xs) + 1) * block_size, raster[1]))


def _check_plan(pending: np.ndarray, raster: tuple[int, int], block_size: int,
                task_blocks: tuple[int, int]) -> np.ndarray:
    """The markers as a bool array, once they are checked against the raster and the task shape."""
    shape = (-(-raster[0] // block_size), -(-raster[1] // block_size))
    if pending.shape != shape or min(task_blocks) < 1:
        raise ValueError(f"{pending.shape} pending markers for {shape} blocks, {task_blocks} blocks per task")
    return np.asarray(pending, dtype=bool)


def count_jobs(pending: np.ndarray, task_blocks: tuple[int, int]) -> int:
    """How many jobs :func:`iter_jobs` yields for these markers, without making any."""
    return int(group_grid(np.asarray(pending, dtype=bool), task_blocks).sum())


def iter_jobs(
    pending: np.ndarray,
    *,
    raster: tuple[int, int],
    block_size: int,
    task_blocks: tuple[int, int],
    layout: ClusterLayout,
    settings: JobSettings,
) -> Iterator[BlockJob]:
    """One job per group of ``task_blocks`` store blocks that still has pending blocks, made lazily.

    A generator: a run of a million blocks holds the markers array (one byte per block)
    and the jobs in flight, never a job per block of the region.

    Args:
        pending: (block rows, block columns) bool mask of the blocks left to compute.
        raster: Raster (height, width).
        block_size: Store block edge.
        task_blocks: Blocks per task along (y, x) (:func:`segpipe.grid.plan.plan_superblocks`).
        layout: The cluster's task slots and hosts (for each task's torch threads).
        settings: What every task of the run shares.

    Returns:
        A generator of the jobs, row-major; each lists exactly its pending blocks.

    Raises:
        ValueError: A mask that does not fit the raster's blocks, or a task shape below 1
            (at the call, not at the first job).
    """
    mask = _check_plan(pending, raster, block_size, task_blocks)
    threads = layout.threads(count_jobs(mask, task_blocks))
    return (BlockJob(settings=settings, box=blocks_box(todo, block_size, raster), blocks=todo,
                     threads=threads) for todo in iter_groups(mask, task_blocks))
