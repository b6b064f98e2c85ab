"""The names segpipe's models go by, and what follows from a name alone, without torch.

Reading a package's description, checking it against an image and planning prediction
need these names but no network. Keeping them here lets the predict driver, the
scheduler's process and idle workers run without importing torch, whose import alone
costs about 550 MB of resident memory per process (see ``docs/benchmarks.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from segpipe.errors import ArchitectureError

__all__ = [
    "ARCHITECTURES",
    "CLASSICAL_ARCHITECTURES",
    "ENCODERS",
    "ENSEMBLE_ARCH",
    "FOREST_ARCH",
    "FOREST_OPTIONS",
    "LINEAR_ARCH",
    "PER_PIXEL_ARCHITECTURES",
    "check_arch",
    "default_overlap",
    "feature_names",
    "features_per_band",
    "has_encoder",
    "output_stride",
]

LINEAR_ARCH: Final = "linear"
ARCHITECTURES = ("unet", "pspnet", "deeplabv3", "deeplabv3plus", LINEAR_ARCH)
# Per-pixel classical models packaged like networks (segpipe.models.forest); kept apart
# from ARCHITECTURES because they have no encoder and are not trained by gradient descent.
CLASSICAL_ARCHITECTURES = ("random_forest",)
# Models that see one pixel at a time: no encoder, any input size, no window overlap
# needed. ``linear`` is one 1 x 1 convolution (multinomial logistic regression on the
# bands, fitted by L-BFGS: segpipe.stages.train.linear): the simplest baseline, and a model whose forward
# pass costs almost nothing, so benchmarks of it measure the pipeline around it.
PER_PIXEL_ARCHITECTURES = (LINEAR_ARCH, *CLASSICAL_ARCHITECTURES)
# Several packages averaged (segpipe.models.ensemble); named here, where no torch is imported.
ENSEMBLE_ARCH: Final = "ensemble"
ENCODERS = (
    "resnet18", "resnet34", "resnet50", "resnet101",
    "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
    "mobilenet_v2",
)

FOREST_ARCH: Final = "random_forest"
# Required shapes; "context" is optional (packages written before it existed are per-pixel).
FOREST_OPTIONS = ("n_trees", "max_nodes", "depth")


def check_arch(arch: str) -> None:
    """Refuse a name that is not one of :data:`ARCHITECTURES`.

    Raises:
        ArchitectureError: Unknown architecture.
    """
    if arch not in ARCHITECTURES:
        raise ArchitectureError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")


def output_stride(arch: str) -> int:
    """Input sizes must be multiples of this for the network to run (32 for encoder networks, 1 per-pixel)."""
    if arch in PER_PIXEL_ARCHITECTURES:
        return 1
    check_arch(arch)
    return 32


def has_encoder(arch: str) -> bool:
    """Whether ``arch`` is built around one of :data:`ENCODERS` (all but the per-pixel architectures)."""
    return arch in ARCHITECTURES and arch not in PER_PIXEL_ARCHITECTURES


def features_per_band(context: int) -> int:
    """Tree features per band: the value, plus its window mean and std when ``context`` > 1."""
    return 3 if context > 1 else 1


def feature_names(band_names: Sequence[str], context: int) -> list[str]:
    """Names of a forest's features, in :func:`segpipe.models.forest.context_features` order."""
    if context <= 1:
        return list(band_names)
    window = f"{context}x{context}"
    return [*band_names, *(f"{b} {stat} {window}" for stat in ("mean", "std") for b in band_names)]


def default_overlap(options: Mapping[str, Any]) -> int:
    """Prediction window overlap a forest with these options needs by default.

    A forest sees at most its context window's half-width of neighbours, so a few
    pixels of overlap put each window's cut-off edge features under the blend's low
    weights; a per-pixel forest needs none (overlap would only repeat work).
    """
    return 4 * (int(options.get("context", 1)) // 2)
