"""Networks and model packages.

Importing this package does not import torch: :func:`build_network` (the one name here
that needs it at import) is loaded on first use, so the predict driver and idle workers
stay light (see :mod:`segpipe.models.catalog`).
"""

from typing import TYPE_CHECKING, Any

from segpipe.models.catalog import ARCHITECTURES, ENCODERS, output_stride
from segpipe.models.loading import load_verified, validate_package
from segpipe.models.package import (
    RESOLUTION_TOLERANCE,
    ModelSpec,
    check_bands,
    check_resolution,
    load_model,
    model_hash,
    normalise,
    read_spec,
    save_model,
)

__all__ = [
    "ARCHITECTURES",
    "RESOLUTION_TOLERANCE",
    "ENCODERS",
    "ModelSpec",
    "build_network",
    "check_bands",
    "check_resolution",
    "load_model",
    "load_verified",
    "model_hash",
    "normalise",
    "output_stride",
    "read_spec",
    "save_model",
    "validate_package",
]


if TYPE_CHECKING:
    from segpipe.models.networks import build_network


def __getattr__(name: str) -> Any:
    """``build_network`` on first use (it imports torch and segmentation-models-pytorch)."""
    if name == "build_network":
        from segpipe.models.networks import build_network

        return build_network
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
