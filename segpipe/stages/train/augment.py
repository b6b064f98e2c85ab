"""Random changes of a training chip that keep its meaning: turns, flips, illumination."""

from __future__ import annotations

import numpy as np

__all__ = ["dihedral", "jitter"]


def dihedral(arrays: tuple[np.ndarray, ...], k: int) -> tuple[np.ndarray, ...]:
    """One of the 8 flips/rotations (``k`` in 0-7) of each array's last two axes, the same for all.

    Land cover and buildings seen from above have no preferred orientation. Chips and
    the objects pasted into them (:mod:`segpipe.stages.train.paste`) share this one
    mapping of ``k``, so a seed's draws mean the same turn wherever they are used.
    """
    if k >= 4:
        arrays = tuple(a[..., ::-1] for a in arrays)
    return tuple(np.rot90(a, k % 4, axes=(-2, -1)) for a in arrays)


def jitter(
    image: np.ndarray, valid: np.ndarray | None, strength: float, rng: np.random.Generator
) -> np.ndarray:
    """Random contrast and brightness of a normalised chip; invalid pixels stay 0.

    In normalised units a brightness shift of ``strength`` is that many standard
    deviations, the same for every band, so the change is a plausible illumination
    change rather than a colour shift.
    """
    contrast = 1.0 + float(rng.uniform(-strength, strength))
    brightness = float(rng.uniform(-strength, strength))
    out = image * np.float32(contrast) + np.float32(brightness)
    if valid is not None:
        out *= valid[None].astype(np.float32)
    return out
