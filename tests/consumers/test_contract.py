"""Frame contract: header parsing, payload limits, header-only image sizes, decompression bombs, decoding."""

from __future__ import annotations

import struct
import zlib
from datetime import UTC, datetime

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers import contract as c
from consumers.decode import PNG_SIGNATURE, decode_frame, image_size, inspect_frame, jpeg_size, png_size
from hpad.errors import FrameError
from tests.consumers.kafka_helpers import encode, image


def headers(**values: str) -> list[tuple[str, bytes]]:
    base = {"content-type": "image/png", "frame_id": "f-1", "camera_id": "cam-1", "category": "widget"}
    base.update(values)
    return [(k, v.encode()) for k, v in base.items() if v is not None]


def reason(fn, *args, **kwargs) -> str:
    with pytest.raises(FrameError) as info:
        fn(*args, **kwargs)
    return info.value.reason


# ------------------------------------------------------------------------------------------ headers


def test_valid_headers_parse():
    meta = c.parse_frame_headers(headers(captured_at="2026-11-25T05:34:27.593Z"), b"cam-key")
    assert (meta.frame_id, meta.camera_id, meta.category) == ("f-1", "cam-1", "widget")
    assert meta.content_type == c.ContentType("png")
    assert meta.captured_at == datetime(2026, 11, 25, 5, 34, 27, 593000, tzinfo=UTC)


def test_camera_id_falls_back_to_key_and_names_are_case_insensitive():
    raw = [("Content-Type", b"image/JPEG"), ("FRAME_ID", b"f-2"), ("category", b"widget")]
    meta = c.parse_frame_headers(raw, b"cam-from-key")
    assert meta.camera_id == "cam-from-key" and meta.content_type.kind == "jpeg"


def test_default_category_applies_only_when_header_missing():
    raw = [h for h in headers() if h[0] != "category"]
    assert c.parse_frame_headers(raw, None, default_category="bottle").category == "bottle"
    assert reason(c.parse_frame_headers, raw, None) == "missing_header"


@pytest.mark.parametrize("drop", ["frame_id", "content-type"])
def test_missing_required_header(drop):
    raw = [h for h in headers() if h[0] != drop]
    assert reason(c.parse_frame_headers, raw, b"cam") == "missing_header"


def test_missing_camera_id_without_key():
    raw = [h for h in headers() if h[0] != "camera_id"]
    assert reason(c.parse_frame_headers, raw, None) == "missing_header"


@pytest.mark.parametrize("raw", [
    [("frame_id", b"a"), ("frame_id", b"b"), ("content-type", b"image/png"), ("category", b"w")],
    [("frame_id", b"\xff\xfe"), ("content-type", b"image/png"), ("category", b"w")],
    [("frame_id", b"bad\nid"), ("content-type", b"image/png"), ("category", b"w")],
    [("frame_id", b"x" * 300), ("content-type", b"image/png"), ("category", b"w")],
])
def test_invalid_headers(raw):
    assert reason(c.parse_frame_headers, raw, b"cam") == "invalid_header"


def test_unrelated_headers_are_ignored():
    raw = [*headers(), ("traceparent", b"\xff not utf8"), ("traceparent", b"dup")]
    assert c.parse_frame_headers(raw, None).frame_id == "f-1"


@pytest.mark.parametrize("text, expected", [
    ("image/png", c.ContentType("png")),
    ("image/jpg", c.ContentType("jpeg")),
    ("application/x-raw; shape=480,640,3; dtype=uint8", c.ContentType("raw", (480, 640, 3))),
    ("application/x-raw;shape=4,5", c.ContentType("raw", (4, 5, 1))),
    ("application/x-raw; shape=2,3,4; order=BGR", c.ContentType("raw", (2, 3, 4), "bgr")),
])
def test_content_types(text, expected):
    assert c.parse_content_type(text) == expected


@pytest.mark.parametrize("text, code", [
    ("image/gif", "unsupported_content_type"),
    ("text/plain", "unsupported_content_type"),
    ("application/x-raw", "invalid_header"),
    ("application/x-raw; shape=1,2,5", "invalid_header"),
    ("application/x-raw; shape=a,b", "invalid_header"),
    ("application/x-raw; shape=2,2,3; dtype=float32", "invalid_header"),
    ("application/x-raw; shape=2,2,3; order=rbg", "invalid_header"),
    ("application/x-raw; shape", "invalid_header"),
])
def test_bad_content_types(text, code):
    assert reason(c.parse_content_type, text) == code


@pytest.mark.parametrize("text, expected", [
    ("2026-11-25T05:34:27Z", datetime(2026, 11, 25, 5, 34, 27, tzinfo=UTC)),
    ("2026-11-25T06:34:27.5+01:00", datetime(2026, 11, 25, 5, 34, 27, 500000, tzinfo=UTC)),
    ("1795584925990", datetime.fromtimestamp(1795584925.990, tz=UTC)),
])
def test_captured_at(text, expected):
    assert c.parse_captured_at(text) == expected


