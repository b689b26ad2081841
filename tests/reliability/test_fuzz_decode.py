"""Property and fuzz tests of the frame admission and decode path, plus one fuzzed stream through a worker.

The path under test is exactly what the worker runs for every polled record: `Pipeline.admit` (payload size,
`contract.parse_frame_headers`, category, `decode.inspect_frame` on the image header) and the decode it
submits (`pipeline._timed_decode` -> `decode.decode_frame`). Property: for any bytes, headers and key, the
frame either becomes uint8 pixels of exactly the size its header declared ([H, W, 3] for JPEG/PNG, [H, W, C]
for raw) or is refused with a `FrameError` whose reason is one of `contract.REASONS` -- never another
exception (the worker would crash on it and, restarted, crash again on the same record: a stalled partition)
and never slow (hypothesis deadline per example).

Found here (fixed in consumers/contract.py `parse_captured_at`): a ``captured_at`` header of ``²`` (str.isdigit
but not int()), of 5000 digits (int() refuses), or of ``9999-12-31T23:59:59-23:59`` (OverflowError when
converted to UTC) raised ValueError / OverflowError out of `Pipeline.admit` and crashed the worker.
"""

from __future__ import annotations

import json
import struct
import zlib
from concurrent.futures import Future
from datetime import timedelta
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from consumers import contract as c
from consumers.camera import frame_headers
from consumers.decode import PNG_SIGNATURE
from consumers.items import PipelineConfig
from consumers.pipeline import Pipeline
from consumers.prompt_provider import StaticPromptProvider
from hpad.errors import FrameError
from tests.consumers.kafka_helpers import (
    Frame,
    assert_commits_covered,
    committed_offsets,
    new_topics,
    publish,
    read_all,
)
from tests.consumers.kafka_helpers import settings as worker_settings

