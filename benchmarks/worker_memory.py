"""Where a default predict's memory goes: peak RSS per process, and a worker's floor step by step.

Run: ``.venv/bin/python benchmarks/worker_memory.py`` (about 5 minutes on 2 cores; a
default network is trained first unless ``--model`` names one).

Part 1 runs the default ``segpipe predict`` (the local cluster of 2 worker processes,
default windows and batch) on a 2048² synthetic region, several times, alternating two
set-ups in one run:

- ``as shipped``: the driver checks the package's weights in a child process and never
  imports torch; a worker imports torch only when it runs a task;
- ``torch everywhere``: what segpipe did before issue 17's lighter worker, reproduced
  from outside: the driver imports torch before it starts (so it loads the weights itself,
  :mod:`segpipe.models.verify`), and every worker imports it at start
  (``DASK_DISTRIBUTED__WORKER__PRELOAD``), as the layout query's import of
  :mod:`segpipe.models` made them do.

Every process of the tree is sampled every 50 ms (``/proc`` RSS); the table gives the peak
of the sum, each process's share at that moment, the seconds ``predict`` reported and the
process's wall seconds (the comparable time: ``torch everywhere`` imports torch in the
driver before ``predict`` starts its clock).

Part 2 measures one worker's floor in a fresh process, step by step: segpipe's predict
modules, torch, segmentation-models-pytorch, the model loaded as a task loads it
(:func:`segpipe.stages.predict.worker.cached_forward`), then one default forward call
(2 windows of 256 px).

Results go to ``benchmarks/results/worker_memory.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "worker_memory.json"
SETUPS = ("as shipped", "torch everywhere")
# The driver of the "torch everywhere" set-up: segpipe's CLI after importing torch.
_TORCH_FIRST = "import sys, torch; from segpipe.cli import main; sys.exit(main())"
_CLI = "import sys; from segpipe.cli import main; sys.exit(main())"


class ProcessPeaks:
    """Samples the RSS of a process tree; keeps the largest sum and each process's share then."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _role(self, proc: psutil.Process) -> str:
        if proc.pid == self.root.pid:
            return "driver"
        cmd = " ".join(proc.cmdline())
        if "resource_tracker" in cmd:
            return "resource tracker"
        if "segpipe.models.verify" in cmd:
            return "weights check"
        return f"worker {proc.pid}"

    def _sample(self) -> None:
        now: dict[str, int] = {}
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                now[self._role(proc)] = proc.memory_info().rss
            except psutil.Error:
                continue
        total = sum(now.values())
        if total > self.peak:
            self.peak, self.at_peak = total, now

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):  # a process ended between listing and reading
                self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> ProcessPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _roles(at_peak: dict[str, int]) -> dict[str, float]:
    """MB per role at the peak; workers ordered by size (busy first)."""
    workers = sorted((v for k, v in at_peak.items() if k.startswith("worker")), reverse=True)
    out = {k: v / 1e6 for k, v in at_peak.items() if not k.startswith("worker")}
    out.update({f"worker {i + 1}": v / 1e6 for i, v in enumerate(workers)})
    return out


def run_predict(setup: str, store: str, model: str) -> dict[str, Any]:
    """One default ``segpipe predict --force`` in the given set-up; its peak memory and seconds."""
    env = dict(os.environ)
    code = _CLI
    if setup == "torch everywhere":
        code = _TORCH_FIRST
        env["DASK_DISTRIBUTED__WORKER__PRELOAD"] = '["torch"]'
    cmd = [sys.executable, "-c", code, "predict", store, "--model", model, "--force", "--no-tta"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with ProcessPeaks(proc.pid) as peaks:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"segpipe predict failed ({setup}):\n{out[-2000:]}")
    found = re.search(r"in \d+ tasks?, ([\d.]+) s", out)
    return {
        "setup": setup,
        "peak_total_mb": peaks.peak / 1e6,
        "at_peak_mb": _roles(peaks.at_peak),
        "predict_s": float(found.group(1)) if found else None,
        "wall_s": time.perf_counter() - t0,
    }


