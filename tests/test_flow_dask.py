"""process_region on Prefect's DaskTaskRunner, and the logging of local clusters started in parallel."""

import contextlib
import importlib
import logging

import numpy as np
import pytest
import rasterio

# One short epoch without validation (which would cost more than the training): the task
# runners are under test, not the network.
TRAIN = {"epochs": 1, "samples_per_epoch": 16, "chip_size": 64, "batch_size": 8, "valid_fraction": 0}


def test_overlapping_local_clusters_restore_the_distributed_log_level():
    """Regions in parallel threads start and stop clusters in any order; the level must come back."""
    from segpipe.cluster import get_client

    importlib.import_module("distributed")  # importing it sets its logger's level: do that first
    logger = logging.getLogger("distributed")
    original = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        for order in ((0, 1), (1, 0)):
            clusters = [contextlib.ExitStack(), contextlib.ExitStack()]
            for stack in clusters:
                stack.enter_context(get_client(n_workers=1, processes=False))
                assert logger.level == logging.WARNING  # quiet while a cluster runs
            clusters[order[0]].close()
            assert logger.level == logging.WARNING  # the other cluster still runs
            clusters[order[1]].close()
            assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(original)


def read_band(path):
    with rasterio.open(path) as src:
        return src.read(1)


def test_process_region_on_a_dask_task_runner_matches_the_default_runner(tmp_path, prefect_home):
    from flows.process_region import RegionRun, process_region, run_region
    from segpipe.stages.train import NetworkConfig
    from segpipe.synth import synthesize

    region = synthesize(tmp_path / "region", size=256, tiles=2, seed=3)

    def region_run(name, **changes):
        settings = {
            "name": name,
            "images": [str(region.image)],
            "store": str(tmp_path / f"{name}.zarr"),
            "labels": str(region.labels_vector),
            "classes": str(region.classes),
            "block_size": 128,
            "model": str(tmp_path / "model"),
            "train": NetworkConfig(**TRAIN),
            "export_dir": str(tmp_path / f"{name}-cog"),
            "reference": str(region.truth),
            "report_dir": str(tmp_path / f"{name}-report"),
        }
        return RegionRun(**{**settings, **changes})

    local = run_region(region_run("local"))
    # The same model on a real multi-process local cluster started for the run: every stage
    # (ingest into a new store, predict, both exports, the evaluation) runs on its workers.
    # Called as a plain flow (like a deployment run), it reruns itself on a DaskTaskRunner.
    dask = process_region(region_run("dask", train=None, task_runner="dask"))

    names = ["ingest", "predict", "export classes", "export confidence", "evaluate classes"]
    assert [s["stage"] for s in dask["stages"]] == names
    assert all(s["worker"] is None for s in local["stages"])
    assert all(str(s["worker"]).startswith("tcp://") for s in dask["stages"]), dask["stages"]
    assert len({s["cluster"] for s in dask["stages"]}) == 1
    assert not any(s.get("skipped") for s in dask["stages"])
    predict = next(s for s in dask["stages"] if s["stage"] == "predict")
    assert predict["blocks"] == 4 and predict["blocks_skipped"] == 0
    for layer in ("classes", "confidence"):
        a = read_band(tmp_path / "local-cog" / f"{layer}.tif")
        b = read_band(tmp_path / "dask-cog" / f"{layer}.tif")
        assert np.array_equal(a, b), layer
    assert dask["miou"] == pytest.approx(local["miou"])


def test_a_batch_on_dask_shares_one_local_cluster(tmp_path, prefect_home):
    from flows.manifest import Manifest
    from flows.process_region import RegionRun
    from flows.process_regions import process_regions
    from segpipe.stages.train import ForestConfig, NetworkConfig
    from segpipe.synth import synthesize

    # A network trains on a worker (with the host's cores) for one region; a small forest
    # for the other, so that the two trainings do not share the cores for half a minute.
    train = {1: NetworkConfig(**TRAIN), 2: ForestConfig(trees=4)}
    runs = []
    for seed in (1, 2):
        region = synthesize(tmp_path / f"r{seed}", size=256, tiles=2, seed=seed)
        runs.append(
            RegionRun(
                name=f"r{seed}",
                images=[str(region.image)],
                labels=str(region.labels_vector),
                store=str(tmp_path / f"r{seed}.zarr"),
                block_size=256,
                model=str(tmp_path / f"model{seed}"),
                train=train[seed],
                exports=["classes"],
                export_dir=str(tmp_path / f"cog{seed}"),
            )
        )
    result = process_regions(Manifest(regions=runs, concurrency=2, task_runner="dask"))
    stages = [s for r in result["regions"].values() for s in r["stages"]]
    assert len(stages) == 8
    clusters = {s["cluster"] for s in stages}
    assert len(clusters) == 1 and None not in clusters  # both regions on the batch's one cluster
    for seed in (1, 2):
        assert (tmp_path / f"cog{seed}" / "classes.tif").is_file()
