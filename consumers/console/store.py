"""Frames and events joined by ``frame_id`` in bounded memory: what the console shows.

Per camera: a ring of the newest frames (``frames_per_camera``), the newest anomalous frames with their
event (``anomalies_per_camera``; they outlive the ring so thumbnails and ``/frame/<id>`` keep working), a
score timeline (``timeline_points``), and the prompt versions seen in its events. Events whose frame has not
arrived yet wait in a bounded pending map; a frame and its event meet whichever comes first. A global byte
budget (``max_bytes``) evicts the oldest plain (non-anomalous) frames first. Every frame or event that is
dropped or evicted unseen is counted by reason (`DROP_REASONS`).

Thread-safe (one lock): the Kafka reader thread adds, the web server reads snapshots.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

DROP_REASONS = {
    "bad_header": "a frame without valid frame headers (frame_id, camera, content-type, category)",
    "too_large": "a frame larger than HPAD_MAX_PAYLOAD_BYTES",
    "camera_limit": "a frame or event of a camera beyond HPAD_CONSOLE_MAX_CAMERAS",
    "bad_event": "an event that is not JSON or lacks the fields the console needs",
    "unjoined_event": "an event whose frame never arrived while it waited (pending map full)",
    "evicted_unscored": "a frame evicted from its camera's ring before its event arrived",
    "duplicate_event": "a second event for a frame (re-sent after a worker restart); the first one is kept",
}
SEEN_EVENTS = 8192  # frame ids of recent events remembered to drop duplicates
EVENT_FIELDS = ("frame_id", "camera_id", "score", "threshold", "is_anomaly", "prompt_version")


@dataclass(eq=False)  # identity: entries are compared by `is`/`in` on hot paths
class FrameEntry:
    """One frame in memory: its bytes and headers, and its event once joined."""

    frame_id: str
    camera_id: str
    category: str
    content_type: str  # the header text (parsed again when rendering)
    captured_at: str | None
    value: bytes
    received: float = field(default_factory=time.time)
    event: dict[str, Any] | None = None
    feedback: list[dict[str, str]] = field(default_factory=list)  # verdicts given on this console
    cache: dict[str, bytes] = field(default_factory=dict)  # rendered thumbnails

    @property
    def size(self) -> int:
        return len(self.value)


@dataclass
class CameraView:
    camera_id: str
    category: str = ""
    frames: OrderedDict[str, FrameEntry] = field(default_factory=OrderedDict)
    anomalies: deque[FrameEntry] = field(default_factory=deque)
    timeline: deque[dict[str, Any]] = field(default_factory=deque)
    prompts: OrderedDict[tuple[int, str], dict[str, Any]] = field(default_factory=OrderedDict)
    latest: FrameEntry | None = None
    last_event_at: float = 0.0
    events: int = 0
    anomaly_count: int = 0
    version: int = 0  # bumped on every change (the live stream sends changed cameras)


def event_time_ms(event: dict[str, Any]) -> int:
    """captured_at (else scored_at) of an event as epoch milliseconds (0 when neither parses)."""
    for name in ("captured_at", "scored_at"):
        text = event.get(name)
        if isinstance(text, str):
            try:
                return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
            except ValueError:
                continue
    return 0


def check_event(event: object) -> dict[str, Any] | None:
    """The event if it has what the console needs (types checked), else None."""
    if not isinstance(event, dict) or any(name not in event for name in EVENT_FIELDS):
        return None
    if not (isinstance(event["frame_id"], str) and isinstance(event["camera_id"], str)):
        return None
    if not all(isinstance(event[n], (int, float)) and not isinstance(event[n], bool) for n in ("score", "threshold")):
        return None
    if not isinstance(event["prompt_version"], int) or not isinstance(event["is_anomaly"], bool):
        return None
    return event


class FrameStore:
    """The console's memory. ``on_drop(reason)`` is called for every drop (metrics)."""

    def __init__(self, *, frames_per_camera: int, anomalies_per_camera: int, timeline_points: int,
                 max_cameras: int, pending_events: int, max_bytes: int,
                 on_drop: Callable[[str], None] = lambda reason: None) -> None:
        self.frames_per_camera = frames_per_camera
        self.anomalies_per_camera = anomalies_per_camera
        self.timeline_points = timeline_points
        self.max_cameras = max_cameras
        self.pending_limit = pending_events
        self.max_bytes = max_bytes
        self.on_drop = on_drop
        self.cameras: OrderedDict[str, CameraView] = OrderedDict()
        self.index: dict[str, FrameEntry] = {}  # frame_id -> entry (in a ring or an anomaly list)
        self.pending: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.seen: OrderedDict[str, None] = OrderedDict()  # frame ids of recent events (duplicates dropped)
        self.bytes = 0
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.lock = threading.RLock()

    # ------------------------------------------------------------------------------ updates
    def _drop(self, reason: str) -> None:
        self.drops[reason] += 1
        self.on_drop(reason)

    def _camera(self, camera_id: str) -> CameraView | None:
        view = self.cameras.get(camera_id)
        if view is None:
            if len(self.cameras) >= self.max_cameras:
                return None
            view = self.cameras[camera_id] = CameraView(camera_id)
        return view

    def add_frame(self, entry: FrameEntry) -> None:
        with self.lock:
            view = self._camera(entry.camera_id)
            if view is None:
                self._drop("camera_limit")
                return
            old = self.index.get(entry.frame_id)
            if old is not None:  # a re-delivered frame: keep the first copy (and its event)
                return
            view.category = entry.category
            view.frames[entry.frame_id] = entry
            self.index[entry.frame_id] = entry
            self.bytes += entry.size
            event = self.pending.pop(entry.frame_id, None)
            if event is not None:
                self._join(view, entry, event)
            view.version += 1
            while len(view.frames) > self.frames_per_camera:
                self._evict(view, next(iter(view.frames)))
            self._enforce_budget()

    def add_event(self, raw: object) -> bool:
        """Record an event (timeline, prompt versions) and join it to its frame; False if refused."""
        event = check_event(raw)
        if event is None:
            self._drop("bad_event")
            return False
        with self.lock:
            if event["frame_id"] in self.seen:
                self._drop("duplicate_event")
                return False
            view = self._camera(event["camera_id"])
            if view is None:
                self._drop("camera_limit")
                return False
            self.seen[event["frame_id"]] = None
            while len(self.seen) > SEEN_EVENTS:
                self.seen.popitem(last=False)
            view.events += 1
            view.last_event_at = time.time()
            view.category = event.get("category") or view.category
            view.timeline.append({"t": event_time_ms(event), "score": float(event["score"]),
                                  "threshold": float(event["threshold"]), "anomaly": event["is_anomaly"],
                                  "frame_id": event["frame_id"], "prompt_version": event["prompt_version"]})
            while len(view.timeline) > self.timeline_points:
                view.timeline.popleft()
            self._note_prompt(view, event)
            if event["is_anomaly"]:
                view.anomaly_count += 1
            entry = self.index.get(event["frame_id"])
            if entry is not None:
                self._join(view, entry, event)
            else:
                self.pending[event["frame_id"]] = event
                while len(self.pending) > self.pending_limit:
                    self.pending.popitem(last=False)
                    self._drop("unjoined_event")
            view.version += 1
            return True

    def _note_prompt(self, view: CameraView, event: dict[str, Any]) -> None:
        key = (int(event["prompt_version"]), str(event.get("prompt_sha256") or ""))
        now_ms = event_time_ms(event)
        row = view.prompts.get(key)
        if row is None:
            row = view.prompts[key] = {"version": key[0], "sha256": key[1],
                                       "source": str(event.get("prompt_source") or ""), "first_seen": now_ms,
                                       "last_seen": now_ms, "events": 0}
        row["events"] += 1
        row["last_seen"] = max(row["last_seen"], now_ms)
        while len(view.prompts) > 50:
            view.prompts.popitem(last=False)

    def _join(self, view: CameraView, entry: FrameEntry, event: dict[str, Any]) -> None:
        if entry.event is not None:
            return  # the first event of a frame wins (events are re-sent after a worker crash)
        entry.event = event
        if view.latest is None or event_time_ms(event) >= event_time_ms(view.latest.event or {}):
            old, view.latest = view.latest, entry
            if old is not None and old.frame_id not in view.frames and old not in view.anomalies:
                self._forget(old)
        if event["is_anomaly"]:
            view.anomalies.appendleft(entry)
            while len(view.anomalies) > self.anomalies_per_camera:
                gone = view.anomalies.pop()
                if gone.frame_id not in view.frames and view.latest is not gone:
                    self._forget(gone)

    def _evict(self, view: CameraView, frame_id: str) -> None:
        entry = view.frames.pop(frame_id)
        if entry.event is None:
            self._drop("evicted_unscored")
        if entry not in view.anomalies and view.latest is not entry:
            self._forget(entry)

    def _forget(self, entry: FrameEntry) -> None:
        if self.index.get(entry.frame_id) is entry:
            del self.index[entry.frame_id]
            self.bytes -= entry.size

    def _enforce_budget(self) -> None:
        """Evict the oldest plain frame of the camera holding the most bytes until within ``max_bytes``."""
        while self.bytes > self.max_bytes:
            candidates = [v for v in self.cameras.values() if v.frames]
            if not candidates:
                break
            view = max(candidates, key=lambda v: sum(e.size for e in v.frames.values()))
            self._evict(view, next(iter(view.frames)))
            view.version += 1
            if not any(v.frames for v in self.cameras.values()):
                break

    def note_feedback(self, frame_id: str, verdict: str, operator: str) -> None:
        with self.lock:
            entry = self.index.get(frame_id)
            if entry is not None:
                entry.feedback.append({"verdict": verdict, "operator": operator})
                view = self.cameras.get(entry.camera_id)
                if view is not None:
                    view.version += 1

    # ------------------------------------------------------------------------------ queries
    def get(self, frame_id: str) -> FrameEntry | None:
        with self.lock:
            return self.index.get(frame_id)

    def versions(self) -> dict[str, int]:
        with self.lock:
            return {camera_id: view.version for camera_id, view in self.cameras.items()}

    def frames_in_memory(self) -> int:
        with self.lock:
            return len(self.index)

    def snapshot(self, camera_id: str, stale_after_s: float, now: float | None = None) -> dict[str, Any] | None:
        """One camera as the page shows it (JSON-ready)."""
        now = time.time() if now is None else now
        with self.lock:
            view = self.cameras.get(camera_id)
            if view is None:
                return None
            latest = view.latest
            if view.last_event_at == 0:
                state = "waiting"
            elif now - view.last_event_at > stale_after_s:
                state = "stale"
            elif latest is not None and latest.event and latest.event["is_anomaly"]:
                state = "anomaly"
            else:
                state = "ok"
            return {
                "camera_id": view.camera_id, "category": view.category, "version": view.version,
                "status": {"state": state, "last_event_age_s": round(now - view.last_event_at, 1)
                           if view.last_event_at else None},
                "counts": {"events": view.events, "anomalies": view.anomaly_count, "frames": len(view.frames)},
                "latest": None if latest is None else frame_summary(latest),
                "timeline": list(view.timeline),
                "anomalies": [frame_summary(e) for e in view.anomalies],
                "prompts": sorted(view.prompts.values(), key=lambda r: (r["first_seen"], r["version"])),
            }

    def snapshots(self, stale_after_s: float) -> list[dict[str, Any]]:
        with self.lock:
            return [s for c in list(self.cameras) if (s := self.snapshot(c, stale_after_s)) is not None]


def frame_summary(entry: FrameEntry) -> dict[str, Any]:
    event = entry.event or {}
    mask = event.get("mask") or {}
    return {
        "frame_id": entry.frame_id, "camera_id": entry.camera_id, "category": entry.category,
        "captured_at": entry.captured_at, "scored": entry.event is not None,
        "score": event.get("score"), "threshold": event.get("threshold"), "is_anomaly": event.get("is_anomaly"),
        "prompt_version": event.get("prompt_version"), "prompt_source": event.get("prompt_source"),
        "anomalous_pixels": mask.get("anomalous_pixels"), "random_weights": event.get("random_weights"),
        "feedback": list(entry.feedback),
    }
