"""Class names, attribute table, palette and QGIS style of class COGs, read back through GDAL itself."""

from __future__ import annotations

import ctypes
import glob
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rio_cogeo import cog_validate
from test_cog import CLASSES, fill_layer, make_store
from test_s3 import s3  # noqa: F401  (the moto server fixture)

import segpipe.stages.export.cog as cog
from segpipe.io.remote import filesystem, gdal_options, gdal_path
from segpipe.stages.export.cog import write_cog
from segpipe.stages.export.layers import class_colormap
from segpipe.stages.export.legend import PixelCounts, aux_xml, legend_files, qgis_style
from segpipe.types import ClassInfo

# value 2 is predicted but has no class, 0 is unlabelled, 255 nodata
VALUES = np.array([0, 1, 2, 3, 7, 255], np.uint8)


def _libgdal_info(path: Path) -> dict[str, Any]:
    """``gdalinfo -json`` run by the GDAL that segpipe writes with (rasterio's libgdal, GDALInfo())."""
    import rasterio._base

    libs = Path(rasterio.__file__).parent.parent / "rasterio.libs"
    found = glob.glob(str(libs / "libgdal*.so*"))
    if not found:
        pytest.skip("rasterio's bundled libgdal not found")
    lib = ctypes.CDLL(found[0])
    lib.GDALOpenEx.restype = ctypes.c_void_p
    lib.GDALOpenEx.argtypes = [
        ctypes.c_char_p,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.GDALInfoOptionsNew.restype = ctypes.c_void_p
    lib.GDALInfoOptionsNew.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p]
    lib.GDALInfo.restype = ctypes.c_void_p
    lib.GDALInfo.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.GDALInfoOptionsFree.argtypes = [ctypes.c_void_p]
    lib.GDALClose.argtypes = [ctypes.c_void_p]
    lib.VSIFree.argtypes = [ctypes.c_void_p]
    lib.GDALAllRegister()
    ds = lib.GDALOpenEx(str(path).encode(), 0x02, None, None, None)  # GDAL_OF_RASTER
    assert ds, f"GDAL cannot open {path}"
    argv = (ctypes.c_char_p * 2)(b"-json", None)
    options = lib.GDALInfoOptionsNew(argv, None)
    text = lib.GDALInfo(ds, options)
    try:
        return json.loads(ctypes.string_at(text).decode())  # type: ignore[no-any-return]
    finally:
        lib.VSIFree(text)
        lib.GDALInfoOptionsFree(options)
        lib.GDALClose(ds)


