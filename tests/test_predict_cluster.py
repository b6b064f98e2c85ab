"""Predict on real multi-process clusters: plans, probabilities, killed workers, resumes, GPU routing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream
from predict_support import CLASSES, HEIGHT, SETTINGS, WIDTH, make_store

from segpipe.io.runs import STAGING
from segpipe.io.store import open_layer
from segpipe.stages.predict.driver import PROGRESS_LAYER, predict


def _read(store: Path, name: str) -> np.ndarray:
    return np.asarray(open_layer(store, name)[...])


def _outputs(store: Path) -> dict[str, np.ndarray]:
    return {name: _read(store, name) for name in ("classes", "confidence")}


def _executing(dask_worker: Any) -> int:
    return int(dask_worker.state.executing_count)


def _wait_idle(client: Client) -> None:
    """Let tasks that were cancelled but already running finish (cancel never stops them).

    The scheduler forgets a cancelled task at once; its worker keeps running it, so the
    workers themselves are asked.
    """
    for _ in range(1200):
        if not any(client.processing().values()) and not any(client.run(_executing).values()):
            return
        time.sleep(0.1)


def test_planned_tasks_match_one_block_per_task(tmp_path: Path, stub_model_dir: Path, client: Client) -> None:
    a = make_store(tmp_path / "a.zarr", block=64)
    b = make_store(tmp_path / "b.zarr", block=64)
    small = predict(a, stub_model_dir, client=client, **SETTINGS)
    planned = predict(b, stub_model_dir, client=client, tile_size=64, overlap=16, batch_size=4)
    assert small.tasks == 12 and planned.tasks < 12
    assert planned.windows < small.windows  # fewer windows computed twice at task borders
    for name, arr in _outputs(a).items():
        np.testing.assert_array_equal(arr, _read(b, name))
    assert planned.blocks_done == 12 and _read(b, PROGRESS_LAYER).all()


def test_probabilities_layer_and_nodata_in_every_output(
    tmp_path: Path, stub_model_dir: Path, client: Client
) -> None:
    store = make_store(tmp_path / "a.zarr", block=64)
    predict(store, stub_model_dir, client=client, probabilities=True, blend="gaussian", **SETTINGS)
    probs = open_layer(store, "probabilities")
    assert probs.shape == (3, HEIGHT, WIDTH) and probs.dtype == np.uint8
    assert probs.metadata.dimension_names == ("class", "y", "x")  # type: ignore[union-attr]
    p, classes, conf = np.asarray(probs[...]), _read(store, "classes"), _read(store, "confidence")
    nodata = (_read(store, "image") == 0).any(axis=0)
    assert np.all(p[:, nodata] == 255) and np.all(classes[nodata] == 255) and np.all(conf[nodata] == 255)
    valid = p[:, ~nodata].astype(int)
    assert np.all(np.abs(valid.sum(axis=0) - 100) <= 2)  # percentages, rounded per class
    index = {c.value: i for i, c in enumerate(CLASSES)}
    chosen = np.array([index[v] for v in classes[~nodata]])
    # The written class has the largest (rounded) probability; rounding may only tie.
    np.testing.assert_array_equal(valid[chosen, np.arange(chosen.size)], valid.max(axis=0))
    np.testing.assert_array_equal(valid.max(axis=0), conf[~nodata])


# TTA runs 8 passes per window: blocks take long enough to be interrupted or killed.
SLOW = {**SETTINGS, "tta": True}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, client: Client) -> Path:
    """An undisturbed run, the reference for the runs below."""
    store = make_store(tmp_path_factory.mktemp("clean") / "clean.zarr", block=96)
    predict(store, model_dir, client=client, **SLOW)
    return store


def test_a_killed_worker_process_changes_nothing(
    tmp_path: Path, model_dir: Path, client: Client, clean: Path
) -> None:
    before = set(client.run(os.getpid).values())
    killed: list[int] = []

    def kill_a_busy_worker(done: int, total: int) -> None:
        if killed or done == 0:
            return
        busy = [addr for addr, keys in client.processing().items() if keys]
        if busy:
            pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    store = make_store(tmp_path / "a.zarr", block=96)
    summary = predict(store, model_dir, client=client, progress=kill_a_busy_worker, **SLOW)
    assert killed, "no worker was busy when a block finished"
    assert summary.blocks_done == 6 and _read(store, PROGRESS_LAYER).all()
    client.wait_for_workers(2, timeout=60)
    after = set(client.run(os.getpid).values())
    assert killed[0] in before and killed[0] not in after  # the nanny started a new process
    for name, arr in _outputs(clean).items():
        np.testing.assert_array_equal(_read(store, name), arr)


class DriverInterruptError(Exception):
    """Raised by a progress callback, as Ctrl-C would interrupt the driver."""


def test_an_interrupted_run_resumes_without_recomputing(
    tmp_path: Path, model_dir: Path, client: Client, clean: Path
) -> None:
    store = make_store(tmp_path / "a.zarr", block=96)

    def interrupt(done: int, total: int) -> None:
        if done >= 2:
            raise DriverInterruptError

    with pytest.raises(DriverInterruptError):
        predict(store, model_dir, client=client, progress=interrupt, **SLOW)
    _wait_idle(client)
    # The unfinished new result is staged in the hidden group until it is complete.
    finished = _read(store, f"{STAGING}/{PROGRESS_LAYER}").astype(bool)
    assert 2 <= finished.sum() < 6
    blocks = list(zip(*np.nonzero(finished), strict=True))

    def shard(root: Path, k: tuple[int, int]) -> Path:
        return root / "classes" / "c" / str(k[0]) / str(k[1])

    stamps = {k: shard(store / STAGING, k).stat().st_mtime_ns for k in blocks}
    resumed = predict(store, model_dir, client=client, **SLOW)
    # Exactly the unfinished blocks ran; finished ones were neither recomputed nor rewritten
    # (publishing renames the staged layer: its shard files keep their times).
    assert (resumed.blocks_done, resumed.blocks_skipped) == (6 - finished.sum(), finished.sum())
    assert {k: shard(store, k).stat().st_mtime_ns for k in blocks} == stamps
    for name, arr in _outputs(clean).items():
        np.testing.assert_array_equal(_read(store, name), arr)


def test_gpu_resource_keeps_tasks_on_gpu_workers(tmp_path: Path, stub_model_dir: Path) -> None:
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        # A second worker process that advertises a GPU (it computes on CPU here).
        gpu = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
             "--nthreads", "1", "--resources", "GPU=1", "--no-dashboard", "--name", "gpu-worker"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            c.wait_for_workers(2, timeout=60)
            gpu_addr = next(a for a, w in c.scheduler_info(n_workers=-1)["workers"].items()
                            if w.get("resources", {}).get("GPU"))
            store = make_store(tmp_path / "a.zarr", block=96)
            with get_task_stream(client=c) as stream:
                summary = predict(store, stub_model_dir, client=c, **SETTINGS)
            assert summary.blocks_done == 6
            ran = {t["worker"] for t in stream.data if str(t["key"]).startswith("run_block")}
            assert ran == {gpu_addr}
        finally:
            gpu.terminate()
            gpu.wait(timeout=30)
