"""The driver at a million blocks: planning and bounded submission of every block, simulated (issue 17).

A region of up to 524288 x 524288 px in 512 px blocks (1,048,576 blocks) is created
lazily: zarr allocates nothing until written, so the store holds only its metadata.
The driver's real code plans it (:func:`segpipe.grid.plan.plan_superblocks`,
:func:`segpipe.stages.predict.jobs.iter_jobs`) and submits every task through
:func:`segpipe.stages.predict.execute.run_on_cluster` to a real local cluster (two
worker processes), with ``run_block`` swapped for a no-op that only sets its blocks'
markers in the store. Measured: the driver's peak RSS (the local cluster's scheduler
runs in the driver process, so it is included), the scheduler's most task states,
planning seconds (every job made, nothing submitted) and tasks per second.

The markers here are chunked by task group (one chunk per task, no two tasks writing
one chunk): predict's own progress layer has one chunk per block, which at a million
blocks is a million files (see the report).

Run: ``.venv/bin/python benchmarks/driver_scale.py [--sizes 65536 262144 1048576] [--per-block]``
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

import segpipe.stages.predict.execute as execute
from segpipe.grid.plan import plan_superblocks
from segpipe.stages.predict.jobs import BlockJob, ClusterLayout, JobSettings, count_jobs, iter_jobs
from segpipe.waves import in_flight_limit

BLOCK = 512
TILE, OVERLAP = 256, 64
RESULTS = Path(__file__).parent / "results" / "driver_scale.json"


def _rss_mb() -> float:
    """This process's resident memory now (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@functools.lru_cache(maxsize=4)
def _markers(path: str) -> zarr.Array[Any]:
    return zarr.open_array(path, mode="r+")


def noop_block(job: BlockJob) -> dict[str, float]:
    """What run_block returns, having only set the markers of its blocks (no read, no forward)."""
    progress = _markers(job.settings.store + "/progress")
    ys = [b[0] for b in job.blocks]
    xs = [b[1] for b in job.blocks]
    progress[min(ys) : max(ys) + 1, min(xs) : max(xs) + 1] = 1
    n = len(job.blocks)
    return {"pixels": n * BLOCK * BLOCK, "valid": 0, "windows": 0, "slots": 0, "blocks": n, "skipped": 0,
            "seconds": 0.0}


def lazy_store(path: Path, blocks_per_side: int, task: tuple[int, int]) -> None:
    """A region store whose image and markers are declared, not allocated (no chunk written)."""
    side = blocks_per_side * BLOCK
    group = zarr.open_group(path, mode="w")
    group.create_array("image", shape=(4, side, side), chunks=(4, BLOCK, BLOCK), dtype="uint16", fill_value=0)
    group.create_array("progress", shape=(blocks_per_side, blocks_per_side), chunks=task, dtype="uint8",
                       fill_value=0)


