"""GPU check: segpipe's CUDA path end to end, ready to run as is on a machine with a GPU (issue 17).

Run: ``.venv/bin/python benchmarks/gpu_check.py`` (about 3-6 minutes on one GPU; ``--size``
sets the region). Needs CUDA for torch, and ``dask-cuda`` (``pip install 'segpipe[gpu]'``) for
a LocalCUDACluster (without it predict runs on a CPU cluster whose workers share the first
GPU, with a warning). Without CUDA it prints one "no CUDA" line and exits 0, having measured
nothing. The GPU tests get what is left of 8 minutes (at least one, ``--pytest-timeout`` at most).

In one run it measures:

- ``train``: a 1-epoch U-Net training on the GPU with automatic mixed precision (the
  training loop runs its forward under bf16 autocast on CUDA), in a process of its own;
- ``predict``: :func:`segpipe.stages.predict.driver.predict` end to end on the cluster
  :func:`segpipe.cluster.get_client` starts (``LocalCUDACluster``, one worker per GPU,
  when ``nvidia-smi`` and dask-cuda are present), warm, store in and store out;
- ``forward``: the bare forward of the same model on the same windows (every window of
  the whole-image grid, the same batch) through the workers' own
  :func:`segpipe.stages.predict.worker.torch_forward`; ideal = forward rate x GPUs /
  overlap factor, efficiency = end-to-end / ideal;
- ``precision``: classes of those windows under bf16 and fp16 autocast against fp32
  (TF32 off), as pixel agreement, with each precision's rate;
- ``pytest -m gpu``: the test suite's GPU tests, their exit status and summary line.

It prints a table and writes ``benchmarks/results/gpu_check.json`` (the device named).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA: gpu_check needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured"
PRECISIONS = ("fp32", "bf16", "fp16")


def cuda_available() -> bool:
    """Whether torch sees a CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


