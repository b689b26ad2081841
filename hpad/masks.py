"""Binary anomaly masks as compact PNG bytes (1 bit per pixel) and back.

`encode_mask_png` takes a boolean array; `encode_packed_mask_png` takes rows already packed 8 pixels a byte
(most significant bit first, as a 1-bit PNG stores them), which is what the scorer copies back from a GPU
(`hpad.scorer.pack_mask_bits`): 1/32 of a float map's bytes, and no repacking on the host.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

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


@dataclass(frozen=True)
class PackedMask:
    """A binary mask as packed rows: ``bits`` uint8 [height, ceil(width / 8)], MSB first; ``count`` = pixels set."""

    bits: np.ndarray
    width: int
    height: int
    count: int

    @classmethod
    def from_bool(cls, mask: np.ndarray) -> PackedMask:
        """bool/0-1 [H, W] -> packed rows."""
        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
        binary = mask > 0
        return cls(np.packbits(binary, axis=1), width=int(mask.shape[1]), height=int(mask.shape[0]),
                   count=int(binary.sum()))

    def unpack(self) -> np.ndarray:
        """-> bool [height, width]."""
        return np.unpackbits(self.bits, axis=1, count=self.width).astype(bool)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def encode_packed_mask_png(mask: PackedMask, level: int = 6) -> bytes:
    """Packed rows -> 1-bit grayscale PNG bytes (filter type 0 on every row; zlib ``level``)."""
    bits = np.ascontiguousarray(mask.bits, dtype=np.uint8)
    if bits.shape != (mask.height, (mask.width + 7) // 8) or mask.width < 1 or mask.height < 1:
        raise ValueError(f"packed mask of {mask.width}x{mask.height} needs bits [{mask.height}, "
                         f"{(mask.width + 7) // 8}], got {bits.shape}")
    rows = np.zeros((mask.height, bits.shape[1] + 1), dtype=np.uint8)  # leading 0 = filter "none"
    rows[:, 1:] = bits
    header = struct.pack(">IIBBBBB", mask.width, mask.height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + _png_chunk(b"IEND", b""))


def decode_mask_png(data: bytes) -> np.ndarray:
    """PNG bytes -> bool [H, W]."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FrameError("bad_mask", "mask bytes are not a decodable PNG")
    return image > 127