LIMITS = c.Limits(max_payload_bytes=1 << 20, max_pixels=1_000_000, max_side=4096, min_side=8)
CATEGORIES = ("widget", "gadget")
TP = TopicPartition("frames", 0)
FUZZ = settings(max_examples=300, deadline=timedelta(seconds=2), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class SyncPool:
    """The decode pool, run inline: the future holds the result or the exception exactly as in the worker."""

    def submit(self, fn, *args):
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who checks its type
            future.set_exception(exc)
        return future


ADMITTER = SimpleNamespace(
    config=PipelineConfig(events_topic="events", dlq_topic="dlq", worker_name="fuzz", limits=LIMITS,
                          default_category=None, mask_policy="never", max_request_size=32 << 20),
    provider=StaticPromptProvider({category: object() for category in CATEGORIES}),  # any non-None set
    pool=SyncPool(),
    decode_target=None,  # full-size decoding: the property below checks the header's size
    model_size=(64, 64),  # tile plans (roi / tiling headers) are made for it
)


def admit_and_decode(value: bytes | None, headers: list[tuple[str, bytes]], key: bytes | None) -> np.ndarray | None:
    """Run the worker's admission + decode on one record and check the property; None when refused."""
    record = ConsumerRecord("frames", 0, -1, 7, 0, 0, key, value, headers, None, -1, len(value or b""), -1)
    item = Pipeline.admit(ADMITTER, record, TP, 0)  # any exception but FrameError fails the test here
    if item.error is not None:
        assert item.error.reason in c.REASONS, item.error.reason
        return None
    assert item.decoding is not None and item.meta is not None and item.size is not None
    try:
        pixels, _ = item.decoding.result()  # ... or here (the scoring stage only catches FrameError)
    except FrameError as exc:
        assert exc.reason in c.REASONS, exc.reason
        return None
    width, height = item.size
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8
    assert pixels.shape[:2] == (height, width), (pixels.shape, item.size)
    assert LIMITS.min_side <= min(width, height) and max(width, height) <= LIMITS.max_side
    assert width * height <= LIMITS.max_pixels
    if item.meta.content_type.kind == "raw":
        assert pixels.shape[2] == item.meta.content_type.shape[2]
    else:
        assert pixels.ndim == 3 and pixels.shape[2] == 3
    return pixels


def headers(content: str = "image/png", frame_id: str = "f-1", **replace: bytes) -> list[tuple[str, bytes]]:
    base = [(k, v) for k, v in frame_headers(frame_id, "cam-1", "widget", content) if k not in replace]
    return base + list(replace.items())


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# ------------------------------------------------------------------------------------------ strategies

IMAGE_CONTENT = st.sampled_from(["image/png", "image/jpeg", "image/jpg", "IMAGE/PNG"])
RAW_CONTENT = st.builds(
    lambda shape, extra: f"application/x-raw; shape={shape}{extra}",
    st.one_of(st.lists(st.integers(-5, 5000), min_size=1, max_size=4).map(lambda d: ",".join(map(str, d))),
              st.text(max_size=30)),
    st.sampled_from(["", "; dtype=uint8", "; dtype=float32", "; order=bgr", "; order=xyz", "; junk", ";;"]),
)
HEADER_NAMES = st.sampled_from([*c.FRAME_HEADERS, "Content-Type", "FRAME_ID", "traceparent", "x-other"])
HEADER_VALUES = st.one_of(
    st.binary(max_size=64),  # mostly not UTF-8
    st.text(max_size=64).map(str.encode),  # UTF-8, control characters included
    st.text(alphabet="0123456789²٣-:TZ.+", max_size=40).map(str.encode),  # digit-like and time-like
    st.sampled_from([b"9999-12-31T23:59:59-23:59", b"0001-01-01T00:00:00+23:59", b"1" * 5000, b"x" * 300,
                     b"2026-11-25T05:34:27.593Z", b"1795584925990", b"image/png", b"widget"]),
    st.binary(min_size=1000, max_size=5000),  # oversized
)


def image_bytes(rng: np.random.Generator, height: int, width: int, kind: str) -> tuple[bytes, str]:
    """A valid image of ``kind``: png8/png16 gray, rgb, rgba, jpeg gray/rgb/progressive."""
    channels = {"gray": 1, "rgb": 3, "rgba": 4}[kind.split("-")[1]]
    depth = np.uint16 if kind.startswith("png16") else np.uint8
    top = 65535 if depth is np.uint16 else 255
    pixels = rng.integers(0, top + 1, (height, width, channels)).astype(depth)
    if channels == 1:
        pixels = pixels[:, :, 0]
    if kind.startswith("jpeg"):
        flags = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if "progressive" in kind else []
        return cv2.imencode(".jpg", pixels, flags)[1].tobytes(), "image/jpeg"
    return cv2.imencode(".png", pixels)[1].tobytes(), "image/png"


IMAGE_KINDS = ["png8-gray", "png8-rgb", "png8-rgba", "png16-gray", "png16-rgb", "png16-rgba", "jpeg-gray",
               "jpeg-rgb", "jpeg-rgb-progressive"]


# ------------------------------------------------------------------------------------------ properties


@FUZZ
@given(value=st.one_of(st.none(), st.binary(max_size=4096)), content=st.one_of(IMAGE_CONTENT, RAW_CONTENT,
       st.text(max_size=40)), key=st.one_of(st.none(), st.binary(max_size=40)))
def test_random_bytes_are_refused_with_a_reason(value, content, key):
    """Invariant: random bytes under any content-type never escape as anything but a FrameError reason."""
    admit_and_decode(value, headers(content), key)


@FUZZ
@given(pairs=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=8),
       key=st.one_of(st.none(), st.binary(max_size=300)), base=st.booleans())
@example(pairs=[("captured_at", "²".encode())], key=b"cam-1", base=True)
@example(pairs=[("captured_at", b"9999-12-31T23:59:59-23:59")], key=b"cam-1", base=True)
@example(pairs=[("captured_at", b"1" * 5000)], key=b"cam-1", base=True)
@example(pairs=[("frame_id", b"\xff\xfe")], key=b"cam-1", base=True)
@example(pairs=[], key=b"\xff", base=False)
def test_fuzzed_headers_and_keys_are_refused_with_a_reason(pairs, key, base):
    """Invariant: any header set (missing, repeated, non-UTF-8, oversized, control characters, odd dates)
    and any key either admit a valid PNG or refuse it with a FrameError reason; never another exception."""
    png = cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))[1].tobytes()
    names = {name.lower() for name, _ in pairs}
    start = [(k, v) for k, v in headers() if k not in names] if base else []
    admit_and_decode(png, start + list(pairs), key)


@settings(FUZZ, max_examples=300)
@given(height=st.integers(1, 80), width=st.integers(1, 80), kind=st.sampled_from(IMAGE_KINDS),
       cut=st.one_of(st.none(), st.floats(0, 1)), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                                               max_size=4), seed=st.integers(0, 2**16))
def test_real_images_truncated_or_corrupted(height, width, kind, cut, flips, seed):
    """Invariant: gray / RGB / RGBA, 8- and 16-bit PNG and baseline / progressive JPEG images decode to
    uint8 [H, W, 3] of their header's size when intact (and within limits); truncated or bit-flipped
    copies decode to that size or are refused with a reason."""
    data, content = image_bytes(np.random.default_rng(seed), height, width, kind)
    intact = cut is None and not flips
    if cut is not None:
        data = data[: int(cut * len(data))]
    mutable = bytearray(data)
    for where, byte in flips:
        if mutable:
            mutable[min(len(mutable) - 1, int(where * len(mutable)))] = byte
    pixels = admit_and_decode(bytes(mutable), headers(content), b"cam-1")
    if intact and min(height, width) >= LIMITS.min_side:
        assert pixels is not None and pixels.shape == (height, width, 3)


