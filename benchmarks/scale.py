"""Scale benchmark: every stage on one synthetic region per size, with a model that costs (almost) nothing.

For each size (default 4096 and 8192 px, 4 uint16 bands) a region is made with
:func:`segpipe.synth.synthesize`, then run through ingest, predict, export (a COG of
the classes) and evaluate with segpipe's Python API (:mod:`segpipe.api`), and an IO
floor is measured on the same store: plain dask + zarr reading the image and writing a
uint8 layer of the same shape. The model is the cheapest package segpipe can express
(``benchmarks/free_model.py``: a ``linear`` package, one 1 x 1 convolution), so prediction's time is
the pipeline's.

Each stage runs in a child process of its own (this script with ``--stage``), so that its
imports, cluster start and memory are its own: the child is the stage's driver, the
child's descendants (a local dask cluster's nannies and workers) are its workers, and this
process samples both in /proc every 0.1 s. Every child runs with ``GDAL_CACHEMAX`` set
(``--gdal-cache-mb``, default 256) so GDAL's block cache (5 % of RAM by default) is
bounded in every stage. Per stage and size the JSON records the API call's seconds, the
child's wall seconds (imports and start-up included), Mpx/s, the peak RSS of the driver,
of the workers and of both together, and the dask tasks run. The table then gives, per
stage, time per Mpx and peak RSS at the largest size over the smallest (targets 1.2 and
1.3), and predict's rate over the IO floor (target at least 0.5).

With ``--py-spy PATH`` (py-spy is not a segpipe dependency: ``pip download py-spy`` gives
a static binary), predict's child runs under py-spy, and each row records where its
driver's and workers' samples went, step by step (``benchmarks/spy_profile.py``). Each
size's image tiles are deleted once ingested and its store once its row is done (a 32768²
region is about 13 GB), unless ``--keep-data``.

    .venv/bin/python benchmarks/scale.py --sizes 4096 8192
    .venv/bin/python benchmarks/scale.py --sizes 4096 8192 16384 32768 --py-spy ~/bin/py-spy
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).parent))  # the benchmarks' own helpers (free_model, spy_profile)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
STAGES = ("synth", "ingest", "predict", "export", "evaluate", "io_floor")
MAX_SIZE = 32768


class TreeRss:
    """Peak RSS of one process (the driver) and of its descendants (the workers), sampled in a thread.

    With ``wrapped`` the process is a wrapper (py-spy) and the driver is its first child;
    the wrapper's own memory is not counted.
    """

    def __init__(self, pid: int, interval: float = 0.1, wrapped: bool = False) -> None:
        self.pid = pid
        self.interval = interval
        self.wrapped = wrapped
        self.driver = self.workers = self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, proc: psutil.Process) -> None:
        driver = proc.memory_info().rss
        workers = 0
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a process that just ended
                workers += child.memory_info().rss
        self.driver, self.workers = max(self.driver, driver), max(self.workers, workers)
        self.total = max(self.total, driver + workers)

    def _driver(self) -> psutil.Process | None:
        proc = psutil.Process(self.pid)
        while self.wrapped and not self._stop.is_set():
            children = proc.children()
            if children:
                return children[0]
            time.sleep(0.01)
        return None if self._stop.is_set() else proc

    def _run(self) -> None:
        with contextlib.suppress(psutil.Error):  # the child has ended
            proc = self._driver()
            while proc is not None and not self._stop.is_set():
                self._sample(proc)
                time.sleep(self.interval)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- stages (in the child)


def _count_tasks() -> tuple[Any, list[int]]:
    """A dask callback counting the tasks local schedulers run in this process, and its counter."""
    from dask.callbacks import Callback

    done = [0]

    def posttask(*_: Any) -> None:
        done[0] += 1

    return Callback(posttask=posttask), done


def _stage_synth(job: dict[str, Any]) -> dict[str, Any]:
    from segpipe.synth import synthesize

    region = synthesize(job["region"], size=job["size"], bands=4, tiles=job["tiles"], seed=0)
    return {"labelled_fraction": region.labelled_fraction}


def _stage_ingest(job: dict[str, Any]) -> dict[str, Any]:
    from segpipe import api

    region = Path(job["region"])
    info = api.ingest(region / "image.vrt", job["store"], labels=region / "labels_sparse.tif",
                      classes=region / "classes.json", block_size=job["block_size"], overwrite=True)
    return {"bands": list(info.bands), "block_size": info.block_size, "shape": list(info.shape)}


def _stage_predict(job: dict[str, Any]) -> dict[str, Any]:
    from segpipe import api

    s = api.predict(job["store"], job["model"], tile_size=job["tile"], overlap=job["overlap"],
                    scheduler=job["scheduler"], force=True)
    return {"tasks": s.tasks, "windows": s.windows, "slots": s.slots, "blocks": s.blocks_done,
            "batch_size": s.batch_size, "task_blocks": list(s.task_blocks), "tile": s.tile_size,
            "overlap": s.overlap, "predict_seconds": round(s.seconds, 3)}


def _stage_export(job: dict[str, Any]) -> dict[str, Any]:
    from segpipe import api

    # No STAC Item: the COG (with its legend) is the pixel path; the Item is a small JSON.
    result = api.export(job["store"], job["cog"], layer="classes", stac=False)
    return {"cog_mb": round(Path(result.path).stat().st_size / 2**20, 2)}


def _stage_evaluate(job: dict[str, Any]) -> dict[str, Any]:
    from segpipe import api

    # No preview: a picture of the region, not the per-pixel comparison being measured.
    result = api.evaluate(job["store"], Path(job["region"]) / "truth.tif", job["report"], preview=False)
    return {"miou": result.miou, "overall_accuracy": result.overall_accuracy}


def _stage_io_floor(job: dict[str, Any]) -> dict[str, Any]:
    """Plain dask + zarr: read the store's image, write a uint8 layer of the same shape (a band argmax)."""
    import dask.array as da
    import numpy as np
    import zarr

    array = zarr.open_array(f"{job['store']}/image", mode="r")
    # One task per shard (segpipe's block), as segpipe's stages read: dask would
    # otherwise take the shards' inner chunks, 16x the tasks and files at 256 px.
    image = da.from_zarr(array, chunks=array.shards or array.chunks)
    layer = image.argmax(axis=0).astype(np.uint8)
    da.to_zarr(layer, job["floor"], overwrite=True)
    return {"chunks": int(np.prod(layer.numblocks))}


