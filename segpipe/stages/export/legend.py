"""What a class COG means, where GIS tools read it: category names, a raster attribute table, a QGIS style.

GDAL keeps the category names and the raster attribute table (RAT) of a GeoTIFF in its
PAM sidecar ``<name>.tif.aux.xml``, never in the TIFF (GDAL 3.10's COG driver, like
GTiff, drops both from the file). GDAL reads the sidecar whenever it opens the COG, so
``gdalinfo``, rasterio, QGIS (category names and, from 3.30, the RAT) and ArcGIS (whose
own RATs live in the same ``.aux.xml``) all see the classes; over ``/vsis3/`` GDAL reads
it from beside the COG as well. QGIS also loads ``<name>.qml`` beside a raster as its
default style: a paletted renderer with one entry per class, named.

Nothing here opens a raster: :mod:`segpipe.stages.export.cog` counts the pixels while
the COG streams (:class:`PixelCounts`) and stages these files next to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from segpipe.io.remote import beside, remote_exists
from segpipe.io.store import NODATA_U8
from segpipe.types import ClassInfo

__all__ = [
    "RAT_COLUMNS",
    "PixelCounts",
    "aux_xml",
    "aux_xml_path",
    "legend_files",
    "qgis_style",
    "qml_path",
    "is_segpipe_style",
    "write_legend",
    "written_by_segpipe",
]

# GDAL's field types and usages (gdal.h: GDALRATFieldType, GDALRATFieldUsage)
_INTEGER, _STRING = 0, 2
_GENERIC, _PIXEL_COUNT, _NAME, _MIN_MAX, _RED, _GREEN, _BLUE, _ALPHA = 0, 1, 2, 5, 6, 7, 8, 9
# (name, type, usage): Value is MinMax, the usage GDAL's thematic lookups (GetRowOfValue) use;
# "Value" and "Count" are also the column names ArcGIS expects of a RAT.
RAT_COLUMNS: tuple[tuple[str, int, int], ...] = (
    ("Value", _INTEGER, _MIN_MAX),
    ("Class name", _STRING, _NAME),
    ("Red", _INTEGER, _RED),
    ("Green", _INTEGER, _GREEN),
    ("Blue", _INTEGER, _BLUE),
    ("Alpha", _INTEGER, _ALPHA),
    ("Count", _INTEGER, _PIXEL_COUNT),
)
# marks the style files segpipe wrote, so a later export replaces only those
_QML_MARK = "segpipe class style"


class PixelCounts:
    """Pixel count of each uint8 value, added up block by block as a class raster streams."""

    def __init__(self) -> None:
        self.counts = np.zeros(256, np.int64)

    def add(self, block: np.ndarray) -> None:
        """Count the values of one block."""
        self.counts += np.bincount(block.ravel(), minlength=256)

    def of(self, value: int) -> int:
        """How many pixels hold ``value``."""
        return int(self.counts[value])


def aux_xml_path(cog: Path) -> Path:
    """GDAL's PAM sidecar of ``cog``: ``<name>.tif.aux.xml``."""
    return cog.with_name(f"{cog.name}.aux.xml")


def qml_path(cog: Path) -> Path:
    """The QGIS default style of ``cog``: ``<stem>.qml``."""
    return cog.with_suffix(".qml")


def legend_files(cog: Path | str) -> list[Path | str]:
    """The sidecars an export left beside ``cog``, a path or an ``s3://`` URL.

    ``segpipe export`` lists them among the files it wrote.
    """
    found = (beside(cog, name_of) for name_of in (aux_xml_path, qml_path))
    return [f for f in found if (f.is_file() if isinstance(f, Path) else remote_exists(f))]


