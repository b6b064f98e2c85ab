"""The error boundary of the ``segpipe`` command: usage errors, exit codes, --debug, --version.

Usage errors go through the installed console script (the way users meet them); the
mapping of library and OS errors is checked in-process by calling ``main()`` with a
stage function that raises, which is cheap and exercises the same code.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

import segpipe
from segpipe import cli
from segpipe.errors import (
    ClusterError,
    EngineError,
    InputError,
    MissingInputError,
    StorageError,
    StoreBusyError,
)


def console_script() -> str:
    found = Path(sys.executable).parent / "segpipe"
    return str(found) if found.exists() else str(shutil.which("segpipe"))


def run(*args, env=None):
    environ = {k: v for k, v in os.environ.items() if k not in ("SEGPIPE_DEBUG", "COLUMNS", "TERMINAL_WIDTH")}
    environ.update(env or {})
    return subprocess.run(
        [console_script(), *map(str, args)], capture_output=True, text=True, timeout=300, env=environ
    )


def error_lines(stderr):
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def assert_usage_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(error_lines(result.stderr)) == 1, result.stderr
    assert result.stderr.lstrip().startswith("Usage: segpipe")
    for needle in needles:
        assert needle in error_lines(result.stderr)[0]


def test_no_arguments_lists_the_commands():
    assert_usage_error(run(), "Missing command", "synth", "predict", "batch")


def test_version():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"segpipe {segpipe.__version__}"
    assert result.stderr == ""


def test_unknown_command():
    assert_usage_error(run("foo"), "foo")


def test_missing_option():
    assert_usage_error(run("synth"), "--out")


def test_malformed_value(tmp_path):
    assert_usage_error(run("synth", "--out", tmp_path / "r", "--size", "abc"), "--size")
    assert not (tmp_path / "r").exists()


def test_unknown_option_of_a_command(tmp_path):
    assert_usage_error(run("train", tmp_path / "s.zarr", "--out", tmp_path / "m", "--epoch", "3"), "--epoch")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_shows_the_traceback_and_keeps_the_exit_code(tmp_path, where):
    args = ["ingest", tmp_path / "nope.tif", "--out", tmp_path / "s.zarr"]
    result = run(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "MissingInputError" in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "nope.tif" in lines[0]


def test_segpipe_debug_environment_variable(tmp_path):
    args = ["ingest", tmp_path / "nope.tif", "--out", tmp_path / "s.zarr"]
    plain = run(*args)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert len(error_lines(plain.stderr)) == 1
    debug = run(*args, env={"SEGPIPE_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert len(error_lines(debug.stderr)) == 1


def _single_class_inputs(folder):
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    profile = {"driver": "GTiff", "width": 32, "height": 32, "crs": "EPSG:32617",
               "transform": from_origin(500000.0, 4000000.0, 10, 10)}
    with rasterio.open(folder / "image.tif", "w", count=2, dtype="uint16", **profile) as dst:
        dst.write(np.arange(2 * 32 * 32, dtype="uint16").reshape(2, 32, 32))
    with rasterio.open(folder / "mask.tif", "w", count=1, dtype="uint8", **profile) as dst:
        dst.write(np.ones((1, 32, 32), dtype="uint8"))
    return folder / "image.tif", folder / "mask.tif"


def test_a_warning_is_one_line_and_debug_keeps_pythons_format(tmp_path):
    image, mask = _single_class_inputs(tmp_path)
    plain = run("ingest", image, "--out", tmp_path / "a.zarr", "--labels", mask)
    assert plain.returncode == 0, plain.stderr
    warned = [ln for ln in plain.stderr.splitlines() if "single class" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "mask.tif" in warned[0], plain.stderr
    assert warned[0].endswith("(SingleClassWarning)") and ".py:" not in plain.stderr, plain.stderr
    debug = run("--debug", "ingest", image, "--out", tmp_path / "b.zarr", "--labels", mask)
    assert "SingleClassWarning: labels" in debug.stderr, debug.stderr


def test_an_image_without_georeferencing_is_warned_about_once_by_name(tmp_path):
    import numpy as np
    import rasterio

    image = tmp_path / "scan.tif"
    with rasterio.open(image, "w", driver="GTiff", width=32, height=32, count=1, dtype="uint16") as dst:
        dst.write(np.arange(32 * 32, dtype="uint16").reshape(1, 32, 32))
    result = run("ingest", image, "--out", tmp_path / "s.zarr")
    assert result.returncode == 0, result.stderr
    warned = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "scan.tif has no georeferencing" in warned[0], result.stderr


def test_help_piped_shows_whole_option_names():
    result = run("train", "--help")  # stdout is a pipe
    assert result.returncode == 0, result.stderr
    for option in ("--samples-per-epoch", "--class-balancing", "--balanced-sampling", "--valid-fraction"):
        assert option in result.stdout
    assert "…" not in result.stdout


def test_root_help_names_version_and_debug():
    result = run("--help")
    assert result.returncode == 0
    assert "--version" in result.stdout and "--debug" in result.stdout


# In-process: main() with a stage that raises what a library would.


def _rasterio_io_error():
    from rasterio.errors import RasterioIOError

    return RasterioIOError("Read failed. See previous exception for details.")


def _rasterio_error():
    from rasterio.errors import CRSError

    return CRSError("The WKT could not be parsed.")


def _zarr_error():
    from zarr.errors import MetadataValidationError

    return MetadataValidationError("zarr_format", "2 or 3", "7")


def _comm_closed():
    from distributed.comm.core import CommClosedError

    return CommClosedError("in <TCP (closed)>: Stream is closed")


OUT = "/data/out/classes.tif"
CASES = [
    (lambda: OSError(errno.ENOSPC, "No space left on device", OUT), 3, [OUT, "space"]),
    (lambda: OSError(errno.EDQUOT, "Disk quota exceeded", OUT), 3, [OUT, "quota"]),
    (lambda: PermissionError(errno.EACCES, "Permission denied", OUT), 3, [OUT, "permission"]),
    (lambda: PermissionError(errno.EPERM, "Operation not permitted", OUT), 3, [OUT, "not permitted"]),
    (lambda: OSError(errno.EROFS, "Read-only file system", OUT), 3, [OUT, "read-only"]),
    (lambda: IsADirectoryError(errno.EISDIR, "Is a directory", OUT), 3, [OUT, "folder"]),
    (lambda: NotADirectoryError(errno.ENOTDIR, "Not a directory", OUT), 3, [OUT, "file is in the way"]),
    (lambda: FileExistsError(errno.EEXIST, "File exists", OUT), 3, [OUT, "already exists"]),
    (lambda: FileNotFoundError(errno.ENOENT, "No such file", "/data/in.tif"), 2, ["/data/in.tif"]),
    (lambda: OSError(errno.EIO, "Input/output error", OUT), 3, [OUT, "Input/output error"]),
    (_rasterio_io_error, 2, ["Read failed", "raster"]),
    (_rasterio_error, 2, ["WKT"]),
    (lambda: json.JSONDecodeError("Expecting value", '{"a": ', 6), 2, ["JSON", "Expecting value"]),
    (_zarr_error, 2, ["Zarr"]),
    (_comm_closed, 3, ["Stream is closed", "scheduler"]),
    (lambda: ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), 3, ["Connection refused"]),
    (lambda: TimeoutError("timed out after 20 s."), 3, ["timed out"]),
    (lambda: InputError("--chip-size 4096 is larger than the region"), 2, ["--chip-size"]),
    (lambda: MissingInputError("image /x.tif does not exist"), 2, ["/x.tif"]),
    (lambda: StorageError(f"{OUT}: no space left"), 3, [OUT]),
    (lambda: ClusterError("cannot reach tcp://h:8786"), 3, ["tcp://h:8786"]),
    (lambda: EngineError("the local Prefect engine did not start"), 3, ["Prefect"]),
    (lambda: StoreBusyError("s.zarr is held by run abc"), 4, ["held"]),
    (
        lambda: RuntimeError("oops\nsecond line"),
        1,
        ["internal error: RuntimeError: oops second line", "--debug"],
    ),
    (lambda: KeyboardInterrupt(), 130, ["interrupted"]),
    (lambda: __import__("segpipe.boundary").boundary.Terminated(), 143, ["SIGTERM", "cleaned up"]),
    (lambda: MemoryError("Unable to allocate 112. GiB"), 3, ["out of memory", "112. GiB", "--tile-size"]),
]


def call_main(monkeypatch, capsys, raised, *extra):
    import segpipe.stages.export.cog

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(segpipe.stages.export.cog, "write_cog", fail)
    monkeypatch.delenv("SEGPIPE_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["segpipe", *extra, "export", "s.zarr", "--out", OUT])
    with pytest.raises(SystemExit) as info:
        cli.main()
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("make", "code", "needles"), CASES)
def test_errors_map_to_one_line_and_an_exit_code(monkeypatch, capsys, make, code, needles):
    exit_code, stderr = call_main(monkeypatch, capsys, make())
    assert exit_code == code, stderr
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower()


def test_debug_in_process_prints_the_traceback_then_the_line(monkeypatch, capsys):
    exit_code, stderr = call_main(monkeypatch, capsys, OSError(errno.ENOSPC, "No space", OUT), "--debug")
    assert exit_code == 3
    assert "Traceback" in stderr and stderr.rstrip().splitlines()[-1].startswith("error: ")
    assert len(error_lines(stderr)) == 1


def test_batch_summary_names_the_cause_in_one_line():
    from prefect.states import Crashed, Failed

    from flows.process_regions import failure_cause

    tile = "/data/r1/tile_3.tif"
    assert failure_cause(Failed(data=MissingInputError(f"image {tile} does not exist"))) == (
        f"MissingInputError: image {tile} does not exist"
    )
    cause = failure_cause(Failed(data=_rasterio_io_error()))
    assert cause.startswith("RasterioIOError: ") and "Read failed" in cause
    assert failure_cause(Failed(data=ValueError("bad\nvalue"))) == "ValueError: bad value"
    assert (
        failure_cause(Crashed(message="Execution was\ninterrupted"))
        == "CrashedRun: Execution was interrupted"
    )


# Progress that reaches a log file or a pipe.


def test_progress_lines_are_throttled_and_end_with_the_final_state():
    import io

    from rich.console import Console

    out = io.StringIO()
    with cli._LineProgress(Console(file=out, width=80), interval=3600) as bar:
        task = bar.add_task("predict", total=None, info="blocks")
        bar.update(task, completed=1, total=64)
        bar.update(task, completed=2)  # within the interval: not printed
        bar.update(task, completed=64)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("  predict: 1/64 (2%) blocks")
    assert lines[1].startswith("  predict: 64/64 (100%) blocks")


def test_progress_prints_every_report_past_the_interval():
    import io

    from rich.console import Console

    out = io.StringIO()
    with cli._LineProgress(Console(file=out, width=80), interval=0) as bar:
        task = bar.add_task("train", total=2, info="")
        for step in range(1, 5):
            bar.update(task, completed=step / 4, info=f"epoch 1/2 loss {1 / step:.3f}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # the final state was already printed
    assert "train: 0.25/2 (12%) epoch 1/2 loss 1.000" in lines[0]


def test_an_error_ends_progress_lines_where_they_stopped_and_adds_none_for_silent_tasks():
    import io

    from rich.console import Console

    out = io.StringIO()
    with pytest.raises(ValueError), cli._LineProgress(Console(file=out, width=80), interval=3600) as bar:
        started = bar.add_task("predict", total=None, info="blocks")
        bar.add_task("export", total=None, info="")  # refused before it reported anything
        bar.update(started, completed=1, total=64)
        bar.update(started, completed=5)
        raise ValueError("bad input")
    lines = out.getvalue().splitlines()
    shown = [line.split(",")[0] for line in lines]
    assert shown == ["  predict: 1/64 (2%) blocks", "  predict: 5/64 (8%) blocks"]


def test_progress_is_lines_when_stderr_is_not_a_terminal():
    # Under pytest stderr is captured: not a terminal, as in `segpipe ... 2> log`.
    assert isinstance(cli._progress(), cli._LineProgress)


# Environment faults: the cluster and the Prefect engine.


def test_unreachable_scheduler_fails_fast_naming_the_address(monkeypatch):
    import time

    from segpipe.cluster import get_client

    monkeypatch.setenv("SEGPIPE_CONNECT_TIMEOUT", "1")
    started = time.monotonic()
    with (
        pytest.raises(ClusterError, match=r"tcp://127\.0\.0\.1:1 within 1 s") as info,
        get_client("tcp://127.0.0.1:1"),
    ):
        pass
    assert time.monotonic() - started < 15
    assert "SEGPIPE_CONNECT_TIMEOUT" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("address", ["foo://host:1", "tcp://host", "tcp://host:port"])
def test_unusable_scheduler_address_is_bad_input(address):
    from segpipe.cluster import get_client

    with pytest.raises(InputError, match="tcp://host:port"), get_client(address):
        pass


def _torch_sum(x):
    import torch  # a worker that imported torch takes seconds to exit

    return float(torch.ones(3).sum()) + x


def test_local_cluster_listens_on_localhost_and_closes_cleanly(caplog, monkeypatch):
    from segpipe.cluster import get_client

    monkeypatch.delenv("SEGPIPE_SCHEDULER", raising=False)
    monkeypatch.delenv("SEGPIPE_CLUSTER_HOST", raising=False)
    monkeypatch.delenv("SEGPIPE_DASHBOARD_ADDRESS", raising=False)
    monkeypatch.setattr("segpipe.cluster.gpu_present", lambda: False)
    caplog.set_level("WARNING", logger="distributed")
    with get_client(n_workers=1) as client:
        scheduler = client.cluster.scheduler
        assert scheduler.address.startswith("tcp://127.0.0.1:")
        bound = {sock.getsockname()[0] for sock in scheduler.http_server._sockets.values()}
        assert bound == {"127.0.0.1"}, bound  # the dashboard: not 0.0.0.0
        assert all(w.startswith("tcp://127.0.0.1:") for w in client.scheduler_info()["workers"])
        assert client.submit(_torch_sum, 1).result() == 4.0
    assert "still alive" not in caplog.text


def _fail_a_task(x):
    raise ValueError(f"task {x} failed on purpose")


def _sigint_handler():
    import signal

    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_local_cluster_workers_leave_errors_and_ctrl_c_to_the_driver(capfd, monkeypatch):
    """A failed task is one error in the driver, not also a worker's traceback; workers ignore Ctrl-C."""
    from segpipe.cluster import get_client

    monkeypatch.delenv("SEGPIPE_SCHEDULER", raising=False)
    monkeypatch.setattr("segpipe.cluster.gpu_present", lambda: False)
    with get_client(n_workers=1) as client:
        assert client.submit(_sigint_handler).result() is True
        with pytest.raises(ValueError, match="on purpose"):
            client.submit(_fail_a_task, 7).result()
    err = capfd.readouterr().err
    assert "Compute Failed" not in err and "Traceback" not in err, err


