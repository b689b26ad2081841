"""Operator feedback records (``hpad.feedback``; ``consumers/schemas/feedback.schema.json``).

`feedback_record` builds one record from a joined frame (its event's key fields + the frame bytes), the
verdict, the note and who gave it. `check_request` turns a request body into (frame_id, verdict, note) or
a `FeedbackRefused` with the HTTP status and a reason the page shows. Pure functions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from consumers.console.store import FrameEntry
from consumers.contract import rfc3339

FEEDBACK_SCHEMA_VERSION = 1
VERDICTS = ("false_alarm", "real_defect")
MAX_NOTE_CHARS = 1000


class FeedbackRefused(Exception):  # noqa: N818 - a refusal, carried to the HTTP answer
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def check_request(body: object) -> tuple[str, str, str]:
    """``{"frame_id", "verdict", "note"?}`` -> (frame_id, verdict, note)."""
    if not isinstance(body, dict):
        raise FeedbackRefused(422, "bad_request", "the body must be a JSON object {frame_id, verdict, note}")
    frame_id, verdict, note = body.get("frame_id"), body.get("verdict"), body.get("note", "")
    if not isinstance(frame_id, str) or not frame_id:
        raise FeedbackRefused(422, "bad_request", "frame_id is missing")
    if verdict not in VERDICTS:
        raise FeedbackRefused(422, "bad_request", f"verdict must be one of {', '.join(VERDICTS)}")
    if note is None:
        note = ""
    if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
        raise FeedbackRefused(422, "bad_request", f"note must be text of at most {MAX_NOTE_CHARS} characters")
    return frame_id, verdict, note.strip()


def feedback_record(entry: FrameEntry, verdict: str, note: str, operator: str, console: str,
                    now: datetime | None = None) -> dict[str, Any]:
    """The record for a frame that has its event (``entry.event`` must be set)."""
    event = entry.event
    if event is None:
        raise FeedbackRefused(409, "unscored", f"frame {entry.frame_id} has no event yet")
    return {
        "schema_version": FEEDBACK_SCHEMA_VERSION,
        "feedback_id": str(uuid.uuid4()),
        "verdict": verdict,
        "note": note,
        "operator": operator,
        "given_at": rfc3339(now or datetime.now(UTC)),
        "frame_id": entry.frame_id,
        "camera_id": entry.camera_id,
        "category": str(event.get("category") or entry.category),
        "prompt_version": int(event["prompt_version"]),
        "prompt_sha256": str(event.get("prompt_sha256") or ""),
        "score": float(event["score"]),
        "threshold": float(event["threshold"]),
        "captured_at": event.get("captured_at") or entry.captured_at,
        "scored_at": event.get("scored_at"),
        "model_identity": str(event.get("model_identity") or ""),
        "console": console,
        "frame": {
            "content_type": entry.content_type,
            "encoding": "base64",
            "data": base64.b64encode(entry.value).decode("ascii"),
            "sha256": hashlib.sha256(entry.value).hexdigest(),
            "bytes": len(entry.value),
        },
    }


def encode_record(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode("utf-8")


def public_view(record: dict[str, Any]) -> dict[str, Any]:
    """The record without the frame's bytes (what the HTTP answer shows)."""
    frame = {k: v for k, v in record["frame"].items() if k != "data"}
    return {**record, "frame": frame}