@FUZZ
@given(width=st.integers(0, 2**32 - 1), height=st.integers(0, 2**32 - 1), depth=st.sampled_from([1, 8, 16, 99]),
       color=st.sampled_from([0, 2, 3, 4, 6, 7]), tail=st.binary(max_size=256), good_crc=st.booleans())
@example(width=100_000, height=100_000, depth=8, color=2, tail=b"", good_crc=True)
@example(width=1000, height=1000, depth=8, color=2, tail=zlib.compress(bytes(3001 * 1000)), good_crc=True)
def test_png_headers_with_absurd_sizes(width, height, depth, color, tail, good_crc):
    """Invariant: a PNG IHDR may declare anything (0, 2^32-1, bombs); the frame is refused from the header
    (bad_dimensions / too_many_pixels) before decoding, or decoded to exactly that size, or undecodable."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
    if not good_crc:
        ihdr = ihdr[:-4] + b"\x00\x00\x00\x00"
    data = PNG_SIGNATURE + ihdr + png_chunk(b"IDAT", tail) + png_chunk(b"IEND", b"")
    pixels = admit_and_decode(data, headers("image/png"), b"cam-1")
    sides_ok = LIMITS.min_side <= min(width, height) and max(width, height) <= LIMITS.max_side
    if not sides_ok or width * height > LIMITS.max_pixels:
        assert pixels is None


def test_png_chunk_claiming_gigabytes_is_refused_before_opencv(monkeypatch):
    """Invariant: a PNG whose chunk claims more bytes than the frame holds is refused as undecodable without
    being handed to OpenCV. Found by fuzzing: a 13 KB 16-bit PNG with one flipped byte (its IDAT length
    became 2.9 GB) made cv2.imdecode allocate about 3 GB and take 2-8 s before failing; two decode threads
    and a few such frames would exhaust the worker's memory."""
    import consumers.decode as decode

    data = bytearray(image_bytes(np.random.default_rng(0), 31, 71, "png16-rgb")[0])
    assert data[37:41] == b"IDAT"
    data[33] = 173  # the IDAT length field: 0x0000xxxx -> 0xAD00xxxx (about 2.9 GB)

    def refuse(*args: object, **kwargs: object):
        raise AssertionError("OpenCV was handed a PNG whose chunks do not fit in it")

    monkeypatch.setattr(decode.cv2, "imdecode", refuse)
    assert admit_and_decode(bytes(data), headers("image/png"), b"cam-1") is None
    with pytest.raises(FrameError, match="claims") as info:
        decode.check_png_chunks(bytes(data))
    assert info.value.reason == "undecodable"


def jpeg_with_sof(width: int, height: int, marker: int, before: list[bytes], tail: bytes) -> bytes:
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    segments = b"".join(b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body for body in before)
    return b"\xff\xd8" + segments + bytes([0xFF, marker]) + struct.pack(">H", len(sof) + 2) + sof + tail + b"\xff\xd9"


@FUZZ
@given(width=st.integers(0, 65535), height=st.integers(0, 65535), marker=st.sampled_from([0xC0, 0xC1, 0xC2, 0xCF]),
       before=st.lists(st.binary(max_size=40), max_size=3), tail=st.binary(max_size=256),
       cut=st.one_of(st.none(), st.integers(0, 40)))
@example(width=65535, height=65535, marker=0xC0, before=[], tail=b"", cut=None)
def test_jpeg_start_of_frame_with_absurd_sizes(width, height, marker, before, tail, cut):
    """Invariant: a JPEG start-of-frame may declare anything, after any APP segments, and be cut anywhere:
    refused from the header, undecodable, or decoded to exactly the declared size."""
    data = jpeg_with_sof(width, height, marker, before, tail)
    if cut is not None:
        data = data[:cut]
    pixels = admit_and_decode(data, headers("image/jpeg"), b"cam-1")
    if not (LIMITS.min_side <= min(width, height) and max(width, height) <= LIMITS.max_side):
        assert pixels is None


@FUZZ
@given(h=st.integers(-3, 300), w=st.integers(-3, 300), ch=st.sampled_from([1, 2, 3, 4, 5]),
       delta=st.sampled_from([0, 0, 0, -1, 1, 17]), order=st.sampled_from(["", "; order=bgr", "; order=RGB"]))
