"""Loading a package for prediction: torch weights or an ONNX file, once per process.

The one seam prediction goes through (:func:`load_network`); kept apart from
:mod:`segpipe.models.package`, which describes, writes and reads packages, so that the
package module never imports the ONNX runtime side (which itself reads packages).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from segpipe.errors import ModelPackageError
from segpipe.models.fetch import local_package
from segpipe.models.files import ONNX_FILE
from segpipe.models.package import ModelSpec, load_model, model_hash, read_spec

if TYPE_CHECKING:
    from torch import nn

    from segpipe.models.onnx import OnnxNetwork

    # What prediction runs: (N, bands, H, W) float32 -> (N, classes, H, W) logits.
    Network: TypeAlias = nn.Module | OnnxNetwork

__all__ = ["load_network", "load_verified", "validate_package"]


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
