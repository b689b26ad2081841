"""Binary anomaly masks as compact PNG bytes (1 bit per pixel) and back."""

from __future__ import annotations

import cv2
import numpy as np

from hpad.errors import FrameError

_PNG_OPTIONS = [cv2.IMWRITE_PNG_BILEVEL, 1, cv2.IMWRITE_PNG_COMPRESSION, 9]


def encode_mask_png(mask: np.ndarray) -> bytes:
    """bool/0-1 [H, W] -> 1-bit grayscale PNG bytes (pixel value 255 = anomalous when decoded)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    ok, buf = cv2.imencode(".png", (mask > 0).astype(np.uint8) * 255, _PNG_OPTIONS)
    if not ok:  # pragma: no cover - cv2 encodes any non-empty uint8 2-D array
        raise RuntimeError("PNG encoding of mask failed")
    return buf.tobytes()


def decode_mask_png(data: bytes) -> np.ndarray:
    """PNG bytes -> bool [H, W]."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FrameError("bad_mask", "mask bytes are not a decodable PNG")
    return image > 127
