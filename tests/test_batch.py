"""Batches of regions from a manifest, and regions run against a separately started Dask cluster."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import dask
import pytest
import yaml
from stac_schemas import COLLECTION_SCHEMA, validate_offline

from segpipe.errors import BatchError, InputError, MissingInputError

# One short epoch without validation (which would cost more than the training): these
# tests are about the flows, not the network.
TRAIN = {"epochs": 1, "samples_per_epoch": 16, "chip_size": 64, "batch_size": 8, "valid_fraction": 0}
# A small random forest where the model family is beside the point too: it trains in
# seconds, without loading torch.
FOREST = {"arch": "random_forest", "trees": 4}


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    from segpipe.synth import synthesize

    root = tmp_path_factory.mktemp("regions")
    for seed in (1, 2):
        synthesize(root / f"r{seed}", size=256, tiles=2, seed=seed)
    return root


def region_entry(name, folder):
    return {
        "name": name,
        "images": [f"{folder}/image.vrt"],
        "labels": f"{folder}/labels_sparse.tif",
        "classes": f"{folder}/classes.json",
        "store": f"out/{name}.zarr",
        "block_size": 256,
        "model": f"out/{name}-model",
        "train": TRAIN,
        "exports": ["classes"],
        "export_dir": f"out/{name}-cog",
    }


def test_manifest_paths_are_relative_to_the_file(regions):
    from flows.manifest import read_manifest

    path = regions / "batch.yaml"
    path.write_text(yaml.safe_dump({"concurrency": 3, "regions": [region_entry("a", "r1")]}))
    manifest = read_manifest(path)
    assert manifest.concurrency == 3
    run = manifest.regions[0]
    assert run.images == [str(regions / "r1" / "image.vrt")]
    assert run.store == str(regions / "out" / "a.zarr")
    assert run.train.epochs == 1


def test_manifest_errors_name_the_setting(tmp_path):
    from flows.manifest import read_manifest

    with pytest.raises(MissingInputError):
        read_manifest(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"regions": [{**region_entry("a", "r1"), "epochs": 3}]}))
    with pytest.raises(InputError, match="epochs"):
        read_manifest(bad)
    twice = tmp_path / "twice.yaml"
    twice.write_text(yaml.safe_dump({"regions": [region_entry("a", "r1"), region_entry("a", "r2")]}))
    with pytest.raises(InputError, match="same store"):
        read_manifest(twice)


def test_batch_runs_every_region_and_fails_naming_the_broken_one(regions, prefect_home):
    from flows.manifest import read_manifest
    from flows.process_regions import process_regions

    broken = {**region_entry("broken", "missing"), "images": ["missing/image.vrt"]}
    # A forest for the second region: two networks training in threads of this process
    # would share its cores for half a minute.
    two = {**region_entry("two", "r2"), "train": FOREST}
    path = regions / "batch2.yaml"
    batch = {"concurrency": 2, "collection": "out/collection.json",
             "regions": [region_entry("one", "r1"), broken, two]}
    path.write_text(yaml.safe_dump(batch))
    with pytest.raises(BatchError, match="broken") as info:
        process_regions(read_manifest(path))
    assert "1 of 3" in str(info.value)
    # Regions ran their clusters in parallel threads; none may leave dask pointing at it.
    assert dask.config.get("scheduler", None) != "dask.distributed"
    for name in ("one", "two"):
        assert (regions / "out" / f"{name}-cog" / "classes.tif").is_file()
        assert (regions / "out" / f"{name}-model" / "model.json").is_file()
    assert not (regions / "out" / "broken.zarr").exists()
    # The finished regions' Items, gathered in one STAC Collection (the failed one has none).
    collection = json.loads((regions / "out" / "collection.json").read_text())
    assert validate_offline(collection) == [COLLECTION_SCHEMA]
    assert sorted(link["href"] for link in collection["links"] if link["rel"] == "item") == [
        "./one-cog/classes.stac.json", "./two-cog/classes.stac.json"]


@pytest.fixture(scope="module")
def dask_scheduler(tmp_path_factory):
    """The deploy guide's commands: `dask scheduler` and `dask worker` as separate processes."""
    dask = str(Path(sys.executable).parent / "dask")
    sched_file = tmp_path_factory.mktemp("dask") / "scheduler.json"
    procs = [
        subprocess.Popen(
            [
                dask,
                "scheduler",
                "--scheduler-file",
                str(sched_file),
                "--port",
                "0",
                "--dashboard-address",
                ":0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        address = None
        deadline = time.time() + 60
        while address is None:  # the scheduler writes the file in several steps
            try:
                address = json.loads(sched_file.read_text())["address"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        procs.append(
            subprocess.Popen(
                [dask, "worker", "--scheduler-file", str(sched_file), "--nworkers", "2", "--nthreads", "1"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        from distributed import Client

        with Client(address, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_region_against_a_separately_started_dask_cluster(regions, tmp_path, prefect_home, dask_scheduler):
    from flows.manifest import read_region
    from flows.process_region import process_region

    entry = {
        **region_entry("remote", str(regions / "r1")),
        "store": str(tmp_path / "remote.zarr"),
        "model": str(tmp_path / "model"),
        "export_dir": str(tmp_path / "cog"),
        "train": FOREST,
        "scheduler": dask_scheduler,
    }
    path = tmp_path / "region.yaml"
    path.write_text(yaml.safe_dump(entry))
    result = process_region(read_region(path))
    predict = next(s for s in result["stages"] if s["stage"] == "predict")
    assert predict["blocks"] == 1
    assert (tmp_path / "cog" / "classes.tif").is_file()


def test_cli_run_finds_the_scheduler_in_the_environment(regions, tmp_path, dask_scheduler, prefect_home):
    """`segpipe run` with SEGPIPE_SCHEDULER set: stages on the cluster's workers, no local cluster."""
    import os

    entry = {
        **region_entry("env", str(regions / "r2")),
        "store": str(tmp_path / "env.zarr"),
        "model": str(tmp_path / "model"),
        "export_dir": str(tmp_path / "cog"),
        "train": FOREST,
    }
    path = tmp_path / "region.yaml"
    path.write_text(yaml.safe_dump(entry))
    # The first run uses the session's Prefect server (PREFECT_API_URL, set by prefect_home).
    env = {**os.environ, "SEGPIPE_SCHEDULER": dask_scheduler}
    cmd = [sys.executable, "-m", "segpipe.cli", "run", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting temporary server" not in done.stderr  # the session's engine served it
    assert json.loads(done.stdout.strip().splitlines()[-1])["region"] == "env"
    assert (tmp_path / "cog" / "classes.tif").is_file()
    logs = done.stderr
    assert f"connected to {dask_scheduler}" in logs  # the CLI shows which cluster predicts
    assert not re.search(r"started \d+ workers", logs)  # and starts none of its own
    assert "predict: 1/1 blocks" in logs  # block progress across the cluster
    assert "Mpx/s" in logs  # per-stage throughput in the final summary

    # The same region with its stages on the cluster's workers: all done already, so each
    # stage only checks and skips, on a worker that reaches this run's Prefect engine. No
    # Prefect API configured this time: the command starts its own engine (on a copy of the
    # session's database, its schema made), and the workers are given its address.
    env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    home = prefect_home.home(tmp_path / "prefect")
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd += ["--task-runner", "dask"]
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Starting temporary server" in again.stderr  # its own engine this time
    assert f"connected to {dask_scheduler}" in again.stderr
    assert "4 of 4 stages skipped" in again.stderr
