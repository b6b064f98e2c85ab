"""Bounded submission, lazy planning and the predict dry run (issue 17: a driver that stays small)."""

from __future__ import annotations

import inspect
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client, LocalCluster
from predict_support import SETTINGS, block_job, make_store

from segpipe.grid.box import Box
from segpipe.io.store import open_layer
from segpipe.models import model_hash, read_spec
from segpipe.stages.predict import worker
from segpipe.stages.predict.driver import PROGRESS_LAYER, predict
from segpipe.stages.predict.dryrun import format_plan, plan_predict
from segpipe.stages.predict.jobs import (
    ClusterLayout,
    JobSettings,
    count_jobs,
    iter_groups,
    iter_jobs,
)
from segpipe.stages.predict.results import prepare_layers
from segpipe.stages.predict.worker import run_block
from segpipe.waves import compute_in_threads, drain, in_flight_limit, submit_bounded, task_cancelled, waves

LAYOUT = ClusterLayout(2, False)
JOB = JobSettings(store="s", model_dir="m", model_hash="h", tile=64, overlap=16, batch_size=2)
PLAN: dict[str, Any] = {"tile_size": 64, "overlap": 16, "batch_size": 4, "max_task_pixels": 128 * 128}
BLOCK_TASKS: dict[str, Any] = dict(SETTINGS)  # one block per task


def _slow(x: int) -> int:
    time.sleep(0.002)
    return x


def _fail_at_5(x: int) -> int:
    if x == 5:
        raise RuntimeError("task 5 failed")
    time.sleep(0.05)
    return x


class _Counting:
    """A client that counts the tasks it was given; the driver's in-flight count is submitted - recorded."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.loop = client.loop
        self.submitted = 0

    def map(self, fn: Any, jobs: list[Any], **kwargs: Any) -> Any:
        self.submitted += len(jobs)
        return self.client.map(fn, jobs, **kwargs)

    def cancel(self, futures: Any) -> None:
        self.client.cancel(futures)


@pytest.fixture(scope="module")
def thread_client() -> Iterator[Client]:
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as c,
    ):
        yield c


def _old_groups(pending: np.ndarray, task: tuple[int, int]) -> list[tuple[tuple[int, int], ...]]:
    """Today's eager grouping (before issue 17), the reference for the lazy one."""
    nby, nbx = pending.shape
    out = []
    for sy in range(0, nby, task[0]):
        for sx in range(0, nbx, task[1]):
            todo = tuple((by, bx) for by in range(sy, min(sy + task[0], nby))
                         for bx in range(sx, min(sx + task[1], nbx)) if pending[by, bx])
            if todo:
                out.append(todo)
    return out


@pytest.mark.parametrize(
    "shape,task", [((7, 5), (2, 3)), ((4, 4), (4, 4)), ((9, 1), (2, 1)), ((3, 8), (5, 5))]
)
def test_lazy_groups_equal_the_eager_ones(shape: tuple[int, int], task: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape) + sum(task))
    for density in (0.0, 0.3, 1.0):
        pending = rng.random(shape) < density
        groups = iter_groups(pending, task)
        assert inspect.isgenerator(groups)
        expected = _old_groups(pending, task)
        assert list(groups) == expected and count_jobs(pending, task) == len(expected)


