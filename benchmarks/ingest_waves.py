"""Ingest's driver memory with many blocks: waves of 1024 blocks against one graph (issue 17).

Run: ``.venv/bin/python benchmarks/ingest_waves.py [--sides 4096 8192] [--block 64]``

A mosaic is one 512 px single-band uint16 GeoTIFF placed side by side in a VRT (so a
large region costs no disk to make), ingested with small blocks so that the block count
is what a whole region has: 8192² px in 64 px blocks is 16,384 blocks. Each ingest runs in
a child process of its own (dask's local threaded scheduler, as ``segpipe ingest`` runs
without a cluster), in two set-ups alternated in one run:

- ``waves``: as shipped, the image computed a wave of at most
  :data:`segpipe.waves.WAVE_BLOCKS` blocks at a time;
- ``one graph``: the wave size raised above the block count, which is what ingest did
  before: one dask graph for the whole region.

Each child reports its peak RSS (``VmHWM``) and the ingest's seconds; both stores are
compared bitwise. Results go to ``benchmarks/results/ingest_waves.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.transform import from_origin

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ingest_waves.json"
TILE = 512
SETUPS = {"waves": None, "one graph": 10**12}

_CHILD = r"""
import json, sys, time
import segpipe.waves
from segpipe.stages.ingest.driver import ingest
if sys.argv[3] != "None":
    segpipe.waves.WAVE_BLOCKS = int(sys.argv[3])
t0 = time.perf_counter()
ingest(sys.argv[1], sys.argv[2], block_size=int(sys.argv[4]))
seconds = time.perf_counter() - t0
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1e3
print(json.dumps({"seconds": seconds, "peak_rss_mb": hwm}))
"""


def make_mosaic(work: Path, side: int) -> Path:
    """A VRT of ``side`` px a side made of one random 512 px tile repeated."""
    tile = work / "tile.tif"
    if not tile.exists():
        data = np.random.default_rng(0).integers(1, 4000, (1, TILE, TILE), dtype=np.uint16)
        with rasterio.open(tile, "w", driver="GTiff", width=TILE, height=TILE, count=1, dtype="uint16",
                           crs="EPSG:32617", transform=from_origin(500000, 4000000, 10, 10), nodata=0,
                           tiled=True, blockxsize=256, blockysize=256) as ds:
            ds.write(data)
    n = side // TILE
    sources = "".join(
        '<SimpleSource><SourceFilename relativeToVRT="1">tile.tif</SourceFilename>'
        "<SourceBand>1</SourceBand>"
        f"<SrcRect xOff=\"0\" yOff=\"0\" xSize=\"{TILE}\" ySize=\"{TILE}\"/>"
        f"<DstRect xOff=\"{c * TILE}\" yOff=\"{r * TILE}\" xSize=\"{TILE}\" ySize=\"{TILE}\"/></SimpleSource>"
        for r in range(n) for c in range(n)
    )
    vrt = work / f"mosaic{side}.vrt"
    with rasterio.open(tile) as ds:
        srs = ds.crs.to_wkt()
    vrt.write_text(
        f'<VRTDataset rasterXSize="{side}" rasterYSize="{side}"><SRS>{srs}</SRS>'
        f"<GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform>"
        f'<VRTRasterBand dataType="UInt16" band="1"><NoDataValue>0</NoDataValue>'
        f"<Description>b1</Description>{sources}</VRTRasterBand></VRTDataset>"
    )
    return vrt


def run_ingest(vrt: Path, store: Path, wave: int | None, block: int) -> dict[str, Any]:
    """One ingest in a child process; its seconds and peak RSS."""
    cmd = [sys.executable, "-c", _CHILD, str(vrt), str(store), str(wave), str(block)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def same_image(a: Path, b: Path) -> bool:
    """Whether two stores hold the same image, bitwise."""
    import zarr

    return bool(np.array_equal(zarr.open_group(str(a), mode="r")["image"][...],
                               zarr.open_group(str(b), mode="r")["image"][...]))


def main(argv: list[str] | None = None) -> None:
    """Measure each size in both set-ups and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[4096, 8192], help="Region edges in px.")
    parser.add_argument("--block", type=int, default=64, help="Block size in px (default 64).")
    parser.add_argument("--work", type=Path, help="Working folder (default: a temporary one).")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="ingest_waves_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for side in args.sides:
        vrt = make_mosaic(work, side)
        stores = {}
        for name, wave in SETUPS.items():
            store = work / f"{name.replace(' ', '_')}{side}.zarr"
            subprocess.run(["rm", "-rf", str(store)], check=True)
            got = run_ingest(vrt, store, wave, args.block)
            stores[name] = store
            rows.append({"side": side, "blocks": (side // args.block) ** 2, "setup": name, **got})
            print(f"  {side}² ({rows[-1]['blocks']} blocks), {name}: {got['seconds']:.1f} s, "
                  f"{got['peak_rss_mb']:.0f} MB", flush=True)
        rows[-1]["same_image"] = same_image(stores["waves"], stores["one graph"])
    result = {"rows": rows, "block": args.block, "load": os.getloadavg(), "cores": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print("| size | blocks | set-up | seconds | driver peak RSS MB |")
    print("| --- | ---: | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['side']}² | {r['blocks']:,} | {r['setup']} | {r['seconds']:.1f} "
              f"| {r['peak_rss_mb']:.0f} |")
    print(f"results in {RESULTS}")


if __name__ == "__main__":
    main()
