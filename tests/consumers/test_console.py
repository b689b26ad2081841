"""hpad console's parts without a browser: the bounded join, the overlay, settings and the feedback record."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
from pydantic import ValidationError

from consumers.console.feedback import FeedbackRefused, check_request, feedback_record
from consumers.console.render import decode_bgr, overlay, render_jpeg
from consumers.console.settings import ConsoleSettings
from consumers.console.store import DROP_REASONS, FrameEntry, FrameStore
from consumers.contract import Limits
from consumers.settings import settings_table
from tests.consumers.console_helpers import event_for, make_frame

SCHEMAS = Path(__file__).resolve().parents[2] / "consumers" / "schemas"


def store(**overrides) -> FrameStore:
    values = {"frames_per_camera": 3, "anomalies_per_camera": 2, "timeline_points": 5, "max_cameras": 2,
              "pending_events": 2, "max_bytes": 10_000}
    values.update(overrides)
    return FrameStore(**values)


def entry(frame_id: str, camera: str = "cam-1", size: int = 100) -> FrameEntry:
    return FrameEntry(frame_id, camera, "widget", "image/png", None, b"x" * size)


def event(frame_id: str, camera: str = "cam-1", score: float = 0.2, version: int = 0, at: int = 0) -> dict:
    return {"frame_id": frame_id, "camera_id": camera, "category": "widget", "score": score, "threshold": 0.5,
            "is_anomaly": score >= 0.5, "prompt_version": version, "prompt_source": "zero-shot",
            "prompt_sha256": "", "captured_at": f"2026-12-01T10:00:{at:02d}.000Z", "mask": None}


def test_frames_and_events_join_in_either_order_and_the_first_event_wins():
    s = store()
    s.add_frame(entry("a"))
    assert s.add_event(event("a", score=0.9))
    assert s.add_event(event("b", score=0.1, at=1))  # event first: it waits
    assert "b" in s.pending
    s.add_frame(entry("b"))
    assert not s.pending and s.get("b").event["score"] == 0.1
    assert not s.add_event(event("a", score=0.1))  # a re-sent event (worker crash) is dropped, counted
    assert s.get("a").event["score"] == 0.9 and s.drops["duplicate_event"] == 1
    snap = s.snapshot("cam-1", stale_after_s=30)
    assert snap["latest"]["frame_id"] == "b" and [a["frame_id"] for a in snap["anomalies"]] == ["a"]
    assert [p["score"] for p in snap["timeline"]] == [0.9, 0.1]
    assert snap["status"]["state"] == "ok" and snap["counts"] == {"events": 2, "anomalies": 1, "frames": 2}


def test_memory_stays_bounded_and_every_loss_is_counted():
    dropped: list[str] = []
    s = store(on_drop=dropped.append)
    for i in range(3):  # anomalies: kept beyond the ring (thumbnails, /frame/<id>)
        s.add_frame(entry(f"bad{i}"))
        s.add_event(event(f"bad{i}", score=0.9, at=i))
    for i in range(5):
        s.add_frame(entry(f"ok{i}"))
        s.add_event(event(f"ok{i}", at=10 + i))
    view = s.cameras["cam-1"]
    assert list(view.frames) == ["ok2", "ok3", "ok4"]
    assert [e.frame_id for e in view.anomalies] == ["bad2", "bad1"]
    assert s.get("bad0") is None and s.get("bad1") is not None and s.get("ok0") is None
    assert set(s.index) == {"ok2", "ok3", "ok4", "bad1", "bad2"}
    assert s.bytes == 100 * len(s.index)
    assert len(view.timeline) == 5  # timeline_points
    s.add_frame(entry("never-scored"))
    for i in range(3):
        s.add_frame(entry(f"late{i}"))
    assert dropped.count("evicted_unscored") == 1
    s.add_frame(entry("c2", camera="cam-2"))
    s.add_frame(entry("c3", camera="cam-3"))  # max_cameras = 2
    assert s.add_event(event("e3", camera="cam-3")) is False
    assert dropped.count("camera_limit") == 2
    for i in range(3):
        s.add_event(event(f"orphan{i}"))
    assert dropped.count("unjoined_event") == 1 and len(s.pending) == 2
    assert s.add_event({"frame_id": "x"}) is False and s.add_event("not an event") is False
    assert dropped.count("bad_event") == 2
    assert set(dropped) <= set(DROP_REASONS)


def test_byte_budget_evicts_plain_frames_before_anomalies():
    s = store(frames_per_camera=100, max_bytes=1000)
    s.add_frame(entry("bad", size=400))
    s.add_event(event("bad", score=0.9))
    for i in range(5):
        s.add_frame(entry(f"ok{i}", size=300))
    assert s.bytes <= 1000 and s.get("bad") is not None
    assert [f for f in s.cameras["cam-1"].frames] == ["ok3", "ok4"]


def test_line_status_and_prompt_history():
    s = store()
    assert s.snapshot("nope", 30) is None
    s.add_frame(entry("a"))
    assert s.snapshot("cam-1", 30)["status"]["state"] == "waiting"
    s.add_event(event("a", version=0, at=1))
    s.add_frame(entry("b"))
    s.add_event(event("b", score=0.8, version=1, at=2))
    snap = s.snapshot("cam-1", 30)
    assert snap["status"]["state"] == "anomaly"
    assert [(p["version"], p["events"]) for p in snap["prompts"]] == [(0, 1), (1, 1)]
    assert s.snapshot("cam-1", 30, now=time.time() + 60)["status"]["state"] == "stale"


def test_overlay_tints_exactly_the_mask_and_outlines_it():
    rng = np.random.default_rng(3)
    frame = make_frame(rng, "cam-1", "widget", defect=True, size=(120, 160))
    ev = event_for(frame, score=0.9)
    limits = Limits()
    bare = decode_bgr(frame.value, "image/png", limits)
    out = overlay(bare, frame.defect)
    changed = np.abs(out.astype(int) - bare.astype(int)).max(axis=2) > 0
    assert changed[frame.defect].all()  # every defect pixel is tinted
    ring = cv2.dilate(frame.defect.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert not changed[~ring].any()  # nothing far from the defect changes
    assert (out[frame.defect][:, 2].astype(int) > bare[frame.defect][:, 2].astype(int)).all()  # redder
    thumb = cv2.imdecode(np.frombuffer(render_jpeg(frame.value, "image/png", ev, max_side=80, limits=limits),
                                       np.uint8), cv2.IMREAD_COLOR)
    assert thumb.shape == (60, 80, 3)
    assert (overlay(bare, None) == bare).all()
    raw = cv2.cvtColor(bare, cv2.COLOR_BGR2RGB).tobytes()
    assert (decode_bgr(raw, "application/x-raw; shape=120,160,3; dtype=uint8", limits) == bare).all()
    from hpad.errors import FrameError

    with pytest.raises(FrameError):
        decode_bgr(b"\x89PNG broken", "image/png", limits)
    with pytest.raises(FrameError):
        decode_bgr(raw[:-1], "application/x-raw; shape=120,160,3; dtype=uint8", limits)


def test_feedback_record_follows_its_schema_and_requests_are_checked():
    rng = np.random.default_rng(4)
    frame = make_frame(rng, "cam-1", "widget", defect=True, size=(60, 80))
    e = FrameEntry(frame.frame_id, "cam-1", "widget", "image/png", None, frame.value)
    with pytest.raises(FeedbackRefused) as refused:
        feedback_record(e, "false_alarm", "", "alice", "console@host")
    assert refused.value.status == 409
    e.event = event_for(frame, score=0.9)
    record = feedback_record(e, "real_defect", "crack", "alice", "console@host")
    schema = json.loads((SCHEMAS / "feedback.schema.json").read_text())
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(record)
    assert base64.b64decode(record["frame"]["data"]) == frame.value
    assert (record["score"], record["prompt_version"], record["operator"]) == (0.9, 0, "alice")
    assert check_request({"frame_id": "f", "verdict": "false_alarm"}) == ("f", "false_alarm", "")
    for body in (None, [], {"verdict": "false_alarm"}, {"frame_id": "f", "verdict": "maybe"},
                 {"frame_id": "f", "verdict": "real_defect", "note": "x" * 1001}):
        with pytest.raises(FeedbackRefused) as refused:
            check_request(body)
        assert refused.value.status == 422


def test_console_settings_tokens_and_topics(clean_hpad_env, monkeypatch):
    s = ConsoleSettings()
    assert s.read_only and s.operators() == {} and s.console_host == "127.0.0.1"
    monkeypatch.setenv("HPAD_CONSOLE_FEEDBACK_TOKEN", "single-token-1")
    monkeypatch.setenv("HPAD_CONSOLE_OPERATOR", "line-3")
    assert ConsoleSettings().operators() == {"single-token-1": "line-3"}
    monkeypatch.setenv("HPAD_CONSOLE_FEEDBACK_TOKEN", "alice:tok-alice-1, bob:tok-bob-22")
    s = ConsoleSettings()
    assert s.operators() == {"tok-alice-1": "alice", "tok-bob-22": "bob"} and not s.read_only
    assert "tok-alice" not in repr(s)
    for bad in ("short", "alice:short", "alice:same-token-1,bob:same-token-1", ":no-name-token"):
        monkeypatch.setenv("HPAD_CONSOLE_FEEDBACK_TOKEN", bad)
        with pytest.raises(ValidationError) as err:
            ConsoleSettings()
        assert "HPAD_CONSOLE_FEEDBACK_TOKEN" in str(err.value) and bad.split(":")[-1] not in str(err.value)
    monkeypatch.delenv("HPAD_CONSOLE_FEEDBACK_TOKEN")
    monkeypatch.setenv("HPAD_FEEDBACK_TOPIC", "hpad.events")
    with pytest.raises(ValidationError, match="must differ"):
        ConsoleSettings()
    table = settings_table(ConsoleSettings)
    assert all(f"`HPAD_{name.upper()}`" in table for name in ConsoleSettings.model_fields)
    assert all(info.description for info in ConsoleSettings.model_fields.values())
