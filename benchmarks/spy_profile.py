"""Where a stage's processes spend their time: py-spy samples, summed per step of the pipeline.

py-spy (a sampling profiler, run from outside the processes; not a segpipe dependency:
``pip download py-spy`` gives a static binary) records every thread of the stage's
driver and of its dask workers (``--subprocesses``) without changing what they run.
:func:`summarise` sorts each sampled stack into one step of prediction's per-window path
(read, normalise, forward, blend, argmax and encode, write), start-up imports, dask's
own scheduling and communication, or idle, so a run names the step that limits it.

    py-spy record --subprocesses --nonblocking -r 50 -f raw -o OUT -- python ...
    python benchmarks/spy_profile.py OUT
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

__all__ = ["STEPS", "classify_stack", "summarise"]

# (step, markers): a stack belongs to the first step one of whose markers is in one of
# its frames. Order matters: imports first (a module imported inside a forward call is
# start-up cost, not the model's), and the per-window steps before the frames that
# enclose them (every step of a task sits under run_block).
STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("imports", ("importlib._bootstrap",)),
    ("forward", ("ForestNet", "torch_forward", "onnx_forward", "_conv_forward", "segmentation_models")),
    ("read: zarr decode", ("_decode_sync", "_decode_single")),
    ("write: zarr encode", ("_encode_sync", "_encode_single")),
    ("argmax and encode", ("encode_probabilities",)),
    ("blend", ("RowAccumulator",)),
    ("write", ("_BlockWriter._write", "NDBuffer.__setitem__")),
    ("normalise", ("prepare_pixels", "normalise", "valid_mask")),
    ("stack windows", ("BatchQueue",)),
    ("read", ("_predict_blocks.<locals>.read", "read_grown", "mirrored")),
    ("other segpipe", ("segpipe/",)),
    # zarr runs its codec pipeline on asyncio: its frames first, or they read as dask's.
    ("zarr: other (chunk checks, store IO)", ("zarr/",)),
    ("dask scheduling and comms", ("distributed/", "tornado/", "asyncio/", "dask/")),
)
# Leaves where a thread waits rather than works (py-spy's --nonblocking mode samples idle
# threads too).
_IDLE_LEAVES = ("select", "wait", "acquire", "sleep", "_worker (concurrent", "poll", "accept", "get (queue")


def _frames(stack: str) -> list[str]:
    """The frames of one raw stack; a ``;`` inside a process's command line does not split it."""
    frames: list[str] = []
    for piece in stack.split(";"):
        if frames and piece.startswith(" "):  # frames never start with a space
            frames[-1] += ";" + piece
        else:
            frames.append(piece)
    return frames


def classify_stack(frames: list[str]) -> str:
    """The step one sampled stack (outermost frame first, process markers removed) belongs to."""
    if not frames:
        return "native (no Python frame)"
    leaf = frames[-1]
    if any(mark in leaf for mark in _IDLE_LEAVES):
        return "idle"
    for step, markers in STEPS:
        if any(mark in frame for frame in frames for mark in markers):
            return step
    return "other"


def summarise(raw: str | Path) -> dict[str, dict[str, float]]:
    """Share of busy samples per step, for the driver process and for the worker processes.

    Args:
        raw: py-spy's ``--format raw`` output (``frame;frame;... count`` per line).

    Returns:
        ``{"driver": {step: share}, "workers": {step: share}, "samples": {...}}``; shares
        are of the role's busy (non-idle) samples, and ``samples`` counts busy and idle ones.
    """
    counts: dict[str, Counter[str]] = {"driver": Counter(), "workers": Counter()}
    for line in Path(raw).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = _frames(stack)
        processes = sum(1 for f in frames if f.startswith("process "))
        role = "driver" if processes <= 1 else "workers"
        counts[role][classify_stack([f for f in frames if not f.startswith("process ")])] += int(n)
    out: dict[str, dict[str, float]] = {"samples": {}}
    for role, counter in counts.items():
        busy = sum(v for k, v in counter.items() if k != "idle")
        out["samples"][f"{role}_busy"] = busy
        out["samples"][f"{role}_idle"] = counter["idle"]
        out[role] = {k: round(v / busy, 4) for k, v in counter.most_common() if k != "idle" and busy}
    return out


if __name__ == "__main__":
    print(json.dumps(summarise(sys.argv[1]), indent=2))
