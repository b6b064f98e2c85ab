"""Initialise an encoder from a local pretrained weights file (never from the network).

Files are safetensors, or torch checkpoints read with ``torch.load(weights_only=True)``
(tensors and plain containers only: no arbitrary pickle is executed). Keys follow
torchvision's names, which smp's ResNet, VGG and MobileNet encoders share; common
wrappers (``module.`` from DataParallel, ``encoder.``, ``backbone.``, ``model.``) are
stripped and classifier heads are dropped. A first convolution trained on RGB is
adapted to the image's band count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segpipe.errors import MissingInputError, PretrainedWeightsError

__all__ = ["PretrainedReport", "adapt_first_conv", "load_pretrained_encoder", "read_state_dict"]

_WRAPPERS = ("module.", "encoder.", "backbone.", "model.")
_HEADS = ("fc.", "classifier.", "head.", "last_linear.")
# Checkpoints written by training scripts nest the weights under one of these keys.
_NESTED = ("state_dict", "model", "model_state_dict", "net")


@dataclass(frozen=True)
class PretrainedReport:
    """What a pretrained file contributed to the encoder.

    Attributes:
        path: The weights file.
        loaded: Encoder keys taken from the file unchanged.
        adapted: Encoder keys derived from the file (the first convolution).
        missing: Encoder keys the file did not provide (left at their initialisation).
        unexpected: File keys that fit no encoder key (name or shape), heads excluded.
    """

    path: str
    loaded: tuple[str, ...]
    adapted: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]

    def summary(self) -> dict[str, Any]:
        """Small JSON-ready record for the model package."""
        return {
            "path": self.path,
            "loaded": len(self.loaded),
            "adapted": list(self.adapted),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
        }


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file or a weights-only torch checkpoint.

    Raises:
        MissingInputError: The file does not exist.
        PretrainedWeightsError: The file is not a readable state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"pretrained weights file {p} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(p))
        else:
            data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors have no common base
        raise PretrainedWeightsError(
            f"cannot read pretrained weights {p} ({exc}); give a .safetensors file or a torch "
            "state dict saved with torch.save(model.state_dict(), path)"
        ) from exc
    for key in _NESTED:
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping):
        raise PretrainedWeightsError(f"{p} holds a {type(data).__name__}, not a state dict of tensors")
    return {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _clean_key(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPERS:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Fit a first-convolution kernel (out, c, k, k) to ``in_channels`` inputs.

    More bands than the file's ``c``: kernels are cycled across the bands (band i
    takes file channel i mod c) and scaled by c / in_channels. Fewer bands: the file's
    channels are folded onto the bands (channel j adds to band j mod in_channels). Both
    keep the response to an image whose bands are all equal, the only input whose
    meaning the file's kernels and a new band set share (exactly when the counts
    divide each other, approximately otherwise).
    """
    out, c = weight.shape[:2]
    if c == in_channels:
        return weight.clone()
    if in_channels > c:
        index = torch.arange(in_channels) % c
        return weight[:, index].clone() * (c / in_channels)
    folded = torch.zeros((out, in_channels, *weight.shape[2:]), dtype=weight.dtype)
    for j in range(c):
        folded[:, j % in_channels] += weight[:, j]
    return folded


def _first_conv_key(encoder: nn.Module) -> str | None:
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    return None


def load_pretrained_encoder(encoder: nn.Module, path: str | Path) -> PretrainedReport:
    """Copy matching weights from a local file into ``encoder`` (in place).

    Args:
        encoder: The network's encoder (``net.encoder`` of an smp model).
        path: Weights file (``.safetensors``, ``.pth``, ``.pt``).

    Returns:
        Which keys were loaded, adapted, missing or unexpected.

    Raises:
        MissingInputError: The file does not exist.
        PretrainedWeightsError: The file is unreadable or no key fits the encoder
            (usually a different backbone than ``--backbone``).
    """
    source = {_clean_key(k): v for k, v in read_state_dict(path).items()}
    target = encoder.state_dict()
    first = _first_conv_key(encoder)
    new: dict[str, torch.Tensor] = {}
    loaded, adapted, unexpected = [], [], []
    for key, tensor in source.items():
        if key.startswith(_HEADS):
            continue
        want = target.get(key)
        if want is None:
            unexpected.append(key)
        elif tensor.shape == want.shape:
            new[key] = tensor.to(want.dtype)
            loaded.append(key)
        elif (
            key == first
            and tensor.ndim == 4
            and tensor.shape[0] == want.shape[0]
            and tensor.shape[2:] == want.shape[2:]
        ):
            new[key] = adapt_first_conv(tensor, int(want.shape[1])).to(want.dtype)
            adapted.append(key)
        else:
            unexpected.append(key)
    if not new:
        raise PretrainedWeightsError(
            f"no weight in {path} fits the {type(encoder).__name__} encoder "
            f"(file keys like {sorted(source)[:3]}, encoder keys like {sorted(target)[:3]}): "
            "is it a state dict of the same backbone as --backbone?"
        )
    encoder.load_state_dict(new, strict=False)
    missing = tuple(k for k in target if k not in new)
    return PretrainedReport(str(path), tuple(loaded), tuple(adapted), missing, tuple(unexpected))
