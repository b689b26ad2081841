"""OAGM stage 2: the six anomaly generators with exact masks, and their registry `GENERATORS`.

Each generator is ``(rng, image, region, params) -> (image, mask)``; sizes are relative to the object size
``sqrt(region area)``, centres are drawn from the region's pixels (preferring pixels far enough from its
edge) and every footprint is intersected with the region:

* ``noise``       - Gaussian or uniform noise in an irregular blob.
* ``perlin``      - a Perlin-noise-shaped blob (DRAEM style) filled with a contrasting Perlin-modulated texture.
* ``cutpaste``    - a rectangle (or thin "scar") cut from elsewhere in the same image, flipped/rotated,
                    colour-jittered and pasted inside the object (CutPaste).
* ``color_shift`` - a colour/intensity shift with soft edges inside an irregular blob.
* ``scratch``     - a thin cubic Bezier curve of contrasting intensity.
* ``missing``     - a blob filled with the background colour (a missing piece), or a contrasting hole.

Visibility: every intensity change is chosen away from clipping (darken bright pixels, brighten dark ones) with
a magnitude of at least ``min_contrast`` grey levels, so grayscale and low-contrast images get visible defects.
Exact masks: the mask is the set of pixels whose value changed by more than ``tolerance`` in any channel;
pixels that changed by less are restored, so outside the mask the output equals the input bit for bit. It is
always inside the region. Everything is deterministic for a given ``numpy.random.Generator`` state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

from hpad.errors import ConfigError
from hpad.frames import gray_or_rgb
from hpad.oagm.config import DefectParams
from hpad.oagm.noise import fractal_noise, perlin_noise
from hpad.oagm.shapes import Box, _blob_site, _box, _defect_size, _object_size, _sample_centre

# ============================================================================================== generator core


def _channels(image: np.ndarray) -> np.ndarray:
    return image[..., None] if image.ndim == 2 else image


def _local_mean(image: np.ndarray, box: Box, foot: np.ndarray) -> np.ndarray:
    """Mean colour [C] of the pixels of ``foot`` inside ``box`` (whole box when foot is empty)."""
    y0, y1, x0, x1 = box
    crop = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    sel = crop[foot] if foot.any() else crop.reshape(-1, crop.shape[-1])
    return sel.mean(axis=0)


def _away(rng: np.random.Generator, local: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Per-channel shift of magnitude in [lo, hi], signed away from clipping (darken bright, brighten dark)."""
    magnitude = rng.uniform(lo, hi, local.shape)
    return np.where(local > 127.5, -magnitude, magnitude).astype(np.float32)


def _finish(
    image: np.ndarray, box: Box, content: np.ndarray, alpha: np.ndarray, region: np.ndarray, tolerance: int
) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``content`` [h, w, C] (float, box-sized) into ``image`` with ``alpha`` [h, w] restricted to region.

    Returns (new image, exact mask): pixels changed by more than ``tolerance``; the others keep their input value.
    """
    y0, y1, x0, x1 = box
    src = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    alpha = (np.clip(alpha, 0.0, 1.0) * region[y0:y1, x0:x1]).astype(np.float32)[..., None]
    blended = np.clip(np.rint(src * (1.0 - alpha) + content.reshape(src.shape) * alpha), 0, 255)
    changed = (np.abs(blended - src) > tolerance).any(axis=-1)
    out = image.copy()
    out_c = _channels(out)
    out_c[y0:y1, x0:x1][changed] = blended[changed].astype(np.uint8)
    mask = np.zeros(region.shape, bool)
    mask[y0:y1, x0:x1] = changed
    return out, mask


def _restore(out: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Give a HxW / HxWx3 result the layout of the original frame (HxWx1, or HxWx4 with its alpha kept)."""
    if original.ndim == 3 and original.shape[2] == 1:
        return out[..., None]
    if original.ndim == 3 and original.shape[2] == 4:
        return np.dstack([out, original[..., 3]])
    return out