@pytest.mark.parametrize("text", ["2026-11-25T05:34:27", "1795584925", "yesterday", "99999999999999"])
def test_bad_captured_at(text):
    assert reason(c.parse_captured_at, text) == "invalid_header"


def test_payload_limits():
    limits = c.Limits(max_payload_bytes=1000)
    assert reason(c.check_payload_size, None, limits) == "empty_value"
    assert reason(c.check_payload_size, b"", limits) == "empty_value"
    assert reason(c.check_payload_size, b"x" * 1001, limits) == "payload_too_large"
    assert c.check_payload_size(b"x" * 1000, limits) == b"x" * 1000


# ------------------------------------------------------------------------------------------ image headers


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), ext=st.sampled_from([".png", ".jpg"]),
       gray=st.booleans(), progressive=st.booleans())
def test_header_sizes_match_real_images(h, w, ext, gray, progressive):
    rng = np.random.default_rng(h * 1000 + w)
    pixels = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, pixels, params)
    assert ok
    data = buf.tobytes()
    assert (png_size(data) if ext == ".png" else jpeg_size(data)) == (w, h)


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares width x height (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\x00" * 1024)
    body = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return PNG_SIGNATURE + chunk + body


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 header is patched to declare width x height."""
    data = bytearray(encode(np.zeros((16, 16, 3), np.uint8), ".jpg"))
    pos = data.index(b"\xff\xc0")
    data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def meta(kind: str, shape=None) -> c.FrameMeta:
    return c.FrameMeta("f", "cam", "widget", c.ContentType(kind, shape), None)


def test_decompression_bombs_are_refused_from_the_header():
    limits = c.Limits(max_pixels=4_000_000, max_side=10_000)
    assert reason(inspect_frame, meta("png"), png_bomb(3000, 3000), limits) == "too_many_pixels"
    assert reason(inspect_frame, meta("png"), png_bomb(100_000, 100_000), limits) == "bad_dimensions"
    assert reason(inspect_frame, meta("jpeg"), jpeg_with_size(2500, 2500), limits) == "too_many_pixels"
    assert reason(inspect_frame, meta("png"), png_bomb(0, 10), limits) == "bad_dimensions"
    assert reason(inspect_frame, meta("png"), png_bomb(4, 4), limits) == "bad_dimensions"  # below min_side 8
    assert inspect_frame(meta("png"), png_bomb(1000, 1000), limits) == (1000, 1000)


@pytest.mark.parametrize("kind, data", [
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00"),
    ("png", b"GIF89a" + b"\x00" * 40),
    ("jpeg", b"\xff\xd8\xff\xe0\x00"),
    ("jpeg", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
    ("jpeg", b"\xff\xd8\x00\x00\x00\x00"),
    ("jpeg", b"\xff\xd8\xff\xe0\x00\x01"),
])
def test_malformed_headers_are_undecodable(kind, data):
    assert reason(image_size, c.ContentType(kind), data) == "undecodable"


def test_raw_size_from_shape():
    assert image_size(c.ContentType("raw", (480, 640, 3)), b"") == (640, 480)


# ------------------------------------------------------------------------------------------ decoding


def test_decode_png_and_jpeg_to_rgb():
    red = np.zeros((20, 30, 3), np.uint8)
    red[..., 0] = 255
    for ext, kind in ((".png", "png"), (".jpg", "jpeg")):
        data = encode(red, ext)
        pixels = decode_frame(meta(kind), data, (30, 20))
        assert pixels.shape == (20, 30, 3) and pixels.dtype == np.uint8
        assert pixels[..., 0].mean() > 240 and pixels[..., 2].mean() < 15


def test_decode_raw_orders_and_channels():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(decode_frame(meta("raw", (2, 3, 3)), rgb.tobytes(), (3, 2)), rgb)
    bgr = rgb[:, :, ::-1].copy()
    out = decode_frame(c.FrameMeta("f", "c", "w", c.ContentType("raw", (2, 3, 3), "bgr"), None), bgr.tobytes(), (3, 2))
    assert np.array_equal(out, rgb)
    gray = decode_frame(meta("raw", (2, 3, 1)), bytes(6), (3, 2))
    assert gray.shape == (2, 3, 1)
    assert reason(decode_frame, meta("raw", (2, 3, 3)), bytes(17), (3, 2)) == "undecodable"


def test_corrupt_image_is_undecodable():
    data = bytearray(encode(image(np.random.default_rng(0), (32, 32))))
    data[40:] = b"\x00" * (len(data) - 40)  # keeps the IHDR, destroys the pixel data
    assert reason(decode_frame, meta("png"), bytes(data), (32, 32)) == "undecodable"
    assert reason(decode_frame, meta("png"), b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, (32, 32)) == "undecodable"


def test_decoded_size_must_match_header():
    data = encode(image(np.random.default_rng(1), (32, 40)))
    assert reason(decode_frame, meta("png"), data, (40, 33)) == "undecodable"


def test_rfc3339_formatting():
    assert c.rfc3339(datetime(2026, 1, 2, 3, 4, 5, 678900, tzinfo=UTC)) == "2026-01-02T03:04:05.678Z"