def test_planning_a_million_blocks_holds_no_object_per_block() -> None:
    pending = np.ones((1024, 1024), dtype=bool)  # 1,048,576 blocks of 512 px
    raster = (1024 * 512, 1024 * 512)
    tracemalloc.start()
    try:
        jobs = iter_jobs(pending, raster=raster, block_size=512, task_blocks=(1, 1), layout=LAYOUT,
                         settings=JOB)
        first = [next(jobs) for _ in range(100)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Two 1 MB copies of the mask (padded, grouped); a job per block would be hundreds of MB.
    assert peak < 4 * 2**20, peak
    assert first[0].blocks == ((0, 0),) and first[99].blocks == ((0, 99),)
    assert count_jobs(pending, (1, 1)) == 1024 * 1024
    small = np.ones((3, 4), bool)
    kw: dict[str, Any] = {"raster": (150, 200), "block_size": 50, "task_blocks": (2, 2), "layout": LAYOUT,
                          "settings": JOB}
    assert [job.blocks for job in iter_jobs(small, **kw)] == [
        ((0, 0), (0, 1), (1, 0), (1, 1)), ((0, 2), (0, 3), (1, 2), (1, 3)),
        ((2, 0), (2, 1)), ((2, 2), (2, 3))]
    with pytest.raises(ValueError):  # refused at the call, before any job is asked for
        iter_jobs(small, raster=(150, 250), block_size=50, task_blocks=(1, 1), layout=LAYOUT, settings=JOB)


def test_in_flight_never_exceeds_the_bound_and_jobs_are_pulled_lazily(thread_client: Client) -> None:
    limit = in_flight_limit(1)
    assert limit == 8 and in_flight_limit(4) == 16
    counting = _Counting(thread_client)
    pulled = 0

    def jobs() -> Iterator[int]:
        nonlocal pulled
        for i in range(300):
            pulled += 1
            yield i

    results: list[int] = []
    worst = 0

    def record(result: int) -> None:
        nonlocal worst
        results.append(result)
        worst = max(worst, counting.submitted - len(results) + 1, pulled - len(results) + 1)

    assert submit_bounded(counting, _slow, jobs(), limit, record) == 300  # type: ignore[arg-type]
    assert sorted(results) == list(range(300))
    assert 1 < worst <= limit  # tasks did overlap, and never more than the bound
    assert [len(w) for w in waves(range(20), 8)] == [8, 8, 4]


def test_the_first_error_cancels_the_queue_and_pulls_no_more(thread_client: Client) -> None:
    pulled = 0

    def jobs() -> Iterator[int]:
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield i

    with pytest.raises(RuntimeError, match="task 5 failed"):
        submit_bounded(thread_client, _fail_at_5, jobs(), 8, lambda _: None)
    assert pulled < 40  # the other 960 jobs were never made
    deadline = time.monotonic() + 10
    while thread_client.processing() and any(thread_client.processing().values()):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _fail_first_or_write_late(job: tuple[str, int]) -> int:
    """Job 0 fails at once; every other job sleeps, then writes a file named after itself."""
    folder, i = job
    if i == 0:
        time.sleep(0.1)
        raise RuntimeError("task 0 failed")
    time.sleep(1.0)
    (Path(folder) / str(i)).write_text("written")
    return i


def test_a_failed_run_raises_only_once_its_running_tasks_have_stopped(
    thread_client: Client, tmp_path: Path
) -> None:
    jobs = [(str(tmp_path), i) for i in range(50)]
    with pytest.raises(RuntimeError, match="task 0 failed"):
        submit_bounded(thread_client, _fail_first_or_write_late, jobs, 8, lambda _: None)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written  # job 1 was running beside job 0 when it failed: the driver waited for it
    time.sleep(1.5)  # longer than a job: a task still running would have written by now
    assert sorted(p.name for p in tmp_path.iterdir()) == written
    assert drain(thread_client, []) is True


def test_a_failed_local_compute_raises_only_once_its_running_tasks_have_stopped(tmp_path: Path) -> None:
    from dask.delayed import delayed

    tasks = [delayed(_fail_first_or_write_late, pure=False)((str(tmp_path), i)) for i in range(2)]
    with pytest.raises(RuntimeError, match="task 0 failed"):
        compute_in_threads(*tasks, threads=2)
    assert [p.name for p in tmp_path.iterdir()] == ["1"]  # written before the error surfaced
    assert compute_in_threads(delayed(sum)([1, 2]), threads=1) == (3,)


def _wait_for_cancel(job: tuple[str, int]) -> int:
    """Job 0 fails; job 1 polls :func:`task_cancelled` for up to 30 s and writes what it saw."""
    folder, i = job
    if i == 0:
        time.sleep(0.2)
        raise RuntimeError("task 0 failed")
    deadline = time.monotonic() + 30
    while not task_cancelled() and time.monotonic() < deadline:
        time.sleep(0.02)
    (Path(folder) / str(i)).write_text("cancelled" if task_cancelled() else "never told")
    return i


def test_a_running_task_learns_that_it_was_cancelled(thread_client: Client, tmp_path: Path) -> None:
    assert task_cancelled() is False  # not inside a worker's task
    with pytest.raises(RuntimeError, match="task 0 failed"):
        submit_bounded(thread_client, _wait_for_cancel, [(str(tmp_path), 0), (str(tmp_path), 1)], 2,
                       lambda _: None)
    assert (tmp_path / "1").read_text() == "cancelled"  # and the driver waited for it to stop


def test_a_cancelled_predict_task_writes_no_further_block(
    tmp_path: Path, stub_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path / "a.zarr", block=64)
    prepare_layers(str(store), read_spec(stub_model_dir), (4, 3), {"model_hash": model_hash(stub_model_dir)},
                   force=True)
    monkeypatch.setattr(worker, "task_cancelled", lambda: True)
    stats = run_block(block_job(store, stub_model_dir, Box(0, 0, 128, 128)))
    assert stats["cancelled"] == 1
    assert not open_layer(store, PROGRESS_LAYER)[...].any()
    assert np.all(open_layer(store, "classes")[...] == 255)


def _tree(store: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(store)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(store.rglob("*")) if p.is_file()}


def test_plan_predict_counts_what_predict_does_and_writes_nothing(
    tmp_path: Path, stub_model_dir: Path
) -> None:
    store = make_store(tmp_path / "s.zarr", block=32)
    before = _tree(store)
    plan = plan_predict(store, stub_model_dir, scheduler="synchronous", **PLAN)
    assert _tree(store) == before  # no layer, marker, lock or metadata written
    assert plan.seconds_per_window > 0 and plan.estimated_seconds == pytest.approx(
        plan.windows * plan.seconds_per_window)
    run = predict(store, stub_model_dir, scheduler="synchronous", **PLAN)
    assert (plan.tasks, plan.windows, plan.blocks_pending, plan.output_pixels) == (
        run.tasks, run.windows, run.blocks_done, run.pixels)
    assert plan.tasks > 1 and plan.overhead == pytest.approx(plan.windows * 64**2 / run.pixels)
    assert plan.overhead > 1  # overlap and halo cost something
    text = format_plan(plan)
    assert f"tasks: {plan.tasks} of " in text and f"windows: {plan.windows:,} in calls of 4" in text
    assert "estimate: " in text and "ms per window" in text

    again = plan_predict(store, stub_model_dir, scheduler="synchronous", calibrate=False, **PLAN)
    assert (again.blocks_pending, again.tasks, again.windows) == (0, 0, 0)

    # Some blocks unfinished inside tasks: windows counted window by window, as predict runs them.
    progress = open_layer(store, PROGRESS_LAYER, mode="r+")
    progress[1, 2] = 0
    progress[4, 0] = 0
    progress[6, 5] = 0
    part = plan_predict(store, stub_model_dir, scheduler="synchronous", calibrate=False, **PLAN)
    rerun = predict(store, stub_model_dir, scheduler="synchronous", **PLAN)
    assert part.blocks_pending == rerun.blocks_done == 3
    assert (part.tasks, part.windows, part.output_pixels) == (rerun.tasks, rerun.windows, rerun.pixels)


def test_plan_predict_for_a_cluster_matches_a_cluster_run(tmp_path: Path, stub_model_dir: Path) -> None:
    store = make_store(tmp_path / "c.zarr", block=64)
    plan = plan_predict(store, stub_model_dir, slots=2, calibrate=False, **BLOCK_TASKS)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as c,
    ):
        run = predict(store, stub_model_dir, client=c, **BLOCK_TASKS)
    assert (plan.tasks, plan.windows, plan.task_blocks) == (run.tasks, run.windows, run.task_blocks)
    assert plan.estimated_seconds == 0 and plan.in_flight == 8


def test_the_cli_plan_only_prints_the_plan_and_writes_nothing(tmp_path: Path, stub_model_dir: Path) -> None:
    from test_cli_errors import run

    store = make_store(tmp_path / "s.zarr", block=32)
    before = _tree(store)
    done = run("predict", store, "--model", stub_model_dir, "--plan-only", "--scheduler", "synchronous")
    assert done.returncode == 0, done.stderr
    shown = done.stdout + done.stderr  # the console writes to stderr, as for every command
    assert "tasks: " in shown and "estimate: " in shown
    assert _tree(store) == before
