"""The training pixel size in model.json, and predict refusing an image at another resolution."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import zarr
from predict_support import stub_package
from rasterio.transform import from_origin

from segpipe.errors import ModelPackageError, ResolutionMismatchError
from segpipe.io.store import read_region_info
from segpipe.models import ModelSpec, read_spec, save_model
from segpipe.models.loading import load_network
from segpipe.models.package import check_resolution
from segpipe.models.spec import grid_resolution
from segpipe.stages.ingest.driver import ingest
from segpipe.stages.predict.driver import check_predict_inputs, predict

SIZE = 48  # pixels per side of every test image


def region(
    root: Path, name: str, res: float, crs: str = "EPSG:32617", origin: tuple[float, float] = (300_000.0, 4e6)
) -> Path:
    """A real 3-band region store (bands b1-b3, as the stub package's) of pixels ``res`` wide."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    data = np.stack([(np.sin(yy / (5 + b)) + np.cos(xx / (4 + b))) * 300 + 700 for b in range(3)])
    tif = root / f"{name}.tif"
    with rasterio.open(
        tif, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint16", crs=crs,
        transform=from_origin(*origin, res, res), nodata=0,
    ) as ds:
        ds.write(data.astype(np.uint16))
        ds.descriptions = ("b1", "b2", "b3")
    ingest([tif], root / f"{name}.zarr", block_size=64)
    return root / f"{name}.zarr"


@pytest.fixture(scope="module")
def old_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package as written before the pixel size was recorded (a forest, cheap to run)."""
    return stub_package(tmp_path_factory.mktemp("old"))


@pytest.fixture(scope="module")
def package_10m(tmp_path_factory: pytest.TempPathFactory, old_package: Path) -> Path:
    """The same model trained on a 10 m store: its description records that store's grid."""
    root = tmp_path_factory.mktemp("trained")
    info = read_region_info(region(root, "train", 10.0))
    size, units = grid_resolution(info.crs_wkt, info.transform)
    net, spec, _ = load_network(old_package)
    assert isinstance(net, torch.nn.Module)
    recorded = dataclasses.replace(spec, pixel_size=size, crs_units=units)
    return save_model(root / "model", recorded, net)


def test_pixel_size_recorded_in_model_json(package_10m: Path, old_package: Path) -> None:
    written = json.loads((package_10m / "model.json").read_text())
    assert (written["pixel_size"], written["crs_units"]) == ([10.0, 10.0], "metre")
    spec = read_spec(package_10m)
    assert (spec.pixel_size, spec.crs_units) == ((10.0, 10.0), "metre")
    # A package without them writes neither key, so it reads as before.
    old = json.loads((old_package / "model.json").read_text())
    assert "pixel_size" not in old and "crs_units" not in old
    assert read_spec(old_package).pixel_size is None


def test_grid_resolution_of_rotated_and_crs_less_grids() -> None:
    assert grid_resolution("", (3.0, 0.0, 0.0, 0.0, -4.0, 0.0)) == ((3.0, 4.0), None)
    size, units = grid_resolution(rasterio.crs.CRS.from_epsg(4326).to_wkt(), (0.0, 6.0, 0.0, 8.0, 0.0, 0.0))
    assert (size, units) == ((8.0, 6.0), "degree")


def test_bad_pixel_size_in_model_json_is_named(package_10m: Path) -> None:
    data = json.loads((package_10m / "model.json").read_text())
    with pytest.raises(ModelPackageError, match="pixel_size"):
        ModelSpec.from_json({**data, "pixel_size": [0.0, 10.0]})
    with pytest.raises(ModelPackageError, match="pixel_size"):
        ModelSpec.from_json({**data, "pixel_size": [10.0]})
    assert ModelSpec.from_json({**data, "pixel_size": [10, 12]}).pixel_size == (10.0, 12.0)


def test_refused_above_25_percent_before_any_write(tmp_path: Path, package_10m: Path) -> None:
    store = region(tmp_path, "coarse", 13.0)
    with pytest.raises(ResolutionMismatchError) as err:
        predict(store, package_10m, scheduler="synchronous")
    message = str(err.value)
    for part in ("13 x 13 m", "10 x 10 m", "30%", "--allow-resolution-mismatch", "=True", str(package_10m)):
        assert part in message
    assert "classes" not in zarr.open_group(store)
    with pytest.raises(ResolutionMismatchError, match="7 x 7 m"):
        check_predict_inputs(region(tmp_path, "fine", 7.0), package_10m)


def test_accepted_at_20_percent(tmp_path: Path, package_10m: Path) -> None:
    for res in (12.0, 8.0):
        store = region(tmp_path, f"r{res:g}", res)
        assert check_predict_inputs(store, package_10m).spec.pixel_size == (10.0, 10.0)
    summary = predict(store, package_10m, scheduler="synchronous")
    assert summary is not None and "classes" in zarr.open_group(store)


def test_override_and_old_packages(tmp_path: Path, package_10m: Path, old_package: Path) -> None:
    store = region(tmp_path, "far", 30.0)
    check_predict_inputs(store, package_10m, allow_resolution_mismatch=True)
    check_predict_inputs(store, old_package)  # nothing recorded: nothing to compare


def test_compared_in_metres_across_units(tmp_path: Path, package_10m: Path) -> None:
    # NC State Plane in US survey feet: 32.8 ft is 10 m, 98.4 ft is 30 m.
    feet = 10.0 / 0.3048006096
    spec = read_spec(package_10m)
    wkt = rasterio.crs.CRS.from_epsg(2264).to_wkt()
    check_resolution(spec, wkt, (feet, 0.0, 0.0, 0.0, -feet, 0.0))
    thrice = r"98\.425 x 98\.425 US survey foot \(30 x 30 m\) differs by 200%"
    with pytest.raises(ResolutionMismatchError, match=thrice):
        check_resolution(spec, wkt, (3 * feet, 0.0, 0.0, 0.0, -3 * feet, 0.0))
    # Degrees against metres cannot be compared: refused, with the way out.
    store = region(tmp_path, "geographic", 0.0001, crs="EPSG:4326", origin=(-79.0, 35.0))
    with pytest.raises(ResolutionMismatchError, match=r"in metre .* in degree .*cannot be compared.*--crs"):
        check_predict_inputs(store, package_10m)
    check_predict_inputs(store, package_10m, allow_resolution_mismatch=True)


def test_the_cli_refuses_in_one_line_and_the_option_overrides(tmp_path: Path, package_10m: Path) -> None:
    from test_cli_errors import error_lines, run

    store = region(tmp_path, "coarse", 13.0)
    refused = run("predict", store, "--model", package_10m, "--scheduler", "synchronous")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = error_lines(refused.stderr)
    assert "13 x 13 m" in line and "--allow-resolution-mismatch" in line
    args = ("predict", store, "--model", package_10m, "--scheduler", "synchronous")
    done = run(*args, "--allow-resolution-mismatch")
    assert done.returncode == 0, done.stderr
    assert "classes" in zarr.open_group(store)
