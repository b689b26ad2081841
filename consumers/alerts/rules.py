"""The debounce rule of ``hpad alerts``: per line (camera, category), "k anomalous frames among the last n".

A pure state machine over events in the order they were written (one camera's events share a partition):

* **fire**: a line without an open episode whose last ``window`` frames hold at least ``min_anomalous``
  anomalies opens an episode at this frame, unless it is in its cooldown;
* **resolve**: an open episode closes at the ``resolve_normals``-th consecutive normal frame;
* **cooldown**: after an episode closed, no new episode opens on that line until ``cooldown_s`` of event
  time passed (anomalous frames still enter the window, so a line that is still bad fires at the first frame
  after the cooldown).

Only event time is used (``captured_at``, else ``scored_at``), never the wall clock, so replaying the same
events rebuilds the same state: that is how a restarted ``hpad alerts`` recovers (it re-reads the tail of each
partition before its committed offset) and why episode ids are deterministic (`episode_id`).

An episode keeps the ``prompt_version`` of the frame that opened it: a prompt hot-swap in the middle of an
episode does not change its identity (Alertmanager identifies an alert by its labels).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from hpad.errors import HpadError

MAX_ID_CHARS = 256


class InvalidEventError(HpadError):
    """An events-topic record the alerts service cannot read (``reason`` is a stable code)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DebounceRule:
    """k of n to fire (``min_anomalous`` of ``window``), m normals in a row to resolve, cooldown after."""

    window: int = 10
    min_anomalous: int = 3
    resolve_normals: int = 10
    cooldown_s: float = 300.0

    def __post_init__(self) -> None:
        if self.window < 1 or not 1 <= self.min_anomalous <= self.window:
            raise ValueError(f"need 1 <= min_anomalous ({self.min_anomalous}) <= window ({self.window})")
        if self.resolve_normals < 1:
            raise ValueError("resolve_normals must be at least 1")
        if not self.cooldown_s >= 0:
            raise ValueError("cooldown_s must be >= 0")


@dataclass(frozen=True)
class AlertEvent:
    """The fields of one scored event (consumers/schemas/event.schema.json) the debounce rule reads."""

    frame_id: str
    camera_id: str
    category: str
    score: float
    threshold: float
    is_anomaly: bool
    prompt_version: int
    event_time: datetime
    random_weights: bool = False

    @property
    def line(self) -> tuple[str, str]:
        return (self.camera_id, self.category)


def _text(event: dict, name: str) -> str:
    value = event.get(name)
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise InvalidEventError("invalid_field", f"event field {name!r} must be a string of 1-{MAX_ID_CHARS} characters")
    return value


def _number(event: dict, name: str) -> float:
    value = event.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidEventError("invalid_field", f"event field {name!r} must be a finite number")
    return float(value)


def _time(event: dict, name: str) -> datetime | None:
    value = event.get(name)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise InvalidEventError("invalid_field", f"event field {name!r} must be an RFC 3339 time with a timezone")
    return moment


