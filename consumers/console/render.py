"""Server-side overlay rendering: the frame with its anomaly mask, as JPEG.

The frame is decoded from its own bytes and content type (JPEG, PNG or raw pixels, the frame contract of
``README.md``; the console renders only frames a worker scored, so their headers passed the worker's size
checks; the size in the event is checked again before and after decoding; thumbnails of JPEGs are decoded at
1/2, 1/4 or 1/8 scale in the DCT domain), the event's mask (a 1-bit PNG at the frame's size, base64) is decoded with
`hpad.masks.decode_mask_png`, and anomalous pixels are tinted red (alpha ``TINT_ALPHA``) with a yellow
outline, so even a small defect stands out in a thumbnail. Pure functions; no torch.
"""

from __future__ import annotations

import base64
from typing import Any

import cv2
import numpy as np

from consumers.contract import Limits, parse_content_type
from hpad.errors import FrameError
from hpad.masks import decode_mask_png

TINT_ALPHA = 0.45
TINT_BGR = (40, 40, 255)
OUTLINE_BGR = (0, 230, 255)


_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def reduction(size: tuple[int, int] | None, max_side: int) -> int:
    """The largest JPEG DCT reduction (1, 2, 4 or 8) that still leaves at least ``max_side`` pixels."""
    if size is None:
        return 1
    return next((r for r in (8, 4, 2) if max(size) // r >= max_side), 1)


def decode_bgr(value: bytes, content_type: str, limits: Limits, reduce: int = 1) -> np.ndarray:
    """Frame bytes -> BGR uint8 [H, W, 3]; FrameError when they do not decode to a sane image. ``reduce`` (2, 4
    or 8) decodes a JPEG at that fraction of its size in the DCT domain (thumbnails); other kinds ignore it."""
    kind = parse_content_type(content_type)
    if kind.kind == "raw":
        assert kind.shape is not None
        h, w, c = kind.shape
        if h * w > limits.max_pixels or len(value) != h * w * c:
            raise FrameError("undecodable", f"raw frame of {len(value)} bytes does not match shape {kind.shape}")
        pixels = np.frombuffer(value, np.uint8).reshape(h, w, c)
        if c == 1:
            return cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
        code = {(3, "rgb"): cv2.COLOR_RGB2BGR, (4, "rgb"): cv2.COLOR_RGBA2BGR, (4, "bgr"): cv2.COLOR_BGRA2BGR}
        return pixels.copy() if (c, kind.order) == (3, "bgr") else cv2.cvtColor(pixels, code[(c, kind.order)])
    flag = _REDUCED.get(reduce, cv2.IMREAD_COLOR) if kind.kind == "jpeg" else cv2.IMREAD_COLOR
    image = cv2.imdecode(np.frombuffer(value, np.uint8), flag)
    if image is None:
        raise FrameError("undecodable", f"the frame is not a valid {kind.kind} image")
    if image.shape[0] * image.shape[1] > limits.max_pixels:
        raise FrameError("too_many_pixels", "the frame has more pixels than HPAD_MAX_PIXELS")
    return image


def event_mask(event: dict[str, Any] | None, size: tuple[int, int]) -> np.ndarray | None:
    """The event's mask as bool [H, W] at ``size`` = (height, width), or None when it carries none."""
    mask = (event or {}).get("mask")
    if not isinstance(mask, dict) or mask.get("encoding") != "png-1bit-base64":
        return None
    try:
        decoded = decode_mask_png(base64.b64decode(mask["data"], validate=True))
    except (FrameError, ValueError, KeyError, TypeError):
        return None
    if decoded.shape != size:  # a worker always sends the frame's size; be lenient with others
        decoded = cv2.resize(decoded.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 0
    return decoded


def overlay(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """BGR [H, W, 3] with anomalous pixels tinted and outlined (a copy; the input is not changed). The work is
    confined to the mask's bounding box (plus the outline), so a small defect costs little."""
    out = image.copy()
    if mask is None:
        return out
    m8 = mask.astype(np.uint8)
    x, y, w, h = cv2.boundingRect(m8)
    if w == 0 or h == 0:
        return out
    thickness = max(1, round(max(out.shape[:2]) / 300))
    pad = thickness + 1
    x0, y0 = max(0, x - pad), max(0, y - pad)
    x1, y1 = min(out.shape[1], x + w + pad), min(out.shape[0], y + h + pad)
    roi, inside = out[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    tint = np.empty_like(roi)
    tint[:] = TINT_BGR
    blended = cv2.addWeighted(roi, 1 - TINT_ALPHA, tint, TINT_ALPHA, 0)
    roi[inside] = blended[inside]
    contours, _ = cv2.findContours(m8[y0:y1, x0:x1], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))
    cv2.drawContours(out, contours, -1, OUTLINE_BGR, thickness)
    return out


def fit_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask scaled to ``size`` = (height, width); a pixel is set if any part of it was (small defects
    stay visible in thumbnails)."""
    if mask.shape == size:
        return mask
    return cv2.resize(mask.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_AREA) > 0


def fit(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def render_jpeg(value: bytes, content_type: str, event: dict[str, Any] | None, *, max_side: int,
                limits: Limits, with_mask: bool = True, quality: int = 85) -> bytes:
    """Frame (+ mask overlay) scaled to at most ``max_side`` pixels, JPEG bytes."""
    size = None
    if event and isinstance(event.get("height"), int) and isinstance(event.get("width"), int):
        size = (event["height"], event["width"])
        if size[0] * size[1] > limits.max_pixels:
            raise FrameError("too_many_pixels", "the frame has more pixels than HPAD_MAX_PIXELS")
    factor = reduction(size, max_side) if parse_content_type(content_type).kind == "jpeg" else 1
    image = decode_bgr(value, content_type, limits, factor)
    if size is not None and (abs(image.shape[0] * factor - size[0]) >= factor
                             or abs(image.shape[1] * factor - size[1]) >= factor):
        raise FrameError("undecodable", f"the frame is {image.shape[1]}x{image.shape[0]} (1/{factor}), its event "
                         f"says {size[1]}x{size[0]}")
    mask = event_mask(event, size or image.shape[:2]) if with_mask else None
    image = fit(image, max_side)  # scale first, then draw: outlines keep their width in a thumbnail
    if mask is not None:
        mask = fit_mask(mask, image.shape[:2])
    ok, buf = cv2.imencode(".jpg", overlay(image, mask), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - cv2 encodes any non-empty BGR image
        raise FrameError("undecodable", "JPEG encoding failed")
    return buf.tobytes()
