"""High-resolution synthetic frames for the tiling tests and benchmark: a fine woven texture (what an
area-scan camera sees of fabric, a machined surface or a web) with small dark spots as defects.

    rng = np.random.default_rng(0)
    frame = woven_frame(rng, (3000, 4000))
    bad, mask = add_spots(rng, frame, count=3, radius=20)

Grayscale uint8 [H, W] (the scorer replicates it to RGB); a 4000x3000 frame takes about 0.2 s.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["add_spots", "woven_frame"]


def woven_frame(rng: np.random.Generator, size: tuple[int, int], period: tuple[int, int] = (24, 32)) -> np.ndarray:
    """A texture of ``size`` (height, width): two crossing sinusoids (periods in pixels), a slow illumination
    gradient and pixel noise. Frames of one ``period`` look alike wherever they are cut."""
    h, w = size
    phase = rng.uniform(0, 2 * np.pi, 2)
    ys = np.sin(2 * np.pi * np.arange(h) / period[0] + phase[0]).astype(np.float32)
    xs = np.sin(2 * np.pi * np.arange(w) / period[1] + phase[1]).astype(np.float32)
    light = np.linspace(-12, 12, w, dtype=np.float32)[None, :]
    base = 128 + 28 * ys[:, None] + 28 * xs[None, :] + light
    noise = rng.integers(-12, 13, size=(h, w), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def add_spots(rng: np.random.Generator, frame: np.ndarray, count: int, radius: int,
              margin: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """``count`` dark discs of ``radius`` pixels at random places -> (frame with spots, bool mask [H, W])."""
    out = frame.copy()
    mask = np.zeros(frame.shape[:2], np.uint8)
    h, w = frame.shape[:2]
    for _ in range(count):
        centre = (int(rng.integers(margin, w - margin)), int(rng.integers(margin, h - margin)))
        cv2.circle(out, centre, radius, 25, thickness=-1)
        cv2.circle(mask, centre, radius, 1, thickness=-1)
    return out, mask.astype(bool)
