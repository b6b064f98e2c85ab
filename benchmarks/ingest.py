"""Benchmark: ingest of scenes in two CRSs and two resolutions against GDAL's own warp.

For each size N (default 4096) the script:

1. writes two 3-band uint16 GeoTIFF scenes (nodata 0, tiled, DEFLATE) that straddle the
   78 W meridian: scene ``a`` in UTM zone 17 (EPSG:32617) at 10 m, N x N px, and scene
   ``b`` in zone 18 (EPSG:32618) at 20 m, N/2 x N/2 px, overlapping by about 10 % of
   the width. Pixels are smooth patches (coarse noise upsampled) plus fine noise, so
   compression and resampling see realistic content;
2. ingests both with segpipe (:func:`segpipe.stages.ingest.driver.ingest`, default grid:
   the CRS covering most area, the finest resolution, bilinear; dask's threaded
   scheduler) in a child process: wall time, peak RSS of the child (GNU ``time``'s
   ``%M``; see :func:`run_child`);
3. warps the same scenes onto the same grid (``-t_srs``/``-te``/``-tr`` of the grid
   segpipe chose) with ``gdalwarp -r bilinear -multi -wo NUM_THREADS=ALL_CPUS`` into a
   tiled, DEFLATE-compressed GeoTIFF, scene ``b`` listed first so that scene ``a`` wins
   where both have data (gdalwarp: last wins; segpipe: first wins): wall time, peak RSS.
   Without a ``gdalwarp`` binary, ``rasterio.warp.reproject`` of each whole scene onto
   the whole grid in memory stands in for it (``reference`` says which ran);
4. compares the two images: same nodata pixels, share of pixels within 1 DN, max difference.

``ratio_vs_gdal`` = segpipe's ingest time / the GDAL warp's. Prints a table and writes
``benchmarks/results/ingest.json``. Scratch data goes to ``--workdir`` (about 0.1 GB
per 4096) and is deleted unless ``--keep``.

    .venv/bin/python benchmarks/ingest.py --sizes 2048 4096
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
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine

RESULTS = Path(__file__).parent / "results" / "ingest.json"
_RSS_TAG = "segpipe-bench-max-rss-kb="
ROWS = 512  # rows written (and compared) per step: no whole image in memory
# 78 W lies at easting 773 798 in zone 17 and 226 202 in zone 18 at 35 N.
EAST_17, WEST_18, NORTH = 773_798.0, 226_202.0, 3_880_000.0


def _patches(rng: np.random.Generator, bands: int, rows: int, width: int, cell: int) -> np.ndarray:
    """Smooth patches (coarse noise upsampled ``cell`` times) plus fine noise, uint16 in 100-10,000."""
    coarse = rng.integers(500, 9000, (bands, rows // cell + 1, width // cell + 1)).astype(np.float32)
    smooth = np.repeat(np.repeat(coarse, cell, axis=1), cell, axis=2)[:, :rows, :width]
    return np.clip(smooth + rng.normal(0, 150, smooth.shape), 100, 10_000).astype(np.uint16)


def write_scene(path: Path, crs: str, transform: Affine, size: int, seed: int) -> None:
    """A 3-band uint16 tiled GeoTIFF of ``size`` x ``size`` px, written ``ROWS`` rows at a time."""
    rng = np.random.default_rng(seed)
    profile = {
        "driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint16", "crs": crs,
        "transform": transform, "nodata": 0, "tiled": True, "blockxsize": 512, "blockysize": 512,
        "compress": "DEFLATE", "predictor": 2, "bigtiff": "IF_SAFER",
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as ds:
        for y in range(0, size, ROWS):
            rows = min(ROWS, size - y)
            ds.write(_patches(rng, 3, rows, size, 32), window=((y, y + rows), (0, size)))


def write_inputs(work: Path, size: int) -> list[Path]:
    """Scene a (zone 17, 10 m) and scene b (zone 18, 20 m), overlapping by ~10 % of the width."""
    overlap = 0.1 * size * 10.0
    a = work / "a_32617_10m.tif"
    b = work / "b_32618_20m.tif"
    write_scene(a, "EPSG:32617", Affine(10, 0, EAST_17 + overlap / 2 - size * 10, 0, -10, NORTH), size, 1)
    # Scene b covers less ground (0.9 x), so zone 17 is the default CRS and 10 m its pixel size.
    write_scene(b, "EPSG:32618", Affine(20, 0, WEST_18 - overlap / 2, 0, -20, NORTH), size * 9 // 20, 2)
    return [a, b]


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """Run a command; return wall seconds, its own peak RSS in MB and its output.

    The peak comes from GNU time (``%M``) where installed: ``os.wait4``'s ru_maxrss of a
    child of this script would include this script's own peak, which Linux carries into
    a child across fork (vfork) and exec. Without GNU time, wait4's figure (an upper bound).
    """
    timer = shutil.which("time", path="/usr/bin:/bin")
    full = [timer, "-f", f"{_RSS_TAG}%M", *cmd] if timer else cmd
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read().decode(errors="replace")
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed ({code}):\n{output[-3000:]}")
    tagged = [line for line in output.splitlines() if line.startswith(_RSS_TAG)]
    peak_kb = int(tagged[-1][len(_RSS_TAG) :]) if tagged else usage.ru_maxrss
    return wall, peak_kb / 1024.0, output


INGEST = """
from segpipe.stages.ingest.driver import ingest
ingest({files!r}, {out!r}, block_size=1024)
"""

REPROJECT = """
import numpy as np, rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject
grid = {grid!r}
out = np.zeros((3, grid[3], grid[4]), np.uint16)
for path in {files!r}:  # gdalwarp's order: later files win where they have data
    part = np.zeros_like(out)
    with rasterio.open(path) as ds:
        reproject(rasterio.band(ds, (1, 2, 3)), part, dst_transform=Affine(*grid[1]),
                  dst_crs=CRS.from_wkt(grid[0]), src_nodata=0, dst_nodata=0,
                  resampling=Resampling.bilinear, num_threads=0)
    out = np.where((part != 0).all(axis=0), part, out)
