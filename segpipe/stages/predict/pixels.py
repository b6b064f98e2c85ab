"""What a model sees and what it writes: the one pixel preparation and output encoding.

``segpipe predict`` (on a worker) and :func:`segpipe.classify` (on any DataArray) both
go through these two functions, so they give the same classes on the same pixels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from segpipe.io.store import NODATA_U8, valid_mask
from segpipe.models import normalise

if TYPE_CHECKING:
    from segpipe.models import ModelSpec

__all__ = ["encode_probabilities", "percent", "prepare_pixels"]


def prepare_pixels(raw: np.ndarray, nodata: float | None, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """Normalise raw (band, y, x) pixels for the model; nodata pixels become 0.

    Args:
        raw: Pixels as stored, any dtype.
        nodata: The imagery's nodata value (None: only NaN is nodata).
        spec: The model package's spec (normalisation statistics, optional clip).

    Returns:
        (band, y, x) float32 normalised pixels and the (y, x) valid mask.
    """
    valid = valid_mask(raw, nodata)
    pixels = normalise(raw, spec, valid)
    pixels[:, ~valid] = 0.0  # normalise zeroes nodata by multiplying, which keeps NaN
    return pixels, valid


def percent(p: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as whole percent (uint8)."""
    out: np.ndarray = np.rint(p * 100).clip(0, 100).astype(np.uint8)
    return out


def _channel_argmax(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index (uint8) and value of the largest channel of (C, y, x) ``probs`` per pixel; ties go to the first.

    One contiguous pass per channel: ``argmax(axis=0)`` walks the C values of each pixel
    through a strided inner loop, several times slower on the blended bands (measured
    in ``benchmarks/scale.py``'s profile).
    """
    top = probs[0].copy()
    best = np.zeros(probs.shape[1:], dtype=np.uint8)
    for c in range(1, probs.shape[0]):
        higher = probs[c] > top
        best[higher] = c
        np.maximum(top, probs[c], out=top)
    return best, top


def encode_probabilities(
    probs: np.ndarray, valid: np.ndarray, values: np.ndarray, with_probabilities: bool = False
) -> dict[str, np.ndarray]:
    """Blended probabilities -> the stored layers; pixels that are not valid get 255.

    Args:
        probs: (class, y, x) float32 blended probabilities.
        valid: (y, x) mask of pixels with data.
        values: uint8 class value of each probability channel.
        with_probabilities: Also return the per-class ``probabilities`` in percent.

    Returns:
        ``classes`` and ``confidence`` (y, x) uint8, and ``probabilities`` (class, y, x)
        uint8 when asked for.
    """
    best, top = _channel_argmax(probs)
    out = {
        "classes": np.where(valid, values[best], NODATA_U8).astype(np.uint8, copy=False),
        "confidence": np.where(valid, percent(top), NODATA_U8).astype(np.uint8, copy=False),
    }
    if with_probabilities:
        out["probabilities"] = np.full(probs.shape, NODATA_U8, dtype=np.uint8)
        out["probabilities"][:, valid] = percent(probs)[:, valid]
    return out
