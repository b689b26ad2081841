"""Output the broker or producer refuses, and poison input, end to end on the real broker.

The poison stream runs on tansu and on Apache Kafka (1 node; without the event_rejected frame there: only
tansu's schema registry makes the broker refuse an event); the rest on tansu.

An event the producer refuses becomes a dead letter with its reason (never dropped), and a stream that mixes
good frames with every kind of bad input never stalls its partition: every good frame after a poison one
is scored, every poison frame is dead-lettered once, and the committed offset reaches the end.
"""

from __future__ import annotations

import dataclasses
import struct

import cv2
import numpy as np
import pytest

from consumers import contract as c
from consumers import kafka_io
from consumers.camera import frame_headers
from consumers.events import headers_as_text, mask_field
from consumers.prompt_provider import StaticPromptProvider
from hpad.scorer import Scorer, ScorerConfig
from tests.consumers.kafka_helpers import (
    Frame,
    assert_commits_covered,
    committed_offsets,
    encode,
    events_by_frame,
    good_frame,
    image,
    new_topics,
    png_claiming,
    publish,
    read_all,
    settings,
)

pytestmark = pytest.mark.kafka
QUIET = {"normals_topic": "", "prompts_topic": ""}


def letters_by_offset(broker, topic: str) -> dict[int, list[dict[str, str]]]:
    """Dead letters by the offset of their frame (frames without a frame_id are found this way too)."""
    out: dict[int, list[dict[str, str]]] = {}
    for record in read_all(broker, topic):
        text = headers_as_text(record.headers)
        out.setdefault(int(text[c.ORIGINAL_OFFSET]), []).append({**text, "_value_len": str(len(record.value or b""))})
    return out


