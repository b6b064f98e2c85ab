"""Predict under bad packages, faults and concurrent runs: the earlier result is never lost."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed import Client
from predict_support import CLASSES, SETTINGS, block_job, make_store

import segpipe.io.runs as runs
from segpipe.errors import ModelPackageError, StorageError, StoreBusyError
from segpipe.grid.box import Box
from segpipe.io.runs import STAGING, acquire_lock, read_lock
from segpipe.io.store import open_layer
from segpipe.models import ModelSpec, build_network, model_hash, read_spec, save_model, validate_package
from segpipe.models import fetch as fetch_mod
from segpipe.stages.predict.driver import PROGRESS_LAYER, pending_blocks, predict
from segpipe.stages.predict.results import prepare_layers
from segpipe.stages.predict.worker import run_block

LAYERS = ("classes", "confidence", PROGRESS_LAYER)
OTHER = {**SETTINGS, "overlap": 8}  # other window settings: another result, staged


def _read(store: Path, name: str) -> np.ndarray:
    return np.asarray(open_layer(store, name)[...])


def _files(store: Path) -> dict[str, bytes]:
    """Every file of the published output layers, by path, with its bytes."""
    return {str(p.relative_to(store)): p.read_bytes()
            for name in LAYERS for p in sorted((store / name).rglob("*")) if p.is_file()}


def _snapshot(store: Path) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    return _files(store), {name: _read(store, name) for name in LAYERS}


def _assert_unchanged(store: Path, before: tuple[dict[str, bytes], dict[str, np.ndarray]]) -> None:
    files, arrays = _snapshot(store)
    assert files == before[0]
    for name, arr in before[1].items():
        np.testing.assert_array_equal(arrays[name], arr)


def _executing(dask_worker: Any) -> int:
    return int(dask_worker.state.executing_count)


def _wait_idle(client: Client) -> None:
    """Let tasks of a failed run that were already running finish (cancel never stops them)."""
    for _ in range(1200):
        if not any(client.processing().values()) and not any(client.run(_executing).values()):
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def done_template(tmp_path_factory: pytest.TempPathFactory, stub_model_dir: Path, client: Client) -> Path:
    store = make_store(tmp_path_factory.mktemp("done") / "a.zarr", block=64)
    predict(store, stub_model_dir, client=client, **SETTINGS)
    assert _read(store, PROGRESS_LAYER).all()
    return store


@pytest.fixture
def done_store(tmp_path: Path, done_template: Path) -> Path:
    """A store holding a complete earlier result (a copy of one predicted once per module)."""
    return Path(shutil.copytree(done_template, tmp_path / "a.zarr"))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """A second valid package for the same bands (other weights, so another hash)."""
    torch.manual_seed(1)
    net = build_network("unet", "resnet18", 3, 3)
    return save_model(tmp_path_factory.mktemp("other"), read_spec(model_dir), net)


def _edit_json(pkg: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    data = json.loads((pkg / "model.json").read_text())
    edit(data)
    (pkg / "model.json").write_text(json.dumps(data))


def _as_list(pkg: Path) -> None:
    (pkg / "model.json").write_text(json.dumps([json.loads((pkg / "model.json").read_text())]))


def _truncate(pkg: Path) -> None:
    w = pkg / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _pickle(pkg: Path) -> None:
    state = {k: v.numpy() for k, v in build_network("unet", "resnet18", 3, 3).state_dict().items()}
    (pkg / "weights.safetensors").write_bytes(pickle.dumps(state))


def _other_shapes(pkg: Path) -> None:
    # A 4-band network's weights under a description of 3 bands.
    save_model(pkg, read_spec(pkg), build_network("unet", "resnet18", 4, 3))


BAD_PACKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated weights": (_truncate, r"weights\.safetensors is not a readable safetensors file"),
    "pickle weights": (_pickle, r"weights\.safetensors is not a readable safetensors file"),
    "wrong tensor shapes": (_other_shapes, r"weights in .*weights\.safetensors do not fit unet/resnet18"),
    "missing weights": (lambda p: (p / "weights.safetensors").unlink(), r"weights\.safetensors is missing"),
    "unknown arch": (lambda p: _edit_json(p, lambda d: d.update(arch="vit9000")), r"'arch'.*vit9000"),
    "mean of 2 bands": (lambda p: _edit_json(p, lambda d: d.update(mean=[1.0, 2.0])), r"'mean': 2 values"),
    "std not finite": (lambda p: _edit_json(p, lambda d: d.update(std=[1.0, float("nan"), 1.0])), r"'std'"),
    "model.json a list": (_as_list, r"holds a JSON list"),
    "output_stride 0": (lambda p: _edit_json(p, lambda d: d.update(output_stride=0)), r"'output_stride'"),
    "missing field": (lambda p: _edit_json(p, lambda d: d.pop("classes")), r"'classes' is missing"),
    "wrong type": (lambda p: _edit_json(p, lambda d: d.update(chip_size="64")), r"'chip_size' is invalid"),
    "unknown key": (lambda p: _edit_json(p, lambda d: d.update(colour="red")), r"'colour' is not part"),
}


@pytest.mark.parametrize("case", list(BAD_PACKAGES))
def test_a_bad_package_fails_before_any_write_or_cluster(
    case: str, done_store: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = Path(shutil.copytree(model_dir, tmp_path / "bad"))
    damage, message = BAD_PACKAGES[case]
    damage(bad)
    before = _snapshot(done_store)
    everything = {p: p.read_bytes() for p in sorted(done_store.rglob("*")) if p.is_file()}

    def no_cluster(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cluster was started before the package was checked")

    monkeypatch.setattr("segpipe.cluster.get_client", no_cluster)
    with pytest.raises(ModelPackageError, match=message) as info:
        predict(done_store, bad, **SETTINGS)
    assert str(bad) in str(info.value)  # the package (or its file) is named
    _assert_unchanged(done_store, before)
    # Nothing else either: no staging layer, no lock.
    assert {p: p.read_bytes() for p in sorted(done_store.rglob("*")) if p.is_file()} == everything


def test_forest_and_ensemble_packages_are_checked_in_full(
    tmp_path: Path, model_dir: Path, other_model: Path
) -> None:
    from segpipe.models.combine import make_ensemble
    from segpipe.models.forest import forest_from_options

    spec = read_spec(model_dir)
    forest = ModelSpec("random_forest", "", spec.band_names, spec.mean, spec.std, CLASSES, 64,
                       options={"n_trees": 2, "max_nodes": 3, "depth": 1}, output_stride=1)
    pkg = save_model(tmp_path / "forest", forest, forest_from_options(3, 3, forest.options))
    assert validate_package(pkg)[0].arch == "random_forest"
    _edit_json(pkg, lambda d: d["options"].pop("n_trees"))
    with pytest.raises(ModelPackageError, match=r"cannot build.*n_trees"):
        validate_package(pkg)
    ens = make_ensemble([model_dir, other_model], tmp_path / "ens")
    assert validate_package(ens)[0].arch == "ensemble"
    _edit_json(ens, lambda d: d["options"]["members"][1].update(arch="pspnet"))
    with pytest.raises(ModelPackageError, match=r"do not fit ensemble"):
        validate_package(ens)


def test_a_failing_run_keeps_the_earlier_result_and_a_rerun_publishes(
    done_store: Path, stub_model_dir: Path, client: Client
) -> None:
    before = _snapshot(done_store)
    shard = done_store / "image" / "c" / "0" / "2" / "2"
    good = shard.read_bytes()
    shard.write_bytes(b"not a shard" * 10)
    with pytest.raises(Exception):  # noqa: B017  (the codec's own error, re-raised)
        predict(done_store, stub_model_dir, client=client, **OTHER)
    _wait_idle(client)
    _assert_unchanged(done_store, before)
    staged = _read(done_store, f"{STAGING}/{PROGRESS_LAYER}")
    assert staged[2, 2] == 0 and read_lock(done_store) is None  # the lock is released on failure
    shard.write_bytes(good)
    assert pending_blocks(done_store, stub_model_dir, 64, 8) == (12 - int(staged.sum()), 12)
    resumed = predict(done_store, stub_model_dir, client=client, **OTHER)
    assert resumed.blocks_skipped == int(staged.sum()) and resumed.blocks_done == 12 - resumed.blocks_skipped
    progress = open_layer(done_store, PROGRESS_LAYER)
    assert np.asarray(progress[...]).all() and progress.attrs["overlap"] == 8
    assert open_layer(done_store, "classes").attrs["overlap"] == 8
    assert pending_blocks(done_store, stub_model_dir, 64, 8) == (0, 12)
    assert not (done_store / STAGING / "classes").exists()


def test_an_interrupted_forced_run_keeps_the_earlier_result(
    done_store: Path, stub_model_dir: Path, client: Client
) -> None:
    before = _snapshot(done_store)

    def interrupt(done: int, total: int) -> None:
        if done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict(done_store, stub_model_dir, client=client, force=True, progress=interrupt, **SETTINGS)
    _wait_idle(client)
    _assert_unchanged(done_store, before)
    # The published result is complete for these settings: a plain rerun computes nothing.
    again = predict(done_store, stub_model_dir, client=client, **SETTINGS)
    assert (again.blocks_done, again.blocks_skipped) == (0, 12)


@pytest.mark.parametrize("crash_at", [0, 1, 2])
def test_a_crash_while_publishing_is_repaired_by_the_next_run(
    crash_at: int, done_store: Path, stub_model_dir: Path, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between the two renames of layer ``crash_at``: the next run finishes the promotion."""
    real = runs._swap_in
    calls: list[str] = []

    def crashing(store: str, name: str) -> None:
        calls.append(name)
        if len(calls) - 1 == crash_at:
            local = Path(store)
            (local / STAGING / "replaced" / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).rename(local / STAGING / "replaced" / name)  # the old one moved aside...
            raise SystemExit("killed")  # ...and the process dies before the new one moves in
        real(store, name)

    monkeypatch.setattr(runs, "_swap_in", crashing)
    with pytest.raises(SystemExit):
        predict(done_store, stub_model_dir, client=client, **OTHER)
    monkeypatch.setattr(runs, "_swap_in", real)
    new = {name: _read(done_store, f"{STAGING}/{name}") for name in LAYERS[crash_at:]}
    # A later run of any settings repairs first; pending_blocks does the same without a cluster.
    assert pending_blocks(done_store, stub_model_dir, 64, 8) == (0, 12)
    for name, arr in new.items():
        np.testing.assert_array_equal(_read(done_store, name), arr)
    assert all(open_layer(done_store, name).attrs["overlap"] == 8 for name in LAYERS)
    assert not (done_store / STAGING / "replaced").exists()
    assert predict(done_store, stub_model_dir, client=client, **OTHER).blocks_done == 0


