"""A STAC Item with the Machine Learning Model (MLM) extension, describing a model package.

``mlm.json`` beside ``model.json`` says, in the vocabulary STAC catalogues and MLM-aware
tools (QGIS's and ArcGIS's model loaders, stac-model, pystac) read: the architecture and
framework (``PyTorch`` for safetensors weights, ``ONNX`` for an ONNX package), the input
(band names, N x bands x H x W float32, -1 for every dynamic dimension, per-band z-score
scaling with the package's mean and standard deviation), the output (logits per class,
with the classes' values, names and colours as ``classification:classes``) and the
accelerators it runs on. It follows MLM v1.5.0 on STAC 1.1.0 (the bands are described by
the core ``bands`` field, which MLM requires whenever ``mlm:input`` names bands).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segpipe.models.files import MLM_FILE, ONNX_FILE, SPEC_FILE, WEIGHTS_FILE, atomic_write

if TYPE_CHECKING:
    from segpipe.models.spec import ModelSpec

__all__ = ["MLM_EXTENSION", "MLM_FILE", "STAC_VERSION", "mlm_item", "write_mlm"]

MLM_EXTENSION = "https://stac-extensions.github.io/mlm/v1.5.0/schema.json"
STAC_VERSION = "1.1.0"

_ARCHITECTURES = {
    "unet": "U-Net", "pspnet": "PSPNet", "deeplabv3": "DeepLabV3", "deeplabv3plus": "DeepLabV3+",
    "random_forest": "Random Forest", "ensemble": "Ensemble", "linear": "Logistic Regression",
}
# The classification extension's class names allow these characters only.
_NAME_CHARS = re.compile(r"[^0-9A-Za-z_-]+")
_ACCELERATORS = {
    True: "onnxruntime on the CPU; CUDAExecutionProvider where onnxruntime-gpu is installed",
    False: "CPU; CUDA (bf16 autocast) when a GPU is present",
}
_SEMVER = re.compile(r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.+-]*)?$")


def _mlm_name(folder: Path, spec: ModelSpec) -> str:
    """The package folder's name when MLM accepts it (letters first and last), else ``segpipe-<arch>``."""
    name = folder.resolve().name
    if re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_.\-\s]+[a-zA-Z0-9]", name):
        return name
    return f"segpipe-{spec.arch.replace('_', '-')}"


def _input(spec: ModelSpec, window: int | None) -> dict[str, Any]:
    """``mlm:input``: the normalised bands, z-score scaled (after the package's clip, when it has one)."""
    edge = -1 if window is None else window
    scaling = [{"type": "z-score", "mean": m, "stddev": s} for m, s in zip(spec.mean, spec.std, strict=True)]
    clipped = ""
    if spec.clip_low is not None and spec.clip_high is not None:
        clipped = (f" clipped per band to {list(spec.clip_low)} .. {list(spec.clip_high)} first,")
    return {
        "name": "image",
        "description": (f"band values{clipped} then standardised per band; nodata pixels 0; height and "
                        f"width multiples of {spec.output_stride}"),
        "bands": list(spec.band_names),
        "input": {"shape": [-1, len(spec.band_names), edge, edge],
                  "dim_order": ["batch", "bands", "height", "width"], "data_type": "float32"},
        "value_scaling": scaling,
        "resize_type": None,
        "pre_processing_function": {"format": "python", "expression": "segpipe.models.package:normalise"},
    }


def _output(spec: ModelSpec, window: int | None) -> dict[str, Any]:
    """``mlm:output``: logits per class, their classes with names and colours."""
    edge = -1 if window is None else window
    classes = [{"value": c.value, "name": _NAME_CHARS.sub("_", c.name).strip("_") or f"class_{c.value}",
                "description": c.name, "color_hint": c.colour.lstrip("#").upper()} for c in spec.classes]
    return {
        "name": "logits",
        "description": ("per-class scores; softmax over 'class' gives probabilities, argmax the class "
                        "(channel i is the i-th class listed)"),
        "tasks": ["semantic-segmentation"],
        "result": {"shape": [-1, len(spec.classes), edge, edge],
                   "dim_order": ["batch", "class", "height", "width"], "data_type": "float32"},
        "classification:classes": classes,
        "post_processing_function": {"format": "python", "expression": "numpy.argmax(logits, axis=1)"},
    }