profile = {{"driver": "GTiff", "width": grid[4], "height": grid[3], "count": 3, "dtype": "uint16",
           "nodata": 0, "crs": CRS.from_wkt(grid[0]), "transform": Affine(*grid[1]), "tiled": True,
           "compress": "DEFLATE"}}
with rasterio.open({dst!r}, "w", **profile) as ds:
    ds.write(out)
"""


def gdal_warp(files: list[Path], dst: Path, grid: Any) -> tuple[list[str], str]:
    """The command warping ``files`` onto ``grid`` (gdalwarp, else reproject in Python) and its name."""
    t = grid.transform
    left, top = t[2], t[5]
    right, bottom = left + grid.width * t[0], top + grid.height * t[4]
    if shutil.which("gdalwarp") is None:
        spec = (grid.crs_wkt, t, None, grid.height, grid.width)
        code = REPROJECT.format(grid=spec, files=[str(f) for f in reversed(files)], dst=str(dst))
        return [sys.executable, "-c", code], "rasterio.warp.reproject"
    cmd = [
        "gdalwarp", "-q", "-overwrite", "-t_srs", grid.crs_wkt, "-te", repr(left), repr(bottom), repr(right),
        repr(top), "-ts", str(grid.width), str(grid.height), "-r", "bilinear", "-srcnodata", "0",
        "-dstnodata", "0", "-multi", "-wo", "NUM_THREADS=ALL_CPUS", "-co", "TILED=YES",
        "-co", "COMPRESS=DEFLATE", "-co", "BIGTIFF=IF_SAFER",
        *[str(f) for f in reversed(files)], str(dst),
    ]  # fmt: skip
    return cmd, "gdalwarp"


def _rows(source: Path, y: int, rows: int) -> np.ndarray:
    """Rows ``y:y+rows`` of a store's image or of a GeoTIFF, as int32."""
    if source.suffix == ".tif":
        with rasterio.open(source) as ds:
            data: np.ndarray = ds.read(window=((y, y + rows), (0, ds.width))).astype(np.int32)
            return data
    import zarr

    image = zarr.open_group(str(source), mode="r")["image"]
    assert isinstance(image, zarr.Array)
    return np.asarray(image[:, y : y + rows, :]).astype(np.int32)


