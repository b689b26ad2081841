"""The frame message contract: header names, dead-letter reason codes, and pure header parsing.

A frame is one Kafka record on the input topic: value = encoded image bytes (JPEG / PNG) or raw pixels,
key = camera id, headers ``content-type``, ``camera_id``, ``frame_id``, ``captured_at``, ``category`` and the
optional ``roi`` / ``tiling`` (what part of the frame is scored, and how: `hpad.tiling`) (``README.md`` and ``consumers/schemas/frame_headers.schema.json`` document them). This module
turns the headers into a `FrameMeta` or refuses them with a `FrameError` whose ``reason`` is one of
`REASONS`; nothing here touches Kafka, so every rule is unit-tested without a broker.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from hpad.errors import ConfigError, FrameError
from hpad.tiling import Box, TileSpec

# header names (lower case; lookups are case-insensitive)
CONTENT_TYPE = "content-type"
CAMERA_ID = "camera_id"
FRAME_ID = "frame_id"
CAPTURED_AT = "captured_at"
CATEGORY = "category"
ROI = "roi"  # "x,y,w,h": region of interest in pixels of the full frame
TILING = "tiling"  # "auto" | "off" | "COLSxROWS", optionally "@OVERLAP" (0..0.9)
FRAME_HEADERS = (CONTENT_TYPE, CAMERA_ID, FRAME_ID, CAPTURED_AT, CATEGORY, ROI, TILING)

# dead-letter headers added to the original record's headers
ERROR_CLASS = "hpad-error-class"
ERROR_MESSAGE = "hpad-error-message"
ORIGINAL_TOPIC = "hpad-original-topic"
ORIGINAL_PARTITION = "hpad-original-partition"
ORIGINAL_OFFSET = "hpad-original-offset"
ORIGINAL_TIMESTAMP = "hpad-original-timestamp"
DEAD_LETTERED_AT = "hpad-dead-lettered-at"
WORKER = "hpad-worker"
VALUE_TRUNCATED = "hpad-value-truncated"
DEAD_LETTER_HEADERS = (ERROR_CLASS, ERROR_MESSAGE, ORIGINAL_TOPIC, ORIGINAL_PARTITION, ORIGINAL_OFFSET,
                       ORIGINAL_TIMESTAMP, DEAD_LETTERED_AT, WORKER, VALUE_TRUNCATED)

# stable reason codes (metrics label `reason`, dead-letter header `hpad-error-class`)
REASONS: dict[str, str] = {
    "empty_value": "the record has no value (no image bytes)",
    "payload_too_large": "the value is larger than HPAD_MAX_PAYLOAD_BYTES",
    "missing_header": "a required header is missing (frame_id, content-type, camera_id or key, category)",
    "invalid_header": "a header is not UTF-8, repeated, too long, or has a malformed value",
    "unsupported_content_type": "content-type is not image/jpeg, image/png or application/x-raw",
    "unknown_category": "the category header names a category this worker does not serve",
    "bad_dimensions": "width or height is zero, below HPAD_MIN_SIDE or above HPAD_MAX_SIDE",
    "too_many_pixels": "width x height (read from the image header, before decoding) exceeds HPAD_MAX_PIXELS",
    "roi_outside_frame": "the roi header's box reaches beyond the frame (checked against the image header's size)",
    "bad_tiling": "the tiling asks for more tiles than HPAD_MAX_TILES, or for tiles under 8 pixels in this frame",
    "undecodable": "the bytes are not a valid image of the declared type (or raw size does not match shape)",
    "bad_image": "the decoded pixels cannot be scored",
    "out_of_memory": "scoring this single frame ran out of memory after retries",
    "event_too_large": "the event (with its mask) is larger than the producer's max request size",
    "event_rejected": "the broker refused the event with a non-retriable error",
    "internal_error": "hpad failed on this frame in an unexpected way (a bug: report it with the dead letter); "
                      "the worker goes on with the next frame",
}

MAX_ID_CHARS = 256
MAX_CATEGORY_CHARS = 128
_ID_RE = re.compile(r"^[^\x00-\x1f\x7f]+$")  # any text without control characters
_MIN_EPOCH_MS = 946_684_800_000  # 2000-01-01: smaller values are seconds or garbage
_MAX_EPOCH_MS = 4_102_444_800_000  # 2100-01-01
RAW_TYPE = "application/x-raw"
IMAGE_TYPES = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png"}


@dataclass(frozen=True)
class Limits:
    """What a frame may be: bytes, sides and pixels (checked from the image header, before decoding)."""

    max_payload_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 16384
    min_side: int = 8


@dataclass(frozen=True)
class ContentType:
    """``kind``: jpeg, png or raw; raw frames carry their ``shape`` (H, W, C) and channel ``order``."""

    kind: str
    shape: tuple[int, int, int] | None = None
    order: str = "rgb"


@dataclass(frozen=True)
class FrameMeta:
    """Validated headers of one frame. ``captured_at`` is None when the camera did not send it."""

    frame_id: str
    camera_id: str
    category: str
    content_type: ContentType
    captured_at: datetime | None
    roi: Box | None = None  # header roi: only this part is scored (maps and masks stay full size)
    tiling: TileSpec | None = None  # header tiling; None: the worker's HPAD_TILING


# ------------------------------------------------------------------------------------------ parsing


def header_map(headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, str]:
    """Kafka headers -> {lower-case name: UTF-8 text}. Repeated or non-UTF-8 frame headers are refused."""
    out: dict[str, str] = {}
    for name, raw in headers or ():
        key = name.lower()
        if key not in FRAME_HEADERS:
            continue  # other headers (tracing, ...) are carried to dead letters but not interpreted
        if key in out:
            raise FrameError("invalid_header", f"header {key!r} appears more than once")
        try:
            out[key] = (raw or b"").decode("utf-8").strip()
        except UnicodeDecodeError:
            raise FrameError("invalid_header", f"header {key!r} is not UTF-8 text") from None
    return out


def parse_content_type(text: str) -> ContentType:
    """``image/jpeg`` | ``image/png`` | ``application/x-raw; shape=H,W[,C]; dtype=uint8[; order=rgb|bgr]``."""
    parts = [p.strip() for p in text.split(";")]
    media = parts[0].lower()
    if media in IMAGE_TYPES:
        return ContentType(IMAGE_TYPES[media])
    if media != RAW_TYPE:
        raise FrameError("unsupported_content_type",
                         f"content-type {text[:80]!r} is not image/jpeg, image/png or {RAW_TYPE}")
    params: dict[str, str] = {}
    for part in parts[1:]:
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise FrameError("invalid_header", f"content-type parameter {part[:40]!r} is not key=value")
        params[key.strip().lower()] = value.strip().strip('"').lower()
    return ContentType("raw", shape=_raw_shape(params.get("shape")), order=_raw_order(params))


def _raw_shape(text: str | None) -> tuple[int, int, int]:
    if not text:
        raise FrameError("invalid_header", f"{RAW_TYPE} needs shape=H,W,C (e.g. shape=480,640,3)")
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise FrameError("invalid_header", f"raw shape {text[:40]!r} is not integers H,W[,C]") from None
    if len(dims) == 2:
        dims = (*dims, 1)
    if len(dims) != 3 or dims[2] not in (1, 3, 4):
        raise FrameError("invalid_header", f"raw shape {text[:40]!r} must be H,W or H,W,C with C in 1, 3, 4")
    return dims  # type: ignore[return-value]


def _raw_order(params: Mapping[str, str]) -> str:
    dtype = params.get("dtype", "uint8")
    if dtype != "uint8":
        raise FrameError("invalid_header", f"raw dtype {dtype!r} is not supported; send uint8 pixels")
    order = params.get("order", "rgb")
    if order not in ("rgb", "bgr"):
        raise FrameError("invalid_header", f"raw order {order!r} must be rgb or bgr")
    return order


def parse_captured_at(text: str) -> datetime:
    """RFC 3339 with a timezone (``2026-11-25T05:34:27.593Z``) or integer epoch milliseconds -> aware UTC."""
    if text.isdigit():
        # str.isdigit() also accepts digits int() refuses ('²') and strings longer than int() converts
        millis = int(text) if text.isascii() and len(text) <= 19 else -1
        if not _MIN_EPOCH_MS <= millis <= _MAX_EPOCH_MS:
            raise FrameError("invalid_header",
                             f"captured_at {text[:64]!r} is not epoch milliseconds between 2000 and 2100")
        return datetime.fromtimestamp(millis / 1000.0, tz=UTC)
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            raise FrameError("invalid_header", f"captured_at {text[:64]!r} has no timezone (add Z or +01:00)")
        return moment.astimezone(UTC)  # OverflowError for 0001-01-01T00:00+01:00 or 9999-12-31T23:59-01:00
    except (ValueError, OverflowError):
        raise FrameError("invalid_header", f"captured_at {text[:64]!r} is neither RFC 3339 nor epoch ms") from None


_ROI_RE = re.compile(r"^\s*(\d{1,6})\s*,\s*(\d{1,6})\s*,\s*(\d{1,6})\s*,\s*(\d{1,6})\s*$")


def parse_roi(text: str) -> Box:
    """``x,y,w,h`` (integer pixels of the full frame; w, h >= 1) -> `Box`, or FrameError(invalid_header).
    Whether it fits the frame is checked once the frame's size is known (``roi_outside_frame``)."""
    match = _ROI_RE.match(text)
    if match is None:
        raise FrameError("invalid_header", f"roi {text[:64]!r} is not x,y,w,h (four non-negative integers)")
    x, y, w, h = (int(v) for v in match.groups())
    if w < 1 or h < 1:
        raise FrameError("invalid_header", f"roi {text[:64]!r} has an empty box: width and height must be >= 1")
    return Box(x, y, w, h)


