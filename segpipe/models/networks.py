"""Segmentation networks, built by segmentation-models-pytorch.

segpipe does not hand-write architectures: smp's U-Net, PSPNet, DeepLabV3 and
DeepLabV3+ are well tested. This module maps segpipe's small set of names and
settings onto smp constructors, and never touches files. The one model it builds
itself is ``linear``: a single 1 x 1 convolution (per-pixel logistic regression).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from segpipe.errors import ArchitectureError
from segpipe.models.catalog import (
    ARCHITECTURES,
    CLASSICAL_ARCHITECTURES,
    ENCODERS,
    LINEAR_ARCH,
    check_arch,
    output_stride,
)

__all__ = [
    "ARCHITECTURES",
    "CLASSICAL_ARCHITECTURES",
    "ENCODERS",
    "LinearPath",
    "PixelHead",
    "build_network",
    "output_stride",
    "zero_output_layers",
]

# U-Net's default decoder in smp (256..16 channels) costs 2x the encoder on CPU; a
# lighter decoder keeps accuracy on multispectral scenes and doubles throughput.
_UNET_DECODER = (128, 64, 32, 16, 16)


class _AddedPath(nn.Module):
    """A wrapped segmentation network whose logits get those of a per-pixel path added."""

    network: nn.Module

    @property
    def encoder(self) -> nn.Module:
        """The wrapped network's encoder (where pretrained weights go)."""
        encoder = self.network.encoder
        assert isinstance(encoder, nn.Module)
        return encoder

    def path(self, x: Any) -> Any:
        """The added path's logits (N, classes, H, W)."""
        raise NotImplementedError

    def forward(self, x: Any) -> Any:
        """Logits (N, classes, H, W): the network's plus the added path's."""
        return self.network(x) + self.path(x)


class PixelHead(_AddedPath):
    """A segmentation network whose logits get those of a per-pixel MLP on the bands added.

    At medium resolution (Landsat's 30 m) ponds, rivers and roads are one to three pixels
    wide: the encoder's stride-2 stem and pooling blur them before any skip connection
    keeps them. The 1 x 1 path sees each pixel's spectrum at full resolution, so such
    features survive while the network supplies the spatial context.
    """

    def __init__(self, network: nn.Module, in_channels: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.network = network
        self.pixel = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, num_classes, 1),
        )

    def path(self, x: Any) -> Any:
        """The per-pixel MLP's logits."""
        return self.pixel(x)


class LinearPath(_AddedPath):
    """A network whose logits get those of a per-pixel logistic regression added.

    Trained with ``linear_start``, the 1 x 1 convolution starts as the logistic
    regression fitted to the training pixels and the network's output layers at zero,
    so training starts from the convex per-pixel model (the same for every seed) and
    learns what spatial context adds to it.
    """

    def __init__(self, network: nn.Module, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.network = network
        self.linear = nn.Conv2d(in_channels, num_classes, 1)

    def path(self, x: Any) -> Any:
        """The logistic regression's logits."""
        return self.linear(x)


def zero_output_layers(net: nn.Module) -> None:
    """Zero the last convolution of every logit path inside ``net`` (not a :class:`LinearPath`'s own).

    What ``linear_start`` does before training, so that the wrapped network first
    outputs exactly the logistic regression's logits.
    """
    import torch

    with torch.no_grad():
        for module in net.modules():
            head = getattr(module, "segmentation_head", None)  # smp's networks
            if isinstance(module, PixelHead):
                head = module.pixel
            if isinstance(head, nn.Sequential):
                last = [m for m in head if isinstance(m, nn.Conv2d)][-1]
                last.weight.zero_()
                if last.bias is not None:
                    last.bias.zero_()


def build_network(
    arch: str,
    encoder: str,
    in_channels: int,
    num_classes: int,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build an untrained network.

    Args:
        arch: One of :data:`ARCHITECTURES` or :data:`CLASSICAL_ARCHITECTURES`, or
            ``ensemble`` (members in ``options``, see :mod:`segpipe.models.ensemble`).
        encoder: One of :data:`ENCODERS` (not used by ``linear`` and the forest).
        in_channels: Number of image bands.
        num_classes: Number of output classes (logit channels).
        options: Extra smp keyword arguments (e.g. ``decoder_channels``), and
            ``pixel_head``: hidden width of a :class:`PixelHead` around the network
            (0 or absent: none); ``linear_path``: a :class:`LinearPath` around it.

    Returns:
        The network, producing logits of shape (N, num_classes, H, W).

    Raises:
        ArchitectureError: Unknown architecture or encoder.
    """
    if arch in CLASSICAL_ARCHITECTURES:
        from segpipe.models.forest import forest_from_options

        return forest_from_options(in_channels, num_classes, options)  # its tree shapes; encoder unused
    if arch == "ensemble":
        from segpipe.models.ensemble import build_ensemble

        return build_ensemble(in_channels, num_classes, options, build_network)  # members: in the options
    check_arch(arch)
    extra = dict(options or {})
    pixel_head = int(extra.pop("pixel_head", 0) or 0)
    linear_path = bool(extra.pop("linear_path", False))
    if arch == LINEAR_ARCH:  # one 1 x 1 convolution; the encoder name is not used
        if extra:
            raise ArchitectureError(f"the {LINEAR_ARCH} model takes no options, got {sorted(extra)}")
        network: nn.Module = nn.Conv2d(in_channels, num_classes, kernel_size=1)
    elif encoder not in ENCODERS:
        raise ArchitectureError(f"unknown encoder {encoder!r}: choose one of {', '.join(ENCODERS)}")
    else:
        network = _smp_network(arch, encoder, in_channels, num_classes, extra)
    if pixel_head:
        network = PixelHead(network, in_channels, num_classes, pixel_head)
    return LinearPath(network, in_channels, num_classes) if linear_path else network


def _smp_network(
    arch: str, encoder: str, in_channels: int, num_classes: int, extra: dict[str, Any]
) -> nn.Module:
    """An untrained segmentation_models_pytorch network; ``extra`` are smp keyword arguments."""
    import segmentation_models_pytorch as smp

    kwargs: dict[str, Any] = {
        "encoder_name": encoder,
        "encoder_weights": None,  # never fetched: weights come from local files only
        "in_channels": in_channels,
        "classes": num_classes,
    }
    if arch == "unet":
        kwargs["decoder_channels"] = _UNET_DECODER
    kwargs.update(extra)
    if "decoder_channels" in kwargs and isinstance(kwargs["decoder_channels"], list):
        kwargs["decoder_channels"] = tuple(kwargs["decoder_channels"])
    cls = {
        "unet": smp.Unet,
        "pspnet": smp.PSPNet,
        "deeplabv3": smp.DeepLabV3,
        "deeplabv3plus": smp.DeepLabV3Plus,
    }[arch]
    network: nn.Module = cls(**kwargs)
    return network