_FLOOR = r'''
import json, sys, time
import numpy as np, psutil
def mb():
    return psutil.Process().memory_info().rss / 1e6
steps = []
import segpipe.stages.predict.driver, segpipe.stages.predict.worker
steps.append(("segpipe predict modules", mb()))
import torch
steps.append(("+ torch", mb()))
import segmentation_models_pytorch
steps.append(("+ segmentation-models-pytorch", mb()))
from segpipe.models import model_hash
from segpipe.stages.predict.worker import cached_forward
torch.set_num_threads(1)
loaded = cached_forward(sys.argv[1], model_hash(sys.argv[1]))
steps.append(("+ model loaded (cached_forward)", mb()))
batch = np.zeros((2, len(loaded.spec.band_names), 256, 256), np.float32)
loaded.forward(batch)
steps.append(("+ one forward call (2 x 256 px)", mb()))
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1e3
print(json.dumps({"steps": steps, "vmhwm_mb": hwm}))
'''


def worker_floor(model: str) -> dict[str, Any]:
    """A worker's resident memory after each import and load step, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", _FLOOR, model], capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _region(work: Path, size: int) -> str:
    """The benchmark's region store (made unless already in ``work``)."""
    from segpipe.stages.ingest.driver import ingest
    from segpipe.synth import synthesize

    store = work / f"region{size}.zarr"
    if not store.exists():
        region = synthesize(work / f"synth{size}", size=size, tiles=2, seed=1)
        ingest(region.image, store, labels=region.labels, classes=region.classes)
    return str(store)


def _model(work: Path, store: str) -> str:
    """A default network (2 epochs x 256 chips), trained in a child process unless present."""
    model = work / "model"
    if not (model / "model.json").exists():
        code = ("import sys; from segpipe.stages.train import NetworkConfig, train; "
                "train(sys.argv[1], sys.argv[2], NetworkConfig(epochs=2, samples_per_epoch=256))")
        subprocess.run([sys.executable, "-c", code, store, str(model)], check=True)
    return str(model)


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: per set-up, the mean of its runs."""
    lines = ["| set-up | runs | peak RSS total MB | driver MB | busy worker MB | other worker MB "
             "| predict s | wall s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for setup in SETUPS:
        rows = [r for r in runs if r["setup"] == setup]
        if not rows:
            continue

        def mean(get: Any, rows: list[dict[str, Any]] = rows) -> float:
            return sum(get(r) for r in rows) / len(rows)

        lines.append(
            f"| {setup} | {len(rows)} | {mean(lambda r: r['peak_total_mb']):.0f} "
            f"| {mean(lambda r: r['at_peak_mb'].get('driver', 0)):.0f} "
            f"| {mean(lambda r: r['at_peak_mb'].get('worker 1', 0)):.0f} "
            f"| {mean(lambda r: r['at_peak_mb'].get('worker 2', 0)):.0f} "
            f"| {mean(lambda r: r['predict_s'] or 0):.1f} | {mean(lambda r: r['wall_s']):.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run both parts and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="Region edge in px (default 2048).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each set-up, alternating.")
    parser.add_argument("--model", help="A model package to use instead of training the default network.")
    parser.add_argument("--work", type=Path, help="Working folder (default: a temporary one).")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="worker_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    store = _region(work, args.size)
    model = args.model or _model(work, store)
    load = os.getloadavg()[0]
    runs = []
    for i in range(args.repeats):
        for setup in SETUPS if i % 2 == 0 else SETUPS[::-1]:
            runs.append(run_predict(setup, store, model))
            print(f"  {setup}: {runs[-1]['peak_total_mb']:.0f} MB, {runs[-1]['predict_s']} s", flush=True)
    floor = worker_floor(model)
    result = {"size": args.size, "runs": runs, "worker_floor": floor, "load_before": load,
              "load_after": os.getloadavg()[0], "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(table(runs))
    for name, value in floor["steps"]:
        print(f"  worker floor: {name}: {value:.0f} MB")
    print(f"results in {RESULTS}")


if __name__ == "__main__":
    main()
