"""Data-parallel training on one machine: one process per device, no torchrun.

:func:`run_ranks` spawns ``world`` processes with torch.multiprocessing; each joins
a process group (NCCL on CUDA, gloo on CPU, so the same code path is testable without
a GPU) and runs the training function with its rank. Rank 0 sends progress reports
and, when a rank fails, the exception back to the parent through a queue, so the
caller sees the same error type as a single-process run would raise.

The collectives below are no-ops without a process group: the single-process run is
the ``world == 1`` case of the same loop, not a second loop.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "average",
    "broadcast_object",
    "free_port",
    "gather_objects",
    "init_group",
    "leave_group",
    "run_ranks",
    "world_active",
]


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def world_active() -> bool:
    """Whether this process belongs to a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_group(rank: int, world: int, port: int, cuda: bool) -> None:
    """Join the process group on loopback (NCCL for CUDA devices, gloo for CPU)."""
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
    )


def leave_group() -> None:
    """Wait for every rank, then leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def average(value: float, device: torch.device) -> float:
    """Mean of ``value`` over the ranks."""
    if not world_active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (every rank must call it)."""
    if not world_active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (every rank must call it)."""
    if not world_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rank_entry(
    rank: int, fn: Callable[..., Any], world: int, port: int, cuda: bool, messages: Any, args: tuple[Any, ...]
) -> None:
    def report(item: Any) -> None:
        messages.put(("progress", item))

    try:
        if cuda:  # NCCL binds each rank to its device before the group forms
            torch.cuda.set_device(rank)
        init_group(rank, world, port, cuda)
        fn(rank, world, *args, report if rank == 0 else None)
        leave_group()
    except BaseException as exc:
        # An unpicklable exception is dropped: its traceback still reaches the parent.
        with contextlib.suppress(Exception):
            messages.put(("error", exc))
        raise


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    args: tuple[Any, ...],
    progress: Callable[[Any], None] | None,
    cuda: bool = False,
) -> None:
    """Run ``fn(rank, world, *args, report)`` in ``world`` spawned processes.

    ``report`` is a callable on rank 0 (None elsewhere) whose items reach ``progress``
    in this process.

    Raises:
        Exception: The first error a rank sent back, re-raised here with its type.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    messages = ctx.SimpleQueue()
    port = free_port()
    processes = mp.start_processes(
        _rank_entry,
        args=(fn, world, port, cuda, messages, args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    errors: list[BaseException] = []

    def drain() -> None:
        while not messages.empty():
            kind, item = messages.get()
            if kind == "error":
                errors.append(item)
            elif progress is not None:
                progress(item)

    try:
        while True:
            drain()
            try:
                if processes.join(timeout=0.2):
                    break
            except Exception:
                drain()
                if errors:
                    raise errors[0] from None
                raise
        drain()
    finally:
        for p in processes.processes:
            if p.is_alive():
                p.terminate()