class _FakeServer:
    """Stands for Prefect's SubprocessASGIServer: fails its first ``failures`` starts."""

    failures = 1
    starts: ClassVar[list[int]] = []
    stops = 0

    def start(self, timeout=None):
        _FakeServer.starts.append(timeout)
        if len(_FakeServer.starts) <= _FakeServer.failures:
            raise RuntimeError(
                "Timed out while attempting to connect to ephemeral Prefect API server.\nstdout: ..."
            )

    def stop(self):
        _FakeServer.stops += 1


@pytest.fixture
def fake_engine(monkeypatch):
    import prefect.settings

    import flows.engine

    class NoApi:
        def value(self):
            return None

    monkeypatch.setattr(prefect.settings, "PREFECT_API_URL", NoApi())
    monkeypatch.setattr(flows.engine, "_new_server", _FakeServer)
    _FakeServer.starts, _FakeServer.stops = [], 0
    return _FakeServer


def test_engine_start_is_retried_once(fake_engine, monkeypatch):
    from flows.engine import start_local_engine

    monkeypatch.setenv("SEGPIPE_PREFECT_START_TIMEOUT", "7")
    fake_engine.failures = 1
    start_local_engine()
    assert fake_engine.starts == [7, 7] and fake_engine.stops == 1


def test_engine_that_never_starts_is_one_line_engine_error(fake_engine):
    from flows.engine import start_local_engine

    fake_engine.failures = 99
    with pytest.raises(EngineError) as info:
        start_local_engine(timeout=3)
    message = str(info.value)
    assert fake_engine.starts == [3, 3] and fake_engine.stops == 2
    assert "\n" not in message and "3 s" in message and "SEGPIPE_PREFECT_START_TIMEOUT" in message