def _prepare(image: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = gray_or_rgb(image)
    region = np.asarray(region, bool)
    if region.shape != image.shape[:2]:
        raise ConfigError(f"region {region.shape} does not match image {image.shape[:2]}")
    if not region.any():
        region = np.ones(image.shape[:2], bool)
    return image, region


_GENERATOR_CONTRACT = """

    ``image``: uint8 HxW, HxWx1, HxWx3 or HxWx4; ``region``: bool [H, W] (empty = whole frame).
    Returns (uint8 image of the same shape, bool [H, W] mask of the pixels changed by more than
    ``params.tolerance``; non-empty, inside ``region``; the image equals the input outside it).
    """

GeneratorFn = Callable[[np.random.Generator, np.ndarray, np.ndarray, DefectParams], tuple[np.ndarray, np.ndarray]]


def _visible(func: GeneratorFn) -> GeneratorFn:
    """Validate inputs; retry a generator whose mask came out empty; last resort: a value-inverted blob."""

    def wrapper(rng: np.random.Generator, image: np.ndarray, region: np.ndarray,
                params: DefectParams | None = None) -> tuple[np.ndarray, np.ndarray]:
        params = params or DefectParams()
        original = image
        image, region = _prepare(image, region)
        for _ in range(4):
            out, mask = func(rng, image, region, params)
            if mask.any():
                return _restore(out, original), mask
        out, mask = _inverted_blob(rng, image, region, params)
        return _restore(out, original), mask

    wrapper.__name__ = wrapper.__qualname__ = func.__name__
    wrapper.__doc__ = (func.__doc__ or "") + _GENERATOR_CONTRACT
    return wrapper


def _inverted_blob(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, params: DefectParams
) -> tuple[np.ndarray, np.ndarray]:
    """Guaranteed-visible fallback: every pixel of a small blob moves by exactly 128 levels (v XOR 128)."""
    _, box, foot = _blob_site(rng, region, params, image.shape[:2])
    y0, y1, x0, x1 = box
    content = (_channels(image)[y0:y1, x0:x1] ^ np.uint8(128)).astype(np.float32)
    return _finish(image, box, content, foot.astype(np.float32), region, params.tolerance)


# ============================================================================================== generators


@_visible
def noise_patch(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, params: DefectParams
) -> tuple[np.ndarray, np.ndarray]:
    """Irregular blob of strong Gaussian noise (added) or uniform noise (replacing the pixels)."""
    _, box, foot = _blob_site(rng, region, params, image.shape[:2])
    y0, y1, x0, x1 = box
    src = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    shape = src.shape if rng.random() < 0.7 else (*src.shape[:2], 1)  # colour or luminance noise
    if rng.random() < 0.6:
        sigma = rng.uniform(params.min_contrast, 2.0 * params.min_contrast)
        content = src + rng.normal(0.0, sigma, shape).astype(np.float32)
    else:
        content = np.broadcast_to(rng.uniform(0.0, 255.0, shape), src.shape).astype(np.float32)
    return _finish(image, box, content, foot.astype(np.float32), region, params.tolerance)


@_visible
def perlin_blob(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, params: DefectParams
) -> tuple[np.ndarray, np.ndarray]:
    """Perlin-shaped blob (thresholded noise under a radial envelope) filled with a contrasting texture."""
    size = 1.3 * _defect_size(rng, region, params)
    cy, cx = _sample_centre(rng, region, size / 3)
    box = _box(cy, cx, size / 2, size / 2, image.shape[:2])
    y0, y1, x0, x1 = box
    bh, bw = y1 - y0, x1 - x0
    res = (int(rng.integers(2, 5)), int(rng.integers(2, 5)))
    noise = perlin_noise(rng, (bh, bw), res)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (size / 2) ** 2
    field_ = noise + 1.5 * np.clip(1.0 - r2, 0.0, 1.0)
    inside = r2 < 1.0
    coverage = rng.uniform(0.3, 0.6)
    threshold = np.quantile(field_[inside], 1.0 - coverage) if inside.any() else 0.0
    foot = (field_ > threshold) & inside
    foot[cy - y0, cx - x0] = True
    src = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    local = _local_mean(image, box, foot & region[y0:y1, x0:x1])
    beta = rng.uniform(0.6, 1.0)
    base = local + _away(rng, local, params.min_contrast / beta, 2.2 * params.min_contrast / beta)
    detail = fractal_noise(rng, (bh, bw), (int(rng.integers(2, 6)),) * 2)[..., None]
    content = base + rng.uniform(10.0, 30.0) * detail
    content = src * (1.0 - beta) + content * beta
    alpha = cv2.GaussianBlur(foot.astype(np.float32), (0, 0), max(0.5, size / 60))
    return _finish(image, box, content, np.maximum(alpha, foot), region, params.tolerance)


@_visible
def cutpaste(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, params: DefectParams
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: a rectangle or thin scar cut from the image (75 %: from the object), flipped/rotated, colour
    jittered and pasted on the object."""
    h, w = image.shape[:2]
    size = _defect_size(rng, region, params)
    if rng.random() < 0.7:  # rectangle, aspect ratio 0.3 .. 3.3
        ratio = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
        ph, pw = size * math.sqrt(ratio), size / math.sqrt(ratio)
    else:  # scar: long and thin
        ph, pw = size * rng.uniform(1.0, 1.6), max(2.0, size * rng.uniform(0.08, 0.2))
    ph, pw = int(min(h, max(2, round(ph)))), int(min(w, max(2, round(pw))))
    if rng.random() < 0.75 and not region.all():  # mostly cut from the object itself, else from anywhere
        sy, sx = _sample_centre(rng, region, 0.0)
        sy, sx = min(max(0, sy - ph // 2), h - ph), min(max(0, sx - pw // 2), w - pw)
    else:
        sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = _channels(image)[sy : sy + ph, sx : sx + pw].astype(np.float32)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1]
    if rng.random() < 0.5:  # a scar is pasted at a random angle
        patch = np.ascontiguousarray(np.rot90(patch))
        ph, pw = pw, ph
    gain, bias = rng.uniform(0.75, 1.25), rng.uniform(-20.0, 20.0)
    patch = patch.mean(axis=(0, 1)) + (patch - patch.mean(axis=(0, 1))) * gain + bias
    cy, cx = _sample_centre(rng, region, min(ph, pw) / 2)
    ty, tx = cy - ph // 2, cx - pw // 2
    y0, x0 = max(0, ty), max(0, tx)
    y1, x1 = min(h, ty + ph), min(w, tx + pw)
    box = (y0, y1, x0, x1)
    content = patch[y0 - ty : y1 - ty, x0 - tx : x1 - tx]
    src = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    sel = region[y0:y1, x0:x1]
    if sel.any() and float(np.abs(content - src)[sel].mean()) < params.min_contrast:
        # pasted texture too similar to the target: drop its mean offset, shift it away from clipping
        local = src[sel].mean(axis=0)
        offset = (content - src)[sel].mean(axis=0)
        content = content - offset + _away(rng, local, params.min_contrast, 1.5 * params.min_contrast)
    return _finish(image, box, content, np.ones(content.shape[:2], np.float32), region, params.tolerance)


@_visible
def color_shift(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, params: DefectParams
) -> tuple[np.ndarray, np.ndarray]:
    """Colour / intensity shift (plus a contrast change) with soft edges inside an irregular blob."""
    size, box, foot = _blob_site(rng, region, params, image.shape[:2])
    y0, y1, x0, x1 = box
    src = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    local = _local_mean(image, box, foot & region[y0:y1, x0:x1])
    shift = _away(rng, local, 0.3 * params.min_contrast, 2.0 * params.min_contrast)
    peak = int(np.argmax(np.abs(shift)))  # at least one channel moves by >= 1.25 x min_contrast
    shift[peak] = math.copysign(max(abs(float(shift[peak])), 1.25 * params.min_contrast), float(shift[peak]))
    if src.shape[-1] > 1 and rng.random() < 0.5:  # sometimes a pure luminance shift
        shift[:] = shift[peak]
    gain = rng.uniform(0.7, 1.3)
    content = local + (src - local) * gain + shift
    alpha = cv2.GaussianBlur(foot.astype(np.float32), (0, 0), max(0.5, size / 25))
    alpha = np.clip(alpha * 1.5, 0.0, 1.0)
    return _finish(image, box, content, alpha, region, params.tolerance)


def _bezier(p: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3]


@_visible
def scratch(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, params: DefectParams
) -> tuple[np.ndarray, np.ndarray]:
    """Thin cubic Bezier scratch of contrasting intensity (dark on bright surfaces, bright on dark ones)."""
    h, w = image.shape[:2]
    extent = _object_size(region)
    length = _defect_size(rng, region, params) * rng.uniform(1.2, 2.0)
    cy, cx = _sample_centre(rng, region, 0.0)
    angle = rng.uniform(0.0, np.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    start = np.array([cx, cy], float) - 0.5 * length * direction
    controls = [start + f * length * direction + rng.uniform(-0.25, 0.25) * length * normal for f in (1 / 3, 2 / 3)]
    points = _bezier(np.stack([start, *controls, start + length * direction]), 64)
    thickness = max(1, round(extent * rng.uniform(0.006, 0.018)))
    reach = length / 2 + 0.25 * length + thickness + 2
    box = _box(cy, cx, reach, reach, (h, w))
    y0, y1, x0, x1 = box
    foot = np.zeros((y1 - y0, x1 - x0), np.uint8)
    pts = np.rint((points - [x0, y0]) * 16).astype(np.int32)
    cv2.polylines(foot, [pts], False, 1, thickness=thickness, lineType=cv2.LINE_8, shift=4)
    foot = foot.astype(bool)
    src = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    local = _local_mean(image, box, foot & region[y0:y1, x0:x1])
    lum = float(local.mean())
    value = rng.uniform(0.0, 45.0) if lum > 127.5 else rng.uniform(210.0, 255.0)
    if abs(value - lum) < params.min_contrast:  # mid-grey surface: go to the far extreme
        value = 0.0 if lum > 127.5 else 255.0
    content = np.full_like(src, value) + rng.normal(0.0, 6.0, src.shape[:2])[..., None].astype(np.float32)
    return _finish(image, box, content, foot.astype(np.float32), region, params.tolerance)


@_visible
def missing_part(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, params: DefectParams
) -> tuple[np.ndarray, np.ndarray]:
    """A piece missing: blob filled with the background (colour + texture of pixels outside the region).

    On a full-frame region, or when background and object look alike, a contrasting hole instead.
    """
    size, box, foot = _blob_site(rng, region, params, image.shape[:2])
    y0, y1, x0, x1 = box
    src = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    local = _local_mean(image, box, foot & region[y0:y1, x0:x1])
    outside = _channels(image)[~region]
    fill: np.ndarray | None = None
    noise_sd = 4.0
    if len(outside) >= 16:
        sample = outside[rng.integers(0, len(outside), min(len(outside), 4096))].astype(np.float32)
        background = np.median(sample, axis=0)
        if float(np.abs(background - local).max()) >= params.min_contrast:
            fill = background
            noise_sd = float(np.clip(sample.std(axis=0).mean(), 1.0, 12.0))
    if fill is None:
        fill = local + _away(rng, local, params.min_contrast, 2.5 * params.min_contrast)
    content = fill + rng.normal(0.0, noise_sd, src.shape).astype(np.float32)
    alpha = cv2.GaussianBlur(foot.astype(np.float32), (0, 0), max(0.5, size / 60))
    return _finish(image, box, content, np.maximum(alpha, foot), region, params.tolerance)


GENERATORS: dict[str, GeneratorFn] = {
    "noise": noise_patch,
    "perlin": perlin_blob,
    "cutpaste": cutpaste,
    "color_shift": color_shift,
    "scratch": scratch,
    "missing": missing_part,
}