def compare(ours: Path, theirs: Path) -> dict[str, Any]:
    """Agreement of two warps of the same grid, ``ROWS`` rows at a time (nodata 0)."""
    with rasterio.open(theirs) as ds:
        height = ds.height
    nodata_same, pixels, within, valid, worst = 0, 0, 0, 0, 0
    for y in range(0, height, ROWS):
        a, b = _rows(ours, y, min(ROWS, height - y)), _rows(theirs, y, min(ROWS, height - y))
        a_empty, b_empty = (a == 0).all(axis=0), (b == 0).all(axis=0)
        nodata_same += int((a_empty == b_empty).sum())
        pixels += a_empty.size
        diff = np.abs(a - b)[:, ~a_empty & ~b_empty]
        valid += diff.size
        within += int((diff <= 1).sum())
        worst = max(worst, int(diff.max()) if diff.size else 0)
    return {
        "nodata_agrees": round(nodata_same / pixels, 5),
        "within_1dn": round(within / max(valid, 1), 4),
        "max_dn_diff": worst,
    }


def bench_size(size: int, work: Path) -> dict[str, Any]:
    from segpipe.io.warp import scenes_from_files, target_grid

    folder = work / str(size)
    folder.mkdir(parents=True, exist_ok=True)
    files = write_inputs(folder, size)
    grid = target_grid(scenes_from_files(files))
    store = folder / "store"
    shutil.rmtree(store, ignore_errors=True)
    ours_s, ours_mb, _ = run_child(
        [sys.executable, "-c", INGEST.format(files=[str(f) for f in files], out=str(store))]
    )
    warped = folder / "gdalwarp.tif"
    cmd, reference = gdal_warp(files, warped, grid)
    gdal_s, gdal_mb, _ = run_child(cmd)
    # GDAL against itself: the same warp in small chunks (-wm 8 MB). Every warp call
    # approximates the transformation anew (1/8 px), so this is the agreement to expect.
    floor: dict[str, Any] = {}
    if reference == "gdalwarp":
        run_child([*cmd[:-1], "-wm", "8", str(folder / "gdalwarp_wm8.tif")])
        floor = {f"gdalwarp_wm8_{k}": v for k, v in compare(folder / "gdalwarp_wm8.tif", warped).items()}
    mpx = grid.width * grid.height / 1e6
    return {
        "size": size,
        "grid": f"{grid.width} x {grid.height} px, {grid.transform[0]:g} m, "
        f"{rasterio.crs.CRS.from_wkt(grid.crs_wkt).to_string()}",
        "megapixels": round(mpx, 1),
        "ingest_s": round(ours_s, 2),
        "ingest_peak_rss_mb": round(ours_mb, 1),
        "reference": reference,
        "reference_s": round(gdal_s, 2),
        "reference_peak_rss_mb": round(gdal_mb, 1),
        "ratio_vs_gdal": round(ours_s / gdal_s, 2),
        **compare(store, warped),
        **floor,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096])
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segpipe-ingest-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows = []
    try:
        for size in args.sizes:
            r = bench_size(size, work)
            rows.append(r)
            print(
                f"{size:>6}: {r['grid']} | "
                f"segpipe ingest {r['ingest_s']:7.1f} s {r['ingest_peak_rss_mb']:6.0f} MB | "
                f"{r['reference']} {r['reference_s']:7.1f} s {r['reference_peak_rss_mb']:6.0f} MB | "
                f"ratio {r['ratio_vs_gdal']:.2f} | within 1 DN {r['within_1dn']:.4f}, max {r['max_dn_diff']} "
                f"(gdalwarp -wm 8 vs gdalwarp: {r.get('gdalwarp_wm8_within_1dn')}, "
                f"max {r.get('gdalwarp_wm8_max_dn_diff')})",
                flush=True,
            )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    gdal = (
        subprocess.run(["gdalwarp", "--version"], capture_output=True, text=True)
        if shutil.which("gdalwarp")
        else None
    )
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "gdal_python": rasterio.__gdal_version__,
        "gdalwarp": gdal.stdout.strip() if gdal else None,
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
