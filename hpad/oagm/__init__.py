"""Object-Attention Anomaly Generation Module (OAGM): synthetic anomalies on the object, with exact masks.

Chen et al. 2024 train prompts from k normal images only. With no real anomalies at training time, OAGM
synthesises them, and it puts them **on the object**: anomalies pasted on the background teach the prompts
nothing about the product. Every synthetic image comes with the exact mask of the pixels that were changed.

Two stages, one module each, plus configuration and a contact sheet:

* `hpad.oagm.config` - `OAGMConfig` (generator weights, defects per image), `RegionParams`, `DefectParams`, and
  the `ObjectRegion` / `Synthetic` results.
* `hpad.oagm.region` - **1. object region** (`object_masks`): the frozen model's saliency (`feature_saliency`,
  `cls_attention`) fused with a colour cue (`colour_cue`), thresholded to a mask, with a full-frame fallback
  for texture-like images.
* `hpad.oagm.generators` - **2. generators** (`GENERATORS`): noise, perlin, cutpaste, color_shift, scratch,
  missing; each returns the image and the exact mask of the pixels it changed, always inside the region.
  Built on `hpad.oagm.noise` (Perlin / fractal noise) and `hpad.oagm.shapes` (boxes, blobs, centres).
* `hpad.oagm.synthesis` - `synthesize` / `synthesize_many`: draw generators by weight and apply them.
* `hpad.oagm.sheet` - `render_sheet`: the contact sheet ``hpad oagm`` writes (image, region, anomaly, mask).

Every public name of the submodules is importable from ``hpad.oagm``.
"""

from __future__ import annotations

from hpad.oagm.config import DEFAULT_WEIGHTS, DefectParams, OAGMConfig, ObjectRegion, RegionParams, Synthetic
from hpad.oagm.generators import (
    GENERATORS,
    GeneratorFn,
    color_shift,
    cutpaste,
    missing_part,
    noise_patch,
    perlin_blob,
    scratch,
)
from hpad.oagm.noise import fractal_noise, perlin_noise
from hpad.oagm.region import (
    RING_FRACTION,
    Cue,
    block_cls_attention,
    border_ring,
    cls_attention,
    colour_cue,
    feature_saliency,
    feature_saliency_tensor,
    fuse_saliency,
    last_block_input,
    model_saliency,
    object_masks,
    object_region,
    region_from_saliency,
    reliability,
)
from hpad.oagm.sheet import SheetRow, render_sheet
from hpad.oagm.synthesis import synthesize, synthesize_many

__all__ = [
    "DEFAULT_WEIGHTS",
    "GENERATORS",
    "RING_FRACTION",
    "Cue",
    "DefectParams",
    "GeneratorFn",
    "OAGMConfig",
    "ObjectRegion",
    "RegionParams",
    "SheetRow",
    "Synthetic",
    "block_cls_attention",
    "border_ring",
    "cls_attention",
    "color_shift",
    "colour_cue",
    "cutpaste",
    "feature_saliency",
    "feature_saliency_tensor",
    "fractal_noise",
    "fuse_saliency",
    "last_block_input",
    "missing_part",
    "model_saliency",
    "noise_patch",
    "object_masks",
    "object_region",
    "perlin_blob",
    "perlin_noise",
    "region_from_saliency",
    "reliability",
    "render_sheet",
    "scratch",
    "synthesize",
    "synthesize_many",
]
