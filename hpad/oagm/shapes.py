"""Geometry for the OAGM generators: defect boxes and sizes, centres inside the region, irregular blobs.

Sizes are relative to the object size ``sqrt(region area)``; centres are drawn from the region's pixels,
preferring pixels far enough from its edge.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from hpad.oagm.config import DefectParams

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (exclusive ends)


def _box(cy: int, cx: int, half_h: float, half_w: float, shape: tuple[int, int]) -> Box:
    h, w = shape
    y0, y1 = max(0, math.floor(cy - half_h)), min(h, math.ceil(cy + half_h) + 1)
    x0, x1 = max(0, math.floor(cx - half_w)), min(w, math.ceil(cx + half_w) + 1)
    return y0, y1, x0, x1


def _object_size(region: np.ndarray) -> float:
    return max(4.0, math.sqrt(float(region.sum())))


def _defect_size(rng: np.random.Generator, region: np.ndarray, params: DefectParams) -> float:
    lo, hi = params.size_range
    return max(3.0, _object_size(region) * float(rng.uniform(lo, hi)))


def _sample_centre(rng: np.random.Generator, region: np.ndarray, radius: float) -> tuple[int, int]:
    """A pixel of ``region``, preferably at least ``radius/2`` from its edge (never outside it)."""
    dist = cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    need = min(0.5 * radius, 0.6 * float(dist.max()))
    candidates = np.flatnonzero(dist >= need)
    if candidates.size == 0:
        candidates = np.flatnonzero(region)
    index = int(candidates[int(rng.integers(candidates.size))])
    return divmod(index, region.shape[1])


def _irregular_blob(rng: np.random.Generator, cy: int, cx: int, size: float, shape: tuple[int, int]) -> tuple[Box, np.ndarray]:
    """Irregular filled polygon (ellipse with a wobbly radius) around (cy, cx): box + bool footprint in it."""
    a = 0.5 * size * rng.uniform(0.6, 1.0)
    b = a * rng.uniform(0.35, 1.0)
    theta = rng.uniform(0.0, np.pi)
    angles = np.linspace(0.0, 2.0 * np.pi, 24, endpoint=False)
    wobble = np.ones_like(angles)
    for freq in (2, 3, 5):
        wobble += rng.uniform(0.0, 0.25 / freq * 2) * np.sin(freq * angles + rng.uniform(0, 2 * np.pi))
    ex, ey = a * np.cos(angles) * wobble, b * np.sin(angles) * wobble
    px = cx + ex * np.cos(theta) - ey * np.sin(theta)
    py = cy + ex * np.sin(theta) + ey * np.cos(theta)
    reach = float(max(np.abs(px - cx).max(), np.abs(py - cy).max())) + 1
    box = _box(cy, cx, reach, reach, shape)
    y0, _, x0, _ = box
    foot = np.zeros((box[1] - y0, box[3] - x0), np.uint8)
    pts = np.stack([px - x0, py - y0], axis=1)
    cv2.fillPoly(foot, [np.rint(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    foot[min(cy - y0, foot.shape[0] - 1), min(cx - x0, foot.shape[1] - 1)] = 1
    return box, foot.astype(bool)


def _blob_site(
    rng: np.random.Generator, region: np.ndarray, params: DefectParams, shape: tuple[int, int]
) -> tuple[float, Box, np.ndarray]:
    """A defect size and an irregular blob of that size centred in the region: (size, box, bool footprint)."""
    size = _defect_size(rng, region, params)
    cy, cx = _sample_centre(rng, region, size / 2)
    box, foot = _irregular_blob(rng, cy, cx, size, shape)
    return size, box, foot
