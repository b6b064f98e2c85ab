"""Networks and model packages."""

from segpipe.models.loading import load_verified, validate_package
from segpipe.models.networks import ARCHITECTURES, ENCODERS, build_network, output_stride
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
