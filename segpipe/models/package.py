"""The model package: a directory with ``model.json`` and ``weights.safetensors``.

A package is everything prediction needs: architecture, encoder, band names,
normalisation statistics (with optional percentile clipping), classes and chip size.
Weights are safetensors (no pickle), or, in a package made by
:func:`segpipe.models.onnx.export_onnx`, the whole network as ``model.onnx``
(``weights_format`` = ``onnx``), which prediction runs with onnxruntime.

Schema history: 1 = first release; 2 adds ``clip_low``/``clip_high``, ``output_stride``
and ``versions`` (the software that wrote the package), and later the optional
``weights_format``, written by ONNX packages only: a torch package's ``model.json`` is
unchanged, and a segpipe from before ONNX packages refuses one by naming that field
rather than stumbling on a missing weights file. Later still, the optional
``pixel_size`` (x, y) and ``crs_units`` of the training region, which prediction checks
the image against (:func:`check_resolution`); packages without them predict as before.
Schema 1 packages still load: their new fields take the values schema 1 implied (no
clipping, stride 32).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segpipe.errors import BandMismatchError, InputError, ModelPackageError, ResolutionMismatchError
from segpipe.models.fetch import hash_file, local_package
from segpipe.models.files import ONNX_FILE, SPEC_FILE, WEIGHTS_FILE, replace_package_files
from segpipe.models.spec import (
    KNOWN_ARCHITECTURES,
    MODEL_SCHEMA,
    WEIGHTS_FORMATS,
    ModelSpec,
    SpecFile,
    grid_resolution,
    software_versions,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "KNOWN_ARCHITECTURES",
    "MODEL_SCHEMA",
    "ONNX_FILE",
    "WEIGHTS_FORMATS",
    "ModelSpec",
    "SpecFile",
    "RESOLUTION_TOLERANCE",
    "check_bands",
    "check_resolution",
    "grid_resolution",
    "load_model",
    "model_hash",
    "normalise",
    "read_spec",
    "save_model",
    "software_versions",
    "weights_name",
]


def read_spec(model_dir: str | Path) -> ModelSpec:
    """Read and check a package's ``model.json`` (every field, see :class:`SpecFile`).

    Args:
        model_dir: Package directory, or its ``s3://`` URL (fetched once per machine).

    Raises:
        ModelPackageError: The package or its description is missing or invalid; the
            message names the package and the field.
    """
    path = local_package(model_dir) / SPEC_FILE
    if not path.is_file():
        raise ModelPackageError(f"{model_dir} is not a model package: {SPEC_FILE} is missing")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelPackageError(f"{path} is not valid JSON ({exc}): re-export the package") from exc
    return ModelSpec.from_json(data, source=f"model package {model_dir}: {SPEC_FILE}")


# Package hashes by the files' identity: hashing 50 MB of weights takes ~40 ms, paid by
# every predict call and every worker's first task otherwise.
_HASHES: dict[tuple[tuple[str, int, int, int, int, int], ...], str] = {}


def weights_name(model_dir: str | Path) -> str:
    """The weights file a local package's ``model.json`` names: ``weights.safetensors`` or ``model.onnx``.

    Only the format is read (the description is checked in full by :func:`read_spec`);
    an unreadable description names the usual weights file, whose absence or the
    description's own check then reports what is wrong.
    """
    try:
        data = json.loads((Path(model_dir) / SPEC_FILE).read_bytes())
    except (OSError, ValueError):
        return WEIGHTS_FILE
    onnx = isinstance(data, dict) and data.get("weights_format") == "onnx"
    return ONNX_FILE if onnx else WEIGHTS_FILE


def model_hash(model_dir: str | Path) -> str:
    """Content hash of a package (description + weights): the key of per-worker caches.

    Computed once per process for the same files: packages are written by atomic
    renames, so a changed file has a new inode and modification time, hence a new key.
    """
    local = local_package(model_dir)
    paths = [local / name for name in (SPEC_FILE, weights_name(local))]
    ids = []
    for path in paths:
        if not path.is_file():
            raise ModelPackageError(f"{model_dir} is not a complete model package: {path.name} is missing")
        st = path.stat()
        ids.append((str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    key = tuple(ids)
    if key not in _HASHES:
        h = hashlib.sha256()
        for path in paths:
            hash_file(h, path)
        _HASHES[key] = h.hexdigest()[:16]
    return _HASHES[key]


def save_model(model_dir: str | Path, spec: ModelSpec, network: nn.Module) -> Path:
    """Write a package: weights and ``model.json`` as one, then its STAC MLM ``mlm.json``.

    A kill leaves the earlier package or the new one whole
    (:func:`segpipe.models.files.replace_package_files`).

    ``mlm.json`` (:mod:`segpipe.models.mlm`) describes the package to STAC tools; it is
    not part of the package's hash and nothing in segpipe reads it.

    Returns:
        The package directory.
    """
    from safetensors.torch import save

    if spec.weights_format != "safetensors":
        raise ModelPackageError(f"save_model writes torch weights, not a spec with weights_format "
                                f"{spec.weights_format!r} (segpipe.models.onnx.export_onnx writes those)")
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    description = (json.dumps(spec.to_json(), indent=2) + "\n").encode()
    replace_package_files(out, WEIGHTS_FILE, save(state, metadata={"format": "pt"}), description)
    from segpipe.models.mlm import write_mlm  # it reads this module's names

    write_mlm(out, spec)
    return out


def _read_weights(weights: Path, model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; anything else (a pickle, a cut file) is a named error."""
    from safetensors.torch import load_file

    if not weights.is_file():
        raise ModelPackageError(f"{model_dir} is not a complete model package: {WEIGHTS_FILE} is missing")
    try:
        return load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types (and OSError)
        raise ModelPackageError(
            f"{weights} is not a readable safetensors file ({type(exc).__name__}: {exc}); it may be cut "
            "short or another format (segpipe never loads pickles): copy the package again or re-export it"
        ) from exc


