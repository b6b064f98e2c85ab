"""Benchmark prediction: throughput, efficiency, compute overhead and memory at 1x, 4x, 16x area.

Run: ``.venv/bin/python benchmarks/predict.py`` (about 5-10 minutes on 2 cores).

For each region size (a synthetic scene from :mod:`segpipe.synth`, ingested with the
default 1024-px blocks) it measures, side by side in one run:

- ``forward_mpx_s``: the network alone on in-memory windows of the same size and batch:
  the better of one process using every core and all dask workers at once;
- ``end_to_end_mpx_s``: :func:`segpipe.stages.predict.driver.predict` store in, store out (warm
  cluster and model), unique output pixels per second;
- ``ideal_mpx_s`` = forward / overlap factor (window pixels of one whole-image sliding
  window per output pixel), ``efficiency`` = end-to-end / ideal;
- ``compute_overhead``: window slots computed (windows duplicated at task borders and
  batch padding included) / windows of one whole-image sliding window;
- ``naive_mpx_s``: a single-process rasterio window loop over the VRT without overlap;
- ``peak_rss_mb``: peak resident memory of the driver and every worker during predict.

Beside segpipe's predict, each size has peer rows (``peers`` in the results; ``--no-peers``
skips them), each run in a process of its own with the same weights, windows and batch:

- ``monai``: MONAI's ``SlidingWindowInferer`` (``mode="gaussian"``, the same window and
  overlap) over the store's whole image in memory: model load, reading, normalising,
  inference and argmax timed (install with ``pip install 'segpipe[bench]'``; without
  monai the row is skipped with a one-line hint);
- ``naive``: the window loop above (no overlap), reading the VRT and writing a GeoTIFF.

Each peer row has its rate (output Mpx/s), its process's peak RSS, and its pixel
agreement with segpipe's classes (pixels valid in both); segpipe's row has the peak RSS
of its whole process tree (driver and workers).

It also writes seam previews of a 4 x 4 block region (``docs/img/seams_<blend>.png``)
and a seam score per blend mode. Results go to ``benchmarks/results/predict.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from segpipe.cluster import describe_cluster, get_client
from segpipe.cores import usable_cores
from segpipe.grid.tiling import pad_to_multiple, window_starts
from segpipe.io.store import open_layer, read_region_info, valid_mask
from segpipe.models import load_model, normalise, read_spec
from segpipe.stages.ingest.driver import ingest
from segpipe.stages.predict.allocator import tune_allocator
from segpipe.stages.predict.driver import predict
from segpipe.stages.train import NetworkConfig, train
from segpipe.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]
MONAI_HINT = "monai is not installed: pip install 'segpipe[bench]' for the MONAI row (skipped)"


class PeakRss:
    """Samples the summed RSS of this process and all its descendants in a thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a process that just ended
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def forward_rate(
    model_dir: str, tile: int, batch: int, threads: int, seconds: float = 4.0
) -> tuple[int, float]:
    """Window pixels and seconds of back-to-back forward passes on random in-memory windows."""
    import torch

    from segpipe.stages.predict.worker import torch_forward

    torch.set_num_threads(threads)
    net, spec = load_model(model_dir)
    forward = torch_forward(net, torch.device("cpu"))
    x = np.random.default_rng(0).normal(size=(batch, len(spec.band_names), tile, tile)).astype(np.float32)
    forward(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        forward(x)
        n += 1
    return n * batch * tile * tile, time.perf_counter() - t0


def naive_loop(vrt: Path, model_dir: str, tile: int, batch: int, out: Path) -> float:
    """What most scripts do: read windows with rasterio, no overlap, write classes; returns seconds."""
    import rasterio
    import torch
    from rasterio.windows import Window

    from segpipe.io.store import valid_mask
    from segpipe.stages.predict.worker import torch_forward

    torch.set_num_threads(usable_cores())
    t0 = time.perf_counter()
    net, spec = load_model(model_dir)
    forward = torch_forward(net, torch.device("cpu"))
    values = np.array([c.value for c in spec.classes], dtype=np.uint8)
    with rasterio.open(vrt) as src:
        profile = {"driver": "GTiff", "width": src.width, "height": src.height, "count": 1, "dtype": "uint8",
                   "crs": src.crs, "transform": src.transform, "tiled": True, "compress": "deflate",
                   "nodata": 255}
        wins = [Window(x, y, min(tile, src.width - x), min(tile, src.height - y))
                for y in range(0, src.height, tile) for x in range(0, src.width, tile)]
        with rasterio.open(out, "w", **profile) as dst:
            for i in range(0, len(wins), batch):
                chunk = wins[i : i + batch]
                chips, valids = [], []
                for win in chunk:
                    raw = src.read(window=win)
                    valid = valid_mask(raw, src.nodata)
                    chips.append(pad_to_multiple(normalise(raw, spec, valid), tile)[0])
                    valids.append(valid)
                probs = forward(np.stack(chips))
                for win, valid, p in zip(chunk, valids, probs, strict=True):
                    cls = values[p[:, : win.height, : win.width].argmax(axis=0)]
                    cls[~valid] = 255
                    dst.write(cls, 1, window=win)
    return time.perf_counter() - t0


def monai_classes(
    store: str, model_dir: str, tile: int, overlap: int, batch: int, threads: int
) -> tuple[np.ndarray, float]:
    """Classes from MONAI's Gaussian ``SlidingWindowInferer`` over the whole image in memory; seconds.

    The image is the store's, read at once (MONAI's way: the whole volume in memory),
    normalised as segpipe normalises it; softmax probabilities are blended, as in segpipe.
    """
    import torch
    from monai.inferers.inferer import SlidingWindowInferer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    net, spec = load_model(model_dir)
    raw = np.asarray(open_layer(store, "image")[:])
    valid = valid_mask(raw, read_region_info(store).nodata)
    x = torch.from_numpy(normalise(raw, spec, valid)[None])
    inferer = SlidingWindowInferer(roi_size=(tile, tile), sw_batch_size=batch, overlap=overlap / tile,
                                   mode="gaussian")
    with torch.inference_mode():
        probs = inferer(x, lambda w: torch.softmax(net(w), dim=1))
    assert isinstance(probs, torch.Tensor)  # one network output, not a tuple or dict
    values = np.array([c.value for c in spec.classes], dtype=np.uint8)
    cls = values[probs[0].argmax(0).numpy()]
    cls[~valid] = 255
    return cls, time.perf_counter() - t0


def monai_available() -> bool:
    """Whether MONAI can be imported (the ``bench`` extra), without importing it."""
    return importlib.util.find_spec("monai") is not None


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels valid (not 255) in both class arrays where the classes are equal."""
    both = (a != 255) & (b != 255)
    return float((a[both] == b[both]).mean()) if both.any() else float("nan")


def _peer_child(job: dict[str, Any]) -> dict[str, float]:
    """Run one peer in this (fresh) process: its seconds and this process's peak RSS in MB."""
    if job["kind"] == "monai":
        cls, seconds = monai_classes(job["store"], job["model"], job["tile"], job["overlap"], job["batch"],
                                     job["threads"])
        np.save(job["out"], cls)
    else:  # naive_loop sets torch's threads to the usable cores itself
        seconds = naive_loop(Path(job["vrt"]), job["model"], job["tile"], job["batch"], Path(job["out"]))
    return {"seconds": seconds, "peak_rss_mb": own_peak_rss_mb()}


def own_peak_rss_mb() -> float:
    """This process's peak resident memory in MB (imports and model included).

    VmHWM is the high-water mark of this process's own memory map: getrusage's
    ru_maxrss is not, as Linux carries the parent's peak across fork and exec into it.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB on most systems


def run_peer(job: dict[str, Any]) -> dict[str, float]:
    """Run one peer in a process of its own (this script, ``--peer-child``): its peak RSS is its own."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--peer-child", json.dumps(job)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"peer {job['kind']} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _read_classes(kind: str, out: Path) -> np.ndarray:
    """The classes a peer wrote: a .npy array (MONAI) or a GeoTIFF (naive loop)."""
    if kind == "monai":
        return np.asarray(np.load(out))
    import rasterio

    with rasterio.open(out) as src:
        return np.asarray(src.read(1))


def measure_peers(
    vrt: Path, store: str, model: str, work: Path, settings: tuple[int, int, int, int],
    segpipe: dict[str, Any],
) -> list[dict[str, Any]]:
    """Peer rows (segpipe's own first) for one region: rate, peak RSS and agreement with segpipe's classes.

    Args:
        vrt: The region's source image (the naive loop reads it).
        store: The region store, holding segpipe's ``classes`` from its last predict.
        model: Model package, the same weights for every row.
        work: Folder for the peers' outputs.
        settings: Window, overlap, batch and torch threads of the peers.
        segpipe: segpipe's figures for the row: ``mpx_s`` and ``peak_rss_mb``.
    """
    tile, overlap, batch, threads = settings
    ours = np.asarray(open_layer(store, "classes")[:])
    pixels = ours.size / 1e6
    size = int(ours.shape[0])
    rows = [{"size": size, "method": "segpipe", **segpipe, "agreement": 1.0}]
    kinds = ["monai", "naive"] if monai_available() else ["naive"]
    if "monai" not in kinds:
        print(MONAI_HINT, flush=True)
    for kind in kinds:
        out = work / (f"peer_{kind}_{size}" + (".npy" if kind == "monai" else ".tif"))
        job = {"kind": kind, "store": store, "vrt": str(vrt), "model": model, "tile": tile,
               "overlap": overlap, "batch": batch, "threads": threads, "out": str(out)}
        r = run_peer(job)
        rows.append({"size": size, "method": kind, "mpx_s": round(pixels / r["seconds"], 4),
                     "peak_rss_mb": round(r["peak_rss_mb"], 1),
                     "agreement": round(agreement(ours, _read_classes(kind, out)), 4)})
    return rows


def workers_rate(client: Any, model_dir: str, tile: int, batch: int) -> float:
    """Window Mpx/s of every worker running the network at once (its share of the cores each)."""
    n_workers = len(client.scheduler_info()["workers"])
    runs = client.run(_forward_on_worker, model_dir, tile, batch, max(1, usable_cores() // n_workers))
    return float(sum(p for p, _ in runs.values()) / max(t for _, t in runs.values()) / 1e6)


def _warm_worker(model_dir: str, tile: int, batch: int) -> None:
    """Load the package into the worker's model cache, as prediction tasks do, and run it once."""
    from segpipe.models import model_hash
    from segpipe.stages.predict.worker import cached_model, torch_forward

    tune_allocator()
    net, spec, device = cached_model(str(Path(model_dir).resolve()), model_hash(model_dir))
    torch_forward(net, device)(np.zeros((batch, len(spec.band_names), tile, tile), dtype=np.float32))


def _forward_on_worker(model_dir: str, tile: int, batch: int, threads: int) -> tuple[int, float]:
    # The same allocator settings prediction tasks use: the reference is the best the
    # network can do in a worker, not one slowed by dask's malloc environment.
    tune_allocator()
    return forward_rate(model_dir, tile, batch, threads)


def seam_score(conf: np.ndarray, tile: int, overlap: int) -> float:
    """Mean |step| of confidence across the columns where windows start or end, over the mean elsewhere."""
    valid = conf != 255
    step = np.abs(np.diff(conf.astype(np.float32), axis=1))
    ok = valid[:, 1:] & valid[:, :-1]
    per_col = np.array([step[ok[:, c], c].mean() if ok[:, c].any() else 0.0 for c in range(step.shape[1])])
    starts = window_starts(conf.shape[1], tile, tile - overlap)
    # Columns c where a window edge or a window's core edge lies between c and c + 1.
    edges = {int(e) - 1 for s in starts for e in (s, s + tile, s + overlap // 2, s + tile - overlap // 2)}
    edges = {e for e in edges if 0 <= e < step.shape[1]}
    other = [c for c in range(step.shape[1]) if c not in edges]
    return float(per_col[sorted(edges)].mean() / max(per_col[other].mean(), 1e-6))


def previews(store: str, model: str, client: Any, out_dir: Path) -> dict[str, float]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    spec = read_spec(model)
    info = read_region_info(store)
    b = info.block_size
    scores = {}
    for blend in ("cosine", "gaussian", "mean", "crop"):
        s = predict(store, model, client=client, force=True, blend=blend, max_task_pixels=b * b, tta=False)
        classes = np.asarray(open_layer(store, "classes")[: 4 * b, : 4 * b])
        conf = np.asarray(open_layer(store, "confidence")[: 4 * b, : 4 * b])
        scores[blend] = seam_score(conf, s.tile_size, s.overlap)
        lut = np.zeros(256, dtype=np.int64)
        for i, c in enumerate(spec.classes):
            lut[c.value] = i
        fig, axes = plt.subplots(1, 2, figsize=(11, 5.6), constrained_layout=True)
        axes[0].imshow(np.ma.masked_where(classes == 255, lut[classes]),
                       cmap=ListedColormap([c.colour for c in spec.classes]), interpolation="nearest",
                       vmin=0, vmax=len(spec.classes) - 1)
        im = axes[1].imshow(np.ma.masked_equal(conf, 255), cmap="magma", vmin=30, vmax=100,
                            interpolation="nearest")
        fig.colorbar(im, ax=axes[1], shrink=0.8, label="confidence (%)")
        for ax, title in zip(axes, ("classes", "confidence"), strict=True):
            ax.set_title(f"{title}: --blend {blend}")
            ax.set_xticks(np.arange(0, 4 * b + 1, b))
            ax.set_yticks(np.arange(0, 4 * b + 1, b))
            ax.tick_params(labelsize=7)
        fig.suptitle(f"4 x 4 blocks of {b} px, one task per block; window {s.tile_size} px, overlap "
                     f"{s.overlap} px; seam score {scores[blend]:.2f} (1 = no seam)", fontsize=10)
        fig.savefig(out_dir / f"seams_{blend}.png", dpi=80)
        plt.close(fig)
    return scores


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=int, default=1024, help="Edge of the 1x region in pixels.")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16], help="Area factors.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/segpipe-bench-predict"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predict.json")
    parser.add_argument("--images", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--no-previews", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="Keep regions and model already in --work.")
    parser.add_argument("--no-peers", action="store_true", help="Skip the MONAI and naive-loop rows.")
    parser.add_argument("--peer-threads", type=int, default=0,
                        help="Torch threads of the MONAI row (default: the usable cores).")
    parser.add_argument("--peer-child", help=argparse.SUPPRESS)  # internal: one peer, in its own process
    return parser.parse_args()


def _regions(base: int, factors: list[int], work: Path) -> dict[int, tuple[Path, str]]:
    """Each factor's VRT and region store (made unless already in ``work``)."""
    stores: dict[int, tuple[Path, str]] = {}
    for f in factors:
        size = round(base * math.sqrt(f))
        store = work / f"region{f}.zarr"
        if not store.exists():
            region = synthesize(work / f"synth{f}", size=size, tiles=2, seed=f)
            ingest(region.image, store, labels=region.labels, classes=region.classes)
        stores[f] = (work / f"synth{f}" / "image.vrt", str(store))
    return stores


def _train_model(store: str, model: str) -> float:
    """Train the benchmark's model (unless there is one); the seconds it took."""
    t0 = time.perf_counter()
    # Trained in a child process, so the driver's memory is what prediction needs.
    if not (Path(model) / "model.json").exists():
        config = NetworkConfig(epochs=2, samples_per_epoch=256)
        trainer = multiprocessing.get_context("spawn").Process(target=train, args=(store, model, config))
        trainer.start()
        trainer.join()
    return time.perf_counter() - t0


def _measure(
    client: Any, factor: int, vrt: Path, store: str, model: str, work: Path, peer_threads: int | None
) -> dict[str, Any]:
    """One region size's row: end-to-end and forward rates, overheads, memory; peers unless no threads."""
    info = read_region_info(store)
    cores = usable_cores()
    # The host's speed drifts within minutes (a shared VM): end-to-end runs and
    # forward measurements alternate, and each rate is the mean of its two.
    # Memory is sampled in a run of its own: the sampler's /proc walks every 50 ms
    # take CPU from the 2 cores (the 1x run took 1.98 s sampled, 1.67 s not).
    with PeakRss() as rss:
        s = predict(store, model, client=client, force=True, tta=False)
    tile, ov = s.tile_size, s.overlap
    seconds, fwd_runs = [], []
    for _ in range(2):
        seconds.append(predict(store, model, client=client, force=True, tta=False).seconds)
        fwd_runs.append(workers_rate(client, model, tile, s.batch_size))
    px, sec = forward_rate(model, tile, s.batch_size, cores)
    fwd_single = px / sec / 1e6
    fwd_workers = float(np.mean(fwd_runs))
    forward = max(fwd_single, fwd_workers)
    stride = tile - ov
    n_global = len(window_starts(info.height, tile, stride)) * len(window_starts(info.width, tile, stride))
    pixels = info.height * info.width
    overlap_factor = n_global * tile * tile / pixels
    end_to_end = pixels / float(np.mean(seconds)) / 1e6
    ideal = forward / overlap_factor
    peers: list[dict[str, Any]] = []
    if peer_threads is None:  # the naive loop alone, in this process as before
        naive_mpx_s = pixels / naive_loop(vrt, model, tile, s.batch_size, work / f"naive{factor}.tif") / 1e6
    else:  # store's classes are from the last predict above: the default settings
        ours = {"mpx_s": round(end_to_end, 4), "peak_rss_mb": round(rss.peak / 2**20, 1)}
        peers = measure_peers(vrt, store, model, work, (tile, ov, s.batch_size, peer_threads), ours)
        naive_mpx_s = next(r["mpx_s"] for r in peers if r["method"] == "naive")
    return {
        "factor": factor, "size": info.height, "mpx": round(pixels / 1e6, 3), "tasks": s.tasks,
        "task_blocks": list(s.task_blocks), "batch_size": s.batch_size, "tile": tile, "overlap": ov,
        "seconds": [round(v, 2) for v in seconds],
        "forward_workers_runs_mpx_s": [round(v, 4) for v in fwd_runs],
        "forward_mpx_s": round(forward, 4), "forward_one_process_mpx_s": round(fwd_single, 4),
        "forward_workers_mpx_s": round(fwd_workers, 4),
        "end_to_end_mpx_s": round(end_to_end, 4), "overlap_factor": round(overlap_factor, 4),
        "ideal_mpx_s": round(ideal, 4), "efficiency": round(end_to_end / ideal, 3),
        "compute_overhead": round(s.slots / n_global, 3), "windows": s.windows, "slots": s.slots,
        "whole_image_windows": n_global, "naive_mpx_s": round(naive_mpx_s, 4),
        "peak_rss_mb": round(rss.peak / 2**20, 1), "peers": peers,
    }


def _report(result: dict[str, Any], out: Path) -> None:
    """Write the results and print the main columns."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    cols = ["size", "tasks", "forward_mpx_s", "end_to_end_mpx_s", "ideal_mpx_s", "efficiency",
            "compute_overhead", "naive_mpx_s", "peak_rss_mb"]
    print(" | ".join(cols))
    for row in result["sizes"]:
        print(" | ".join(str(row[c]) for c in cols))
    peers = [p for row in result["sizes"] for p in row["peers"]]
    if peers:
        cols = ["size", "method", "mpx_s", "peak_rss_mb", "agreement"]
        print("\n" + " | ".join(cols))
        for p in peers:
            print(" | ".join(str(p[c]) for c in cols))
    print(f"seam score (1 = none): {result['seam_score']}; wrote {out}")


def main() -> None:
    args = _arguments()
    if args.peer_child:
        print(json.dumps(_peer_child(json.loads(args.peer_child))))
        return
    peer_threads = None if args.no_peers else (args.peer_threads or usable_cores())
    if not args.reuse:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    stores = _regions(args.base, args.factors, args.work)
    model = str(args.work / "model")
    train_s = _train_model(stores[args.factors[0]][1], model)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with get_client() as client:
        cluster_s = time.perf_counter() - t0
        cluster = describe_cluster(client)
        # Warm-up: every worker loads the model and primes torch once, as in any long run.
        # (A warm-up predict alone warms only the workers its tasks land on: at 1x that
        # left the measured run loading the model on the other worker.)
        client.run(_warm_worker, model, 256, 2)
        predict(stores[args.factors[0]][1], model, client=client, force=True, tta=False)
        for f in args.factors:
            rows.append(_measure(client, f, *stores[f], model, args.work, peer_threads))
            print(json.dumps(rows[-1]), flush=True)
        seams: dict[str, float] = {}
        if not args.no_previews:
            vrt, _ = stores[args.factors[0]]
            pstore = args.work / "preview.zarr"
            ingest(vrt, pstore, block_size=256, overwrite=True)
            args.images.mkdir(parents=True, exist_ok=True)
            seams = previews(str(pstore), model, client, args.images)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "cluster": cluster, "cluster_start_s": round(cluster_s, 2), "train_s": round(train_s, 1),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "sizes": rows,
        "peak_rss_ratio_largest_to_base": round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3),
        "seam_score": {k: round(v, 3) for k, v in seams.items()},
    }
    _report(result, args.out)


if __name__ == "__main__":
    main()