def aux_xml(classes: Sequence[ClassInfo], counts: PixelCounts) -> str:
    """GDAL PAM XML giving band 1 its category names and a thematic RAT.

    Category names are indexed by value up to the largest class (values without a class
    get an empty name), as GDAL's ``GetCategoryNames`` expects; the RAT has one row per
    class, with its colour (alpha 255) and pixel count.
    """
    ordered = sorted(classes, key=lambda c: c.value)
    names = {c.value: c.name for c in ordered}
    top = ordered[-1].value if ordered else -1
    categories = "".join(f"      <Category>{escape(names.get(v, ''))}</Category>\n" for v in range(top + 1))
    fields = "".join(
        f'      <FieldDefn index="{i}">\n        <Name>{escape(name)}</Name>\n'
        f"        <Type>{kind}</Type>\n        <Usage>{usage}</Usage>\n      </FieldDefn>\n"
        for i, (name, kind, usage) in enumerate(RAT_COLUMNS)
    )
    rows = "".join(
        f'      <Row index="{i}">'
        + "".join(f"<F>{escape(str(v))}</F>" for v in (c.value, c.name, *c.rgb, 255, counts.of(c.value)))
        + "</Row>\n"
        for i, c in enumerate(ordered)
    )
    return (
        '<PAMDataset>\n  <PAMRasterBand band="1">\n'
        f"    <CategoryNames>\n{categories}    </CategoryNames>\n"
        f'    <GDALRasterAttributeTable tableType="thematic">\n{fields}{rows}'
        "    </GDALRasterAttributeTable>\n  </PAMRasterBand>\n</PAMDataset>\n"
    )


def qgis_style(classes: Sequence[ClassInfo]) -> str:
    """A QGIS style (``.qml``): paletted renderer of band 1, one named entry per class.

    Values without an entry (0, unlabelled classes) are not drawn by a paletted renderer;
    nodata (255) is made fully transparent as well, whatever the reader's nodata setting.
    """
    entries = "".join(
        f'        <paletteEntry value="{c.value}" color="{_hex(c.rgb)}" alpha="255"'
        f" label={quoteattr(c.name)}/>\n"
        for c in sorted(classes, key=lambda c: c.value)
    )
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        f'<qgis version="3.28.0" styleCategories="AllStyleCategories">\n  <!-- {_QML_MARK} -->\n'
        '  <pipe>\n    <provider>\n      <resampling enabled="false" maxOversampling="2"'
        ' zoomedInResamplingMethod="nearestNeighbour" zoomedOutResamplingMethod="nearestNeighbour"/>\n'
        "    </provider>\n"
        '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">\n'
        "      <rasterTransparency>\n        <singleValuePixelList>\n"
        f'          <pixelListEntry min="{NODATA_U8}" max="{NODATA_U8}" percentTransparent="100"/>\n'
        "        </singleValuePixelList>\n      </rasterTransparency>\n"
        f"      <colorPalette>\n{entries}      </colorPalette>\n    </rasterrenderer>\n"
        '    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>\n'
        '    <huesaturation saturation="0" colorizeOn="0" grayscaleMode="0" invertColors="0"/>\n'
        '    <rasterresampler maxOversampling="2"/>\n  </pipe>\n  <blendMode>0</blendMode>\n</qgis>\n'
    )


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def written_by_segpipe(style: Path) -> bool:
    """Whether the style file ``style`` is one segpipe wrote (a user's own style is never replaced)."""
    try:
        return is_segpipe_style(style.read_text(errors="replace"))
    except OSError:
        return False


def is_segpipe_style(text: str) -> bool:
    """Whether a style's text (its first 400 characters suffice) is one segpipe wrote."""
    return _QML_MARK in text[:400]


def write_legend(aux: Path, qml: Path, classes: Sequence[ClassInfo], counts: PixelCounts) -> None:
    """Write the PAM sidecar and the QGIS style of a class raster to ``aux`` and ``qml``."""
    aux.write_text(aux_xml(classes, counts), encoding="utf-8")
    qml.write_text(qgis_style(classes), encoding="utf-8")