def test_engine_start_timeout_must_be_a_number(monkeypatch):
    from flows.engine import start_local_engine

    monkeypatch.setenv("SEGPIPE_PREFECT_START_TIMEOUT", "soon")
    with pytest.raises(InputError, match="SEGPIPE_PREFECT_START_TIMEOUT"):
        start_local_engine()


# Unusable region files and manifests: InputError naming the file and the field.

REGION_OK = "images: [a.tif]\nstore: r.zarr\nmodel: m\nexport_dir: cog\n"
IN_MANIFEST = "regions:\n- " + REGION_OK.replace("\n", "\n  ")


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("", ["empty"]),
        ("images: [a.tif\nstore: r.zarr\n", ["not valid YAML", "line"]),
        ("- images: [a.tif]\n", ["mapping", "list"]),
        ("just a string\n", ["mapping", "str"]),
        (REGION_OK + "epochs: 3\n", ["epochs", "unknown setting", "train"]),
        (REGION_OK + "train: {epochs: many}\n", ["train.epochs", "'many'"]),
        (REGION_OK + "train: {epoch: 3}\n", ["train.epoch", "unknown setting", "samples_per_epoch"]),
        (REGION_OK + "block_size: [1]\n", ["block_size"]),
        ("store: r.zarr\nmodel: m\nexport_dir: cog\n", ["images", "missing"]),
    ],
)
def test_unusable_region_file_names_file_and_field(tmp_path, text, needles):
    from flows.manifest import read_region

    path = tmp_path / "region.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        read_region(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("regions: [a, b]\n", ["regions[0]", "mapping", "str"]),
        ("regions: {a: 1}\n", ["regions", "list", "dict"]),
        ("concurrency: 2\n", ["regions", "missing"]),
        (
            "regions:\n- " + REGION_OK.replace("\n", "\n  ") + "colour: red\n",
            ["regions[0].colour", "unknown"],
        ),
        ("regions:\n- " + REGION_OK.replace("\n", "\n  ") + "\nconcurrency: 0\n", ["concurrency"]),
        ("regions: []\n", ["regions"]),
    ],
)
def test_unusable_manifest_names_file_and_field(tmp_path, text, needles):
    from flows.manifest import read_manifest

    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        read_manifest(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_region_file_that_is_a_folder_or_binary(tmp_path):
    from flows.manifest import read_region

    with pytest.raises(InputError, match="folder"):
        read_region(tmp_path)
    binary = tmp_path / "region.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(InputError, match="not a text file"):
        read_region(binary)
