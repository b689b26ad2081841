"""The frame contract of the library: which pixel arrays hpad accepts, checked in one place.

A frame is a non-empty uint8 numpy array of shape HxW (grayscale), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA). The
scorer (`hpad.scorer.frame_to_chw`) and OAGM (`hpad.oagm`) both validate with `check_frame`; anything else is
refused with ``FrameError("bad_image", ...)`` saying what was wrong.
"""

from __future__ import annotations

import numpy as np

from hpad.errors import FrameError

__all__ = ["check_frame", "gray_or_rgb"]


def check_frame(frame: object) -> np.ndarray:
    """A valid frame (uint8 HxW / HxWx1 / HxWx3 / HxWx4, H and W >= 1) is returned as it is; anything else
    raises ``FrameError("bad_image", ...)``."""
    if not isinstance(frame, np.ndarray):
        raise FrameError("bad_image", f"expected a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise FrameError("bad_image", f"expected uint8 pixels, got {frame.dtype}")
    channels_ok = frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (1, 3, 4))
    if not channels_ok or min(frame.shape[:2]) < 1:
        raise FrameError("bad_image", f"expected HxW, HxWx1, HxWx3 or HxWx4 pixels, got shape {frame.shape}")
    return frame


def gray_or_rgb(frame: object) -> np.ndarray:
    """A valid frame -> uint8 HxW (from HxW or HxWx1) or HxWx3 (from HxWx3, or HxWx4 with alpha dropped): views."""
    frame = check_frame(frame)
    if frame.ndim == 3 and frame.shape[2] == 1:
        return frame[:, :, 0]
    if frame.ndim == 3 and frame.shape[2] == 4:
        return frame[:, :, :3]
    return frame