def parse_event(value: bytes | None) -> AlertEvent:
    """An events-topic record value (JSON, schema version 1) -> `AlertEvent`, or `InvalidEventError`."""
    if not value:
        raise InvalidEventError("empty_value", "the record has no value")
    try:
        event = json.loads(value)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidEventError("not_json", f"the value is not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise InvalidEventError("not_json", "the value is not a JSON object")
    if event.get("schema_version") != 1:
        raise InvalidEventError("unsupported_schema_version",
                           f"schema_version {event.get('schema_version')!r} is not 1")
    is_anomaly = event.get("is_anomaly")
    version = event.get("prompt_version")
    if not isinstance(is_anomaly, bool):
        raise InvalidEventError("invalid_field", "event field 'is_anomaly' must be true or false")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InvalidEventError("invalid_field", "event field 'prompt_version' must be an integer >= 0")
    moment = _time(event, "captured_at") or _time(event, "scored_at")
    if moment is None:
        raise InvalidEventError("invalid_field", "event field 'scored_at' is missing")
    return AlertEvent(frame_id=_text(event, "frame_id"), camera_id=_text(event, "camera_id"),
                      category=_text(event, "category"), score=_number(event, "score"),
                      threshold=_number(event, "threshold"), is_anomaly=is_anomaly, prompt_version=version,
                      event_time=moment, random_weights=event.get("random_weights") is True)


def episode_id(camera_id: str, category: str, started_at: datetime, frame_id: str) -> str:
    """Deterministic id of an episode: the same events always give the same id (restarts, replays)."""
    text = "\x1f".join((camera_id, category, started_at.isoformat(), frame_id))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class Episode:
    """One incident of one line: opened by ``frame_id`` at ``started_at``; ``ended_at`` once resolved."""

    id: str
    camera_id: str
    category: str
    prompt_version: int  # of the opening frame, kept for the whole episode (the alert's identity)
    started_at: datetime
    frame_id: str
    score: float
    threshold: float
    anomalous_in_window: int
    random_weights: bool
    last_frame_id: str
    last_score: float
    last_prompt_version: int
    peak_score: float
    peak_frame_id: str
    ended_at: datetime | None = None
    resolved_by: str | None = None  # frame that closed it


@dataclass(frozen=True)
class Transition:
    """What a step changed: ``status`` is ``firing`` (episode opened) or ``resolved`` (episode closed).

    ``episode`` is a copy taken at that frame: a notification describes the episode as it was when it fired
    or resolved, whatever else the same batch holds, so it is the same after a restart that batches the
    events differently."""

    status: str
    episode: Episode


@dataclass
class LineState:
    """What the rule remembers about one line."""

    recent: deque[bool] = field(default_factory=deque)
    normal_streak: int = 0
    episode: Episode | None = None
    cooldown_until: datetime | None = None

    def anomalous(self) -> int:
        return sum(self.recent)


def step(rule: DebounceRule, state: LineState, event: AlertEvent) -> Transition | None:
    """Feed one event of the line to its state; the transition it causes, if any (mutates ``state``)."""
    state.recent.append(event.is_anomaly)
    while len(state.recent) > rule.window:
        state.recent.popleft()
    state.normal_streak = 0 if event.is_anomaly else state.normal_streak + 1
    episode = state.episode
    if episode is not None:
        episode.last_frame_id, episode.last_score = event.frame_id, event.score
        episode.last_prompt_version = event.prompt_version
        if event.score > episode.peak_score:
            episode.peak_score, episode.peak_frame_id = event.score, event.frame_id
        if state.normal_streak >= rule.resolve_normals:
            episode.ended_at, episode.resolved_by = event.event_time, event.frame_id
            state.episode = None
            state.cooldown_until = event.event_time + timedelta(seconds=rule.cooldown_s)
            return Transition("resolved", replace(episode))
        return None
    if state.cooldown_until is not None and event.event_time < state.cooldown_until:
        return None
    count = state.anomalous()
    if not event.is_anomaly or count < rule.min_anomalous:
        return None
    state.cooldown_until = None
    state.episode = Episode(
        id=episode_id(event.camera_id, event.category, event.event_time, event.frame_id),
        camera_id=event.camera_id, category=event.category, prompt_version=event.prompt_version,
        started_at=event.event_time, frame_id=event.frame_id, score=event.score, threshold=event.threshold,
        anomalous_in_window=count, random_weights=event.random_weights, last_frame_id=event.frame_id,
        last_score=event.score, last_prompt_version=event.prompt_version, peak_score=event.score,
        peak_frame_id=event.frame_id)
    return Transition("firing", replace(state.episode))


class Debouncer:
    """The states of many lines (one per (camera, category)), grouped by the partition they arrive on."""

    def __init__(self, rule: DebounceRule) -> None:
        self.rule = rule
        self.lines: dict[object, dict[tuple[str, str], LineState]] = {}

    def feed(self, group: object, event: AlertEvent) -> Transition | None:
        states = self.lines.setdefault(group, {})
        state = states.get(event.line)
        if state is None:
            state = states[event.line] = LineState()
        return step(self.rule, state, event)

    def drop(self, group: object) -> None:
        """Forget the lines of one partition (it moved to another consumer)."""
        self.lines.pop(group, None)

    def open_episodes(self, group: object | None = None) -> list[Episode]:
        groups = self.lines.values() if group is None else [self.lines.get(group, {})]
        return [s.episode for states in groups for s in states.values() if s.episode is not None]
