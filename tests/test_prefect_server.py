"""A real Prefect server on loopback: a served deployment of process_regions, run through the API.

Slow (starting a server and a serving process takes a minute): run with ``pytest -m slow``.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, timeout=120):
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"Prefect server at {url} did not answer")


@pytest.mark.slow
def test_served_deployment_runs_through_the_api(tmp_path, monkeypatch):
    from segpipe.synth import synthesize

    region = synthesize(tmp_path / "r", size=256, tiles=2, seed=4)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    prefect = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    serve = None
    try:
        wait_healthy(api)
        serve = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from flows.process_regions import process_regions; process_regions.serve(name='test')",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        from prefect.deployments import run_deployment

        manifest = {
            "concurrency": 1,
            "regions": [
                {
                    "name": "served",
                    "images": [str(region.image)],
                    "labels": str(region.labels),
                    "classes": str(region.classes),
                    "store": str(tmp_path / "s.zarr"),
                    "block_size": 256,
                    "model": str(tmp_path / "m"),
                    "export_dir": str(tmp_path / "cog"),
                    "exports": ["classes"],
                    "train": {"epochs": 1, "samples_per_epoch": 16, "chip_size": 64, "batch_size": 8},
                }
            ],
        }
        deadline = time.time() + 120
        while True:  # the serving process registers the deployment shortly after it starts
            try:
                run = run_deployment("process-regions/test", parameters={"manifest": manifest}, timeout=600)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(2)
        assert run.state.is_completed(), run.state
        assert (tmp_path / "cog" / "classes.tif").is_file()
    finally:
        for p in (serve, server):
            if p is not None:
                p.terminate()
                p.wait(timeout=60)
