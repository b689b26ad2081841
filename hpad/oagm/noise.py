"""Procedural noise for the OAGM generators: 2-D Perlin gradient noise and its fractal (multi-octave) sum.

Vectorised numpy, any output size, deterministic for a given ``numpy.random.Generator`` state.
"""

from __future__ import annotations

import numpy as np


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(rng: np.random.Generator, shape: tuple[int, int], res: tuple[int, int]) -> np.ndarray:
    """2-D gradient (Perlin) noise, float32 [H, W] in about [-1, 1]; ``res`` = (cells along H, cells along W).

    Vectorised: random unit gradients on a (res+1) lattice, dot products with the offsets to the 4 corners,
    quintic fade interpolation. Any H, W (not only multiples of res).
    """
    h, w = shape
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    angles = rng.uniform(0.0, 2.0 * np.pi, (ry + 1, rx + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    y = (np.arange(h) + 0.5) * (ry / h)
    x = (np.arange(w) + 0.5) * (rx / w)
    yi, xi = np.minimum(y.astype(int), ry - 1), np.minimum(x.astype(int), rx - 1)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]

    def corner(oy: int, ox: int) -> np.ndarray:
        iy, ix = (yi + oy)[:, None], (xi + ox)[None, :]
        return gy[iy, ix] * (yf - oy) + gx[iy, ix] * (xf - ox)

    u, v = _fade(xf), _fade(yf)
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return (np.sqrt(2.0) * (top * (1 - v) + bottom * v)).astype(np.float32)


def fractal_noise(
    rng: np.random.Generator, shape: tuple[int, int], res: tuple[int, int], octaves: int = 3
) -> np.ndarray:
    """Sum of Perlin octaves (frequency x2, amplitude x0.5), normalised to about [-1, 1]: float32 [H, W]."""
    total = np.zeros(shape, np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        scale = 2**octave
        total += amplitude * perlin_noise(rng, shape, (res[0] * scale, res[1] * scale))
        norm += amplitude
        amplitude *= 0.5
    return total / norm