def _model_asset(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    if spec.weights_format == "onnx":
        return ONNX_FILE, {"href": f"./{ONNX_FILE}", "type": "application/octet-stream; application=onnx",
                           "title": "ONNX network", "roles": ["mlm:model"], "mlm:artifact_type": "onnx"}
    return WEIGHTS_FILE, {
        "href": f"./{WEIGHTS_FILE}", "type": "application/octet-stream; application=safetensors",
        "title": "PyTorch weights (segmentation-models-pytorch network built from model.json)",
        "roles": ["mlm:model"], "mlm:artifact_type": "safetensors.torch.save_file",
    }


def _onnx_window(path: Path) -> int | None:
    """The fixed window edge of an ONNX file's input, or None when height and width are dynamic."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    edges = [d.dim_value for d in dims[2:] if d.HasField("dim_value")]
    return edges[0] if len(edges) == 2 else None


def mlm_item(folder: str | Path, spec: ModelSpec, window: int | None = None) -> dict[str, Any]:
    """The STAC MLM Item of a package folder.

    Args:
        folder: The package folder (its name becomes ``mlm:name`` when MLM accepts it).
        spec: Its description (its ``model.json``).
        window: The one window edge the network takes, or None: read from an ONNX
            package's ``model.onnx``, else dynamic (torch networks take any multiple of the stride).

    Returns:
        The Item as JSON-ready dict (``geometry`` null: a model has no footprint).
    """
    path = Path(folder)
    weights, asset = _model_asset(spec)
    if window is None and spec.weights_format == "onnx" and (path / ONNX_FILE).is_file():
        window = _onnx_window(path / ONNX_FILE)
    made = path / weights if (path / weights).exists() else path / SPEC_FILE
    when = datetime.fromtimestamp(made.stat().st_mtime, UTC) if made.exists() else datetime.now(UTC)
    onnx = spec.weights_format == "onnx"
    framework: dict[str, Any] = {"mlm:framework": "ONNX" if onnx else "PyTorch"}
    torch_version = str(spec.versions.get("torch", ""))
    if not onnx and _SEMVER.match(torch_version):
        framework["mlm:framework_version"] = torch_version
    name = _mlm_name(path, spec)
    properties: dict[str, Any] = {
        "datetime": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "description": f"segpipe {spec.arch} ({spec.encoder}) classifying every pixel into "
                       f"{len(spec.classes)} classes",
        "mlm:name": name,
        "mlm:architecture": _ARCHITECTURES.get(spec.arch, spec.arch),
        "mlm:tasks": ["semantic-segmentation"],
        **framework,
        "mlm:accelerator": "amd64",
        "mlm:accelerator_constrained": False,
        "mlm:accelerator_summary": _ACCELERATORS[onnx],
        "mlm:input": [_input(spec, window)],
        "mlm:output": [_output(spec, window)],
        "mlm:hyperparameters": {"encoder": spec.encoder, "chip_size": spec.chip_size,
                                "output_stride": spec.output_stride},
        "bands": [{"name": b} for b in spec.band_names],
    }
    # STAC 1.1 allows ``bands`` in properties only where an asset lists bands too, and MLM
    # wants them in properties: the model asset lists the same bands.
    asset["bands"] = properties["bands"]
    return {
        "type": "Feature", "stac_version": STAC_VERSION, "stac_extensions": [MLM_EXTENSION],
        "id": name, "geometry": None, "properties": properties, "links": [],
        "assets": {"model": asset, "description": {
            "href": f"./{SPEC_FILE}", "type": "application/json", "title": "segpipe model description",
            "roles": ["metadata"]}},
    }


def write_mlm(folder: str | Path, spec: ModelSpec, window: int | None = None) -> Path:
    """Write ``mlm.json`` (see :func:`mlm_item`) into a package folder, atomically.

    Returns:
        The file written.
    """
    out = Path(folder) / MLM_FILE
    atomic_write(out, (json.dumps(mlm_item(folder, spec, window), indent=2) + "\n").encode())
    return out