_STAGE_FUNCS = {"synth": _stage_synth, "ingest": _stage_ingest, "predict": _stage_predict,
                "export": _stage_export, "evaluate": _stage_evaluate, "io_floor": _stage_io_floor}


def run_stage(name: str, job_file: Path) -> None:
    """Child: run one stage through its API call, counting dask tasks, and write the result beside the job."""
    job = json.loads(job_file.read_text())
    callback, done = _count_tasks()
    if name == "io_floor":  # segpipe's calls import their stage lazily, inside the timing; these
        import dask.array  # noqa: F401  (are the floor's own tools: imported first)
        import zarr  # noqa: F401
    start = time.perf_counter()
    with callback:
        extra = _STAGE_FUNCS[name](job)
    seconds = time.perf_counter() - start
    extra.setdefault("tasks", done[0])
    Path(job["result"]).write_text(json.dumps({"call_s": seconds, **extra}))


# ---------------------------------------------------------------- driving (in the parent)


def _spy_command(py_spy: str | None, name: str, work: Path, size: int) -> tuple[list[str], Path | None]:
    """The py-spy prefix that samples predict's driver and workers, and its output file (none elsewhere)."""
    if not py_spy or name != "predict":
        return [], None
    raw = work / f"{name}_{size}.spy.txt"
    # 20 samples/s without pausing the processes: a cost of about 1 % of one core.
    return [py_spy, "record", "--subprocesses", "--nonblocking", "-r", "20", "-f", "raw", "-o", str(raw),
            "--"], raw


