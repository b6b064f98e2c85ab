"""A deterministic synthetic land-cover scene, computed block by block.

Every pixel is a pure function of its global (row, column) and the seed, so any
window of an arbitrarily large scene can be generated on its own, in any order,
and two windows always agree where they overlap.

The scene is built so that spatial context matters. Classes come in pairs that
share the same spectral mean *and* the same per-pixel value distribution, and
differ only in how their pixels are arranged:

- forest (canopy blobs a few pixels wide) vs grassland (pixel-scale speckle);
- cropland (oriented rows) vs built-up (a checkerboard of blocks).

A per-pixel classifier cannot tell the members of a pair apart; a convolutional
network that sees a neighbourhood can. Water and bare soil are spectrally distinct.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segpipe.types import ClassInfo

__all__ = ["SCENE_CLASSES", "SceneSpec", "class_block", "hash_uniform", "image_block", "nodata_block"]

SCENE_CLASSES = (
    ClassInfo(1, "water", "#1f77b4"),
    ClassInfo(2, "forest", "#1f7a1f"),
    ClassInfo(3, "grassland", "#98df8a"),
    ClassInfo(4, "cropland", "#e8c547"),
    ClassInfo(5, "built-up", "#d62728"),
    ClassInfo(6, "bare soil", "#8c564b"),
)

IMAGE_NODATA = 0


@dataclass(frozen=True)
class SceneSpec:
    """Parameters of a synthetic scene.

    Attributes:
        size: Edge of the (square) scene in pixels.
        bands: Number of spectral bands.
        seed: Seed of every random field.
        region_scale: Typical size of a land-cover patch in pixels.
    """

    size: int = 2048
    bands: int = 4
    seed: int = 0
    region_scale: int = 192


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def hash_bits(iy: np.ndarray, ix: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Well-mixed uint64 bits hashed from integer lattice coordinates (splitmix64's finaliser)."""
    # Broadcastable (h, 1) and (1, w) coordinates are hashed as the full grid they span,
    # with the row and column terms computed once each; the mixing runs in place (one
    # scratch array), as the per-pixel hashes are a large part of a synthetic scene's cost.
    with np.errstate(over="ignore"):
        z = (iy.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
            (ix.astype(np.uint64) + np.uint64(0x632BE59BD9B4E019)) * np.uint64(0xD6E8FEB86659FD93)
        )
        z ^= np.uint64((seed * 1_000_003 + salt * 7919) & 0xFFFFFFFFFFFF) * np.uint64(0xA0761D6478BD642F)
        scratch = np.empty_like(z)
        for shift, mult in ((30, _M1), (27, _M2), (31, None)):
            np.right_shift(z, np.uint64(shift), out=scratch)
            z ^= scratch
            if mult is not None:
                z *= mult
    return z


