"""Benchmark: COG export of big class rasters against GDAL's own COG driver, and evaluate throughput.

For each size (default 16,384^2 and 32,768^2) the script:

1. builds a region store whose ``classes`` layer holds a synthetic land-cover map,
   generated block by block from :func:`segpipe.synth.scene.class_block` (computed at
   1/4 resolution and upsampled, with 1 % speckle, so it has realistic patches and
   edges yet takes seconds, not the ~17 min of full-resolution noise), never whole;
2. exports it with :func:`segpipe.stages.export.cog.write_cog` in a child process (wall time, peak RSS
   of that child from ``os.wait4``);
3. streams the same layer to a tiled GeoTIFF (what segpipe's export converts), then runs
   ``gdal_translate -of COG`` (Debian's gdal-bin) on it with the same creation options and
   GDAL cache: ``ratio_vs_gdal`` = segpipe's whole export / gdal_translate's conversion;
4. evaluates the store against that GeoTIFF as the reference (``segpipe.stages.evaluate.assess``, dask's
   threaded scheduler), in a child process: throughput in Mpx/s, dense and ``--points``;
5. the vector row: polygons of the classes with :func:`segpipe.stages.export.vector.write_vector`
   (block by block, in this process, written to a GeoPackage; once plain and once with a
   ``min_area`` sieve of 10 px) beside one ``rasterio.features.shapes`` pass over the whole
   layer read into memory (features counted as they stream, not kept and not written: the
   cheapest a whole-raster pass can be), each in a child: wall time and peak RSS.
   ``--vector-only`` measures this row alone (no gdal_translate needed).

Prints a table and writes ``benchmarks/results/export.json``. Needs ``gdal_translate``
(``apt-get install gdal-bin``). Scratch data goes to ``--workdir`` (about 0.3 GB per
16,384^2, 1.2 GB per 32,768^2) and is deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from affine import Affine

from segpipe.io.store import create_layer, open_layer, write_block
from segpipe.stages.export.geotiff import WINDOW
from segpipe.synth.scene import SCENE_CLASSES, SceneSpec, class_block
from segpipe.types import classes_to_json

BLOCK = 1024
COARSE = 4  # class_block resolution divisor
RESULTS = Path(__file__).parent / "results" / "export.json"
# GDAL_CACHEMAX of the gdal_translate reference, in MB (GDAL's option reads small numbers as MB).
GDAL_CACHE_MB = 256


def make_store(path: Path, size: int) -> None:
    """A region store with an unwritten 1-band image (metadata only) and no classes yet."""
    transform = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0)
    ys = transform.f + transform.e * (np.arange(size) + 0.5)
    xs = transform.c + transform.a * (np.arange(size) + 0.5)
    image = xr.DataArray(
        da.zeros((1, size, size), dtype=np.uint8, chunks=(1, BLOCK, BLOCK)),
        dims=("band", "y", "x"),
        coords={"band": [1], "y": ys, "x": xs},
        name="image",
        attrs={"long_name": ["b1"]},
    )
    image = image.rio.write_crs("EPSG:32617").rio.write_transform(transform)
    encoding = {"image": {"chunks": (1, 256, 256), "shards": (1, BLOCK, BLOCK), "_FillValue": 0}}
    ds = image.to_dataset()
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False, encoding=encoding, compute=False)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["segpipe"] = {"schema": 1, "block_size": BLOCK, "classes": classes_to_json(SCENE_CLASSES)}


def _fill_row(args: tuple[str, int, int]) -> int:
    store, size, y0 = args
    spec = SceneSpec(size=size // COARSE, region_scale=192 // COARSE, seed=1)
    array = open_layer(store, "classes", mode="r+")
    c = BLOCK // COARSE
    for x0 in range(0, size, BLOCK):
        coarse = class_block(spec, y0 // COARSE, x0 // COARSE, c, c)
        block = coarse.repeat(COARSE, 0).repeat(COARSE, 1)
        rng = np.random.default_rng([y0, x0])
        speckle = rng.random(block.shape) < 0.01
        block[speckle] = rng.integers(1, 7, size=int(speckle.sum()), dtype=np.uint8)
        block[coarse.repeat(COARSE, 0).repeat(COARSE, 1) == 0] = 255  # no-data corner
        write_block(array, y0, x0, block, BLOCK)
    return y0


def fill_classes(store: Path, size: int, workers: int) -> None:
    """Write the classes layer row of blocks by row of blocks in worker processes."""
    create_layer(store, "classes", "uint8", 255, attributes={"classes": classes_to_json(SCENE_CLASSES)})
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_fill_row, [(str(store), size, y0) for y0 in range(0, size, BLOCK)]))


# The export, timed inside the child: the call, and its stages (streaming the tiled GeoTIFF,
# GDAL's COG conversion, checks and validation). Stage timers wrap module attributes only.
EXPORT_CHILD = """
import json, time
import segpipe.stages.export.cog as cog
stages = {{}}
def timed(name, fn):
    def run(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - t
    return run
cog.write_geotiff_layer = timed("stream", cog.write_geotiff_layer)
cog.rasterio.shutil.copy = timed("convert", cog.rasterio.shutil.copy)
cog.cog_validate = timed("validate", cog.cog_validate)
t = time.perf_counter()
cog.write_cog({store!r}, {out!r}, compress={compress!r})
stages["call"] = time.perf_counter() - t
print(json.dumps(stages))
"""


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """Run a command; return wall seconds, its peak RSS in MB (from wait4) and its output."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed ({proc.returncode}):\n{output[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0, output


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def gdal_cog(src: Path, dst: Path, compress: str) -> list[str]:
    """gdal_translate with the creation options write_cog gives GDAL's COG driver."""
    options = {
        "COMPRESS": compress,
        "PREDICTOR": "YES",
        "BLOCKSIZE": str(WINDOW),
        "OVERVIEW_RESAMPLING": "MODE",
        "OVERVIEWS": "IGNORE_EXISTING",
        "BIGTIFF": "IF_SAFER",
        "NUM_THREADS": "ALL_CPUS",
    }
    cmd = ["gdal_translate", "-q", "-of", "COG", "--config", "GDAL_CACHEMAX", str(GDAL_CACHE_MB)]
    for key, value in options.items():
        cmd += ["-co", f"{key}={value}"]
    return [*cmd, str(src), str(dst)]


def _validation(cog: Path) -> dict[str, Any]:
    """The written COG checked in a fresh process: valid, overviews, colour map, class tags, size."""
    check = (
        "import json, rasterio; from rio_cogeo.cogeo import cog_validate; "
        f"p = {str(cog)!r}; src = rasterio.open(p); v = cog_validate(p, strict=False, quiet=True); "
        "print(json.dumps({'valid': v[0], 'overviews': src.overviews(1), 'colormap': len(src.colormap(1)), "
        "'class_tags': sorted(k for k in src.tags(1) if k.startswith('CLASS_')), "
        "'bigtiff': src.profile.get('BIGTIFF', 'no'), 'MB': round(src.name and __import__('os')"
        ".path.getsize(p) / 2**20, 1)}))"
    )
    _, _, validation = run_child(py(check))
    return dict(json.loads(validation.strip().splitlines()[-1]))


def _evaluations(store: Path, prediction: Path, work: Path, mpx: float) -> dict[str, Any]:
    """Evaluate the store against the prediction, every pixel and 10,000 points, each in a child."""
    eval_dense = (
        f"from segpipe.stages.evaluate.assess import evaluate; evaluate({str(store)!r}, {str(prediction)!r}, "
        f"{str(work / 'eval')!r})"
    )
    eval_points = (
        f"from segpipe.stages.evaluate.assess import evaluate; evaluate({str(store)!r}, {str(prediction)!r}, "
        f"{str(work / 'eval_points')!r}, points=10000, sampling='stratified', seed=0)"
    )
    eval_s, eval_mb, _ = run_child(py(eval_dense))
    points_s, points_mb, _ = run_child(py(eval_points))
    return {
        "evaluate_s": round(eval_s, 2),
        "evaluate_mpx_per_s": round(mpx / eval_s, 1),
        "evaluate_peak_rss_mb": round(eval_mb, 1),
        "evaluate_points_10000_s": round(points_s, 2),
        "evaluate_points_mpx_per_s": round(mpx / points_s, 1),
        "evaluate_points_peak_rss_mb": round(points_mb, 1),
    }


VECTOR_CHILD = """
import json, time, pyogrio
from segpipe.stages.export.vector import write_vector
t = time.perf_counter()
write_vector({store!r}, {out!r}, min_area={min_area!r})
print(json.dumps({{"s": time.perf_counter() - t, "features": pyogrio.read_info({out!r})["features"]}}))
"""

# The whole-raster baseline: the layer in memory, one GDAL polygonize pass over it.
SHAPES_CHILD = """
import json, time, numpy as np, rasterio.features
from segpipe.io.store import open_layer, read_region_info
t = time.perf_counter()
info = read_region_info({store!r})
classes = np.asarray(open_layer({store!r}, "classes")[:])
valid = (classes != 0) & (classes != 255)
n = sum(1 for _ in rasterio.features.shapes(classes, mask=valid, connectivity=4, transform=info.affine))
print(json.dumps({{"s": time.perf_counter() - t, "features": n}}))
"""


def bench_vector(store: Path, work: Path, size: int) -> dict[str, Any]:
    """The vector row: write_vector (plain, and sieved at 10 px) beside a whole-raster shapes pass."""
    out = work / f"classes{size}.gpkg"
    pixel_area = 100.0  # make_store's 10 m pixels
    record: dict[str, Any] = {}
    for key, min_area in (("vector", None), ("vector_sieve10", 10 * pixel_area)):
        wall, mb, text = run_child(py(VECTOR_CHILD.format(store=str(store), out=str(out), min_area=min_area)))
        result = json.loads(text.strip().splitlines()[-1])
        record |= {f"{key}_s": round(result["s"], 2), f"{key}_process_s": round(wall, 2),
                   f"{key}_peak_rss_mb": round(mb, 1), f"{key}_features": result["features"]}
        out.unlink(missing_ok=True)
    wall, mb, text = run_child(py(SHAPES_CHILD.format(store=str(store))))
    result = json.loads(text.strip().splitlines()[-1])
    record |= {"shapes_whole_s": round(result["s"], 2), "shapes_whole_process_s": round(wall, 2),
               "shapes_whole_peak_rss_mb": round(mb, 1), "shapes_whole_features": result["features"],
               "vector_ratio_vs_shapes": round(record["vector_s"] / result["s"], 2)}
    return record


def bench_vector_only(size: int, work: Path, workers: int) -> dict[str, Any]:
    """Only the vector row (``--vector-only``): build the store, measure, clean up."""
    store = work / f"region{size}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    make_store(store, size)
    fill_classes(store, size, workers)
    try:
        return {"size": size, "megapixels": round(size * size / 1e6, 1), **bench_vector(store, work, size)}
    finally:
        shutil.rmtree(store, ignore_errors=True)


def bench_size(size: int, work: Path, compress: str, workers: int) -> dict[str, Any]:
    store = work / f"region{size}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    make_store(store, size)
    fill_classes(store, size, workers)
    generate = time.perf_counter() - t0
    mpx = size * size / 1e6
    ours = work / f"classes{size}.tif"
    stream = work / f"stream{size}.tif"
    gdal_out = work / f"gdal{size}.tif"
    export_code = EXPORT_CHILD.format(store=str(store), out=str(ours), compress=compress)
    stream_code = (
        "from segpipe.stages.export.geotiff import write_geotiff_layer; "
        f"write_geotiff_layer({str(store)!r}, {str(stream)!r}, 'classes')"
    )
    process_s, ours_mb, out = run_child(py(export_code))
    stages = json.loads(out.strip().splitlines()[-1])
    ours_s = stages["call"]
    stream_s, stream_mb, _ = run_child(py(stream_code))
    gdal_s, gdal_mb, _ = run_child(gdal_cog(stream, gdal_out, compress))
    validation = _validation(ours)
    record = {
        "size": size,
        "megapixels": round(mpx, 1),
        "compress": compress,
        "generate_store_s": round(generate, 1),
        "export_s": round(ours_s, 2),
        "export_process_s": round(process_s, 2),
        "export_stages_s": {k: round(v, 2) for k, v in stages.items() if k != "call"},
        "export_peak_rss_mb": round(ours_mb, 1),
        "stream_geotiff_s": round(stream_s, 2),
        "stream_peak_rss_mb": round(stream_mb, 1),
        "gdal_translate_cog_s": round(gdal_s, 2),
        "gdal_translate_peak_rss_mb": round(gdal_mb, 1),
        "ratio_vs_gdal": round(ours_s / gdal_s, 3),
        "cog_mb": round(ours.stat().st_size / 2**20, 1),
        "gdal_cog_mb": round(gdal_out.stat().st_size / 2**20, 1),
        "validation": validation,
        **_evaluations(store, stream, work, mpx),
        **bench_vector(store, work, size),
    }
    for path in (ours, ours.with_name(f"{ours.stem}.stac.json"), stream, gdal_out):
        path.unlink(missing_ok=True)
    shutil.rmtree(store, ignore_errors=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--compress", default="DEFLATE", choices=["DEFLATE", "ZSTD"])
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating the store")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--vector-only", action="store_true", help="measure the vector row alone")
    args = parser.parse_args()
    if args.vector_only:
        return vector_main(args)
    if shutil.which("gdal_translate") is None:
        sys.exit("gdal_translate not found: apt-get install -y gdal-bin")
    gdal_version = subprocess.run(["gdal_translate", "--version"], capture_output=True, text=True).stdout
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segpipe-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows = []
    try:
        for size in args.sizes:
            rows.append(bench_size(size, work, args.compress, args.workers))
            r = rows[-1]
            print(
                f"{size:>6}^2  export {r['export_s']:7.1f} s  {r['export_peak_rss_mb']:6.0f} MB | "
                f"gdal_translate {r['gdal_translate_cog_s']:7.1f} s  "
                f"{r['gdal_translate_peak_rss_mb']:6.0f} MB | "
                f"ratio {r['ratio_vs_gdal']:.2f} | stream {r['stream_geotiff_s']:.1f} s | "
                f"evaluate {r['evaluate_mpx_per_s']:.1f} Mpx/s "
                f"(points {r['evaluate_points_mpx_per_s']:.1f}) | "
                f"valid {r['validation']['valid']}",
                flush=True,
            )
            print(
                f"{'':>8}vector {r['vector_s']:7.1f} s  {r['vector_peak_rss_mb']:6.0f} MB | "
                f"whole-raster shapes {r['shapes_whole_s']:7.1f} s  {r['shapes_whole_peak_rss_mb']:6.0f} MB",
                flush=True,
            )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    import rasterio

    result = {
        **_provenance(load_before),
        "gdal_python": rasterio.__gdal_version__,
        "gdal_translate": gdal_version.strip(),
        "gdal_cache_mb": GDAL_CACHE_MB,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _provenance(load_before: tuple[float, float, float]) -> dict[str, object]:
    """Where and when a run was measured, and how busy the machine was (timings depend on it)."""
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def vector_main(args: argparse.Namespace) -> None:
    """``--vector-only``: the vector row per size, into ``benchmarks/results/export_vector.json``."""
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segpipe-vector-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows = []
    try:
        for size in args.sizes:
            rows.append(bench_vector_only(size, work, args.workers))
            r = rows[-1]
            print(
                f"{size:>6}^2  write_vector {r['vector_s']:7.1f} s  {r['vector_peak_rss_mb']:6.0f} MB "
                f"({r['vector_features']} polygons; sieved 10 px {r['vector_sieve10_s']:.1f} s "
                f"{r['vector_sieve10_peak_rss_mb']:.0f} MB) | "
                f"whole-raster shapes {r['shapes_whole_s']:7.1f} s  "
                f"{r['shapes_whole_peak_rss_mb']:6.0f} MB ({r['shapes_whole_features']} polygons)",
                flush=True,
            )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {**_provenance(load_before), "results": rows}
    out = args.out if args.out != RESULTS else RESULTS.with_name("export_vector.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
