"""benchmarks/gpu_check.py and benchmarks/predict.py's peer rows, on tiny real inputs.

The GPU check runs as a script (without CUDA it must say so and exit 0); its CPU-reachable
pieces (the window grid, the precision comparison, the efficiency arithmetic) run here on
the CPU. The prediction benchmark's peer rows (MONAI's sliding window and the naive loop)
run on a 200 x 170 store against segpipe's own prediction of it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import psutil
import pytest
import rasterio
import torch
from predict_support import HEIGHT, WIDTH, make_store
from rasterio.transform import from_origin
from script_support import load_script

from segpipe.grid.tiling import window_count
from segpipe.io.store import open_layer, read_region_info, valid_mask
from segpipe.models import load_model, normalise
from segpipe.stages.predict.driver import predict

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    return load_script(BENCH / f"{name}.py", f"{name}_bench_script")


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return _load("gpu_check")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("predict")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the whole check")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path: Path, gpu_check: ModuleType) -> None:
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--out", str(out), "--work",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [gpu_check.NO_CUDA]
    assert not out.exists() and not (tmp_path / "work").exists()  # nothing measured, nothing made


def test_gpu_check_windows_are_prediction_grid(gpu_check: ModuleType) -> None:
    image = np.arange(3 * 200 * 170, dtype=np.float32).reshape(3, 200, 170)
    windows = gpu_check.grid_windows(image, 64, 16)
    assert windows.shape == (window_count((200, 170), 64, 48), 3, 64, 64)
    np.testing.assert_array_equal(windows[0], image[:, :64, :64])
    np.testing.assert_array_equal(windows[1], image[:, :64, 48:112])
    np.testing.assert_array_equal(windows[-1], image[:, -64:, -64:])  # the last ends at the edge


def test_gpu_check_precisions_on_cpu(tmp_path: Path, model_dir: Path, gpu_check: ModuleType) -> None:
    store = make_store(tmp_path / "a.zarr", block=256)
    net, spec = load_model(model_dir)
    raw = np.asarray(open_layer(store, "image")[:])
    windows = gpu_check.grid_windows(normalise(raw, spec, valid_mask(raw, 0)), 64, 16)
    # Four windows: bf16 on a CPU without bf16 units is slow.
    rows = gpu_check.precision_rows(net, torch.device("cpu"), windows[:4], 2, ("fp32", "bf16"))
    assert rows["fp32"]["agreement"] == 1.0 and rows["fp32"]["max_probability_gap"] == 0.0
    # bf16 keeps 8 bits of mantissa: most classes hold, probabilities move a little.
    assert 0.9 < rows["bf16"]["agreement"] <= 1.0
    assert 0.0 < rows["bf16"]["max_probability_gap"] < 0.5
    assert all(r["window_mpx_s"] > 0 for r in rows.values())


def test_gpu_check_efficiency_arithmetic(gpu_check: ModuleType) -> None:
    # 16 windows of 64 px over a 128 x 128 image: overlap factor 4; 2 GPUs at 10 window Mpx/s each.
    forward = {"windows": 16, "forward_window_mpx_s": 10.0}
    e = gpu_check.efficiency(128 * 128, 128 * 128 / 2.5e6, forward, 64, 2)
    assert e == {"end_to_end_mpx_s": 2.5, "overlap_factor": 4.0, "ideal_mpx_s": 5.0, "efficiency": 0.5}


def _region(tmp_path: Path, model_dir: Path) -> tuple[Path, Path]:
    """A store predicted by segpipe (Gaussian blend, as MONAI's) and its image as a GeoTIFF.

    The model is the stub forest (3 x 3 context, no edge margin): its windows lie where
    MONAI's do and a pixel's class hardly depends on which window saw it, so the peers
    must agree with segpipe; an untrained U-Net's classes flip with any change of context.
    """
    store = make_store(tmp_path / "r.zarr", block=256)
    predict(store, model_dir, tile_size=64, overlap=16, batch_size=4, blend="gaussian",
            scheduler="synchronous")
    tif = tmp_path / "image.tif"
    raw = np.asarray(open_layer(store, "image")[:])
    with rasterio.open(tif, "w", driver="GTiff", width=WIDTH, height=HEIGHT, count=raw.shape[0],
                       dtype=raw.dtype, nodata=0, crs="EPSG:32617",
                       transform=from_origin(300000, 4000, 10, 10)) as dst:
        dst.write(raw)
    return store, tif


def test_peer_rows_agree_with_segpipe(tmp_path: Path, stub_model_dir: Path, bench: ModuleType) -> None:
    if not bench.monai_available():
        pytest.skip("monai is not installed (pip install 'segpipe[bench]')")
    store, tif = _region(tmp_path, stub_model_dir)
    rows = bench.measure_peers(tif, str(store), str(stub_model_dir), tmp_path, (64, 16, 4, 1),
                               {"mpx_s": 1.0, "peak_rss_mb": 1.0})
    by = {r["method"]: r for r in rows}
    assert list(by) == ["segpipe", "monai", "naive"]
    assert all(r["size"] == HEIGHT for r in rows)
    for method in ("monai", "naive"):
        assert by[method]["mpx_s"] > 0
        assert 100 < by[method]["peak_rss_mb"] < 8000  # a process with torch loaded
    # The same Gaussian profile and windows: only the raster's edges are weighted differently.
    assert by["monai"]["agreement"] > 0.97
    assert by["naive"]["agreement"] > 0.9  # no overlap: a pixel's 3 x 3 context is cut at window borders
    monai = np.load(tmp_path / f"peer_monai_{HEIGHT}.npy")
    assert monai.shape == (HEIGHT, WIDTH) and np.all(monai[:30, :25] == 255)  # nodata kept


def test_peer_rows_without_monai_print_the_hint(
    tmp_path: Path, stub_model_dir: Path, bench: ModuleType, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, tif = _region(tmp_path, stub_model_dir)
    monkeypatch.setattr(bench, "monai_available", lambda: False)
    # 1 GiB more in this process: a peer's peak must be its own, not this process's
    # (getrusage's ru_maxrss in a child carries its parent's peak across fork and exec).
    ballast = np.ones(2**27)
    rows = bench.measure_peers(tif, str(store), str(stub_model_dir), tmp_path, (64, 16, 4, 1),
                               {"mpx_s": 1.0, "peak_rss_mb": 1.0})
    assert [r["method"] for r in rows] == ["segpipe", "naive"]
    assert capsys.readouterr().out.strip() == bench.MONAI_HINT
    mine = psutil.Process().memory_info().rss / 2**20
    assert 100 < rows[1]["peak_rss_mb"] < mine - 512, (rows[1], mine)
    del ballast
    assert read_region_info(store).height == HEIGHT


def test_gpu_check_table_names_every_figure(gpu_check: ModuleType) -> None:
    # A result shaped as main() builds it: a KeyError here would cost a GPU run its printout.
    forward = {"windows": 16, "forward_window_mpx_s": 10.0, "forward_s": 0.1, "worker_half": "bf16",
               "precision": {p: {"window_mpx_s": 9.0, "agreement": 0.99, "max_probability_gap": 0.01}
                             for p in gpu_check.PRECISIONS}}
    result = {
        "device": "1 x Some GPU", "train": {"seconds": 12.0, "metrics": {"valid_miou": 0.5}},
        "predict": {"cluster": "1 workers", "cluster_start_s": 3.0, "seconds": [1.0, 1.1], "tasks": 4},
        "forward": forward, "efficiency": gpu_check.efficiency(128 * 128, 1.0, forward, 64, 1),
        "pytest_gpu": {"rc": 0, "summary": "1 passed"},
    }
    lines = gpu_check.table(result)
    assert lines[0] == "device | 1 x Some GPU"
    assert [ln.split(" |")[0] for ln in lines[-4:]] == ["fp32 vs fp32", "bf16 vs fp32", "fp16 vs fp32",
                                                        "pytest -m gpu"]
    assert lines[5] == "ideal / efficiency | 2.5 Mpx/s / 0.007"  # 0.016 Mpx/s end to end over 10 / 4


def test_seed_ensembles_scores_each_run_of_seeds_through_the_cli(tmp_path):
    from train_support import TINY

    from segpipe.stages.train import train, train_config
    from segpipe.synth import synthesize

    bench = _load("seed_ensembles")
    folder = tmp_path / "scene"
    region = synthesize(tmp_path / "region", size=128, bands=4, tiles=1, seed=1)
    ingest = ["ingest", str(region.image), "--labels", str(region.labels), "--out", f"{folder}/store.zarr"]
    subprocess.run([bench.SEGPIPE, *ingest, "--block-size", "64"], check=True, capture_output=True)
    (folder / "reference_test.tif").symlink_to(region.truth)
    for seed in (0, 1):
        train(folder / "store.zarr", folder / f"model_default_s{seed}",
              train_config(**{**TINY, "valid_fraction": 0.0, "threads": 1, "seed": seed}))
    # Predict in the command's own process: a local cluster's start is beside the point here.
    row = bench.score(folder, (0, 1), scheduler="threads")
    assert row["seeds"] == [0, 1] and 0.0 <= row["test_miou"] <= 1.0 and row["test_iou"]
    assert row["members"] == ["default_s0", "default_s1"]
    spec = (folder / "seed_ensemble_default_s0+default_s1" / "model.json").read_text()
    assert '"arch": "ensemble"' in spec