def test_a_second_predict_on_a_busy_store_is_refused(
    tmp_path: Path, stub_model_dir: Path, other_model: Path, client: Client
) -> None:
    store = make_store(tmp_path / "a.zarr", block=64)
    holding, refused = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def first_progress(done: int, total: int) -> None:
        holding.set()
        refused.wait(60)  # keep the store while the second run tries

    def first() -> None:
        try:
            results["first"] = predict(store, stub_model_dir, client=client, progress=first_progress,
                                       **SETTINGS)
        except BaseException as exc:  # reported by the assertion below
            results["first"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    assert holding.wait(120)
    try:
        with pytest.raises(StoreBusyError) as info:
            predict(store, other_model, client=client, **SETTINGS)
    finally:
        refused.set()
        thread.join(120)
    message = str(info.value)
    assert str(store) in message and f"pid {os.getpid()}" in message and socket.gethostname() in message
    assert model_hash(stub_model_dir) in message and "started at" in message and "remove" in message
    assert getattr(results["first"], "blocks_done", None) == 12, results["first"]
    # The store holds the winner's result, complete.
    assert open_layer(store, "classes").attrs["model_hash"] == model_hash(stub_model_dir)
    assert _read(store, PROGRESS_LAYER).all() and read_lock(store) is None


def _plant_lock(store: Path, **record: Any) -> None:
    """A lock record as another run would have left it."""
    (store / STAGING / "lock").mkdir(parents=True, exist_ok=True)
    full = {"run_id": "other", "host": socket.gethostname(), "pid": os.getpid(), "model_hash": "m0",
            "started": "2020-01-01T00:00:00+00:00", "heartbeat": time.time(), **record}
    runs._write_json(str(store), f"{STAGING}/lock/zarr.json",
                     {"zarr_format": 3, "node_type": "group", "attributes": {"segpipe_lock": full}})


def test_stale_locks_are_taken_over_and_live_ones_refuse(tmp_path: Path) -> None:
    store = make_store(tmp_path / "a.zarr", block=64)
    with acquire_lock(store, "first"), pytest.raises(StoreBusyError, match="model first"):
        acquire_lock(store, "second")
    assert read_lock(store) is None  # released
    # The heartbeat thread refreshes the record.
    with acquire_lock(store, "first").start(interval=0.05):
        beat = read_lock(store)["heartbeat"]  # type: ignore[index]
        time.sleep(0.3)
        assert read_lock(store)["heartbeat"] > beat  # type: ignore[index]
    # A dead process on this host: taken over at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant_lock(store, pid=dead.pid)
    with acquire_lock(store, "y") as taken:
        assert read_lock(store)["run_id"] == taken.record["run_id"]  # type: ignore[index]
    # Another host: live while its heartbeat is fresh, stale once it is old.
    _plant_lock(store, host="elsewhere", pid=1)
    with pytest.raises(StoreBusyError, match=r"host elsewhere \(pid 1\) with model m0 started at 2020"):
        acquire_lock(store, "w")
    _plant_lock(store, host="elsewhere", pid=1, heartbeat=time.time() - runs.STALE_SECONDS - 5)
    with acquire_lock(store, "w") as taken:
        assert read_lock(store)["run_id"] == taken.record["run_id"]  # type: ignore[index]


def test_a_rerun_task_skips_the_blocks_it_already_marked(tmp_path: Path, stub_model_dir: Path) -> None:
    store = make_store(tmp_path / "a.zarr", block=64)
    key = {"model_hash": model_hash(stub_model_dir)}
    prepare_layers(str(store), read_spec(stub_model_dir), (4, 3), key, force=True)
    job = block_job(store, stub_model_dir, Box(0, 0, 128, 128), blocks=((0, 0), (0, 1), (1, 0), (1, 1)))
    full = run_block(job)
    expected = _read(store, "classes")[:128, :128].copy()
    # The worker died after finishing two blocks: their markers are set, the rest is garbage.
    progress = open_layer(store, PROGRESS_LAYER, mode="r+")
    progress[...] = 0
    progress[0, 0] = progress[1, 0] = 1
    classes = open_layer(store, "classes", mode="r+")
    classes[:128, :128] = 0
    classes[0:64, 0:64] = 11  # what the dead worker wrote (distinct, so a rewrite shows)
    classes[64:128, 0:64] = 12
    rerun = run_block(job)
    assert (rerun["blocks"], rerun["pixels"]) == (2, 2 * 64 * 64)
    assert rerun["windows"] < full["windows"]  # only windows reaching the other blocks
    after = _read(store, "classes")
    assert np.all(after[0:64, 0:64] == 11) and np.all(after[64:128, 0:64] == 12)
    np.testing.assert_array_equal(after[:128, 64:128], expected[:, 64:128])
    assert _read(store, PROGRESS_LAYER)[:2, :2].all()
    assert run_block(job)["blocks"] == 0  # all marked: nothing computed


# --- the model cache and package files ---------------------------------------------------


def test_the_model_cache_is_private_to_its_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fetch_mod.CACHE_ENV, raising=False)
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    root = fetch_mod.cache_root()
    assert root == tmp_path / f"segpipe-{os.getuid()}" / "models"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and stat.S_IMODE(root.parent.stat().st_mode) == 0o700
    root.parent.chmod(0o777)  # a per-user folder others may write into: refused
    with pytest.raises(StorageError, match=r"writable by other users.*SEGPIPE_CACHE"):
        fetch_mod.cache_root()
    root.parent.chmod(0o700)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(root).st_uid + 1)  # a folder of another user
    with pytest.raises(StorageError, match="belongs to user"):
        fetch_mod.check_private(root)


