"""Events and dead letters: built records validate against the JSON Schemas in consumers/schemas/."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from consumers import contract as c
from consumers import events as ev
from consumers.camera import frame_headers
from consumers.items import FrameItem, PipelineConfig
from consumers.offsets import OffsetBook
from consumers.output import OutputStage
from hpad.errors import FrameError
from hpad.masks import PackedMask, decode_mask_png

SCHEMAS = Path(c.__file__).resolve().parent / "schemas"
MODEL = ev.ModelInfo("hpad-tiny", "random-init", "hpad-tiny/random-init", True, "cpu", "fp32")
SCORED = ev.Scored(0.7, 0.5, 0.5, 3, "learned", "ab" * 32)


def schema(name: str) -> jsonschema.Validator:
    document = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(document)
    cls.check_schema(document)
    return cls(document, format_checker=cls.FORMAT_CHECKER)


def meta(captured: datetime | None = datetime(2026, 11, 25, 5, 0, tzinfo=UTC)) -> c.FrameMeta:
    return c.FrameMeta("cam-1-000042", "cam-1", "widget", c.ContentType("png"), captured)


def event(mask=None, **kwargs) -> dict:
    args = {"meta": meta(), "scored": SCORED, "model": MODEL, "timings": ev.Timings(1.0, 2.0, 3.0, 6.5),
            "scored_at": datetime(2026, 11, 25, 5, 0, 1, tzinfo=UTC), "source": ("frames", 2, 17),
            "size": (30, 20), "mask": mask}
    args.update(kwargs)
    return ev.build_event(**args)


def test_event_with_mask_validates_and_mask_round_trips():
    amap = np.zeros((20, 30), np.float32)
    amap[5:10, 3:12] = 0.9
    mask = ev.mask_field(amap, 0.5)
    built = event(mask)
    schema("event").validate(json.loads(ev.encode_event(built)))
    assert built["is_anomaly"] is True and built["random_weights"] is True and built["weights"] == "random-init"
    assert built["prompt_version"] == 3 and built["captured_at"] == "2026-11-25T05:00:00.000Z"
    decoded = decode_mask_png(base64.b64decode(mask["data"]))
    assert decoded.shape == (20, 30) and decoded.sum() == 45 == mask["anomalous_pixels"]
    assert (mask["width"], mask["height"]) == (30, 20)


def test_event_without_mask_or_capture_time_validates():
    built = event(None, meta=meta(None), scored=ev.Scored(0.2, 0.5, 0.5, 0, "zero-shot", ""))
    schema("event").validate(built)
    assert built["is_anomaly"] is False and built["captured_at"] is None and built["mask"] is None


def test_event_schema_rejects_missing_fields_and_bad_values():
    validator = schema("event")
    built = event()
    for broken in ({k: v for k, v in built.items() if k != "random_weights"}, {**built, "score": 1.5},
                   {**built, "schema_version": 2}, {**built, "surprise": 1}):
        assert not validator.is_valid(broken)


def test_nan_scores_are_refused_not_written():
    with pytest.raises(ValueError):
        ev.encode_event(event(scored=ev.Scored(float("nan"), 0.5, 0.5, 0, "zero-shot", "")))


def test_dead_letter_headers_validate_and_keep_originals():
    original = [("frame_id", b"f-9"), ("traceparent", b"00-abc"), (c.ERROR_CLASS, b"old")]
    headers = ev.dead_letter_headers(original, "undecodable", "bad bytes", ("frames", 1, 99), 1795584925990,
                                     datetime(2026, 11, 25, tzinfo=UTC), "hpad-scorer@host:1")
    text = ev.headers_as_text(headers)
    schema("dead_letter_headers").validate(text)
    assert text["frame_id"] == "f-9" and text["traceparent"] == "00-abc"
    assert text[c.ERROR_CLASS] == "undecodable" and [k for k, _ in headers].count(c.ERROR_CLASS) == 1
    assert (text[c.ORIGINAL_TOPIC], text[c.ORIGINAL_PARTITION], text[c.ORIGINAL_OFFSET]) == ("frames", "1", "99")


def test_reason_codes_match_the_schema():
    document = json.loads((SCHEMAS / "dead_letter_headers.schema.json").read_text())
    assert document["properties"][c.ERROR_CLASS]["enum"] == list(c.REASONS)


def test_camera_headers_validate_against_the_frame_schema():
    validator = schema("frame_headers")
    good = ev.headers_as_text(frame_headers("cam-1-abc-0000001", "cam-1", "bottle", "image/png"))
    validator.validate(good)
    validator.validate({**good, "content-type": "application/x-raw; shape=480,640,3; dtype=uint8"})
    validator.validate({**good, "captured_at": "1795584925990"})
    assert not validator.is_valid({k: v for k, v in good.items() if k != "frame_id"})
    assert not validator.is_valid({**good, "captured_at": "2026-11-25T05:00:00"})  # no timezone
    assert not validator.is_valid({**good, "content-type": "image/gif"})


def record(offset: int = 5, value: bytes = b"\x89PNG...") -> ConsumerRecord:
    headers = frame_headers("f-5", "cam-1", "widget", "image/png")
    return ConsumerRecord("frames", 0, -1, offset, 1795584925990, 0, b"cam-1", value, headers, None, 5,
                          len(value), 0)


def stage(max_request_size: int) -> OutputStage:
    config = PipelineConfig(events_topic="events", dlq_topic="dlq", worker_name="w", limits=c.Limits(),
                            default_category=None, mask_policy="always", max_request_size=max_request_size)
    return OutputStage(config, deliverer=None, metrics=None, model=MODEL, book=OffsetBook())


def scored_item(size=(64, 64)) -> FrameItem:
    item = FrameItem(record(), TopicPartition("frames", 0), 0, 0.0, meta=meta(), size=(size[1], size[0]))
    item.scored = SCORED
    item.mask = PackedMask.from_bool(np.random.default_rng(0).random(size) >= 0.5)  # noisy: a big mask PNG
    return item


def test_event_over_the_request_size_becomes_a_dead_letter():
    out = stage(max_request_size=20_000).event_record(scored_item((400, 400)))
    assert out.topic == "dlq" and out.reason == "event_too_large"
    assert out.value == record().value and out.key == b"cam-1"
    fits = stage(max_request_size=10_000_000).event_record(scored_item())
    assert fits.topic == "events" and fits.reason is None
    schema("event").validate(json.loads(fits.value))


def test_dead_letter_of_an_oversized_value_is_truncated_and_says_so():
    item = FrameItem(record(value=b"x" * 50_000), TopicPartition("frames", 0), 0, 0.0)
    out = stage(max_request_size=40_000).dead_letter(item, "payload_too_large", "too big")
    assert out.value == b"" and ev.headers_as_text(out.headers)[c.VALUE_TRUNCATED] == "true"
    small = stage(max_request_size=10_000_000).dead_letter(item, "payload_too_large", "too big")
    assert small.value == b"x" * 50_000 and c.VALUE_TRUNCATED not in ev.headers_as_text(small.headers)


def test_work_of_a_partition_that_left_is_abandoned():
    from consumers.items import Batch
    from consumers.metrics import WorkerMetrics

    book, metrics = OffsetBook(), WorkerMetrics()
    tp = TopicPartition("frames", 0)
    kept = FrameItem(record(offset=1), TopicPartition("frames", 1), book.track(TopicPartition("frames", 1), 1), 0.0)
    stale = FrameItem(record(offset=5), tp, book.track(tp, 5), 0.0)
    kept.error = stale.error = FrameError("undecodable", "not an image")
    book.release({tp})
    config = PipelineConfig(events_topic="events", dlq_topic="dlq", worker_name="w", limits=c.Limits(),
                            default_category=None, mask_policy="never", max_request_size=2**24)
    outs = OutputStage(config, None, metrics, MODEL, book).build(Batch([kept, stale]))
    assert [o.item for o in outs] == [kept]
    abandoned = [s.value for s in metrics.frames.collect()[0].samples
                 if s.name == "hpad_frames_total" and s.labels["outcome"] == "abandoned"]
    assert abandoned == [1.0]