def hash_uniform(iy: np.ndarray, ix: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Uniform [0, 1) float64 values hashed from integer lattice coordinates (53 bits each)."""
    z = hash_bits(iy, ix, seed, salt)
    z >>= np.uint64(11)
    out = z.astype(np.float64)
    out *= 1.0 / (1 << 53)
    return out


def _hash_normal(iy: np.ndarray, ix: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Approximately Gaussian float32 values (mean 0, variance 1/4): a sum of three uniforms minus 1.5.

    The three uniforms are three 21-bit fields of one hash, so a pixel costs one hash
    rather than three (the noise's resolution, 2**-21, is far below a DN).
    """
    z = hash_bits(iy, ix, seed, salt)
    mask = np.uint64((1 << 21) - 1)
    total = z & mask
    total += (z >> np.uint64(21)) & mask
    total += (z >> np.uint64(42)) & mask
    out = total.astype(np.float32)
    out *= np.float32(1.0 / (1 << 21))
    out -= np.float32(1.5)
    return out


def _value_noise(ys: np.ndarray, xs: np.ndarray, scale: float, seed: int, salt: int) -> np.ndarray:
    """Smooth float32 noise in [0, 1): hashed lattice values every ``scale`` px, smoothstep-interpolated.

    Only the lattice points the window needs are hashed, then gathered: hashing
    every pixel four times would dominate the cost of large scenes. The per-pixel
    arithmetic runs in float32 (memory traffic is its cost; the fields only decide
    which class wins where, and smooth noise has no use for 53 bits).
    """
    gy = ys / scale
    gx = xs / scale
    iy = np.floor(gy).astype(np.int64)
    ix = np.floor(gx).astype(np.int64)
    ty = gy - iy
    tx = gx - ix
    fy = (ty * ty * (3 - 2 * ty)).astype(np.float32)[:, None]
    fx = (tx * tx * (3 - 2 * tx)).astype(np.float32)[None, :]
    ly = np.arange(iy.min(), iy.max() + 2)
    lx = np.arange(ix.min(), ix.max() + 2)
    offset = 1 << 20  # keep lattice indices non-negative
    lattice = hash_uniform((ly + offset)[:, None], (lx + offset)[None, :], seed, salt).astype(np.float32)
    ry = iy - ly[0]
    rx = ix - lx[0]
    # Interpolated along x once per lattice row (few rows), then each pixel row is its
    # lattice row plus a share of the step to the next: two gathers and an in-place
    # multiply-add over the window, rather than interpolating four corners per pixel.
    left = lattice[:, rx]
    rows = left + (lattice[:, rx + 1] - left) * fx
    steps = np.diff(rows, axis=0)
    out: np.ndarray = steps[ry]
    out *= fy
    out += rows[ry]
    return out


def _coords(y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(y0, y0 + h, dtype=np.float64), np.arange(x0, x0 + w, dtype=np.float64)


def nodata_block(spec: SceneSpec, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """True where the scene has no data: a triangle cut off the top-left corner.

    Real scenes have nodata borders; this one exercises that path everywhere.
    """
    ys, xs = _coords(y0, x0, h, w)
    cut = spec.size * 0.18
    return (ys[:, None] + xs[None, :]) < cut  # type: ignore[no-any-return]


def class_block(spec: SceneSpec, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Dense land-cover classes (values 1-6) of a window; 0 where the scene has no data."""
    ys, xs = _coords(y0, x0, h, w)
    s = spec.region_scale
    fields = np.empty((len(SCENE_CLASSES), h, w), dtype=np.float32)
    for k, field in enumerate(fields):
        # Fractal sum of value noise: large patches with irregular, natural edges.
        field[...] = _value_noise(ys, xs, s, spec.seed, 100 + k)
        for octave, weight, salt in ((3.0, 0.45, 200), (9.0, 0.2, 300)):
            detail = _value_noise(ys, xs, s / octave, spec.seed, salt + k)
            detail *= np.float32(weight)
            field += detail
    classes: np.ndarray = (np.argmax(fields, axis=0) + 1).astype(np.uint8)
    classes[nodata_block(spec, y0, x0, h, w)] = 0
    return classes


def _spectra(bands: int) -> np.ndarray:
    """Mean digital numbers of each class (rows) in each band (columns)."""
    t = np.linspace(0.0, 1.0, bands) if bands > 1 else np.array([0.5])
    red_edge = 1.0 / (1.0 + np.exp(-(t - 0.84) * 18.0))  # vegetation: dark in red, bright in NIR
    water = 700 - 350 * t
    vegetation = 900 + 250 * t + 1500 * red_edge
    man_made = 1500 + 350 * t + 250 * red_edge
    soil = 2000 + 900 * t
    # Pairs share spectra on purpose: only their texture tells them apart.
    return np.stack([water, vegetation, vegetation, man_made, man_made, soil])


_TEXTURED = (2, 3, 4, 5)  # the classes :func:`_texture` gives a pattern (paired classes)


def _texture(spec: SceneSpec, k: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """A +-1 pattern for class value ``k``; pairs have the same 50/50 marginal."""
    yy = ys[:, None]
    xx = xs[None, :]
    h, w = ys.size, xs.size
    if k == 2:  # forest: canopy blobs ~4 px across
        return np.where(_value_noise(ys, xs, 4.0, spec.seed, 400) > 0.5, 1.0, -1.0)
    if k == 3:  # grassland: independent per-pixel speckle
        speckle = hash_uniform(yy.astype(np.int64), xx.astype(np.int64), spec.seed, 401)
        return np.where(speckle > 0.5, 1.0, -1.0)
    if k == 4:  # cropland: rows 8 px apart, one direction per 128 px parcel
        cy = (yy // 128).astype(np.int64)
        cx = (xx // 128).astype(np.int64)
        # One hash (and one cosine and sine) per parcel, spread to its pixels.
        py, px = np.unique(cy, return_inverse=True), np.unique(cx, return_inverse=True)
        angle = np.pi * hash_uniform(py[0][:, None], px[0][None, :], spec.seed, 402)
        rows, cols = py[1].reshape(-1), px[1].reshape(-1)
        cos = np.cos(angle).astype(np.float32)[rows][:, cols]
        sin = np.sin(angle).astype(np.float32)[rows][:, cols]
        # Local coordinates keep the rows straight: a direction that varies over global
        # coordinates would bend them into moire far from the origin.
        cos *= ((xx - cx * 128) / 8.0).astype(np.float32)
        sin *= ((yy - cy * 128) / 8.0).astype(np.float32)
        phase = cos + sin
        return np.where((phase - np.floor(phase)) < 0.5, 1.0, -1.0)
    if k == 5:  # built-up: a checkerboard of 8 px blocks (coarser than the crop rows)
        return np.broadcast_to(np.where(((yy // 8) + (xx // 8)) % 2 == 0, 1.0, -1.0), (h, w))
    return np.zeros((h, w))


def image_block(
    spec: SceneSpec, y0: int, x0: int, h: int, w: int, classes: np.ndarray | None = None
) -> np.ndarray:
    """The (band, y, x) uint16 image of a window; 0 (nodata) outside the scene footprint.

    ``classes`` may pass the window's :func:`class_block` when the caller has it already.
    """
    ys, xs = _coords(y0, x0, h, w)
    if classes is None:
        classes = class_block(spec, y0, x0, h, w)
    spectra = _spectra(spec.bands)
    # Slow illumination changes across the scene, so absolute levels are not a cue.
    light = 1.0 + 0.10 * (_value_noise(ys, xs, spec.region_scale * 4.0, spec.seed, 500) - 0.5)
    # Each pixel's texture factor (1 for untextured classes), then per band its class's
    # mean looked up by class value: whole-window passes rather than one scatter per
    # class and band.
    factor = np.ones((h, w), dtype=np.float32)
    for k in _TEXTURED:
        mask = classes == k
        if mask.any():
            factor[mask] = 1.0 + 0.16 * _texture(spec, k, ys, xs)[mask]
    factor *= light
    means = np.zeros((spec.bands, 256), dtype=np.float32)
    means[:, 1 : len(SCENE_CLASSES) + 1] = spectra.T
    out = means[:, classes]
    out *= factor
    iy = ys[:, None].astype(np.int64)
    ix = xs[None, :].astype(np.int64)
    for b in range(spec.bands):
        # Sensor noise: approximately Gaussian (sum of 3 uniforms), band-independent.
        noise = _hash_normal(iy, ix, spec.seed, 600 + 3 * b)
        noise *= np.float32(0.09 * spectra[:, b].mean())
        out[b] += noise
    np.rint(out, out=out)
    np.clip(out, 1, 65535, out=out)
    image = out.astype(np.uint16)
    image[:, classes == 0] = IMAGE_NODATA
    return image
