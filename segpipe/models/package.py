"""The model package: a directory with ``model.json`` and ``weights.safetensors``.

A package is everything prediction needs: architecture, encoder, band names,
normalisation statistics, classes and chip size. Weights are safetensors (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from segpipe.errors import BandMismatchError, ModelPackageError
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
]

MODEL_SCHEMA = 1
SPEC_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"


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
        if data.get("schema") != MODEL_SCHEMA:
            raise ModelPackageError(
                f"model.json schema {data.get('schema')} is not supported (expected {MODEL_SCHEMA})"
            )
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
            )
        except KeyError as exc:
            raise ModelPackageError(f"model.json lacks the field {exc}") from exc


def read_spec(model_dir: str | Path) -> ModelSpec:
    """Read a package's ``model.json``.

    Raises:
        ModelPackageError: The package or its description is missing or invalid.
    """
    path = Path(model_dir) / SPEC_FILE
    if not path.is_file():
        raise ModelPackageError(f"{model_dir} is not a model package: {SPEC_FILE} is missing")
    try:
        return ModelSpec.from_json(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ModelPackageError(f"{path} is not valid JSON: {exc}") from exc


def model_hash(model_dir: str | Path) -> str:
    """Content hash of a package (description + weights): the key of per-worker caches."""
    h = hashlib.sha256()
    for name in (SPEC_FILE, WEIGHTS_FILE):
        path = Path(model_dir) / name
        if not path.is_file():
            raise ModelPackageError(f"{model_dir} is not a complete model package: {name} is missing")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


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
    """Load a package into an eval-mode network on the CPU.

    Raises:
        ModelPackageError: Missing files, bad schema or weights that do not fit.
    """
    from safetensors.torch import load_file

    spec = read_spec(model_dir)
    weights = Path(model_dir) / WEIGHTS_FILE
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
    """Standardise a (band, y, x) array with the package's statistics.

    Invalid pixels (``valid`` False) become 0, the mean of every band, so that they
    pull neighbours as little as possible.

    Returns:
        A float32 array of the same shape.
    """
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    out = (image.astype(np.float32) - mean) / np.maximum(std, 1e-6)
    if valid is not None:
        out *= valid[None].astype(np.float32)
    return out
