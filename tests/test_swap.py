"""segpipe.io.swap: a folder published whole; what killed runs leave is recovered or removed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from segpipe.errors import StoreError
from segpipe.io.swap import recover, run_tag, staging_path, swap_in


def _dead_pid() -> int:
    """The pid of a process that has ended (reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(proc.stdout)


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "content.txt").write_text(text)
    return path


def _leftover(out: Path, kind: str, pid: int, text: str) -> Path:
    return _folder(out.with_name(f".{out.name}.{kind}-{socket.gethostname()}-{pid}-abcd1234"), text)


def test_swap_in_publishes_and_removes_the_earlier_folder(tmp_path: Path) -> None:
    out = _folder(tmp_path / "result", "earlier")
    tag = run_tag()
    staging = _folder(staging_path(out, tag), "new")
    swap_in(staging, out, tag)
    assert (out / "content.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_recover_puts_back_a_folder_a_kill_left_aside(tmp_path: Path) -> None:
    out = tmp_path / "result"
    dead = _dead_pid()
    _leftover(out, "old", dead, "earlier")  # killed between its two renames: no "result"
    _leftover(out, "tmp", dead, "half")
    recover(out)
    assert (out / "content.txt").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_recover_leaves_live_runs_and_a_published_folder_alone(tmp_path: Path) -> None:
    out = _folder(tmp_path / "result", "current")
    live = _leftover(out, "tmp", os.getppid(), "being written")
    _leftover(out, "old", _dead_pid(), "older")  # "result" exists: this is garbage, not a loss
    recover(out)
    assert (out / "content.txt").read_text() == "current"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["result", live.name])


def test_a_killed_process_not_yet_reaped_is_dead() -> None:
    """``kill -9`` under ``timeout`` leaves a zombie until init reaps it: its leftovers are garbage."""
    import time

    from segpipe.io.runs import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        assert not pid_alive(child.pid)
        assert pid_alive(os.getpid())
    finally:
        child.wait()


def test_ingest_puts_back_a_store_a_kill_left_aside(tmp_path: Path) -> None:
    from segpipe.stages.ingest.driver import ingest
    from segpipe.synth import synthesize

    region = synthesize(tmp_path / "region", size=64, bands=2, tiles=1, seed=3)
    store = tmp_path / "store.zarr"
    ingest(region.image, store, block_size=64)
    aside = store.with_name(f".{store.name}.old-{socket.gethostname()}-{_dead_pid()}-abcd1234")
    store.rename(aside)  # what a kill between the replacement's two renames leaves
    with pytest.raises(StoreError, match="--overwrite"):  # the earlier store is back, and kept
        ingest(region.image, store, block_size=64)
    assert (store / "zarr.json").is_file() and not aside.exists()