def grid_windows(image: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """Every window of the whole-image sliding grid of a (band, y, x) array, as (N, band, tile, tile).

    The grid is prediction's own (:func:`segpipe.grid.tiling.window_starts`: the last
    window ends at the edge); an image smaller than a window is padded up to one.
    """
    from segpipe.grid.tiling import pad_to_multiple, window_starts

    padded, _ = pad_to_multiple(image, 1, min_size=tile)
    ys = window_starts(padded.shape[1], tile, tile - overlap)
    xs = window_starts(padded.shape[2], tile, tile - overlap)
    return np.stack([padded[:, y : y + tile, x : x + tile] for y in ys for x in xs])


def forward_seconds(forward: Callable[[np.ndarray], np.ndarray], windows: np.ndarray, batch: int) -> float:
    """Seconds for ``forward`` over every window in batches (results back on the host, so synchronised)."""
    forward(windows[:batch])  # warm-up: kernels chosen, memory pooled
    t0 = time.perf_counter()
    for i in range(0, len(windows), batch):
        forward(windows[i : i + batch])
    return time.perf_counter() - t0


def precision_forward(
    net: nn.Module, device: torch.device, precision: str
) -> Callable[[np.ndarray], np.ndarray]:
    """Softmax probabilities of ``net`` in one precision: ``fp32`` (TF32 off), ``bf16`` or ``fp16``."""
    import torch

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def forward(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=half or torch.float32,
                                                    enabled=half is not None):
            probs = torch.softmax(net(x).float(), dim=1)
        result: np.ndarray = probs.cpu().numpy()
        return result

    return forward


def precision_rows(
    net: nn.Module,
    device: torch.device,
    windows: np.ndarray,
    batch: int,
    precisions: tuple[str, ...] = PRECISIONS,
) -> dict[str, dict[str, float]]:
    """Per precision: window Mpx/s, and class agreement and largest probability gap against fp32."""
    import torch

    rows: dict[str, dict[str, float]] = {}
    reference: np.ndarray | None = None
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    for precision in precisions:
        # fp32 means fp32: TF32 (on by default for cuDNN convolutions) would blur the reference.
        torch.backends.cudnn.allow_tf32 = precision != "fp32"
        torch.set_float32_matmul_precision("highest" if precision == "fp32" else matmul)
        try:
            forward = precision_forward(net, device, precision)
            forward(windows[:batch])  # warm-up: kernels chosen, memory pooled
            t0 = time.perf_counter()
            probs = np.concatenate([forward(windows[i : i + batch]) for i in range(0, len(windows), batch)])
            seconds = time.perf_counter() - t0
        finally:
            torch.backends.cudnn.allow_tf32 = cudnn
            torch.set_float32_matmul_precision(matmul)
        if reference is None:  # the first precision is the reference (fp32 by default)
            reference = probs
        rows[precision] = {
            "window_mpx_s": round(windows.shape[0] * windows.shape[2] * windows.shape[3] / seconds / 1e6, 4),
            "agreement": round(float((probs.argmax(1) == reference.argmax(1)).mean()), 5),
            "max_probability_gap": round(float(np.abs(probs - reference).max()), 4),
        }
    return rows


def _train(store: str, model: str, samples: int) -> dict[str, Any]:
    """One epoch on the GPU (bf16 autocast in the loop); seconds and validation scores."""
    from segpipe.stages.train import NetworkConfig, train

    t0 = time.perf_counter()
    spec = train(store, model, NetworkConfig(epochs=1, samples_per_epoch=samples, device="cuda"))
    return {"seconds": round(time.perf_counter() - t0, 1), "samples": samples,
            "metrics": {k: v for k, v in spec.metrics.items() if isinstance(v, int | float)}}


def _prepare(work: Path, size: int, samples: int) -> tuple[str, str, dict[str, Any]]:
    """A synthetic region ingested into a store and a model trained on it: store, model, training figures."""
    from segpipe.stages.ingest.driver import ingest
    from segpipe.synth import synthesize

    t0 = time.perf_counter()
    region = synthesize(work / "synth", size=size, tiles=2, seed=0)
    store = str(work / "region.zarr")
    ingest(region.image, store, labels=region.labels, classes=region.classes, overwrite=True)
    prepare_s = time.perf_counter() - t0
    model = str(work / "model")
    # Trained in a child process: the driver holds no CUDA context while the workers run.
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        trained = pool.submit(_train, store, model, samples).result()
    return store, model, {"synth_ingest_s": round(prepare_s, 1), "train": trained}


def _cluster_predict(store: str, model: str) -> dict[str, Any]:
    """Predict end to end on the cluster get_client starts (warm run first); figures of the timed runs.

    ``gpus`` is the GPUs the workers use: one per worker of a LocalCUDACluster; a CPU
    cluster's workers (dask-cuda missing) all run on the first GPU.
    """
    from segpipe.cluster import describe_cluster, get_client, gpu_present
    from segpipe.stages.predict.driver import predict

    cuda_cluster = gpu_present()
    t0 = time.perf_counter()
    with get_client() as client:
        start_s = time.perf_counter() - t0
        workers = client.scheduler_info(n_workers=-1)["workers"]
        gpus = len(workers) if cuda_cluster else 1
        predict(store, model, client=client, force=True)  # warm: model loaded, kernels chosen
        runs = [predict(store, model, client=client, force=True, tta=False) for _ in range(2)]
        cluster = describe_cluster(client)
    s = runs[-1]
    return {"cluster": cluster, "local_cuda_cluster": cuda_cluster, "cluster_start_s": round(start_s, 1),
            "gpus": gpus,
            "workers": len(workers), "tasks": s.tasks, "tile": s.tile_size, "overlap": s.overlap,
            "batch_size": s.batch_size, "seconds": [round(r.seconds, 3) for r in runs]}


def _bare_forward(store: str, model: str, tile: int, overlap: int, batch: int) -> dict[str, Any]:
    """The workers' forward on this process's GPU over the whole-image windows, and the precisions."""
    import torch

    from segpipe.io.store import open_layer, read_region_info, valid_mask
    from segpipe.models import load_model, normalise
    from segpipe.stages.predict.worker import torch_forward

    device = torch.device("cuda")
    net, spec = load_model(model)
    net = net.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    raw = np.asarray(open_layer(store, "image")[:])
    valid = valid_mask(raw, read_region_info(store).nodata)
    windows = grid_windows(normalise(raw, spec, valid), tile, overlap)
    seconds = forward_seconds(torch_forward(net, device), windows, batch)
    return {"windows": len(windows), "forward_s": round(seconds, 3),
            "forward_window_mpx_s": round(windows.size / windows.shape[1] / seconds / 1e6, 2),
            "worker_half": "bf16" if torch.cuda.is_bf16_supported() else "fp16",
            "precision": precision_rows(net, device, windows, batch)}


def _pytest_gpu(timeout: float) -> dict[str, Any]:
    """Run the suite's ``gpu`` tests; exit status, summary line and seconds."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"rc": None, "summary": f"timed out after {timeout:.0f} s", "seconds": round(timeout, 1)}
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    return {"rc": done.returncode, "summary": lines[-1] if lines else done.stderr[-300:],
            "seconds": round(time.perf_counter() - t0, 1)}


def efficiency(
    pixels: int, predict_s: float, forward: dict[str, Any], tile: int, gpus: int
) -> dict[str, float]:
    """End-to-end, ideal (bare forward x GPUs / overlap factor) and their ratio, in Mpx/s."""
    window_px = forward["windows"] * tile * tile
    overlap_factor = window_px / pixels
    end_to_end = pixels / predict_s / 1e6
    ideal = forward["forward_window_mpx_s"] * max(1, gpus) / overlap_factor
    return {"end_to_end_mpx_s": round(end_to_end, 2), "overlap_factor": round(overlap_factor, 4),
            "ideal_mpx_s": round(ideal, 2), "efficiency": round(end_to_end / ideal, 3)}


def table(result: dict[str, Any]) -> list[str]:
    """The figures worth a glance, one ``name | value`` line each."""
    p, f, e = result["predict"], result["forward"], result["efficiency"]
    lines = [
        f"device | {result['device']}",
        f"cluster | {p['cluster']} (started in {p['cluster_start_s']} s)",
        f"train 1 epoch, AMP | {result['train']['seconds']} s, {result['train']['metrics']}",
        f"predict end to end | {e['end_to_end_mpx_s']} Mpx/s ({p['seconds']} s, {p['tasks']} tasks)",
        f"bare forward ({f['worker_half']}) | {f['forward_window_mpx_s']} window Mpx/s, "
        f"{f['windows']} windows",
        f"ideal / efficiency | {e['ideal_mpx_s']} Mpx/s / {e['efficiency']}",
    ]
    for name, row in f["precision"].items():
        lines.append(f"{name} vs fp32 | agreement {row['agreement']}, max prob gap "
                     f"{row['max_probability_gap']}, {row['window_mpx_s']} window Mpx/s")
    lines.append(f"pytest -m gpu | rc {result['pytest_gpu']['rc']}: {result['pytest_gpu']['summary']}")
    return lines


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=4096, help="Edge of the synthetic region in pixels.")
    parser.add_argument("--samples", type=int, default=2048, help="Training chips in the one epoch.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/segpipe-gpu-check"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    parser.add_argument("--pytest-timeout", type=float, default=240.0, help="Seconds for pytest -m gpu.")
    return parser.parse_args()


def _device() -> str:
    import torch

    props = torch.cuda.get_device_properties(0)
    return (f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.0f} GiB, "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def main() -> int:
    """Run every check (without CUDA: none, and say so); the exit status is 0 unless a check raised."""
    args = _arguments()
    if not cuda_available():
        print(NO_CUDA, flush=True)
        return 0
    from segpipe.cluster import gpu_present

    if not gpu_present():  # the rest still runs: its figures are worth the GPU's time
        print("warning: no LocalCUDACluster (needs nvidia-smi and dask-cuda: pip install 'segpipe[gpu]'); "
              "predict runs on a CPU cluster whose workers share the first GPU", flush=True)
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    store, model, prepared = _prepare(args.work, args.size, args.samples)
    predicted = _cluster_predict(store, model)
    forward = _bare_forward(store, model, predicted["tile"], predicted["overlap"], predicted["batch_size"])
    result: dict[str, Any] = {
        "device": _device(), "host": f"{platform.node()}, {multiprocessing.cpu_count()} cores",
        "size": args.size, **prepared, "predict": predicted, "forward": forward,
        "efficiency": efficiency(args.size**2, float(np.mean(predicted["seconds"])), forward,
                                 predicted["tile"], predicted["gpus"]),
    }
    # What is left of the 8-minute budget, at least a minute: the GPU tests come last.
    left = 470.0 - (time.perf_counter() - t0)
    result["pytest_gpu"] = _pytest_gpu(min(args.pytest_timeout, max(60.0, left)))
    result["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(table(result)))
    print(f"total {result['total_s']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
