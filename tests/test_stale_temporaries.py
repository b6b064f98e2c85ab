"""A killed write's temporaries are removed by the next write: model packages and polygon exports.

A SIGKILL runs no cleanup, so a killed ``segpipe train`` or ``segpipe export --vector``
leaves hidden temporaries (as big as the weights, or a partial GeoPackage) beside what it
was writing. The next write to the same place removes them, and nothing else: not the
finished files, not unrelated files, not the temporaries of a process still running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import pyogrio
import pytest
from predict_support import stub_package
from test_vector import make_store, scene

from segpipe.models import load_model
from segpipe.models.files import settle_package
from segpipe.stages.export.vector import write_vector

# What atomic_write's mkstemp leaves when a package write is killed: ".<file>.<8 random characters>".
PACKAGE_LEFTOVERS = (
    "..weights.safetensors.staged.ovxnubuk",
    "..model.json.staged.k_3abcde",
    "..model.onnx.staged.0a1b2c3d",
    ".mlm.json.q1w2e3r4",
    ".model.json.zz9_8yx7",
)
# Not a package file's temporary, or not one atomic_write makes: none is the package writer's to remove.
PACKAGE_UNRELATED = ("notes.txt", ".other.json.abcdefgh", ".mlm.json.keep", ".weights.safetensors.staged.x")


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _features(path: Path) -> int:
    return len(pyogrio.read_dataframe(path) if path.suffix == ".gpkg" else gpd.read_parquet(path))


def _plant(folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        (folder / name).write_bytes(b"partial " + name.encode())


def test_package_write_removes_the_temporaries_of_a_killed_write(tmp_path: Path) -> None:
    package = stub_package(tmp_path / "pkg", seed=0)
    finished = _contents(package)
    _plant(package, PACKAGE_LEFTOVERS + PACKAGE_UNRELATED)
    # A reader settles the package but leaves every temporary: a writer may be at work.
    settle_package(package)
    load_model(package)
    assert {n: b for n, b in _contents(package).items() if n in finished} == finished
    assert all((package / name).exists() for name in PACKAGE_LEFTOVERS)

    stub_package(package, seed=1)  # the next write
    left = _contents(package)
    assert not any((package / name).exists() for name in PACKAGE_LEFTOVERS)
    assert all(left[name] == b"partial " + name.encode() for name in PACKAGE_UNRELATED)
    assert set(left) == set(finished) | set(PACKAGE_UNRELATED)
    load_model(package)


_KILLED_PACKAGE_WRITE = """
import os, sys, time
from predict_support import stub_package
real = os.chmod
def stall(path, mode, **kw):  # atomic_write's temporary is written whole, not yet renamed in
    real(path, mode, **kw)
    if ".staged." in str(path):
        time.sleep(60)
os.chmod = stall
stub_package(__import__("pathlib").Path(sys.argv[1]), seed=1)
"""


def _killed_when(proc: subprocess.Popen[bytes], folder: Path, ready: str) -> list[Path]:
    """SIGKILL ``proc`` once a file whose name holds ``ready`` is in ``folder``; the hidden files left."""
    deadline = time.monotonic() + 120
    while not any(ready in p.name for p in folder.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the write ended before it was killed"
        time.sleep(0.05)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def test_package_write_removes_what_a_sigkill_left(tmp_path: Path) -> None:
    package = stub_package(tmp_path / "pkg", seed=0)
    finished = _contents(package)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PACKAGE_WRITE, str(package)], env=env)
    leftovers = _killed_when(proc, package, ".weights.safetensors.staged.")
    assert leftovers  # only hidden files: the earlier package is whole
    assert _contents(package).items() >= finished.items()

    stub_package(package, seed=2)
    assert set(_contents(package)) == set(finished)
    assert not any(p.exists() for p in leftovers)


# ---- polygon exports ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small 2 x 2-block store with a classes layer."""
    return make_store(tmp_path_factory.mktemp("stale") / "region.zarr", scene()[:128, :128].copy(), 64)


@pytest.fixture
def dead_pid() -> int:
    """The id of a process that has ended (as a killed export's is)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          check=True, text=True)
    return int(proc.stdout)


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The id of another process still running (as a concurrent export's is)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("suffix", [".gpkg", ".parquet"])
def test_vector_export_removes_a_killed_exports_partial_files(
    store: Path, tmp_path: Path, suffix: str, dead_pid: int, live_pid: int
) -> None:
    dest = tmp_path / f"classes{suffix}"
    other = write_vector(store, tmp_path / f"other{suffix}")
    write_vector(store, dest)
    finished = {p.name: p.read_bytes() for p in (other, dest)}
    partial = f".{dest.name}.{dead_pid}-0123abcd{suffix}"
    killed = [partial, f"{partial}-journal", f".{dest.name}.{dead_pid}-fedc9876{suffix}"]
    kept = [f".{dest.name}.{live_pid}-89abcdef{suffix}",  # a live export's: never touched
            f".{other.name}.{dead_pid}-0123abcd{suffix}",  # another destination's: not this export's
            f"notes{suffix}.txt", f".{dest.name}.notes"]
    _plant(tmp_path, tuple(killed + kept))

    write_vector(store, dest)
    assert not any((tmp_path / name).exists() for name in killed)
    assert all((tmp_path / name).read_bytes() == b"partial " + name.encode() for name in kept)
    assert other.read_bytes() == finished[other.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest.name, other.name, *kept])
    assert _features(dest) == _features(other) > 0


_KILLED_EXPORT = """
import sys, time
import segpipe.stages.export.vector as vector
real = vector._Writer.write
def stall(self, patches):  # the partial file holds the layer, more is never added
    real(self, patches)
    time.sleep(60)
vector._Writer.write = stall
vector.write_vector(sys.argv[1], sys.argv[2])
"""


def test_vector_export_removes_what_a_sigkill_left(store: Path, tmp_path: Path) -> None:
    dest = write_vector(store, tmp_path / "classes.gpkg")
    finished, features = dest.read_bytes(), _features(dest)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_EXPORT, str(store), str(dest)])
    leftovers = _killed_when(proc, tmp_path, ".classes.gpkg.")
    assert leftovers
    assert dest.read_bytes() == finished  # the kill left the earlier file whole

    write_vector(store, dest)
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]
    assert _features(dest) == features