class _Sampler:
    """Samples the driver's RSS and the scheduler's task states every 50 ms, in a thread."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.rss = self.tasks = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.rss = max(self.rss, _rss_mb())
            if self.scheduler is not None:
                self.tasks = max(self.tasks, len(self.scheduler.tasks))

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


def eager_run(client: Any, jobs: Any, record: Any) -> int:
    """Before issue 17: every job made into a list and mapped at once (the comparison row)."""
    from distributed import as_completed

    futures = client.map(noop_block, list(jobs), pure=False)
    for future in as_completed(futures):
        record(future.result())
    return len(futures)


def run_size(
    n_blocks: int, per_block: bool, client: Any, scheduler: Any, tmp: Path, eager: bool = False
) -> dict[str, Any]:
    """Plan and submit every block of an ``n_blocks`` region (a square of 512 px blocks).

    Without a ``client`` every job is made (the planning) and none is submitted.
    """
    side = round(n_blocks**0.5)
    slots = 2
    task = (1, 1) if per_block else plan_superblocks(side * BLOCK, side * BLOCK, BLOCK, TILE, TILE - OVERLAP,
                                                      slots)
    store = tmp / f"r{n_blocks}.zarr"
    lazy_store(store, side, task)
    settings = JobSettings(store=str(store), model_dir="none", model_hash="none", tile=TILE, overlap=OVERLAP,
                           batch_size=2)
    layout = ClusterLayout(slots, False, (("127.0.0.1", slots, slots),))
    pending = np.ones((side, side), dtype=bool)  # what read_markers returns: one byte per block
    raster = (side * BLOCK, side * BLOCK)
    rss0 = _rss_mb()
    blocks = ran = 0
    seconds = 0.0

    def record(stats: dict[str, float]) -> None:
        nonlocal blocks
        blocks += int(stats["blocks"])

    with _Sampler(scheduler) as sampler:
        t0 = time.perf_counter()
        every = iter_jobs(pending, raster=raster, block_size=BLOCK, task_blocks=task, layout=layout,
                          settings=settings)
        n_jobs = sum(1 for _ in every)
        planning = time.perf_counter() - t0
        if client is not None:
            t1 = time.perf_counter()
            jobs = iter_jobs(pending, raster=raster, block_size=BLOCK, task_blocks=task, layout=layout,
                             settings=settings)
            run = eager_run if eager else functools.partial(execute.run_on_cluster, gpu=False, slots=slots)
            ran = run(client, jobs, record=record)
            seconds = time.perf_counter() - t1
    # Read back only after a run: reading a million one-block marker chunks is slow in itself.
    marked = int(np.asarray(zarr.open_array(store / "progress")[...]).sum()) if client is not None else 0
    return {
        "blocks": side * side, "raster_px": raster[0], "task_blocks": list(task), "tasks": ran,
        "tasks_planned": count_jobs(pending, task), "jobs_made_in_planning": n_jobs,
        "blocks_recorded": blocks, "blocks_marked": marked, "in_flight_limit": in_flight_limit(slots),
        "planning_s": round(planning, 2), "submit_run_s": round(seconds, 1),
        "tasks_per_s": round(ran / seconds, 1) if seconds else 0.0, "per_block": per_block,
        "driver_rss_start_mb": round(rss0),
        "driver_rss_peak_mb": round(max(sampler.rss, _rss_mb())),
        "scheduler_max_tasks": int(sampler.tasks), "eager": eager,
    }


def _table(rows: list[dict[str, Any]]) -> None:
    """Print the rows as a table."""
    print(f"\n{'blocks':>9} {'tasks':>8} {'task':>5} {'plan s':>7} {'run s':>7} {'tasks/s':>8} "
          f"{'RSS MB':>7} {'sched tasks':>11}")
    for r in rows:
        shape = "x".join(map(str, r["task_blocks"]))
        print(f"{r['blocks']:>9} {r['tasks']:>8} {shape:>5} {r['planning_s']:>7} {r['submit_run_s']:>7} "
              f"{r['tasks_per_s']:>8} {r['driver_rss_peak_mb']:>7} {r['scheduler_max_tasks']:>11}")


def main() -> None:
    """Run the sizes asked for, print the table and write the JSON."""
    from distributed import Client, LocalCluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144, 1048576])
    ap.add_argument("--per-block", action="store_true", help="one task per block (the worst case) "
                    "instead of predict's own task shape")
    ap.add_argument("--plan-only", action="store_true", help="make every job, submit none (no cluster)")
    ap.add_argument("--eager", action="store_true", help="map every job at once, as before issue 17")
    args = ap.parse_args()
    setattr(execute, "run_block", noop_block)  # noqa: B010  (the simulation's no-op forward, for run_on_cluster)
    rows = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="driver_scale")))
        client = scheduler = None
        if not args.plan_only:
            cluster = stack.enter_context(LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                                       dashboard_address=":0"))
            client, scheduler = stack.enter_context(Client(cluster)), cluster.scheduler
        for n in args.sizes:
            row = run_size(n, args.per_block, client, scheduler, tmp, args.eager)
            rows.append(row)
            print(json.dumps(row), flush=True)
    peak_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _table(rows)
    print(f"driver peak RSS over the whole run (ru_maxrss): {peak_hwm:.0f} MB")
    RESULTS.parent.mkdir(exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    key = ("plan_only_" if args.plan_only else "eager_" if args.eager else "") + (
        "per_block" if args.per_block else "predict_tasks")
    old[key] = {"rows": rows, "driver_ru_maxrss_mb": round(peak_hwm), "cores": 2,
                "note": "LocalCluster 2 workers x 1 thread; scheduler in the driver process"}
    RESULTS.write_text(json.dumps(old, indent=2) + "\n")


if __name__ == "__main__":
    main()