def parse_tiling(text: str) -> TileSpec:
    """``auto`` | ``off`` | ``COLSxROWS``, optionally ``@OVERLAP`` (``3x2@0.25``, ``auto@0.1``) -> `TileSpec`
    (`hpad.tiling.TileSpec.parse`, one grammar for headers and settings), or FrameError(invalid_header)."""
    try:
        return TileSpec.parse(text)
    except ConfigError as exc:
        raise FrameError("invalid_header", str(exc)) from None


def _identifier(name: str, value: str | None, limit: int = MAX_ID_CHARS) -> str:
    if not value:
        raise FrameError("missing_header", f"header {name!r} is missing or empty")
    if len(value) > limit or not _ID_RE.match(value):
        raise FrameError("invalid_header", f"header {name!r} must be 1-{limit} characters without control characters")
    return value


def parse_frame_headers(
    headers: Iterable[tuple[str, bytes | None]] | None, key: bytes | None, default_category: str | None = None
) -> FrameMeta:
    """Headers (+ record key) -> FrameMeta, or FrameError(missing_header / invalid_header / ...)."""
    found = header_map(headers)
    frame_id = _identifier(FRAME_ID, found.get(FRAME_ID))
    camera_text = found.get(CAMERA_ID)
    if not camera_text and key:
        try:
            camera_text = key.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("invalid_header", "record key (camera id) is not UTF-8 text") from None
    if not camera_text:
        raise FrameError("missing_header", "no camera id: set header 'camera_id' or the record key")
    camera_id = _identifier(CAMERA_ID, camera_text)
    category = _identifier(CATEGORY, found.get(CATEGORY) or default_category, MAX_CATEGORY_CHARS)
    content_text = found.get(CONTENT_TYPE)
    if not content_text:
        raise FrameError("missing_header", "header 'content-type' is missing (image/jpeg, image/png or raw)")
    captured_text = found.get(CAPTURED_AT)
    roi_text, tiling_text = found.get(ROI), found.get(TILING)
    return FrameMeta(
        frame_id=frame_id,
        camera_id=camera_id,
        category=category,
        content_type=parse_content_type(content_text),
        captured_at=parse_captured_at(captured_text) if captured_text else None,
        roi=parse_roi(roi_text) if roi_text else None,
        tiling=parse_tiling(tiling_text) if tiling_text else None,
    )


def check_payload_size(value: bytes | None, limits: Limits) -> bytes:
    """Refuse an empty value or one over the byte limit (before anything else is read)."""
    if not value:
        raise FrameError("empty_value", "the record has no value; send the encoded image as the value")
    if len(value) > limits.max_payload_bytes:
        raise FrameError("payload_too_large",
                         f"the value is {len(value)} bytes, over the {limits.max_payload_bytes}-byte limit")
    return value


def rfc3339(moment: datetime) -> str:
    """Aware datetime -> ``2026-11-25T05:34:27.593Z`` (UTC, milliseconds)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
