"""Frame bytes -> pixels, with every size check done on the image header before any pixel is decoded.

`image_size` reads width and height from the PNG ``IHDR`` chunk or the JPEG start-of-frame marker (a few
dozen bytes; nothing is decompressed), so a decompression bomb (a small file declaring 100000 x 100000
pixels) is refused by `check_dimensions` instead of being decoded. `decode_frame` then decodes with OpenCV
(which releases the GIL, so a small thread pool decodes in parallel with the model) to uint8 RGB
[H, W, 3], or reshapes raw pixels, and checks that the result has the size the header promised.

Decoding at the scale the model needs: the model sees every frame resized to its input size (240 px for
ViT-B-16-plus-240), so a JPEG is decoded in the DCT domain at the smallest 1/2, 1/4 or 1/8 scale that
keeps both sides at or above that size (`jpeg_scale`; libjpeg's scaled IDCT, OpenCV ``IMREAD_REDUCED_*``):
a 900x900 JPEG decodes at 450x450 in about a quarter of the time. The frame's size in events, maps and
masks stays the one in its header. PNG and raw frames are decoded at full size (PNG has no such shortcut).
`decode_jpeg_batch` decodes JPEGs on a GPU with nvJPEG (torchvision) when the scorer runs there.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from consumers.contract import ContentType, FrameMeta, Limits
from hpad.errors import FrameError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
# start-of-frame markers that carry the image size (baseline, progressive, lossless, arithmetic...)
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field
# torchvision >= 0.29 warns on every decode_jpeg call that its codecs move to TorchCodec; nvJPEG through
# torchvision is what runs on the GPU images (torchvision 0.26 there), so the warning is silenced here only
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
_REDUCED_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                  8: cv2.IMREAD_REDUCED_COLOR_8}


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise FrameError("undecodable", "declared image/png but the bytes do not start with a PNG IHDR header")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's first start-of-frame marker (walks the marker segments only)."""
    if not data.startswith(JPEG_SOI):
        raise FrameError("undecodable", "declared image/jpeg but the bytes do not start with a JPEG SOI marker")
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            raise FrameError("undecodable", f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            raise FrameError("undecodable", f"JPEG segment at byte {pos} has length {length}")
        if marker in _JPEG_SOF:
            if pos + 9 > end:
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(width), int(height)
        pos += 2 + length
    raise FrameError("undecodable", "JPEG has no start-of-frame header (truncated or not a JPEG)")


def image_size(content: ContentType, data: bytes) -> tuple[int, int]:
    """(width, height) of a frame from its header alone."""
    if content.kind == "png":
        return png_size(data)
    if content.kind == "jpeg":
        return jpeg_size(data)
    assert content.shape is not None  # raw frames always carry a shape (contract.parse_content_type)
    return content.shape[1], content.shape[0]


def check_dimensions(width: int, height: int, limits: Limits) -> None:
    """Refuse absurd sides and too many pixels (before decoding)."""
    if min(width, height) < limits.min_side or max(width, height) > limits.max_side:
        raise FrameError("bad_dimensions", f"frame is {width}x{height}; each side must be within "
                         f"{limits.min_side}..{limits.max_side} pixels")
    if width * height > limits.max_pixels:
        raise FrameError("too_many_pixels", f"frame is {width}x{height} = {width * height} pixels, over the "
                         f"{limits.max_pixels}-pixel limit")


def inspect_frame(meta: FrameMeta, data: bytes, limits: Limits) -> tuple[int, int]:
    """Header-only checks of a frame's bytes -> (width, height)."""
    width, height = image_size(meta.content_type, data)
    check_dimensions(width, height, limits)
    return width, height


def decode_raw(content: ContentType, data: bytes) -> np.ndarray:
    assert content.shape is not None
    h, w, c = content.shape
    if len(data) != h * w * c:
        raise FrameError("undecodable", f"raw frame has {len(data)} bytes but shape {h},{w},{c} needs {h * w * c}")
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(h, w, c)
    if c >= 3 and content.order == "bgr":
        pixels = pixels[:, :, [2, 1, 0, 3][:c]]
    return pixels


def check_png_chunks(data: bytes) -> None:
    """Every PNG chunk's declared length must fit in the bytes. OpenCV allocates what a chunk claims before
    reading it: a 13 KB PNG whose IDAT claimed 2.9 GB made it allocate about 3 GB and spend 2-8 s."""
    pos, end = len(PNG_SIGNATURE), len(data)
    while pos + 8 <= end:
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if pos + 12 + length > end:
            raise FrameError("undecodable", f"PNG chunk {data[pos + 4 : pos + 8]!r} at byte {pos} claims {length} "
                             f"bytes, but only {max(0, end - pos - 12)} follow (truncated or corrupt)")
        if data[pos + 4 : pos + 8] == b"IEND":
            return
        pos += 12 + length


def jpeg_scale(size: tuple[int, int], target: tuple[int, int] | None) -> int:
    """The largest DCT scale divisor (1, 2, 4 or 8) that keeps a (width, height) JPEG at or above ``target``
    (height, width, the model's input size) on both sides; 1 when ``target`` is None (full-size decoding)."""
    if target is None:
        return 1
    width, height = size
    for scale in (8, 4, 2):
        if -(-width // scale) >= target[1] and -(-height // scale) >= target[0]:
            return scale
    return 1


def scaled_size(size: tuple[int, int], scale: int) -> tuple[int, int]:
    """(width, height) of a JPEG decoded at 1/``scale`` (libjpeg rounds up)."""
    return -(-size[0] // scale), -(-size[1] // scale)


def decode_frame(meta: FrameMeta, data: bytes, size: tuple[int, int],
                 target: tuple[int, int] | None = None) -> np.ndarray:
    """Bytes -> uint8 pixels ([H, W, 3] RGB for JPEG/PNG, [H, W, C] for raw); must match ``size`` (W, H).

    ``target`` (height, width): the model's input size; a JPEG is then decoded at the smallest DCT scale
    still at or above it (`jpeg_scale`), and must match ``size`` scaled the same way.
    """
    kind = meta.content_type.kind
    if kind == "raw":
        return decode_raw(meta.content_type, data)
    if kind == "png":
        check_png_chunks(data)
    scale = jpeg_scale(size, target) if kind == "jpeg" else 1
    flags = _REDUCED_FLAGS[scale] | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:  # OpenCV refuses some malformed inputs with an exception instead of None
        raise FrameError("undecodable", f"OpenCV cannot decode the {kind.upper()}: {exc}") from None
    if bgr is None:
        raise FrameError("undecodable", f"{kind.upper()} data cannot be decoded (corrupt or truncated)")
    expected = scaled_size(size, scale)
    if (bgr.shape[1], bgr.shape[0]) != expected:
        at = f" at 1/{scale} scale" if scale > 1 else ""
        raise FrameError("undecodable", f"decoded {bgr.shape[1]}x{bgr.shape[0]} pixels{at} but the header says "
                         f"{size[0]}x{size[1]}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_jpeg_batch(data: Sequence[bytes], sizes: Sequence[tuple[int, int]], device: torch.device
                      ) -> list[torch.Tensor | FrameError]:
    """JPEG bytes -> uint8 RGB [3, H, W] tensors on ``device`` (nvJPEG on CUDA, libjpeg on the CPU), one call
    for the batch. A batch the decoder refuses is decoded frame by frame, so one corrupt frame costs only
    itself: its slot holds the `FrameError`. Each result must have its header's (width, height)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    buffers = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    try:
        decoded: list[torch.Tensor | FrameError] = list(
            decode_jpeg(buffers, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded = []
        for buffer in buffers:
            try:
                decoded.append(decode_jpeg(buffer, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as exc:
                decoded.append(FrameError("undecodable", f"JPEG data cannot be decoded: {str(exc)[:200]}"))
    for index, (image, size) in enumerate(zip(decoded, sizes, strict=True)):
        if isinstance(image, torch.Tensor) and (image.shape[2], image.shape[1]) != tuple(size):
            decoded[index] = FrameError("undecodable", f"decoded {image.shape[2]}x{image.shape[1]} pixels but the "
                                        f"header says {size[0]}x{size[1]}")
    return decoded
