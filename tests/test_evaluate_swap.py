"""A report folder is switched in whole: a kill or an error leaves the earlier report or the new one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from segpipe.errors import InputError
from segpipe.stages.evaluate import evaluate

SIZE = 96
REPORT = {"metrics.json", "report.md", "confusion_matrix.png", "preview.png", "points.csv"}
TRANSFORM = Affine(10.0, 0.0, 600000.0, 0.0, -10.0, 5000000.0)


def _tif(path: Path, data: np.ndarray, nodata: int) -> Path:
    profile = {"driver": "GTiff", "height": SIZE, "width": SIZE, "count": 1, "dtype": "uint8"}
    with rasterio.open(path, "w", **profile, nodata=nodata, crs="EPSG:32633", transform=TRANSFORM) as dst:
        dst.write(data, 1)
    return path


@pytest.fixture(scope="module")
def rasters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small class GeoTIFF and two references on its grid that score differently."""
    root = tmp_path_factory.mktemp("swap")
    rng = np.random.default_rng(5)
    pred = rng.choice(np.array([1, 2, 3], np.uint8), (SIZE, SIZE))
    near = np.where(rng.random((SIZE, SIZE)) < 0.8, pred, 1).astype(np.uint8)
    far = rng.choice(np.array([0, 1, 2, 3], np.uint8), (SIZE, SIZE))
    return {
        "pred": _tif(root / "pred.tif", pred, 255),
        "near": _tif(root / "near.tif", near, 0),
        "far": _tif(root / "far.tif", far, 0),
    }


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def _dead_pid() -> int:
    """The pid of a process that has ended (reaped), for leftovers of a "killed" run."""
    code = "import os; print(os.getpid())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_new_report_replaces_the_earlier_whole(rasters: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    evaluate(rasters["pred"], rasters["near"], out, points=50)
    assert (out / "points.csv").exists()
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    (out / "extra" / "a.txt").write_text("kept too")
    evaluate(rasters["pred"], rasters["far"], out)
    # No points.csv of the point run beside the full-pixel report; the user's files stay.
    names = {p.name for p in out.iterdir()}
    assert names == REPORT - {"points.csv"} | {"notes.txt", "extra"}
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "extra" / "a.txt").read_text() == "kept too"
    assert "far.tif" in (out / "metrics.json").read_text()
    assert "far.tif" in (out / "report.md").read_text()
    assert _hidden(out) == []


def _run_killed(script: str, cwd: Path) -> None:
    command = [sys.executable, "-c", textwrap.dedent(script)]
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr


KILL_BEFORE_REPORT_MD = """
    import os
    import segpipe.stages.evaluate.assess as assess
    from segpipe.stages.evaluate import evaluate

    def killed(*args, **kwargs):
        os._exit(9)  # as SIGKILL: no cleanup, after metrics.json and the figures were written

    assess.write_report = killed
    evaluate({pred!r}, {ref!r}, {out!r})
"""


def test_kill_while_writing_keeps_the_earlier_report(rasters: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    evaluate(rasters["pred"], rasters["near"], out, points=50)
    before = _snapshot(out)
    script = KILL_BEFORE_REPORT_MD.format(pred=str(rasters["pred"]), ref=str(rasters["far"]), out=str(out))
    _run_killed(script, tmp_path)
    assert _snapshot(out) == before
    # The next run sweeps the killed run's staging folder and writes its own report whole.
    evaluate(rasters["pred"], rasters["far"], out)
    assert _hidden(out) == []
    assert not (out / "points.csv").exists()


KILL_BETWEEN_RENAMES = """
    import os
    from segpipe.stages.evaluate import evaluate

    real = os.replace

    def replace(src, dst):
        if ".tmp-" in os.fspath(src):
            os._exit(9)  # as SIGKILL: the earlier report is renamed aside, the new one not yet in
        real(src, dst)

    os.replace = replace
    evaluate({pred!r}, {ref!r}, {out!r})
"""


def test_swap_killed_between_renames_is_recovered(rasters: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    evaluate(rasters["pred"], rasters["near"], out)
    before = _snapshot(out)
    script = KILL_BETWEEN_RENAMES.format(pred=str(rasters["pred"]), ref=str(rasters["far"]), out=str(out))
    _run_killed(script, tmp_path)
    assert not out.exists()
    # A run that fails on its inputs still puts the earlier report back, byte for byte.
    with pytest.raises(InputError):
        evaluate(rasters["pred"], rasters["far"], out, points=0)
    assert _snapshot(out) == before
    assert _hidden(out) == []


def test_next_run_recovers_then_replaces(rasters: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    evaluate(rasters["pred"], rasters["near"], out, points=50)
    tag = f"{socket.gethostname()}-{_dead_pid()}-0123abcd"
    os.replace(out, tmp_path / f".rep.old-{tag}")  # as left by a kill between the renames
    (tmp_path / f".rep.tmp-{tag}").mkdir()
    (tmp_path / f".rep.tmp-{tag}" / "metrics.json").write_text("{")
    evaluate(rasters["pred"], rasters["far"], out)
    assert _hidden(out) == []
    assert {p.name for p in out.iterdir()} == REPORT - {"points.csv"}
    assert "far.tif" in (out / "metrics.json").read_text()


def test_live_runs_folders_are_left_alone(rasters: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    live = tmp_path / f".rep.tmp-{socket.gethostname()}-{os.getppid()}-0123abcd"
    live.mkdir()
    evaluate(rasters["pred"], rasters["near"], out)
    assert live.is_dir()


def test_current_folder_is_refused(
    rasters: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="current folder"):
        evaluate(rasters["pred"], rasters["near"], ".")
    assert list(tmp_path.iterdir()) == []
