"""A model package's description: ``model.json``'s fields, checked, as :class:`ModelSpec`.

Kept apart from :mod:`segpipe.models.package` (which reads and writes packages) so that
what describes a package (the STAC MLM Item, the ONNX export) can import it without
importing the package's readers and writers, which write those descriptions.
"""


from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from segpipe.errors import InputError, ModelPackageError
from segpipe.models.catalog import (
    ARCHITECTURES,
    CLASSICAL_ARCHITECTURES,
    ENCODERS,
    ENSEMBLE_ARCH,
    has_encoder,
)
from segpipe.models.files import SPEC_FILE
from segpipe.types import ClassInfo, classes_from_json, classes_to_json

__all__ = [
    "KNOWN_ARCHITECTURES",
    "MODEL_SCHEMA",
    "WEIGHTS_FORMATS",
    "ModelSpec",
    "SpecFile",
    "grid_resolution",
    "software_versions",
]

MODEL_SCHEMA = 2
_READABLE_SCHEMAS = (1, 2)
# The weights file of an ONNX package (a torch package's is files.WEIGHTS_FILE).
WEIGHTS_FORMATS = ("safetensors", "onnx")
# Every ``arch`` a package may name.
KNOWN_ARCHITECTURES = (*ARCHITECTURES, *CLASSICAL_ARCHITECTURES, ENSEMBLE_ARCH)
# Networks' inputs must be multiples of this (segpipe.models.networks.output_stride).
_NETWORK_STRIDE = 32


def grid_resolution(crs_wkt: str, transform: Sequence[float]) -> tuple[tuple[float, float], str | None]:
    """A pixel grid's pixel size (x, y) in its CRS's units, and the name of those units.

    Args:
        crs_wkt: The grid's CRS as WKT ("" when it has none).
        transform: Its affine transform (a, b, c, d, e, f); a rotated grid's pixel size
            is the length of a pixel's edges.

    Returns:
        ``((x, y), units)``: units as PROJ names them (``metre``, ``degree``,
        ``US survey foot``...), or None without a CRS or with one whose units are unknown.
    """
    a, b, _, d, e, _ = (float(v) for v in transform[:6])
    size = (math.hypot(a, d), math.hypot(b, e))
    if not crs_wkt:
        return size, None
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        units = str(CRS.from_wkt(crs_wkt).units_factor[0])
    except CRSError:  # a CRS without one unit for its axes (compound, engineering...)
        return size, None
    return size, units