def test_event_the_producer_refuses_becomes_a_dead_letter(kafka_broker, tiny_backbone, make_worker, monkeypatch):
    """Invariant: a frame whose event is too large for the producer (kafka-python raises
    MessageSizeTooLargeError) ends as exactly one dead letter with reason event_too_large and its original
    bytes; the frames before and after it get exactly one event each; the offset is committed past all."""
    topics = new_topics(kafka_broker, partitions=1)
    scorer = Scorer(tiny_backbone, config=ScorerConfig(max_batch=4))
    flat = np.full((800, 800, 3), 128, np.uint8)  # a PNG of a few KB whose mask is bigger than the PNG
    big_value = cv2.imencode(".png", flat, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()
    # a prompt set whose pixel threshold (the map's median on this frame: the most ragged mask) draws a real
    # mask on the flat frame, as a learned artifact may; the map does not depend on the threshold
    zero_shot = scorer.zero_shot_prompts("widget")
    amap = scorer.score([flat], zero_shot).anomaly_map[0]
    prompts = dataclasses.replace(zero_shot, pixel_threshold=float(np.median(amap)))
    provider = StaticPromptProvider({"widget": prompts})
    mask_b64 = len(mask_field(amap, prompts.pixel_threshold)["data"])
    event_size, letter_size = mask_b64 + 900, len(big_value) + 900  # + JSON fields / + dead-letter headers
    assert event_size - letter_size > 1000, (mask_b64, len(big_value))  # precondition of the scenario
    limit = (event_size + letter_size) // 2

    real = kafka_io.make_producer
    monkeypatch.setattr(kafka_io, "make_producer", lambda kwargs: real({**kwargs, "max_request_size": limit}))
    rng = np.random.default_rng(31)
    before = [good_frame(rng, size=(32, 40)) for _ in range(3)]
    big = Frame(big_value, frame_headers("big-flat-frame", "cam-1", "widget", "image/png"), b"cam-1")
    after = [good_frame(rng, size=(32, 40)) for _ in range(3)]
    sent = publish(kafka_broker, topics.frames, [*before, big, *after])
    worker = make_worker(settings(kafka_broker, topics, categories=["widget"], mask_policy="always", **QUIET),
                         provider=provider)
    result = worker.run(max_frames=len(sent), timeout=60, install_signals=False)
    assert result.exit_code == 0 and result.completed == len(sent), result

    events = events_by_frame(read_all(kafka_broker, topics.events, expected=6))
    letters = letters_by_offset(kafka_broker, topics.dlq)
    print(f"\nevent too large (producer limit {limit} B, event ~{event_size} B): frames in {len(sent)}, events "
          f"{len(events)}, DLQ {sum(map(len, letters.values()))}, duplicates "
          f"{sum(len(v) - 1 for v in events.values())}, lost {len(sent) - len(events) - len(letters)}")
    assert set(events) == {f.frame_id for f in [*before, *after]} and all(len(v) == 1 for v in events.values())
    assert list(letters) == [3] and len(letters[3]) == 1
    (letter,) = letters[3]
    assert letter[c.ERROR_CLASS] == "event_too_large" and "MessageSizeTooLarge" in letter[c.ERROR_MESSAGE]
    assert letter["frame_id"] == "big-flat-frame" and int(letter["_value_len"]) == len(big_value)
    committed = committed_offsets(kafka_broker, topics.group, topics.frames)
    assert committed == {0: len(sent)}
    assert_commits_covered(committed, sent, set(events) | {"big-flat-frame"})
    samples = {s.labels["reason"]: s.value for s in worker.metrics.dead_letters.collect()[0].samples
               if s.name == "hpad_dead_letters_total"}
    assert samples["event_too_large"] == 1


def poison(rng: np.random.Generator) -> list[tuple[str, Frame]]:
    """(expected reason, frame) for every kind of bad input the worker can be sent."""
    png = encode(image(rng, (32, 32)))
    jpeg = encode(image(rng, (32, 32)), ".jpg")

    def h(fid: str = "p", content: str = "image/png", category: str = "widget", **extra: bytes):
        """The contract's headers; ``extra`` replaces (or adds) headers with raw bytes."""
        base = [(k, v) for k, v in frame_headers(fid, "cam-p", category, content) if k not in extra]
        return base + [(k, v) for k, v in extra.items() if v is not None]

    no_id = [(k, v) for k, v in h() if k != c.FRAME_ID]
    no_camera = [(k, v) for k, v in h("p-nocam") if k != c.CAMERA_ID]
    raw = "application/x-raw; shape=8,8,3"
    return [
        ("empty_value", Frame(None, h("p-empty"), b"cam-p")),
        ("payload_too_large", Frame(b"\x89PNG" + bytes(300_000), h("p-large"), b"cam-p")),
        ("missing_header", Frame(png, no_id, b"cam-p")),
        ("missing_header", Frame(png, no_camera, None)),
        ("missing_header", Frame(png, [(k, v) for k, v in h("p-noct") if k != c.CONTENT_TYPE], b"cam-p")),
        ("invalid_header", Frame(png, h("p-utf8", frame_id=b"p-\xff\xfe-not-utf8"), b"cam-p")),
        ("invalid_header", Frame(png, [*h("p-twice"), (c.FRAME_ID, b"p-twice-again")], b"cam-p")),
        ("invalid_header", Frame(png, h("x" * 300), b"cam-p")),
        ("invalid_header", Frame(png, h("p-ctrl\x07"), b"cam-p")),
        ("invalid_header", Frame(png, h("p-time", captured_at=b"yesterday"), b"cam-p")),
        ("invalid_header", Frame(bytes(192), h("p-float", content=f"{raw}; dtype=float32"), b"cam-p")),
        ("invalid_header", Frame(bytes(192), h("p-shape", content="application/x-raw; shape=8,8,2"), b"cam-p")),
        ("invalid_header", Frame(png, no_camera, b"\xff\xfe")),  # the key (camera id) is not UTF-8
        ("unsupported_content_type", Frame(png, h("p-gif", content="image/gif"), b"cam-p")),
        ("unknown_category", Frame(png, h("p-cat", category="spaceship"), b"cam-p")),
        ("bad_dimensions", Frame(png_claiming(100_000, 100_000), h("p-huge"), b"cam-p")),
        ("bad_dimensions", Frame(encode(image(rng, (4, 4))), h("p-tiny"), b"cam-p")),
        ("bad_dimensions", Frame(png_claiming(0, 64), h("p-zero"), b"cam-p")),
        ("too_many_pixels", Frame(png_claiming(4000, 4000), h("p-bomb"), b"cam-p")),
        ("undecodable", Frame(b"not an image at all", h("p-junk", content="image/jpeg"), b"cam-p")),
        ("undecodable", Frame(png[: len(png) // 2], h("p-halfpng"), b"cam-p")),
        ("undecodable", Frame(jpeg[: len(jpeg) // 3], h("p-halfjpeg", content="image/jpeg"), b"cam-p")),
        ("undecodable", Frame(jpeg, h("p-jpeg-as-png"), b"cam-p")),
        ("undecodable", Frame(bytes(10), h("p-raw", content=raw), b"cam-p")),
        ("undecodable", Frame(_sof_only_jpeg(64, 64), h("p-sof", content="image/jpeg"), b"cam-p")),
        ("event_rejected", Frame(png, h("p-rejected", category="gadget"), b"cam-p")),
    ]


def _sof_only_jpeg(width: int, height: int) -> bytes:
    """SOI + a baseline start-of-frame declaring width x height, and nothing to decode."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def test_poison_stream_never_stalls_the_partition(kafka, make_worker):
    """Invariant: in one partition, good frames interleaved with every kind of bad input: each good frame
    ends as exactly one event, each bad one as exactly one dead letter with the expected reason; the worker
    finishes within its timeout and commits the partition's end (nothing stalls behind a poison frame)."""
    topics = kafka.new_topics(partitions=1)
    if kafka.has_schema_registry:
        kafka.reject_schema(topics.events, "gadget")  # the broker refuses gadget events for real
    rng = np.random.default_rng(32)
    bad = [(reason, frame) for reason, frame in poison(rng)  # only tansu's schema registry refuses an event
           if kafka.has_schema_registry or reason != "event_rejected"]
    stream: list[Frame] = []
    expected: dict[int, str] = {}
    good: list[Frame] = []
    for reason, frame in bad:
        ok = good_frame(rng, size=(40, 48), ext=(".png", ".jpg")[len(good) % 2])
        good.append(ok)
        stream.append(ok)
        expected[len(stream)] = reason
        stream.append(frame)
    good.append(good_frame(rng, size=(40, 48)))
    stream.append(good[-1])
    for frame in stream:
        frame.partition = 0
    sent = kafka.publish(topics.frames, stream)
    s = kafka.settings(topics, max_pixels=1_000_000, max_payload_bytes=200_000, **QUIET)
    worker = make_worker(s)
    result = worker.run(max_frames=len(sent), timeout=90, install_signals=False)
    assert result.exit_code == 0 and result.completed == len(sent), result

    events = events_by_frame(kafka.read_all(topics.events, expected=len(good)))
    letters = letters_by_offset(kafka.broker, topics.dlq)
    print(f"\npoison stream: frames in {len(sent)} ({len(good)} good, {len(bad)} bad), events {len(events)}, DLQ "
          f"{sum(map(len, letters.values()))}, duplicates {sum(len(v) - 1 for v in events.values())}, lost "
          f"{len(good) - len(events) + len(bad) - len(letters)}")
    assert set(events) == {f.frame_id for f in good} and all(len(v) == 1 for v in events.values())
    got = {offset: [x[c.ERROR_CLASS] for x in copies] for offset, copies in letters.items()}
    assert got == {offset: [reason] for offset, reason in expected.items()}
    committed = kafka.committed_offsets(topics.group, topics.frames)
    assert committed == {0: len(sent)}
    assert_commits_covered(committed, sent, set(events) | {s.frame_id for s in sent if s.offset in expected})
