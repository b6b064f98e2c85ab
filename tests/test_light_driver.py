"""The predict driver stays without torch: the weights are checked in a child process (issue 17).

Importing torch costs a process about 550 MB of resident memory; the driver only plans,
submits and tracks tasks, so it checks a package's weights through
:func:`segpipe.models.verify.verify_package` in a child and keeps torch out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from predict_support import SETTINGS, make_store

from segpipe.errors import ModelPackageError
from segpipe.models import build_network, read_spec, save_model, validate_package
from segpipe.models.verify import _error_class, verify_package

TESTS = Path(__file__).resolve().parent


def _truncate(pkg: Path) -> None:
    weights = pkg / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _other_shapes(pkg: Path) -> None:
    save_model(pkg, read_spec(pkg), build_network("unet", "resnet18", 4, 3))  # 4-band weights, 3-band spec


def test_the_child_check_gives_the_spec_and_hash_of_the_in_process_check(model_dir: Path) -> None:
    assert verify_package(model_dir, here=False) == validate_package(model_dir)


@pytest.mark.parametrize("damage", [_truncate, _other_shapes], ids=["truncated", "other shapes"])
def test_the_child_check_raises_what_the_in_process_check_raises(
    damage: object, model_dir: Path, tmp_path: Path
) -> None:
    bad = Path(shutil.copytree(model_dir, tmp_path / "bad"))
    damage(bad)  # type: ignore[operator]
    with pytest.raises(ModelPackageError) as here:
        verify_package(bad, here=True)
    with pytest.raises(ModelPackageError) as child:
        verify_package(bad, here=False)
    assert str(child.value) == str(here.value)
    assert str(bad) in str(child.value)


def test_an_unknown_error_name_from_the_child_is_a_package_error() -> None:
    assert _error_class("NoSuchError") is ModelPackageError
    assert _error_class("Exception") is ModelPackageError  # only segpipe's own tree is raised
    assert _error_class("BandMismatchError").__name__ == "BandMismatchError"


_DRIVER = """
import sys
from distributed import Client, LocalCluster
from segpipe.stages.predict.driver import predict
with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \\
        Client(cluster) as client:
    summary = predict(sys.argv[1], sys.argv[2], tile_size={tile}, overlap={overlap}, client=client)
    on_worker = client.run(lambda: "torch" in sys.modules)
print(summary.blocks_done, "torch" in sys.modules, list(on_worker.values()))
"""


def test_a_cluster_predict_never_imports_torch_in_the_driver(tmp_path: Path, model_dir: Path) -> None:
    store = make_store(tmp_path / "r.zarr", block=128)
    code = _DRIVER.format(tile=SETTINGS["tile_size"], overlap=SETTINGS["overlap"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, str(store), str(model_dir)], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    blocks, driver_torch, worker_torch = done.stdout.strip().splitlines()[-1].split(" ", 2)
    assert int(blocks) > 0
    assert driver_torch == "False"  # the weights were checked in a child
    assert worker_torch == "[True]"  # the worker that ran the network did import it
