"""OAGM synthesis: one or several anomalies on normal images (`synthesize`, `synthesize_many`).

Draws ``min_defects..max_defects`` generators by weight (`OAGMConfig.generators`), applies them in turn inside
the object region and returns the image with the exact mask of the changed pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hpad.errors import ConfigError
from hpad.frames import gray_or_rgb
from hpad.oagm.config import OAGMConfig, ObjectRegion, Synthetic
from hpad.oagm.generators import GENERATORS, _inverted_blob, _restore


def _region_array(region: ObjectRegion | np.ndarray) -> np.ndarray:
    return region.mask if isinstance(region, ObjectRegion) else np.asarray(region, bool)


def synthesize(
    rng: np.random.Generator, image: np.ndarray, region: ObjectRegion | np.ndarray, config: OAGMConfig | None = None
) -> Synthetic:
    """One synthetic anomaly on a normal image.

    ``image``: uint8 HxW, HxWx1, HxWx3 or HxWx4 (alpha kept unchanged); ``region``: bool [H, W] or ObjectRegion.
    Draws ``min_defects..max_defects`` generators by weight and applies them in turn, inside the region (or
    anywhere when ``config.on_object`` is False). Returns the image, the exact changed-pixel mask (non-empty)
    and the generator names joined with "+".
    """
    config = config or OAGMConfig()
    original = image
    image = gray_or_rgb(image)
    area = np.asarray(_region_array(region), bool)
    if area.shape != image.shape[:2]:
        raise ConfigError(f"region {area.shape} does not match image {image.shape[:2]}")
    if not config.on_object or not area.any():
        area = np.ones(image.shape[:2], bool)
    names = [n for n, _ in config.generators]
    weights = np.array([w for _, w in config.generators], float)
    weights /= weights.sum()
    tol = config.defect.tolerance
    for _ in range(config.max_tries):
        count = int(rng.integers(config.min_defects, config.max_defects + 1))
        chosen = [names[int(i)] for i in rng.choice(len(names), size=count, p=weights)]
        out = image
        for name in chosen:
            out, _ = GENERATORS[name](rng, out, area, config.defect)
        diff = np.abs(out.astype(np.int16) - image.astype(np.int16))
        mask = (diff > tol).any(axis=-1) if diff.ndim == 3 else diff > tol
        if mask.any():
            final = np.where(mask[..., None] if image.ndim == 3 else mask, out, image)
            return Synthetic(_restore(final.astype(np.uint8), original), mask, "+".join(chosen))
    out, mask = _inverted_blob(rng, image, area, config.defect)
    return Synthetic(_restore(out, original), mask, "inverted")


def synthesize_many(
    rng: np.random.Generator, images: Sequence[np.ndarray], regions: Sequence[ObjectRegion | np.ndarray],
    n: int, config: OAGMConfig | None = None,
) -> list[Synthetic]:
    """``n`` anomalies, cycling over the k normal images (image i % k with region i % k)."""
    if len(images) != len(regions):
        raise ConfigError(f"{len(images)} images but {len(regions)} regions")
    if n > 0 and not images:
        raise ConfigError("synthesize_many needs at least one normal image")
    return [synthesize(rng, images[i % len(images)], regions[i % len(images)], config) for i in range(n)]