def _command_info(path: Path) -> dict[str, Any]:
    """The ``gdalinfo -json`` command (gdal-bin)."""
    out = subprocess.run(["gdalinfo", "-json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


READERS = [
    pytest.param(_libgdal_info, id="libgdal"),
    pytest.param(
        _command_info,
        id="gdalinfo",
        marks=pytest.mark.skipif(shutil.which("gdalinfo") is None, reason="gdal-bin is not installed"),
    ),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 700 x 600 store (two blocks each way) with every kind of value."""
    path = tmp_path_factory.mktemp("legend") / "region.zarr"
    make_store(path, 700, 600)
    data = np.random.default_rng(4).choice(VALUES, size=(700, 600), p=[0.05, 0.3, 0.05, 0.3, 0.2, 0.1])
    fill_layer(path, "classes", data)
    return path, data


@pytest.mark.parametrize("read", READERS)
def test_gdal_reads_names_table_colours_and_counts(
    store: tuple[Path, np.ndarray], tmp_path: Path, read
) -> None:  # type: ignore[no-untyped-def]
    path, data = store
    out = Path(write_cog(path, tmp_path / "classes.tif"))
    assert cog_validate(out, strict=False, quiet=True)[0]  # the sidecar leaves the COG valid
    info = read(out)
    band = info["bands"][0]
    assert band["categories"] == ["", "forest", "", "water", "", "", "", "urban"]
    rat = band.get("rat") or info["rat"]  # GDAL 3.6 lists the RAT with the dataset, later with the band
    assert rat["tableType"] == "thematic"
    columns = [(f["name"], f["type"], f["usage"]) for f in rat["fieldDefn"]]
    # types: 0 integer, 2 string; usages: 5 MinMax, 2 Name, 6-9 Red/Green/Blue/Alpha, 1 PixelCount
    assert columns == [
        ("Value", 0, 5),
        ("Class name", 2, 2),
        ("Red", 0, 6),
        ("Green", 0, 7),
        ("Blue", 0, 8),
        ("Alpha", 0, 9),
        ("Count", 0, 1),
    ]
    counts = np.bincount(data.ravel(), minlength=256)
    rows = [row["f"] for row in rat["row"]]
    assert rows == [[c.value, c.name, *c.rgb, 255, int(counts[c.value])] for c in CLASSES]
    assert all(r[-1] > 0 for r in rows)
    entries = band["colorTable"]["entries"]
    for c in CLASSES:
        assert entries[c.value][:3] == list(c.rgb)
    assert entries[255][3] == 0  # nodata transparent
    assert str(out) + ".aux.xml" in info["files"]


def test_qml_is_a_named_paletted_style(store: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = store
    out = Path(write_cog(path, tmp_path / "classes.tif"))
    root = ET.parse(out.with_suffix(".qml")).getroot()
    assert root.tag == "qgis"
    renderer = root.find("pipe/rasterrenderer")
    assert renderer is not None and renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = [
        (e.get("value"), e.get("color"), e.get("alpha"), e.get("label"))
        for e in renderer.iter("paletteEntry")
    ]
    assert entries == [(str(c.value), c.colour, "255", c.name) for c in CLASSES]
    clear = renderer.find("rasterTransparency/singleValuePixelList/pixelListEntry")
    assert clear is not None and (clear.get("min"), clear.get("max"), clear.get("percentTransparent")) == (
        "255",
        "255",
        "100",
    )


def test_names_are_escaped_and_counts_come_from_blocks() -> None:
    classes = [ClassInfo(2, 'crops & "grass" <x>', "#00ff00")]
    counts = PixelCounts()
    counts.add(np.array([[2, 2], [0, 255]], np.uint8))
    counts.add(np.array([[2]], np.uint8))
    pam = ET.fromstring(aux_xml(classes, counts))
    assert [c.text or "" for c in pam.iter("Category")] == ["", "", 'crops & "grass" <x>']
    row = [f.text for f in pam.iter("F")]
    assert row == ["2", 'crops & "grass" <x>', "0", "255", "0", "255", "3"]
    entry = ET.fromstring(qgis_style(classes)).find(".//paletteEntry")
    assert entry is not None and entry.get("label") == 'crops & "grass" <x>'


def test_palette_is_transparent_outside_the_classes() -> None:
    table = class_colormap(CLASSES)
    assert len(table) == 256
    assert table[1] == (31, 122, 31, 255) and table[7] == (*CLASSES[2].rgb, 255)
    assert table[0][3] == table[255][3] == table[2][3] == table[254][3] == 0
    assert [v for v, rgba in table.items() if rgba[3]] == [1, 3, 7]
    # no class known: every value 1-254 stays visible in its default colour
    bare = class_colormap(())
    assert bare[0][3] == bare[255][3] == 0 and all(bare[v][3] == 255 for v in range(1, 255))


def test_failed_export_keeps_the_earlier_legend(
    store: tuple[Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = store
    out = Path(write_cog(path, tmp_path / "classes.tif"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"classes.tif", "classes.tif.aux.xml", "classes.qml", "classes.stac.json"}

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cog, "write_legend", full_disk)
    with pytest.raises(Exception, match="space"):
        write_cog(path, out)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing half-written or left


def test_killed_export_leaves_temporaries_the_next_one_removes(
    store: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    path, _ = store
    pid = _dead_pid()
    for kind in ("cog.tif", "aux.xml", "qml"):
        (tmp_path / f".classes.tif.{pid}-0123abcd.{kind}").write_text("killed")
    write_cog(path, tmp_path / "classes.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "classes.qml",
        "classes.stac.json",
        "classes.tif",
        "classes.tif.aux.xml",
    ]


def _dead_pid() -> int:
    """The id of a process that has ended (an export killed outright)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_another_layer_drops_a_stale_legend_but_not_a_user_style(
    store: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    path, _ = store
    fill_layer(path, "confidence", np.full((700, 600), 50, np.uint8))
    out = Path(write_cog(path, tmp_path / "x.tif"))
    assert legend_files(out) == [tmp_path / "x.tif.aux.xml", tmp_path / "x.qml"]
    write_cog(path, out, layer="confidence")
    assert legend_files(out) == []
    with rasterio.open(out) as src:
        assert src.descriptions == ("confidence",)
    (tmp_path / "x.qml").write_text("<qgis><!-- my own style --></qgis>")
    write_cog(path, out, layer="confidence")
    assert (tmp_path / "x.qml").read_text() == "<qgis><!-- my own style --></qgis>"


def test_store_without_classes_gets_no_legend(tmp_path: Path) -> None:
    path = tmp_path / "bare.zarr"
    make_store(path, 64, 64, block=64, classes=())
    fill_layer(path, "classes", np.full((64, 64), 2, np.uint8))
    write_cog(path, tmp_path / "bare.tif", stac=False)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".zarr")) == ["bare.tif"]


def test_sidecars_are_uploaded_beside_an_s3_cog(store: tuple[Path, np.ndarray], s3: str) -> None:  # noqa: F811
    path, _ = store
    url = str(write_cog(path, f"{s3}/legend/classes.tif"))
    names = sorted(k.rsplit("/", 1)[-1] for k in filesystem().ls(f"{s3}/legend"))
    assert names == ["classes.qml", "classes.stac.json", "classes.tif", "classes.tif.aux.xml"]
    pam = ET.fromstring(filesystem().cat_file(f"{s3}/legend/classes.tif.aux.xml"))
    assert [f.text for f in pam.iter("F")][:2] == ["1", "forest"]
    # GDAL with its default directory listing (as gdalinfo or QGIS open it) finds the sidecar in the
    # bucket; segpipe's own gdal_env turns the listing off (EMPTY_DIR) and reads the tags instead
    listing = rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="FALSE", **gdal_options())
    with listing, rasterio.open(gdal_path(url)) as src:
        assert f"{gdal_path(url)}.aux.xml" in src.files
    assert os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://127.0.0.1")