class _FakeS3:
    """Objects of one package, served from a local folder; counts downloads."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.gets = 0

    def get_file(self, url: str, dest: str) -> None:
        self.gets += 1
        shutil.copyfile(self.folder / url.rsplit("/", 1)[-1], dest)


def test_a_cached_package_is_reused_only_while_its_hash_matches(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fetch_mod.CACHE_ENV, str(tmp_path / "cache"))
    fake = _FakeS3(model_dir)
    monkeypatch.setattr(fetch_mod, "filesystem", lambda: fake)
    monkeypatch.setattr(fetch_mod, "remote_info", lambda url, what="": {"ETag": "e1", "size": 1})
    url = "s3://bucket/models/unet"
    copy = fetch_mod.local_package(url)
    assert fake.gets == 2 and fetch_mod.local_package(url) == copy and fake.gets == 2  # reused
    assert stat.S_IMODE((tmp_path / "cache" / "models").stat().st_mode) == 0o700
    weights = copy / "weights.safetensors"
    weights.write_bytes(b"planted" + weights.read_bytes()[7:])  # same size, other content
    assert fetch_mod.local_package(url) == copy and fake.gets == 4  # fetched again
    assert weights.read_bytes() == (model_dir / "weights.safetensors").read_bytes()
    assert model_hash(copy) == model_hash(model_dir)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_package_files_get_the_usual_permissions(tmp_path: Path, model_dir: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        out = save_model(tmp_path / "m", read_spec(model_dir), build_network("unet", "resnet18", 3, 3))
    finally:
        os.umask(old)
    for name in ("model.json", "weights.safetensors"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask
