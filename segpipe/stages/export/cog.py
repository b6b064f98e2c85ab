"""Export store layers to validated Cloud-Optimized GeoTIFFs: the ``write_cog`` driver.

One export, top to bottom: check the arguments and the destination; stream the layer
into a tiled GeoTIFF beside the destination (:mod:`segpipe.stages.export.geotiff`, with
MODE overviews for class rasters, :mod:`segpipe.stages.export.overviews`); convert it
with GDAL's COG driver; check what the conversion kept and validate with ``rio_cogeo``;
stage the legend of a class raster (GDAL's ``.tif.aux.xml`` sidecar with category names
and an attribute table, and a QGIS ``.qml`` style: :mod:`segpipe.stages.export.legend`,
pixel counts taken as the layer streams) and the STAC Item
(:mod:`segpipe.stages.export.stac`); and only then rename them all over the destination.
``rio.to_raster(driver="COG")`` would hold ~3x the raster in RAM (ARCHITECTURE.md).
Overviews: class rasters' levels built during the stream are copied
by the COG driver (GDAL 3.10's own MODE pass was most of the export's time); other
layers get GDAL's AVERAGE overviews.

Measured on GDAL 3.10 / rasterio 1.4: the COG driver keeps the colour table, band
descriptions, dataset and band tags of its source, so nothing needs re-adding after
the conversion (re-adding would rewrite the IFD at the end of the file and break the
COG layout); :func:`write_cog` still checks they survived and fails loudly if not.

Temporaries carry the writing process's id, so an export killed outright (SIGKILL,
out-of-memory killer) leaves only hidden temporaries, never a destination file, and
the next export to the same destination removes those of dead processes.

An ``s3://`` destination is exported the same way into a local temporary folder
(``TMPDIR``: it needs room for the COG), validated there, and only then uploaded, the
COG before its sidecars and its STAC Item; S3 shows an object only once its upload completes, so a
failed export leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rio_cogeo.cogeo import cog_validate

from segpipe.errors import InputError, SegpipeError, StorageError
from segpipe.io.remote import (
    as_url,
    check_bucket,
    filesystem,
    is_remote,
    remote_exists,
    storage_errors,
    upload,
    url_name,
    url_parent,
)
from segpipe.io.store import RegionInfo, read_region_info, same_nodata
from segpipe.io.swap import remove_stale_temporaries
from segpipe.stages.export.band_stats import band_statistics
from segpipe.stages.export.geotiff import WINDOW, write_geotiff_layer
from segpipe.stages.export.layers import ExportLayer, band_colormap, classes_from_tags, describe_layer
from segpipe.stages.export.legend import (
    PixelCounts,
    aux_xml_path,
    is_segpipe_style,
    qml_path,
    write_legend,
    written_by_segpipe,
)
from segpipe.stages.export.lineage import read_lineage
from segpipe.stages.export.stac import file_fields, stac_bands, stac_item, stac_item_path, stac_json

__all__ = ["COMPRESSIONS", "COPY_CACHE_BYTES", "READ_CACHE_BYTES", "write_cog"]

COMPRESSIONS = ("DEFLATE", "ZSTD")
# GDAL's block cache during the conversion, in bytes (as rasterio takes it). The COG driver
# reads every block of the streamed GeoTIFF and its levels once, in order, so a cache buys
# nothing: at 32,768^2 a real 256 MB one raised export's peak RSS from 252 to 522 MB for the
# same time. (Until session 15 this was written GDAL_CACHEMAX=256, meant as MB: rasterio
# read 256 bytes, which is what the measurements since then ran with.)
COPY_CACHE_BYTES = 2**20
# GDAL's block cache for the rest of an export (the checks, validation and band statistics
# read the finished COG once). Without a bound, GDAL's default (5 % of RAM) applies wherever
# the process's environment does not set one (the Python API, a flow): export peaked at
# 1.24-1.33 GB at 32,768^2 there, against 287 MB under the CLI's 256 MB.
READ_CACHE_BYTES = 64 * 2**20


def write_cog(
    store: str | Path,
    out: str | Path,
    layer: str = "classes",
    overwrite: bool = True,
    compress: str = "DEFLATE",
    stac: bool = True,
) -> Path | str:
    """Export a store layer to a validated Cloud-Optimized GeoTIFF, plus a STAC Item.

    The COG has the store's CRS and transform, 512-px blocks, internal overviews
    (MODE for classes, AVERAGE otherwise), ``compress`` with a predictor, BIGTIFF if
    needed and the bands, nodata, colour table and tags of
    :func:`segpipe.stages.export.layers.describe_layer`. ``out`` is replaced only once
    the new file is complete and valid; on any failure the temporaries are removed and
    an existing ``out`` is left untouched.

    Args:
        store: Region store holding the layer (a path or an ``s3://`` URL).
        out: Destination ``.tif`` (a path or an ``s3://`` URL).
        layer: ``classes``, ``confidence``, ``probabilities`` or ``image``.
        overwrite: Replace an existing ``out``.
        compress: ``DEFLATE`` (readable everywhere) or ``ZSTD`` (faster, smaller).
        stac: Also write a STAC Item ``<name>.stac.json`` beside ``out``.

    Returns:
        The destination: a path, or the URL for an ``s3://`` destination.

    Raises:
        MissingInputError: The store (or the destination bucket) does not exist.
        TransientError: Object storage could not be reached.
        MissingLayerError: The layer does not exist (run ``segpipe predict`` first).
        InputError: ``out`` exists and ``overwrite`` is false, names a folder, or a bad
            layer/compression.
        StorageError: ``out`` cannot be written (full disk, read-only or forbidden
            folder, a file in the way); nothing is left and an earlier ``out`` is kept.
        SegpipeError: The COG failed validation.
    """
    if compress.upper() not in COMPRESSIONS:
        raise InputError(f"compression {compress!r} is not supported: use DEFLATE or ZSTD")
    if is_remote(out):
        return _write_remote_cog(store, as_url(out), layer, overwrite, compress, stac)
    dest = Path(out)
    _check_destination(dest, overwrite)
    info = read_region_info(store)
    spec, _ = describe_layer(store, layer, info)  # fail before any file is created
    # Each step sets its own cache inside this one (the stream, the conversion).
    with storage_errors(dest, "COG"), rasterio.Env(GDAL_CACHEMAX=READ_CACHE_BYTES):
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(dest)
        with _staging(dest) as token:
            counts = PixelCounts()
            cog = _convert(store, dest, token, info, spec, compress, counts)
            # Staged before the COG is published: a full disk fails here, with the
            # earlier COG and Item still in place; the renames of _publish need no space.
            legend = _stage_legend(dest, token, spec, counts)
            item = _stage_stac_item(store, dest, token, info, spec) if stac else None
            _publish(dest, cog, legend, item)
    return dest


def _check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse a destination that cannot become a file, before any work.

    Raises:
        InputError: ``dest`` is a folder, or exists and ``overwrite`` is false.
        StorageError: A file is in the way where one of its folders should be.
    """
    if dest.is_dir():
        raise InputError(f"--out {dest} is a folder: name the .tif to write, e.g. {dest / 'classes.tif'}")
    if dest.exists() and not overwrite:
        raise InputError(f"{dest} exists: remove it or export with overwrite")
    for parent in dest.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StorageError(f"cannot write COG {dest}: {parent} is a file, not a folder")
            break


@contextlib.contextmanager
def _staging(dest: Path) -> Iterator[str]:
    """This export's token (process id and a random part); its temporaries are removed on the way out.

    Temporaries live next to the destination: same filesystem, so the final renames are atomic.
    """
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield token
    finally:
        for tmp in dest.parent.glob(f".{glob.escape(dest.name)}.{token}.*"):
            tmp.unlink(missing_ok=True)


def _temporary(dest: Path, token: str, kind: str) -> Path:
    """The hidden temporary ``kind`` (e.g. ``cog.tif``) of the export ``token`` to ``dest``."""
    return dest.with_name(f".{dest.name}.{token}.{kind}")


def _convert(
    store: str | Path,
    dest: Path,
    token: str,
    info: RegionInfo,
    spec: ExportLayer,
    compress: str,
    counts: PixelCounts,
) -> Path:
    """Stream the layer beside ``dest``, convert it to a COG, check and validate it.

    ``counts`` receives the pixel count of each value of a class layer as it streams.

    Returns:
        The hidden, validated COG (``dest`` is not touched).

    Raises:
        SegpipeError: The conversion damaged the raster, or the COG is not valid.
    """
    stream = _temporary(dest, token, "stream.tif")
    cog = _temporary(dest, token, "cog.tif")
    on_block = counts.add if spec.name == "classes" else None
    source = write_geotiff_layer(store, stream, spec.name, info=info, overviews=True, on_block=on_block)
    with rasterio.Env(GDAL_CACHEMAX=COPY_CACHE_BYTES):
        rasterio.shutil.copy(
            source,
            cog,
            driver="COG",
            COMPRESS=compress.upper(),
            PREDICTOR="YES",  # 2 for integers, 3 for floats
            BLOCKSIZE=WINDOW,
            OVERVIEW_RESAMPLING=spec.resampling,
            # levels built while streaming (classes) are copied, not recomputed
            OVERVIEWS="FORCE_USE_EXISTING" if source != stream else "IGNORE_EXISTING",
            BIGTIFF="IF_SAFER",
            NUM_THREADS="ALL_CPUS",
        )
    _check_survived(cog, spec, info)
    valid, errors, _warnings = cog_validate(cog, strict=False, quiet=True)
    if not valid:
        raise SegpipeError(f"exported {spec.name} of {store} is not a valid COG: {'; '.join(errors)}")
    return cog


def _check_survived(path: Path, spec: ExportLayer, info: RegionInfo) -> None:
    """Fail if the COG lost its georeferencing, nodata, descriptions, colour table or class tags."""
    with rasterio.open(path) as src:
        problems = []
        if not same_nodata(src.nodata, spec.nodata):
            problems.append(f"nodata is {src.nodata}")
        if src.transform != info.affine:
            problems.append("transform changed")
        if info.crs_wkt and (src.crs is None or src.crs != CRS.from_wkt(info.crs_wkt)):
            problems.append("CRS changed")
        if tuple(src.descriptions) != spec.descriptions:
            problems.append("band descriptions lost")
        if spec.name == "classes":
            cmap = band_colormap(src)
            if any(cmap.get(c.value, (0, 0, 0, 0))[:3] != c.rgb for c in spec.classes):
                problems.append("colour table lost")
            if spec.classes and classes_from_tags(src.tags(1)) != list(spec.classes):
                problems.append("class tags lost")
    if problems:
        raise SegpipeError(f"COG conversion of {path} damaged the raster: {'; '.join(problems)}")


def _stage_stac_item(store: str | Path, dest: Path, token: str, info: RegionInfo, spec: ExportLayer) -> Path:
    """Write the STAC Item of the COG to be published at ``dest`` into a hidden temporary.

    Returns:
        The temporary, for :func:`_publish`.
    """
    cog = _temporary(dest, token, "cog.tif")  # the staged COG: the same bytes _publish renames
    bands = stac_bands(spec.descriptions, spec.dtype, spec.nodata, spec.units, band_statistics(cog))
    item_id = f"{Path(str(store)).stem}-{dest.stem}"
    item = stac_item(dest, info.grid, spec.name, bands, spec.classes, item_id=item_id,
                     lineage=read_lineage(store, spec.name), file=file_fields(cog))
    tmp = _temporary(dest, token, "stac.json")
    tmp.write_text(stac_json(item))
    return tmp


def _stage_legend(dest: Path, token: str, spec: ExportLayer, counts: PixelCounts) -> tuple[Path, Path] | None:
    """Write the PAM sidecar and QGIS style of a class COG into hidden temporaries.

    Returns:
        The temporaries (sidecar, style) for :func:`_publish`, or None for a layer
        without classes.
    """
    if spec.name != "classes" or not spec.classes:
        return None
    aux, qml = _temporary(dest, token, "aux.xml"), _temporary(dest, token, "qml")
    write_legend(aux, qml, spec.classes, counts)
    return aux, qml


def _publish(dest: Path, cog: Path, legend: tuple[Path, Path] | None, item: Path | None) -> None:
    """Rename the validated COG over ``dest``, then its staged sidecars and Item beside it.

    Every file is replaced by one atomic rename, so none is ever half-written. Without
    a legend, the sidecar of an earlier export is removed (GDAL would lend its names,
    counts and statistics to the new raster), and so is a style segpipe wrote.
    """
    os.replace(cog, dest)
    if legend is not None:
        os.replace(legend[0], aux_xml_path(dest))
        os.replace(legend[1], qml_path(dest))
    else:
        aux_xml_path(dest).unlink(missing_ok=True)
        if written_by_segpipe(qml_path(dest)):
            qml_path(dest).unlink()
    if item is not None:
        os.replace(item, stac_item_path(dest))


def _write_remote_cog(
    store: str | Path, url: str, layer: str, overwrite: bool, compress: str, stac: bool
) -> str:
    """:func:`write_cog` to ``s3://``: export into a local temporary folder, then upload."""
    check_bucket(url)
    if not overwrite and remote_exists(url):
        raise InputError(f"{url} exists: remove it or export with overwrite")
    with tempfile.TemporaryDirectory(prefix="segpipe-export-") as tmp:
        local = Path(write_cog(store, Path(tmp) / url_name(url), layer, True, compress, stac))
        upload(local, url)
        for sidecar in (aux_xml_path(local), qml_path(local)):
            remote = f"{url_parent(url)}/{sidecar.name}"
            if sidecar.exists():  # GDAL finds the sidecar beside the COG in the bucket too
                upload(sidecar, remote)
            else:
                _drop_stale_sidecar(remote)
        if stac:
            # After the COG: an Item never points at a COG that is not there yet.
            item = stac_item_path(local)
            upload(item, f"{url_parent(url)}/{item.name}")
    return url


def _drop_stale_sidecar(url: str) -> None:
    """Remove an earlier export's sidecar that the new COG does not have, as :func:`_publish` does locally.

    GDAL would lend an old ``.aux.xml``'s names, counts and statistics to the new raster;
    a ``.qml`` goes only if segpipe wrote it (a user's own style stays).
    """
    if not remote_exists(url):
        return
    fs = filesystem()
    # Only a style is read (its first bytes): an .aux.xml goes whoever wrote it.
    if url.endswith(".qml"):
        head = fs.cat_file(url, start=0, end=400).decode(errors="replace")
        if not is_segpipe_style(head):
            return
    fs.rm(url)