def software_versions() -> dict[str, str]:
    """Versions of the software that trains and runs models, recorded in every package."""
    versions = {"python": platform.python_version()}
    for dist in ("segpipe", "torch", "segmentation-models-pytorch", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    return versions


class SpecFile(BaseModel):
    """The fields of ``model.json`` (schemas 1 and 2), checked before anything is loaded.

    Types are strict (``"64"`` is not a chip size); free-form content is allowed only
    under ``options``, ``metrics``, ``training`` and ``versions``; any other unknown
    key is refused, as it means a package from another program or a hand edit gone wrong.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_: int = Field(alias="schema")
    kind: str
    arch: str
    encoder: str
    band_names: list[str] = Field(min_length=1)
    mean: list[float]
    std: list[float]
    classes: list[dict[str, Any]] = Field(min_length=1)
    chip_size: int = Field(gt=0)
    nodata: float | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    clip_low: list[float] | None = None
    clip_high: list[float] | None = None
    output_stride: int = Field(default=_NETWORK_STRIDE, gt=0)
    versions: dict[str, Any] = Field(default_factory=dict)
    weights_format: Literal["safetensors", "onnx"] = "safetensors"
    pixel_size: list[float] | None = Field(default=None, min_length=2, max_length=2)
    crs_units: str | None = None

    @field_validator("pixel_size")
    @classmethod
    def _positive_pixel_size(cls, size: list[float] | None) -> list[float] | None:
        if size is not None and not all(math.isfinite(v) and v > 0 for v in size):
            raise ValueError(f"a pixel size must be two positive numbers (x, y), not {size}")
        return size

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch not in KNOWN_ARCHITECTURES:
            known = ", ".join(KNOWN_ARCHITECTURES)
            raise ValueError(f"unknown architecture {arch!r}: this segpipe knows {known}")
        return arch

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, encoder: str, info: ValidationInfo) -> str:
        if has_encoder(info.data.get("arch", "")) and encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}: this segpipe knows {', '.join(ENCODERS)}")
        return encoder

    @field_validator("mean", "std", "clip_low", "clip_high")
    @classmethod
    def _one_finite_value_per_band(
        cls, values: list[float] | None, info: ValidationInfo
    ) -> list[float] | None:
        bands = info.data.get("band_names")
        if values is None or bands is None:
            return values
        if len(values) != len(bands):
            raise ValueError(f"{len(values)} values for the package's {len(bands)} bands {bands}")
        if not all(np.isfinite(values)):
            raise ValueError(f"a value is not finite ({values}); the training data had no valid pixel "
                             "in some band: retrain on valid imagery")
        if info.field_name == "std" and min(values) < 0:
            raise ValueError(f"a negative standard deviation ({values})")
        return values

    @field_validator("output_stride")
    @classmethod
    def _stride_fits_the_network(cls, stride: int, info: ValidationInfo) -> int:
        if has_encoder(info.data.get("arch", "")) and stride % _NETWORK_STRIDE:
            raise ValueError(f"{stride} is not a multiple of {_NETWORK_STRIDE}, the stride of "
                             f"{info.data.get('arch')} networks")
        return stride


def _describe(exc: ValidationError) -> str:
    """The first problems of a failed :class:`SpecFile` validation, each naming its field."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "missing":
            parts.append(f"the field '{loc}' is missing")
        elif err["type"] == "extra_forbidden":
            parts.append(f"the field '{loc}' is not part of the schema (free-form content belongs under "
                         "options, metrics, training or versions)")
        else:
            shown = repr(err.get("input"))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            msg = str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"the field '{loc}': {msg}" if err["type"] == "value_error"
                         else f"the field '{loc}' is invalid: {msg} (got {shown})")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "") + \
        " (fix model.json or re-export the package)"


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a trained model except its weights.

    Attributes:
        arch: Network architecture (see ``segpipe.models.ARCHITECTURES``).
        encoder: Encoder (backbone) name.
        band_names: Input bands, in order.
        mean: Per-band mean used for normalisation (valid pixels only).
        std: Per-band standard deviation used for normalisation.
        classes: Output classes; logit channel i is ``classes[i]``.
        chip_size: Training chip edge in pixels (a good prediction tile size).
        nodata: Image nodata value seen in training, or None.
        options: Extra network constructor options.
        metrics: Validation metrics at the end of training.
        training: Training settings and history.
        clip_low: Per-band lower clip applied before standardising, or None (no clipping).
        clip_high: Per-band upper clip, or None; set together with ``clip_low``.
        output_stride: Input edges must be multiples of this for the network.
        versions: Software versions that made the model (see :func:`software_versions`).
        weights_format: ``safetensors`` (torch weights in ``weights.safetensors``) or
            ``onnx`` (the whole network in ``model.onnx``, run by onnxruntime).
        pixel_size: The training region's pixel size (x, y) in ``crs_units``, or None
            (packages from before it was recorded): prediction refuses a region whose
            pixel size differs by more than 25 % (see
            :func:`segpipe.models.package.check_resolution`).
        crs_units: The units of the training region's CRS (``metre``, ``degree``...), or
            None where unknown (no CRS).
    """

    arch: str
    encoder: str
    band_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[ClassInfo, ...]
    chip_size: int
    nodata: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    clip_low: tuple[float, ...] | None = None
    clip_high: tuple[float, ...] | None = None
    output_stride: int = 32
    versions: dict[str, str] = field(default_factory=software_versions)
    weights_format: str = "safetensors"
    pixel_size: tuple[float, float] | None = None
    crs_units: str | None = None

    def __post_init__(self) -> None:
        if self.pixel_size is not None and (
            len(self.pixel_size) != 2 or not all(math.isfinite(v) and v > 0 for v in self.pixel_size)
        ):
            raise ModelPackageError(f"pixel size must be two positive numbers (x, y), not {self.pixel_size}")
        if self.weights_format not in WEIGHTS_FORMATS:
            raise ModelPackageError(f"weights format {self.weights_format!r} is not one of {WEIGHTS_FORMATS}")
        if (self.clip_low is None) != (self.clip_high is None):
            raise ModelPackageError("clip_low and clip_high must be given together")
        for name in ("clip_low", "clip_high"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.band_names):
                raise ModelPackageError(
                    f"{name} has {len(values)} values but the model has {len(self.band_names)} bands"
                )

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form written to ``model.json``."""
        d = asdict(self)
        d["classes"] = classes_to_json(self.classes)
        d["band_names"] = list(self.band_names)
        if self.weights_format == "safetensors":
            del d["weights_format"]  # torch packages' model.json as before ONNX packages existed
        # Written only when known, so a package without them reads as it did before.
        for name in ("pixel_size", "crs_units"):
            if d[name] is None:
                del d[name]
        if self.pixel_size is not None:
            d["pixel_size"] = [float(v) for v in self.pixel_size]
        return {"schema": MODEL_SCHEMA, "kind": "segpipe-model", **d}

    @classmethod
    def from_json(cls, data: Any, source: str = SPEC_FILE) -> ModelSpec:
        """Parse ``model.json`` contents, checking every field (see :class:`SpecFile`).

        Args:
            data: The decoded JSON.
            source: What to name in messages (the file, or the package and its file).

        Raises:
            ModelPackageError: Not an object, wrong kind, unsupported schema, or a field
                missing, of the wrong type or out of range (the message names the field).
        """
        if not isinstance(data, dict):
            raise ModelPackageError(
                f"{source} holds a JSON {type(data).__name__}, not an object: it is not a segpipe model "
                "description (re-export the package with 'segpipe train')"
            )
        if data.get("kind") != "segpipe-model":
            raise ModelPackageError(f"{source} is not a segpipe model description (its 'kind' is "
                                    f"{data.get('kind')!r}, not 'segpipe-model')")
        schema = data.get("schema")
        if schema not in _READABLE_SCHEMAS or isinstance(schema, bool):
            raise ModelPackageError(
                f"{source} schema {schema} is not supported: this segpipe reads schemas "
                f"{', '.join(map(str, _READABLE_SCHEMAS))}; "
                + (
                    "upgrade segpipe to load this package"
                    if isinstance(schema, int) and schema > MODEL_SCHEMA
                    else "retrain the model"
                )
            )
        try:
            parsed = SpecFile.model_validate(data)
        except ValidationError as exc:
            raise ModelPackageError(f"{source}: {_describe(exc)}") from exc
        size = parsed.pixel_size
        try:
            return cls(
                arch=parsed.arch,
                encoder=parsed.encoder,
                band_names=tuple(parsed.band_names),
                mean=tuple(parsed.mean),
                std=tuple(parsed.std),
                classes=tuple(classes_from_json(parsed.classes)),
                chip_size=parsed.chip_size,
                nodata=parsed.nodata,
                options=dict(parsed.options),
                metrics=dict(parsed.metrics),
                training=dict(parsed.training),
                clip_low=None if parsed.clip_low is None else tuple(parsed.clip_low),
                clip_high=None if parsed.clip_high is None else tuple(parsed.clip_high),
                output_stride=parsed.output_stride,
                versions=dict(parsed.versions),
                weights_format=parsed.weights_format,
                pixel_size=None if size is None else (size[0], size[1]),
                crs_units=parsed.crs_units,
            )
        except (InputError, TypeError, ValueError) as exc:
            raise ModelPackageError(f"{source}: {exc}") from exc
