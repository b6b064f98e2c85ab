"""The model package: a directory with ``model.json`` and ``weights.safetensors``.

A package is everything prediction needs: architecture, encoder, band names,
normalisation statistics (with optional percentile clipping), classes and chip size.
Weights are safetensors (no pickle).

Schema history: 1 = first release; 2 adds ``clip_low``/``clip_high``, ``output_stride``
and ``versions`` (the software that wrote the package). Schema 1 packages still load:
their new fields take the values schema 1 implied (no clipping, stride 32).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from segpipe.errors import BandMismatchError, ModelPackageError
from segpipe.models.fetch import local_package
from segpipe.models.networks import build_network
from segpipe.types import ClassInfo, classes_from_json, classes_to_json

__all__ = [
    "MODEL_SCHEMA",
    "ModelSpec",
    "check_bands",
    "load_model",
    "model_hash",
    "normalise",
    "read_spec",
    "save_model",
    "software_versions",
]

MODEL_SCHEMA = 2
_READABLE_SCHEMAS = (1, 2)
SPEC_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"


def software_versions() -> dict[str, str]:
    """Versions of the software that trains and runs models, recorded in every package."""
    versions = {"python": platform.python_version()}
    for dist in ("segpipe", "torch", "segmentation-models-pytorch", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    return versions


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

    def __post_init__(self) -> None:
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
        return {"schema": MODEL_SCHEMA, "kind": "segpipe-model", **d}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        """Parse ``model.json`` contents, checking the schema.

        Raises:
            ModelPackageError: Wrong kind, unsupported schema or missing fields.
        """
        if data.get("kind") != "segpipe-model":
            raise ModelPackageError("model.json is not a segpipe model description")
        schema = data.get("schema")
        if schema not in _READABLE_SCHEMAS:
            raise ModelPackageError(
                f"model.json schema {schema} is not supported: this segpipe reads schemas "
                f"{', '.join(map(str, _READABLE_SCHEMAS))}; "
                + (
                    "upgrade segpipe to load this package"
                    if isinstance(schema, int) and schema > MODEL_SCHEMA
                    else "retrain the model"
                )
            )
        clip_low, clip_high = data.get("clip_low"), data.get("clip_high")
        try:
            return cls(
                arch=str(data["arch"]),
                encoder=str(data["encoder"]),
                band_names=tuple(data["band_names"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                classes=tuple(classes_from_json(data["classes"])),
                chip_size=int(data["chip_size"]),
                nodata=data.get("nodata"),
                options=dict(data.get("options", {})),
                metrics=dict(data.get("metrics", {})),
                training=dict(data.get("training", {})),
                clip_low=None if clip_low is None else tuple(float(v) for v in clip_low),
                clip_high=None if clip_high is None else tuple(float(v) for v in clip_high),
                output_stride=int(data.get("output_stride", 32)),
                versions={str(k): str(v) for k, v in data.get("versions", {}).items()},
            )
        except KeyError as exc:
            raise ModelPackageError(f"model.json lacks the field {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise ModelPackageError(f"model.json has a malformed field: {exc}") from exc


def read_spec(model_dir: str | Path) -> ModelSpec:
    """Read a package's ``model.json``.

    Args:
        model_dir: Package directory, or its ``s3://`` URL (fetched once per machine).

    Raises:
        ModelPackageError: The package or its description is missing or invalid.
    """
    path = local_package(model_dir) / SPEC_FILE
    if not path.is_file():
        raise ModelPackageError(f"{model_dir} is not a model package: {SPEC_FILE} is missing")
    try:
        return ModelSpec.from_json(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ModelPackageError(f"{path} is not valid JSON: {exc}") from exc


# Package hashes by the files' identity: hashing 50 MB of weights takes ~40 ms, paid by
# every predict call and every worker's first task otherwise.
_HASHES: dict[tuple[tuple[str, int, int, int, int, int], ...], str] = {}


def model_hash(model_dir: str | Path) -> str:
    """Content hash of a package (description + weights): the key of per-worker caches.

    Computed once per process for the same files: packages are written by atomic
    renames, so a changed file has a new inode and modification time, hence a new key.
    """
    paths = [local_package(model_dir) / name for name in (SPEC_FILE, WEIGHTS_FILE)]
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
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        _HASHES[key] = h.hexdigest()[:16]
    return _HASHES[key]


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model_dir: str | Path, spec: ModelSpec, network: nn.Module) -> Path:
    """Write a package: weights first, then ``model.json``, each atomically.

    Returns:
        The package directory.
    """
    from safetensors.torch import save

    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    _atomic_write(out / WEIGHTS_FILE, save(state, metadata={"format": "pt"}))
    _atomic_write(out / SPEC_FILE, (json.dumps(spec.to_json(), indent=2) + "\n").encode())
    return out


def load_model(model_dir: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Load a package (a directory or an ``s3://`` URL) into an eval-mode network on the CPU.

    Raises:
        ModelPackageError: Missing files, bad schema or weights that do not fit.
    """
    from safetensors.torch import load_file

    local = local_package(model_dir)  # one copy for the description and the weights
    spec = read_spec(local)
    weights = local / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelPackageError(f"{model_dir} is not a complete model package: {WEIGHTS_FILE} is missing")
    net = build_network(spec.arch, spec.encoder, len(spec.band_names), len(spec.classes), spec.options)
    try:
        net.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise ModelPackageError(f"weights in {weights} do not fit {spec.arch}/{spec.encoder}: {exc}") from exc
    return net.eval(), spec


def check_bands(spec: ModelSpec, band_names: tuple[str, ...] | list[str]) -> None:
    """Refuse an image whose bands differ from the model's.

    Raises:
        BandMismatchError: Band count or names differ; the message shows both.
    """
    names = tuple(band_names)
    if len(names) != len(spec.band_names):
        raise BandMismatchError(
            f"the image has {len(names)} bands {list(names)} but the model was trained on "
            f"{len(spec.band_names)} bands {list(spec.band_names)}"
        )
    if names != spec.band_names:
        raise BandMismatchError(
            f"the image's bands {list(names)} differ from the model's {list(spec.band_names)}"
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
    pixels = image.astype(np.float32)
    if spec.clip_low is not None and spec.clip_high is not None:
        low = np.asarray(spec.clip_low, dtype=np.float32)[:, None, None]
        high = np.asarray(spec.clip_high, dtype=np.float32)[:, None, None]
        pixels = np.clip(pixels, low, high)
    out = (pixels - mean) / np.maximum(std, 1e-6)
    if valid is not None:
        out *= valid[None].astype(np.float32)
    return out
