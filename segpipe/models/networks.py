"""Segmentation networks, built by segmentation-models-pytorch.

segpipe does not hand-write architectures: smp's U-Net, PSPNet, DeepLabV3 and
DeepLabV3+ are well tested. This module maps segpipe's small set of names and
settings onto smp constructors, and never touches files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from segpipe.errors import ArchitectureError

__all__ = ["ARCHITECTURES", "ENCODERS", "build_network", "output_stride"]

ARCHITECTURES = ("unet", "pspnet", "deeplabv3", "deeplabv3plus")
ENCODERS = (
    "resnet18", "resnet34", "resnet50", "resnet101",
    "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
    "mobilenet_v2",
)

# U-Net's default decoder in smp (256..16 channels) costs 2x the encoder on CPU; a
# lighter decoder keeps accuracy on multispectral scenes and doubles throughput.
_UNET_DECODER = (128, 64, 32, 16, 16)


def output_stride(arch: str) -> int:
    """Input sizes must be multiples of this for the network to run (32 for all four)."""
    if arch not in ARCHITECTURES:
        raise ArchitectureError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    return 32


def build_network(
    arch: str,
    encoder: str,
    in_channels: int,
    num_classes: int,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build an untrained network.

    Args:
        arch: One of :data:`ARCHITECTURES`.
        encoder: One of :data:`ENCODERS`.
        in_channels: Number of image bands.
        num_classes: Number of output classes (logit channels).
        options: Extra smp keyword arguments (e.g. ``decoder_channels``).

    Returns:
        The network, producing logits of shape (N, num_classes, H, W).

    Raises:
        ArchitectureError: Unknown architecture or encoder.
    """
    import segmentation_models_pytorch as smp

    if arch not in ARCHITECTURES:
        raise ArchitectureError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    if encoder not in ENCODERS:
        raise ArchitectureError(f"unknown encoder {encoder!r}: choose one of {', '.join(ENCODERS)}")
    kwargs: dict[str, Any] = {
        "encoder_name": encoder,
        "encoder_weights": None,  # never fetched: weights come from local files only
        "in_channels": in_channels,
        "classes": num_classes,
    }
    if arch == "unet":
        kwargs["decoder_channels"] = _UNET_DECODER
    kwargs.update(options or {})
    if "decoder_channels" in kwargs and isinstance(kwargs["decoder_channels"], list):
        kwargs["decoder_channels"] = tuple(kwargs["decoder_channels"])
    cls = {
        "unet": smp.Unet,
        "pspnet": smp.PSPNet,
        "deeplabv3": smp.DeepLabV3,
        "deeplabv3plus": smp.DeepLabV3Plus,
    }[arch]
    return cls(**kwargs)  # type: ignore[no-any-return]
