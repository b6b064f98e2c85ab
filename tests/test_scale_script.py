"""benchmarks/scale.py end to end at tiny sizes: every stage's figures, and the free model's classes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from script_support import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scale.py"
STAGES = ("synth", "ingest", "predict", "export", "evaluate", "io_floor")
SIZES = (256, 512)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    work = tmp_path_factory.mktemp("scale")
    out = work / "scale.json"
    # Threads for predict: a local cluster's start (10-20 s per run here) would take the
    # test past its time; the stages are otherwise those of the default run.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", *map(str, SIZES), "--block-size", "256", "--tile", "128",
         "--overlap", "32", "--scheduler", "threads", "--work", str(work), "--out", str(out), "--keep-data"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), work, proc.stdout


def test_every_stage_has_its_figures_at_every_size(run: tuple[dict[str, Any], Path, str]) -> None:
    result, _, stdout = run
    assert [r["size"] for r in result["rows"]] == list(SIZES)
    for row in result["rows"]:
        assert row["mpx"] == pytest.approx(row["size"] ** 2 / 1e6, rel=1e-3)
        for name in STAGES:
            s = row["stages"][name]
            assert 0 < s["call_s"] <= s["process_s"]
            assert s["mpx_s"] == pytest.approx(row["mpx"] / s["call_s"], rel=0.01)
            assert s["driver_peak_mb"] > 50  # a Python process with numpy at least
            assert s["total_peak_mb"] >= s["driver_peak_mb"]
        # 256 px blocks: ingest and the IO floor run one dask task per block at least.
        blocks = (row["size"] // 256) ** 2
        assert row["stages"]["ingest"]["tasks"] >= blocks
        assert row["stages"]["io_floor"]["chunks"] == blocks
        assert row["stages"]["predict"]["tasks"] >= 1
        assert row["stages"]["predict"]["blocks"] == blocks
        floor = row["stages"]["predict"]["mpx_s"] / row["stages"]["io_floor"]["mpx_s"]
        assert row["predict_over_io_floor"] == pytest.approx(floor, rel=0.01)
        assert row["stages"]["evaluate"]["miou"] > 0
    assert set(result["ratios"]) == set(STAGES)
    assert all(r["time_per_mpx"] > 0 and r["peak_rss"] > 0 for r in result["ratios"].values())
    # Two sizes: the line runs through both points.
    for name, r in result["ratios"].items():
        small, large = (row["stages"][name]["call_s"] for row in result["rows"])
        slope = (large - small) / (result["rows"][1]["mpx"] - result["rows"][0]["mpx"])
        assert r["fixed_s"] == pytest.approx(small - slope * result["rows"][0]["mpx"], abs=0.02)
    assert result["settings"]["gdal_cachemax_mb"] == 256
    # The 1 x 1 convolution runs many times the rate of the one-tree forest it replaced.
    assert result["forward"]["free_model_mpx_s"] > 3 * result["forward"]["forest_stand_in_mpx_s"] > 0
    assert "predict / IO floor at 512" in stdout


def test_the_exported_classes_are_the_free_models_one_split(run: tuple[dict[str, Any], Path, str]) -> None:
    _, work, _ = run
    folder = work / "512"
    spec = json.loads((folder / "free_model" / "model.json").read_text())
    with rasterio.open(folder / "region" / "image.vrt") as src:
        nir = src.read(4).astype(np.float64)
        valid = src.read_masks(4) > 0
    with rasterio.open(folder / "classes.tif") as cog:
        classes = cog.read(1)
    mean, std = spec["mean"][3], spec["std"][3]
    z = (nir - mean) / std
    clear = valid & (np.abs(z) > 1e-3)  # float32 rounding decides pixels on the split
    values = [c["value"] for c in spec["classes"]]
    expected = np.where(z > 0, values[1], values[0])
    assert clear.mean() > 0.5
    assert np.array_equal(classes[clear], expected[clear])
    assert {values[0], values[1]} <= set(np.unique(classes[clear]).tolist())


def test_sizes_out_of_range_are_refused() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "65536"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert "outside 256..32768" in proc.stderr


def _fake_stage(name: str, job: dict[str, Any], work: Path, args: Any) -> dict[str, Any]:
    """Stand-in for ``measure``: the files the real stage leaves, and figures of the right form."""
    region, folder = Path(job["region"]), Path(job["cog"]).parent
    made = {"synth": [region / "tiles" / "t0.tif", region / "truth.tif"],
            "ingest": [Path(job["store"]) / "zarr.json"], "io_floor": [Path(job["floor"]) / "zarr.json"],
            "export": [Path(job["cog"]), Path(job["cog"]).with_suffix(".stac.json")]}
    for path in made.get(name, []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (folder / f"{name}_{job['size']}.result.json").write_text("{}")
    return {"call_s": 1.0, "mpx_s": 2.0, "bands": ["b1"]}


def test_without_keep_data_only_the_figures_and_the_truth_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clean-up of a size's folder, in-process (the stages themselves run in the fixture's run)."""
    scale = load_script(SCRIPT, "scale_bench_script")
    monkeypatch.setattr(scale, "measure", _fake_stage)
    monkeypatch.setattr(scale, "make_model", lambda *a: None)
    args = scale._arguments(["--sizes", "256", "--work", str(tmp_path)])
    kept = scale._arguments(["--sizes", "256", "--keep-data"])
    gone = ["region/tiles", "region.zarr", "floor.zarr", "classes.tif", "classes.stac.json"]
    scale.run_size(256, tmp_path / "a", kept)
    assert [p for p in gone if not (tmp_path / "a" / str(256) / p).exists()] == []
    row = scale.run_size(256, tmp_path, args)
    folder = tmp_path / "256"
    assert [p for p in gone if (folder / p).exists()] == []
    assert (folder / "region" / "truth.tif").exists() and (folder / "predict_256.result.json").exists()
    assert row["predict_over_io_floor"] == 1.0