def test_raw_frames_match_their_declared_shape(h, w, ch, delta, order):
    """Invariant: raw pixels decode to [H, W, C] uint8 exactly when the byte count is H*W*C and the shape
    is within limits; any other combination is refused with a reason."""
    size = max(0, h * w * ch + delta)
    content = f"application/x-raw; shape={h},{w},{ch}; dtype=uint8{order}"
    pixels = admit_and_decode(bytes(range(256)) * (size // 256) + bytes(size % 256), headers(content), b"cam-1")
    valid = ch in (1, 3, 4) and delta == 0 and LIMITS.min_side <= min(h, w) and size > 0
    assert (pixels is not None) == valid
    if valid:
        assert pixels.shape == (h, w, ch)


# ------------------------------------------------------------------------------------------ end to end


def fuzzed_stream(rng: np.random.Generator, count: int) -> list[Frame]:
    """``count`` records: good images, corrupted / truncated / crafted ones and hostile headers (seeded)."""
    frames = []
    for i in range(count):
        frame_id = f"fz-{i:03d}"
        kind = IMAGE_KINDS[int(rng.integers(len(IMAGE_KINDS)))]
        data, content = image_bytes(rng, int(rng.integers(8, 64)), int(rng.integers(8, 64)), kind)
        head = headers(content, frame_id)
        mode = i % 6
        if mode == 1:
            data = data[: int(rng.integers(0, len(data)))]
        elif mode == 2:
            data = bytearray(data)
            for _ in range(4):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
            data = bytes(data)
        elif mode == 3:
            data = jpeg_with_sof(int(rng.integers(0, 65536)), int(rng.integers(0, 65536)), 0xC0, [],
                                 rng.bytes(int(rng.integers(0, 64))))
            head = headers("image/jpeg", frame_id)
        elif mode == 4:
            bad = [("captured_at", "²".encode()), ("captured_at", b"9999-12-31T23:59:59-23:59"),
                   ("category", rng.bytes(8)), ("content-type", b"application/x-raw; shape=1e9,1,3"),
                   ("camera_id", b"x" * 300)][i // 6 % 5]
            head = headers(content, frame_id, **{bad[0]: bad[1]})
        elif mode == 5:
            data = rng.bytes(int(rng.integers(1, 2000)))
        frames.append(Frame(data, head, b"cam-fz", partition=0))
    return frames


@pytest.mark.kafka
def test_fuzzed_records_through_a_worker_end_as_one_output_each(kafka_broker, make_worker):
    """Invariant: 30 fuzzed records through a real worker on the real broker: each ends as exactly one
    event or one dead letter (matched by offset: some have no usable frame_id), the worker does not crash,
    and the committed offset reaches the end of the partition."""
    topics = new_topics(kafka_broker, partitions=1)
    frames = fuzzed_stream(np.random.default_rng(41), 30)
    sent = publish(kafka_broker, topics.frames, frames)
    worker = make_worker(worker_settings(kafka_broker, topics, normals_topic="", prompts_topic="",
                                         max_pixels=LIMITS.max_pixels))
    result = worker.run(max_frames=len(sent), timeout=60, install_signals=False)
    assert result.exit_code == 0 and result.completed == len(sent), result

    outputs: dict[int, list[str]] = {}
    for record in read_all(kafka_broker, topics.events):
        outputs.setdefault(json.loads(record.value)["source"]["offset"], []).append("event")
    for record in read_all(kafka_broker, topics.dlq):
        text = dict((k, v.decode()) for k, v in record.headers if k.startswith("hpad-"))
        outputs.setdefault(int(text[c.ORIGINAL_OFFSET]), []).append(text[c.ERROR_CLASS])
    events = sum(v.count("event") for v in outputs.values())
    print(f"\nfuzzed stream: frames in {len(sent)}, events {events}, DLQ {sum(map(len, outputs.values())) - events}, "
          f"duplicates {sum(len(v) - 1 for v in outputs.values())}, lost {len(sent) - len(outputs)}; reasons "
          f"{sorted({r for v in outputs.values() for r in v} - {'event'})}")
    assert sorted(outputs) == [s.offset for s in sent], "a record has no output"
    assert all(len(v) == 1 for v in outputs.values()), {k: v for k, v in outputs.items() if len(v) > 1}
    assert all(v[0] == "event" or v[0] in c.REASONS for v in outputs.values())
    committed = committed_offsets(kafka_broker, topics.group, topics.frames)
    assert committed == {0: len(sent)}
    assert_commits_covered(committed, sent, {s.frame_id for s in sent})
