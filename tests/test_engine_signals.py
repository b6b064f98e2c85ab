"""A signal to segpipe's group stops a flow's task thread and leaves the engine up until segpipe exits.

Ctrl-C in a terminal and ``kill -TERM -<pgid>`` reach every process of the foreground
group. Before the engine had a group of its own it died with segpipe, and the flow's
crash report and last log lines were retried against a dead port for about 2.5 minutes,
ending in ``httpx.ConnectError`` instead of the signal's own exit. And the task's thread,
told nothing, ran to its end (a whole training) before the process could exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, sys, time
from pathlib import Path
from segpipe.boundary import Terminated, catch_sigterm
from flows.engine import use_local_engine
from flows.signals import relays_signals
from segpipe.stop import check_stop

catch_sigterm()
work = Path(sys.argv[1])
use_local_engine(work / "home")
from prefect import flow, get_run_logger, task
from prefect.server.api.server import SubprocessASGIServer

@task
def wait() -> None:
    server = SubprocessASGIServer().server_process
    (work / "server.json").write_text(json.dumps({"pid": server.pid, "pgid": os.getpgid(server.pid)}))
    try:
        for i in range(6000):  # a long step loop, as training's, in the task runner's thread
            check_stop()
            get_run_logger().info("waiting %d", i)
            time.sleep(0.1)
    finally:
        (work / "task_cleanup").write_text("ran")

@flow
@relays_signals  # as every segpipe flow
def waiting() -> None:
    wait.submit().result()

try:
    waiting()
except BaseException as exc:
    print(f"LEFT WITH {type(exc).__name__}", flush=True)
    raise
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and parent-death signals")
def test_sigterm_to_the_group_reaches_segpipe_and_not_its_engine(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PYTHONPATH"] = str(ROOT)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 240  # the engine's first start creates its database
        while not (tmp_path / "server.json").exists():
            assert child.poll() is None, child.communicate()[0]
            assert time.monotonic() < deadline, "the flow never started"
            time.sleep(0.2)
        time.sleep(1.0)  # a few log lines on their way to the engine
        server = json.loads((tmp_path / "server.json").read_text())
        assert server["pgid"] != os.getpgid(child.pid)  # a group of its own
        os.killpg(child.pid, signal.SIGTERM)  # what a scheduler or Ctrl-C does to the group
        # Far less than the task's 600 s: the task's thread stops at its next check.
        output, _ = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert "LEFT WITH Terminated" in output, output[-3000:]
    assert (tmp_path / "task_cleanup").read_text() == "ran"  # its finally ran in its thread
    assert "ConnectError" not in output and "Error logging to API" not in output, output[-3000:]
    with pytest.raises(ProcessLookupError):  # stopped by segpipe on its way out
        os.kill(server["pid"], 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_the_engine_dies_with_a_killed_segpipe(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PYTHONPATH"] = str(ROOT)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "server.json").exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        server = json.loads((tmp_path / "server.json").read_text())
    finally:
        child.kill()  # SIGKILL: no cleanup of segpipe's runs
        child.wait()
    deadline = time.monotonic() + 60  # uvicorn's own graceful shutdown after the SIGTERM
    while _alive(server["pid"]):
        assert time.monotonic() < deadline, "the engine outlived segpipe"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie of ours does not count)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_a_new_flow_forgets_the_stop_an_earlier_one_was_asked_for() -> None:
    import threading

    from flows.signals import relay_signals
    from segpipe.stop import check_stop, request_stop

    raised: list[BaseException] = []

    def step() -> None:
        try:
            check_stop()
        except BaseException as exc:  # recorded for the assertion
            raised.append(exc)

    request_stop(KeyboardInterrupt)  # a notebook's Ctrl-C during an earlier flow
    with relay_signals():
        thread = threading.Thread(target=step)
        thread.start()
        thread.join()
    assert raised == []
    request_stop(KeyboardInterrupt)
    thread = threading.Thread(target=step)
    thread.start()
    thread.join()
    assert len(raised) == 1 and isinstance(raised[0], KeyboardInterrupt)
    from segpipe.stop import clear_stop

    clear_stop()
