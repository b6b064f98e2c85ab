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
rather than stumbling on a missing weights file. Schema 1 packages still load: their
new fields take the values schema 1 implied (no clipping, stride 32).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from segpipe.errors import BandMismatchError, InputError, ModelPackageError
from segpipe.models.fetch import hash_file, local_package
from segpipe.models.files import ONNX_FILE, SPEC_FILE, WEIGHTS_FILE
from segpipe.models.networks import ARCHITECTURES, CLASSICAL_ARCHITECTURES, ENCODERS, build_network
from segpipe.types import ClassInfo, classes_from_json, classes_to_json

if TYPE_CHECKING:
    import torch
    from torch import nn

    from segpipe.models.onnx import OnnxNetwork

    # What prediction runs: (N, bands, H, W) float32 -> (N, classes, H, W) logits.
    Network: TypeAlias = nn.Module | OnnxNetwork

__all__ = [
    "KNOWN_ARCHITECTURES",
    "MODEL_SCHEMA",
    "ONNX_FILE",
    "WEIGHTS_FORMATS",
    "ModelSpec",
    "SpecFile",
    "check_bands",
    "load_model",
    "load_network",
    "model_hash",
    "normalise",
    "read_spec",
    "save_model",
    "software_versions",
    "validate_package",
    "weights_name",
]

MODEL_SCHEMA = 2
_READABLE_SCHEMAS = (1, 2)
# The weights file of an ONNX package (a torch package's is files.WEIGHTS_FILE).
WEIGHTS_FORMATS = ("safetensors", "onnx")
# Every ``arch`` a package may name; ``ensemble`` is segpipe.models.ensemble.ENSEMBLE_ARCH
# (not imported: the ensemble module imports this one).
KNOWN_ARCHITECTURES = (*ARCHITECTURES, *CLASSICAL_ARCHITECTURES, "ensemble")
# Networks' inputs must be multiples of this (segpipe.models.networks.output_stride).
_NETWORK_STRIDE = 32


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
        if info.data.get("arch") in ARCHITECTURES and encoder not in ENCODERS:
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
        if info.data.get("arch") in ARCHITECTURES and stride % _NETWORK_STRIDE:
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

    def __post_init__(self) -> None:
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
            )
        except (InputError, TypeError, ValueError) as exc:
            raise ModelPackageError(f"{source}: {exc}") from exc


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


def _umask() -> int:
    """The process's umask (read by setting it, the only portable way, and setting it back)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes the file 0600: workers or containers running as another user
        # could not read the package. Give it the mode open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model_dir: str | Path, spec: ModelSpec, network: nn.Module) -> Path:
    """Write a package: weights first, then ``model.json``, each atomically, then its STAC MLM ``mlm.json``.

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
    _atomic_write(out / WEIGHTS_FILE, save(state, metadata={"format": "pt"}))
    _atomic_write(out / SPEC_FILE, (json.dumps(spec.to_json(), indent=2) + "\n").encode())
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
            :func:`load_network`); the message names the file.
    """
    local = local_package(model_dir)  # one copy for the description and the weights
    spec = read_spec(local)
    if spec.weights_format != "safetensors":
        raise ModelPackageError(
            f"model package {model_dir} holds its network as {ONNX_FILE}, not torch weights: prediction "
            "runs it with onnxruntime; training, combining and selecting need the torch package it came from"
        )
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


# Loaded packages by content hash, so the driver's validation and in-process tasks load a
# package once; each dask worker process keeps its own (segpipe.stages.predict.worker).
_LOADED: OrderedDict[str, tuple[Network, ModelSpec]] = OrderedDict()
_LOADED_LOCK = threading.Lock()
_LOADED_MAX = 2


def _load_any(local: Path) -> tuple[Network, ModelSpec]:
    """A local package's network: a torch module, or an onnxruntime session for an ONNX package."""
    spec = read_spec(local)
    if spec.weights_format == "onnx":
        from segpipe.models.onnx import load_onnx  # onnxruntime only where an ONNX package is run

        return load_onnx(local / ONNX_FILE, spec), spec
    return load_model(local)


def load_network(model_dir: str | Path, expected_hash: str | None = None) -> tuple[Network, ModelSpec, str]:
    """Load a package of either weights format once per process, keyed by its content hash.

    The seam prediction goes through: a torch package gives its eval-mode CPU network,
    an ONNX package an :class:`segpipe.models.onnx.OnnxNetwork` (onnxruntime, no torch
    call). Either maps (N, bands, H, W) normalised float32 input to (N, classes, H, W)
    logits. Hash and weights come from one local copy, so a package on S3 replaced in
    between never loads under the old hash.

    Args:
        model_dir: Package directory or ``s3://`` URL.
        expected_hash: Refuse the package unless its hash is this (it changed since
            the driver checked it).

    Returns:
        The network (shared: do not train it), its spec and its hash.

    Raises:
        ModelPackageError: An invalid package, or one that changed.
    """
    local = local_package(model_dir)
    found = model_hash(local)
    if expected_hash is not None and found != expected_hash:
        raise ModelPackageError(
            f"model package {model_dir} changed during prediction (hash {found}, expected "
            f"{expected_hash}): rerun predict"
        )
    with _LOADED_LOCK:
        if found in _LOADED:
            _LOADED.move_to_end(found)
            net, spec = _LOADED[found]
            return net, spec, found
    net, spec = _load_any(local)
    with _LOADED_LOCK:
        _LOADED[found] = (net, spec)
        while len(_LOADED) > _LOADED_MAX:
            _LOADED.popitem(last=False)
    return net, spec, found


def load_verified(
    model_dir: str | Path, expected_hash: str | None = None
) -> tuple[nn.Module, ModelSpec, str]:
    """Load a torch package once per process, keyed by its content hash (see :func:`load_network`).

    Returns:
        The eval-mode CPU network (shared: do not train it), its spec and its hash.

    Raises:
        ModelPackageError: An invalid package, one that changed, or an ONNX package
            (its network is not a torch module).
    """
    net, spec, found = load_network(model_dir, expected_hash)
    from torch import nn

    if not isinstance(net, nn.Module):
        raise ModelPackageError(
            f"model package {model_dir} holds its network as {ONNX_FILE}, not torch weights: this step "
            "needs a torch package (prediction runs ONNX packages through onnxruntime)"
        )
    return net, spec, found


def validate_package(model_dir: str | Path) -> tuple[ModelSpec, str]:
    """Check a package completely: description, architecture, normalisation and weights.

    The weights are loaded into the network (on the CPU, once per process and package
    hash; an ONNX package into an onnxruntime session), so nothing a worker would
    stumble on is left to find after outputs change.

    Returns:
        The package's spec and content hash.

    Raises:
        ModelPackageError: What is wrong, naming the package, the file and the field.
    """
    _, spec, digest = load_network(model_dir)
    return spec, digest


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
