"""Whether a prediction averages the 8 views of every window (test-time augmentation).

Left to segpipe (``tta=None``, the default of ``segpipe predict``, :func:`segpipe.predict`
and :func:`segpipe.classify`), a network averages the 8 flips and rotations of every window
on a region of at most :data:`TTA_AUTO_PIXELS`, and predicts each window once on a larger
one. Averaging the views takes out what a network learnt of one orientation alone, which
differs from seed to seed: on the SpaceNet building scene the five default networks
scored 0.630-0.683 test mIoU (mean 0.662, building IoU 0.352) predicted once and
0.650-0.687 (0.672, 0.369) averaged over the views, at 1.4x predict's wall time on its
900 x 900 px; on s2-brandenburg 0.320 -> 0.324, no seed lower (docs/benchmarks.md, session 28).
The forward calls cost 8x, which on a small region is seconds and on a whole region
hours, hence the bound; ``tta=True`` or ``False`` (``--tta`` / ``--no-tta``) decides
either way. A per-pixel model (a random forest, the linear model, an ensemble of them)
gives every view the same answer, so it never averages them unless asked.
"""

from __future__ import annotations

from typing import Any

from segpipe.models import ModelSpec
from segpipe.models.catalog import ENSEMBLE_ARCH, PER_PIXEL_ARCHITECTURES

__all__ = ["TTA_AUTO_PIXELS", "choose_tta", "parts", "per_pixel"]

# 4096 x 4096 px: 8 views of a ResNet-18 U-Net cost a few CPU-minutes there on 2 cores.
TTA_AUTO_PIXELS = 4096 * 4096


def choose_tta(tta: bool | None, spec: ModelSpec, height: int, width: int) -> tuple[bool, str]:
    """Whether to average the 8 views, and why.

    Args:
        tta: The user's choice (None: segpipe's rule above).
        spec: The model package's description.
        height: Rows predicted.
        width: Columns predicted.

    Returns:
        The decision and a few words for the log.
    """
    if tta is not None:
        return tta, "as asked"
    if per_pixel(spec):
        return False, "a per-pixel model gives every view the same answer"
    pixels = height * width
    within = pixels <= TTA_AUTO_PIXELS
    bound = f"{pixels / 1e6:.1f} Mpx, {'within' if within else 'over'} {TTA_AUTO_PIXELS / 1e6:.1f} Mpx"
    return within, f"a network on {bound}"


def parts(spec: ModelSpec) -> list[dict[str, Any]]:
    """The models a package combines (``arch`` and ``options`` each): an ensemble's members, else itself."""
    if spec.arch == ENSEMBLE_ARCH:
        return list((spec.options or {}).get("members", []))
    return [{"arch": spec.arch, "options": spec.options}]


def per_pixel(spec: ModelSpec) -> bool:
    """Whether the package classifies each pixel from its own values (and a fixed context) alone."""
    models = parts(spec)
    return bool(models) and all(m.get("arch") in PER_PIXEL_ARCHITECTURES for m in models)