def measure(name: str, job: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one stage in a child process; its result with wall seconds and peak RSS (MB)."""
    job_file = work / f"{name}_{job['size']}.job.json"
    job = {**job, "result": str(work / f"{name}_{job['size']}.result.json")}
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "GDAL_CACHEMAX": str(args.gdal_cache_mb)}
    spy, raw = _spy_command(args.py_spy, name, work, job["size"])
    start = time.perf_counter()
    command = [*spy, sys.executable, __file__, "--stage", name, "--job", str(job_file)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL if spy else None)
    with TreeRss(proc.pid, wrapped=bool(spy)) as rss:
        code = proc.wait()
    wall = time.perf_counter() - start
    if code:
        raise RuntimeError(f"stage {name} at {job['size']} px failed (exit {code})")
    result: dict[str, Any] = json.loads(Path(job["result"]).read_text())
    if raw is not None and raw.exists():
        from spy_profile import summarise

        result["profile"] = summarise(raw)
    mpx = job["size"] ** 2 / 1e6
    return {**result, "call_s": round(result["call_s"], 3), "process_s": round(wall, 3),
            "mpx_s": round(mpx / result["call_s"], 4), "driver_peak_mb": round(rss.driver / 2**20, 1),
            "workers_peak_mb": round(rss.workers / 2**20, 1), "total_peak_mb": round(rss.total / 2**20, 1)}


def _store_statistics(store: str) -> tuple[list[float], list[float]]:
    """Per-band mean and std of the store's image over its valid pixels, from a strided sample."""
    import numpy as np
    import zarr

    image = zarr.open_array(f"{store}/image", mode="r")
    step = max(1, image.shape[1] // 512)
    sample = np.asarray(image[:, ::step, ::step], dtype=np.float64)
    valid = (sample != 0).all(axis=0)
    pixels = sample[:, valid] if valid.any() else sample.reshape(sample.shape[0], -1)
    return pixels.mean(axis=1).tolist(), np.maximum(pixels.std(axis=1), 1.0).tolist()


def make_model(store: str, bands: list[str], out: Path, tile: int) -> str:
    """The free package for this store's bands and the synthetic scene's classes."""
    from free_model import free_package

    from segpipe.synth.scene import SCENE_CLASSES

    mean, std = _store_statistics(store)
    return str(free_package(out, bands, SCENE_CLASSES, mean, std, chip_size=tile))


def run_size(size: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every stage and the IO floor at one size, each in a child process; the size's row."""
    folder = work / str(size)
    folder.mkdir(parents=True, exist_ok=True)
    job: dict[str, Any] = {
        "size": size, "region": str(folder / "region"), "store": str(folder / "region.zarr"),
        "model": str(folder / "free_model"), "cog": str(folder / "classes.tif"),
        "report": str(folder / "report"), "floor": str(folder / "floor.zarr"), "tiles": args.tiles,
        "block_size": args.block_size, "tile": args.tile, "overlap": args.overlap,
        "scheduler": args.scheduler,
    }
    stages: dict[str, dict[str, Any]] = {}
    for name in STAGES:
        if name == "predict":
            make_model(job["store"], stages["ingest"]["bands"], Path(job["model"]), args.tile)
        stages[name] = measure(name, job, folder, args)
        print(f"  {size:>6} {name:<9} {stages[name]['call_s']:8.2f} s", flush=True)
        if name == "ingest" and not args.keep_data:
            # Nothing after ingest reads the image tiles (evaluate reads truth.tif): a
            # 32768² region's tiles are 6 GB that the store holds again.
            shutil.rmtree(Path(job["region"]) / "tiles")
    if not args.keep_data:
        shutil.rmtree(job["store"], ignore_errors=True)
        shutil.rmtree(job["floor"], ignore_errors=True)
        for path in folder.glob(Path(job["cog"]).stem + ".*"):  # the COG and its sidecars
            path.unlink()
    row: dict[str, Any] = {"size": size, "mpx": round(size * size / 1e6, 6), "stages": stages}
    row["predict_over_io_floor"] = round(stages["predict"]["mpx_s"] / stages["io_floor"]["mpx_s"], 4)
    return row


def _fit(rows: list[dict[str, Any]], name: str) -> dict[str, float | None]:
    """A straight line through (Mpx, call seconds) of every size (least squares), when there are two.

    Its intercept is the stage's fixed cost per run, its slope's inverse the marginal rate
    that the fixed cost hides at small sizes (None when the time does not grow).
    """
    import numpy as np

    if len(rows) < 2:
        return {}
    slope, fixed = np.polyfit([r["mpx"] for r in rows], [r["stages"][name]["call_s"] for r in rows], 1)
    return {"fixed_s": round(float(fixed), 2),
            "marginal_mpx_s": round(1.0 / float(slope), 3) if slope > 0 else None}


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per stage, largest size over smallest: time per Mpx and peak RSS (driver + workers); the line fit."""
    small, large = min(rows, key=lambda r: r["size"]), max(rows, key=lambda r: r["size"])
    out = {}
    for name in STAGES:
        a, b = small["stages"][name], large["stages"][name]
        per_mpx = (b["call_s"] / large["mpx"]) / (a["call_s"] / small["mpx"])
        process_per_mpx = (b["process_s"] / large["mpx"]) / (a["process_s"] / small["mpx"])
        out[name] = {"time_per_mpx": round(per_mpx, 3), "process_time_per_mpx": round(process_per_mpx, 3),
                     "peak_rss": round(b["total_peak_mb"] / a["total_peak_mb"], 3), **_fit(rows, name)}
    return out


def table(result: dict[str, Any]) -> str:
    """The printed table: every stage at every size, then the ratios and predict over the IO floor."""
    lines = [f"{'stage':<9} {'size':>6} {'call s':>8} {'proc s':>8} {'Mpx/s':>8} {'driver MB':>10} "
             f"{'workers MB':>10} {'tasks':>6}"]
    for name in STAGES:
        for row in result["rows"]:
            s = row["stages"][name]
            lines.append(f"{name:<9} {row['size']:>6} {s['call_s']:8.2f} {s['process_s']:8.2f} "
                         f"{s['mpx_s']:8.3f} {s['driver_peak_mb']:10.0f} {s['workers_peak_mb']:10.0f} "
                         f"{s['tasks']:>6}")
    sizes = [r["size"] for r in result["rows"]]
    lines.append(f"\nlargest ({max(sizes)}) over smallest ({min(sizes)}): "
                 "time per Mpx (call; process), peak RSS (driver + workers)")
    for name, r in result["ratios"].items():
        lines.append(f"{name:<9} {r['time_per_mpx']:6.2f} {r['process_time_per_mpx']:6.2f} "
                     f"{r['peak_rss']:6.2f}   line fit: fixed {r.get('fixed_s')} s, "
                     f"marginal {r.get('marginal_mpx_s')} Mpx/s")
    fwd = result["forward"]
    lines.append(f"\nforward on one thread: free model (linear) {fwd['free_model_mpx_s']:.1f} Mpx/s, "
                 f"the one-split forest it replaced {fwd['forest_stand_in_mpx_s']:.1f} Mpx/s")
    for row in result["rows"]:
        ours, floor = row["stages"]["predict"]["mpx_s"], row["stages"]["io_floor"]["mpx_s"]
        lines.append(f"predict / IO floor at {row['size']}: {row['predict_over_io_floor']:.3f} "
                     f"({ours:.3f} vs {floor:.3f} Mpx/s)")
        profile = row["stages"]["predict"].get("profile")
        if profile:
            shares = ", ".join(f"{k} {v:.0%}" for k, v in list(profile["workers"].items())[:8])
            lines.append(f"  predict workers' busy samples at {row['size']}: {shares}")
    return "\n".join(lines)


def _arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192],
                        help=f"region edges in px (256 to {MAX_SIZE})")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON to write")
    parser.add_argument("--tiles", type=int, default=2, help="synthetic GeoTIFF tiles per side")
    parser.add_argument("--block-size", type=int, default=1024, help="ingest's block edge")
    parser.add_argument("--tile", type=int, default=256, help="prediction window edge")
    parser.add_argument("--overlap", type=int, default=64, help="prediction window overlap")
    parser.add_argument("--scheduler", default=None,
                        help="predict's scheduler (default: a local cluster, as segpipe predict)")
    parser.add_argument("--gdal-cache-mb", type=int, default=256, help="GDAL_CACHEMAX of every stage")
    parser.add_argument("--py-spy", default=None,
                        help="py-spy binary: sample predict's processes and record where their time goes")
    parser.add_argument("--keep-data", action="store_true",
                        help="keep each size's image tiles, store and outputs (default: delete them once "
                             "no later stage reads them; a 32768² region is about 13 GB)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bad = [s for s in args.sizes if not 256 <= s <= MAX_SIZE]
    if bad:
        parser.error(f"sizes {bad} are outside 256..{MAX_SIZE}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every size, print the table and write the JSON."""
    args = _arguments(argv)
    if args.stage:
        run_stage(args.stage, args.job)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="segpipe-scale-"))
    load_before = os.getloadavg()
    rows = [run_size(size, work, args) for size in sorted(args.sizes)]
    from free_model import forward_rates

    result = {
        "command": shlex.join(["benchmarks/scale.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "settings": {"tile": args.tile, "overlap": args.overlap, "block_size": args.block_size,
                     "tiles": args.tiles, "scheduler": args.scheduler or "local cluster",
                     "gdal_cachemax_mb": args.gdal_cache_mb, "bands": 4, "dtype": "uint16"},
        "forward": {k: round(v, 2) for k, v in forward_rates(4, 6, args.tile, 2).items()},
        "rows": rows,
        "ratios": ratios(rows),
    }
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
