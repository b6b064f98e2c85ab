"""``segpipe preview``: a whole layer at a glance, with its legend, from real GeoTIFFs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from segpipe.errors import InputError, MissingInputError
from segpipe.stages.export.layers import class_colormap, class_tags
from segpipe.stages.export.preview import read_quicklook, write_preview
from segpipe.types import ClassInfo

CLASSES = (
    ClassInfo(1, "forest", "#1f7a1f"),
    ClassInfo(3, "water", "#1f77b4"),
    ClassInfo(7, "urban", "#d62728"),
)


def _classes_tif(path: Path) -> np.ndarray:
    """600 x 400 px: forest on the left half, water top right, urban bottom right, a nodata corner."""
    data = np.full((400, 600), 1, np.uint8)
    data[:200, 300:] = 3
    data[200:, 300:] = 7
    data[:40, :60] = 255
    profile = {"driver": "GTiff", "height": 400, "width": 600, "count": 1, "dtype": "uint8", "nodata": 255,
               "crs": "EPSG:32617", "transform": from_origin(500000, 4000000, 30, 30), "tiled": True}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
        dst.write_colormap(1, class_colormap(CLASSES))
        dst.update_tags(SEGPIPE_LAYER="classes")
        dst.update_tags(1, **class_tags(CLASSES))
    return data


def _colours(png: Path) -> set[tuple[int, int, int]]:
    pixels = np.asarray(Image.open(png).convert("RGBA")).reshape(-1, 4)
    return {tuple(int(v) for v in px[:3]) for px in pixels}


def test_a_class_cog_is_drawn_in_its_colours_with_shares_and_nodata(tmp_path: Path) -> None:
    data = _classes_tif(tmp_path / "classes.tif")
    look = read_quicklook(tmp_path / "classes.tif", max_size=150)
    assert max(look.data.shape[1:]) == 150 and look.factor == 4 and look.layer == "classes"
    assert [c.name for c in look.classes] == ["forest", "water", "urban"] and look.crs == "EPSG:32617"
    from segpipe.stages.export.preview import _legend

    labels = [text for _, text in _legend(look)]
    valid = data[data != 255]
    expected = [f"{c.value} {c.name} ({np.mean(valid == c.value):.1%})" for c in CLASSES]
    assert labels == expected, labels
    png = write_preview(tmp_path / "classes.tif", tmp_path / "look.png", max_size=150)
    colours = _colours(png)
    assert {c.rgb for c in CLASSES} <= colours  # each class in its own colour
    assert {(199, 199, 199), (237, 237, 237)} <= colours  # the nodata corner's checkerboard
    assert not list(tmp_path.glob(".look.*"))


def test_single_band_and_colour_layers_get_a_colour_bar_or_a_composite(tmp_path: Path) -> None:
    profile = {"driver": "GTiff", "height": 64, "width": 96, "dtype": "uint8", "nodata": 255,
               "crs": "EPSG:4326", "transform": from_origin(10, 50, 0.01, 0.01)}
    ramp = np.tile(np.linspace(0, 100, 96).astype(np.uint8), (64, 1))
    with rasterio.open(tmp_path / "confidence.tif", "w", count=1, **profile) as dst:
        dst.write(ramp, 1)
        dst.set_band_description(1, "confidence")
        dst.update_tags(SEGPIPE_LAYER="confidence")
        dst.units = ("percent",)
    look = read_quicklook(tmp_path / "confidence.tif")
    assert look.classes == () and look.units == "percent" and look.factor == 1
    assert np.array_equal(look.data[0], ramp)  # small enough: shown pixel for pixel
    assert write_preview(tmp_path / "confidence.tif", tmp_path / "c.png").stat().st_size > 0
    with rasterio.open(tmp_path / "image.tif", "w", count=3, **profile) as dst:
        dst.write(np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 50)]))
        dst.descriptions = ("blue", "green", "red")
    import segpipe

    png = segpipe.preview(tmp_path / "image.tif", tmp_path / "i.png")
    assert len(_colours(png)) > 50  # a colour composite, not a flat map


def test_bad_inputs_are_refused_by_name_and_keep_an_earlier_preview(tmp_path: Path) -> None:
    _classes_tif(tmp_path / "classes.tif")
    good = write_preview(tmp_path / "classes.tif", tmp_path / "look.png", max_size=64)
    before = good.read_bytes()
    with pytest.raises(MissingInputError, match=r"absent\.tif does not exist"):
        write_preview(tmp_path / "absent.tif", good)
    (tmp_path / "notes.tif").write_text("not a raster")
    with pytest.raises(InputError, match=r"notes\.tif is not a raster"):
        write_preview(tmp_path / "notes.tif", good)
    with pytest.raises(InputError, match=r"ending in \.png"):
        write_preview(tmp_path / "classes.tif", tmp_path / "look.jpg")
    (tmp_path / "s.zarr").mkdir()  # a region store given in place of its exported layer
    (tmp_path / "s.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    with pytest.raises(InputError, match=r"s\.zarr is a folder .*segpipe export"):
        write_preview(tmp_path / "s.zarr", good)
    assert good.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "classes.tif", "look.png", "notes.tif", "s.zarr"]


def test_the_command_writes_the_png_and_refuses_in_one_line(tmp_path: Path) -> None:
    _classes_tif(tmp_path / "classes.tif")
    segpipe = str(Path(sys.executable).parent / "segpipe")
    command = [segpipe, "preview", str(tmp_path / "classes.tif"), "--out", str(tmp_path / "p.png")]
    done = subprocess.run([*command, "--max-size", "100"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout + done.stderr and Image.open(tmp_path / "p.png").size[0] > 100
    command = [segpipe, "preview", str(tmp_path / "nope.tif"), "--out", str(tmp_path / "q.png")]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode != 0 and len(lines) == 1, refused.stderr
    assert "nope.tif does not exist" in lines[0]
    assert "Traceback" not in refused.stderr and not (tmp_path / "q.png").exists()