def load_model(model_dir: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Load a package (a directory or an ``s3://`` URL) into an eval-mode network on the CPU.

    Raises:
        ModelPackageError: Missing files, a bad description, weights that are not
            safetensors, do not fit the network or hold NaN, or an ONNX package (see
            :func:`segpipe.models.loading.load_network`); the message names the file.
    """
    local = local_package(model_dir)  # one copy for the description and the weights
    spec = read_spec(local)
    if spec.weights_format != "safetensors":
        raise ModelPackageError(
            f"model package {model_dir} holds its network as {ONNX_FILE}, not torch weights: prediction "
            "runs it with onnxruntime; training, combining and selecting need the torch package it came from"
        )
    # Imported here, not at the top: reading and checking a package's description must
    # not import torch (segpipe.models.catalog says why).
    from segpipe.models.networks import build_network

    tensors = _read_weights(local / WEIGHTS_FILE, model_dir)
    try:
        net = build_network(spec.arch, spec.encoder, len(spec.band_names), len(spec.classes), spec.options)
    except (InputError, KeyError, TypeError, ValueError) as exc:
        raise ModelPackageError(
            f"model package {model_dir}: {SPEC_FILE} describes a network segpipe cannot build ({exc}): "
            "re-export the package"
        ) from exc
    weights = local / WEIGHTS_FILE
    try:
        net.load_state_dict(tensors)
    except RuntimeError as exc:
        first = " ".join(line.strip() for line in str(exc).strip().splitlines()[:3])
        raise ModelPackageError(
            f"weights in {weights} do not fit {spec.arch}/{spec.encoder} with {len(spec.band_names)} "
            f"bands and {len(spec.classes)} classes ({first}): model.json and weights.safetensors "
            "come from different models; copy the whole package again"
        ) from exc
    bad = [k for k, v in tensors.items() if v.is_floating_point() and bool(v.isnan().any())]
    if bad:
        raise ModelPackageError(
            f"weights in {weights} hold NaN (in {', '.join(bad[:3])}): the training diverged; "
            "retrain the model"
        )
    return net.eval(), spec


def check_bands(
    spec: ModelSpec,
    band_names: tuple[str, ...] | list[str],
    image: str = "the image",
    model: str = "the model",
) -> None:
    """Refuse an image whose bands differ from the model's.

    Args:
        spec: The model's description.
        band_names: The image's band names, in order.
        image: What the message calls the image (``store X``).
        model: What the message calls the model (``model DIR``).

    Raises:
        BandMismatchError: Band count or names differ; the message shows both and the fix.
    """
    names = tuple(band_names)
    fix = "predict an image of the bands the model was trained on, in that order, or train a model on these"
    if len(names) != len(spec.band_names):
        raise BandMismatchError(
            f"{image} has {_bands(len(names))} {list(names)} but {model} was trained on "
            f"{_bands(len(spec.band_names))} {list(spec.band_names)}: {fix}"
        )
    if names != spec.band_names:
        raise BandMismatchError(
            f"{image}'s bands {list(names)} differ from {model}'s {list(spec.band_names)}: {fix}"
        )


def _bands(n: int) -> str:
    return f"{n} band" if n == 1 else f"{n} bands"


# Most relative difference between the image's pixel size and the model's, per axis.
RESOLUTION_TOLERANCE = 0.25
_OVERRIDE = "pass --allow-resolution-mismatch (allow_resolution_mismatch=True) to predict anyway"


def _unit_scale(units: str | None) -> tuple[str, float] | None:
    """(``linear`` or ``angular``, the factor to metres or radians) of a PROJ unit name, or None."""
    if units is None:
        return None
    from pyproj.database import get_units_map

    for category in ("linear", "angular"):
        unit = get_units_map(category=category).get(units)
        if unit is not None:
            return category, float(unit.conv_factor)
    return None


def _size(size: Sequence[float], units: str | None) -> str:
    """``10 x 10 m``; other linear units with their size in metres too."""
    shown = {"metre": "m", None: "(no CRS units)"}.get(units, str(units))
    text = f"{size[0]:.6g} x {size[1]:.6g} {shown}"
    scale = _unit_scale(units)
    if scale is not None and scale[0] == "linear" and units != "metre":
        text += f" ({size[0] * scale[1]:.6g} x {size[1] * scale[1]:.6g} m)"
    return text


def check_resolution(
    spec: ModelSpec, crs_wkt: str, transform: Sequence[float], allow: bool = False, model: str = "the model"
) -> None:
    """Refuse an image whose pixel size differs from the training pixel size by more than 25 %.

    A network trained at 10 m sees other objects at 30 cm and fails without a sign, so
    the sizes are compared before anything runs: in metres where both CRSs' units are
    known and linear (a grid in US survey feet against one in metres compares fairly),
    as plain numbers where units are unknown. A package without a recorded pixel size
    (older packages) passes.

    Args:
        spec: The model's description.
        crs_wkt: The image grid's CRS as WKT ("" when it has none).
        transform: The image grid's affine transform (a, b, c, d, e, f).
        allow: Only check nothing (the user's override).
        model: What to call the model in messages (its package).

    Raises:
        ResolutionMismatchError: The pixel sizes differ by more than
            :data:`RESOLUTION_TOLERANCE` of the model's on either axis, or one grid is in
            angular units and the other in linear ones; the message names both sizes and
            the override.
    """
    if allow or spec.pixel_size is None:
        return
    size, units = grid_resolution(crs_wkt, transform)
    trained, image = _unit_scale(spec.crs_units), _unit_scale(units)
    if trained is not None and image is not None and trained[0] != image[0]:
        raise ResolutionMismatchError(
            f"{model} was trained on a grid in {spec.crs_units} ({_size(spec.pixel_size, spec.crs_units)} "
            f"pixels) but the image's grid is in {units} ({_size(size, units)}): the pixel sizes cannot "
            f"be compared; ingest the image onto a grid in {spec.crs_units} (--crs), or {_OVERRIDE}"
        )
    ratio = 1.0 if trained is None or image is None else image[1] / trained[1]
    worst = max(abs(s * ratio - t) / t for s, t in zip(size, spec.pixel_size, strict=True))
    if worst > RESOLUTION_TOLERANCE:
        raise ResolutionMismatchError(
            f"the image's pixel size {_size(size, units)} differs by {worst:.0%} from the "
            f"{_size(spec.pixel_size, spec.crs_units)} {model} was trained at (more than "
            f"{RESOLUTION_TOLERANCE:.0%}): a network fails silently at another resolution; ingest the "
            f"image at the model's pixel size (--resolution), or {_OVERRIDE}"
        )


def normalise(image: np.ndarray, spec: ModelSpec, valid: np.ndarray | None = None) -> np.ndarray:
    """Clip (when the package says so), then standardise a (band, y, x) array.

    Clipping to the training percentiles first keeps rare extreme values (clouds,
    sensor spikes) from dominating the scale, identically in training and prediction.
    Invalid pixels (``valid`` False) become 0, the mean of every band, so that they
    pull neighbours as little as possible.

    Returns:
        A float32 array of the same shape.
    """
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    # One float32 copy, then every step in place: prediction normalises every pixel it
    # reads, and each temporary would be another pass over the window rows.
    out: np.ndarray = image.astype(np.float32)
    if spec.clip_low is not None and spec.clip_high is not None:
        low = np.asarray(spec.clip_low, dtype=np.float32)[:, None, None]
        high = np.asarray(spec.clip_high, dtype=np.float32)[:, None, None]
        np.clip(out, low, high, out=out)
    out -= mean
    out /= np.maximum(std, np.float32(1e-6))
    if valid is not None:
        out *= valid[None]
    return out
