"""`hpad alerts` without Kafka or HTTP: the debounce state machine, the payloads, settings and README tables."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest

from consumers.alerts import docs as alerts_docs
from consumers.alerts.notify import (
    AlertStyle,
    alertmanager_alert,
    console_link,
    idempotency_key,
    signature,
    verify_signature,
    webhook_body,
)
from consumers.alerts.rules import (
    AlertEvent,
    Debouncer,
    DebounceRule,
    InvalidEventError,
    LineState,
    parse_event,
    step,
)
from consumers.alerts.settings import AlertsSettings, alerts_consumer_kwargs
from consumers.docs import README, block
from consumers.settings import load_settings
from hpad.errors import ConfigError
from tests.consumers.alerting_helpers import event_bytes

SCHEMA = json.loads((Path(__file__).parents[2] / "consumers/schemas/alert_webhook.schema.json").read_text())
T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def ev(seq: int, anomalous: bool, camera: str = "cam-1", version: int = 0, seconds: float | None = None,
       category: str = "widget", score: float | None = None) -> AlertEvent:
    return AlertEvent(frame_id=f"{camera}-{seq}", camera_id=camera, category=category,
                      score=score if score is not None else (0.9 if anomalous else 0.1), threshold=0.5,
                      is_anomaly=anomalous, prompt_version=version,
                      event_time=T0 + timedelta(seconds=seq if seconds is None else seconds))


def run(rule: DebounceRule, pattern: str, state: LineState | None = None, start: int = 0, **kw):
    """Feed 'A' (anomalous) / '.' (normal) frames; [(index, status)] of the transitions."""
    state = state if state is not None else LineState()
    out = []
    for i, char in enumerate(pattern, start=start):
        transition = step(rule, state, ev(i, char == "A", **kw))
        if transition is not None:
            out.append((i, transition.status))
    return out, state


# ------------------------------------------------------------------------------------------ the rule


def test_fires_at_the_kth_anomaly_among_the_last_n_and_not_before():
    rule = DebounceRule(window=5, min_anomalous=3, resolve_normals=3, cooldown_s=0)
    assert run(rule, "A..A..A..A..")[0] == []  # never 3 in any 5
    transitions, state = run(rule, "A.A.A")
    assert transitions == [(4, "firing")]
    assert state.episode is not None and state.episode.frame_id == "cam-1-4"
    assert state.episode.anomalous_in_window == 3 and state.episode.started_at == T0 + timedelta(seconds=4)


def test_resolves_after_m_consecutive_normals_only():
    rule = DebounceRule(window=4, min_anomalous=2, resolve_normals=3, cooldown_s=0)
    transitions, state = run(rule, "AA..A...")
    # an anomaly after two normals restarts the count: resolved at the third normal in a row (index 7)
    assert transitions == [(1, "firing"), (7, "resolved")]
    assert state.episode is None


def test_cooldown_holds_a_new_episode_back_then_fires_at_the_first_frame_after_it():
    rule = DebounceRule(window=3, min_anomalous=2, resolve_normals=1, cooldown_s=10)
    transitions, state = run(rule, "AA.AAAAAAAAAAAAA")
    # resolved at 2 (event time 2 s): no episode before 12 s, then the window is still bad -> fires at 12
    assert transitions == [(1, "firing"), (2, "resolved"), (12, "firing")]
    assert state.episode is not None and state.episode.frame_id == "cam-1-12"
    no_cooldown, _ = run(DebounceRule(window=3, min_anomalous=2, resolve_normals=1, cooldown_s=0), "AA.AA")
    assert no_cooldown == [(1, "firing"), (2, "resolved"), (3, "firing")]  # [A . A] is 2 of 3


def test_k_equals_one_and_k_equals_n():
    assert run(DebounceRule(1, 1, 1, 0), "A.")[0] == [(0, "firing"), (1, "resolved")]
    assert run(DebounceRule(3, 3, 1, 0), "AA.AAA")[0] == [(5, "firing")]


def test_prompt_hot_swap_does_not_change_the_episode_identity():
    rule = DebounceRule(window=3, min_anomalous=2, resolve_normals=2, cooldown_s=0)
    state = LineState()
    step(rule, state, ev(0, True, version=1))
    first = step(rule, state, ev(1, True, version=1))
    assert first is not None and first.status == "firing"
    for i in range(2, 5):
        assert step(rule, state, ev(i, True, version=2)) is None  # swapped: same episode
    style = AlertStyle()
    episode = state.episode
    assert episode is not None and episode.prompt_version == 1 and episode.last_prompt_version == 2
    now = T0 + timedelta(minutes=1)
    assert alertmanager_alert(style, rule, episode, now, 300)["labels"]["prompt_version"] == "1"
    step(rule, state, ev(5, False, version=2))
    resolved = step(rule, state, ev(6, False, version=2))
    assert resolved is not None and resolved.status == "resolved" and resolved.episode.id == first.episode.id
    assert alertmanager_alert(style, rule, resolved.episode, now, 300)["labels"] == \
        alertmanager_alert(style, rule, first.episode, now, 300)["labels"]
    # the next episode carries the new version
    step(rule, state, ev(7, True, version=2))
    again = step(rule, state, ev(8, True, version=2))
    assert again is not None and again.episode.prompt_version == 2 and again.episode.id != first.episode.id


def test_a_transition_is_a_snapshot_of_the_episode_at_its_frame():
    rule = DebounceRule(window=3, min_anomalous=2, resolve_normals=2, cooldown_s=0)
    state = LineState()
    step(rule, state, ev(0, True))
    fired = step(rule, state, ev(1, True))
    for i in range(2, 5):
        step(rule, state, ev(i, True, score=0.99))
    assert fired is not None and state.episode is not None and state.episode.last_frame_id == "cam-1-4"
    assert (fired.episode.last_frame_id, fired.episode.peak_score, fired.episode.ended_at) == ("cam-1-1", 0.9, None)
    style = AlertStyle()
    # the same webhook bytes whether the batch that fired it held more frames of the episode or not
    alone = LineState()
    step(rule, alone, ev(0, True))
    again = step(rule, alone, ev(1, True))
    assert again is not None
    assert webhook_body(style, rule, fired.episode, "firing") == webhook_body(style, rule, again.episode, "firing")


def test_lines_are_independent_and_keyed_by_camera_and_category():
    rule = DebounceRule(window=2, min_anomalous=2, resolve_normals=1, cooldown_s=0)
    debouncer = Debouncer(rule)
    assert debouncer.feed(0, ev(0, True, camera="a")) is None
    assert debouncer.feed(0, ev(1, True, camera="b")) is None  # another camera: its own window
    assert debouncer.feed(0, ev(2, True, camera="a", category="gadget")) is None  # another category
    fired = debouncer.feed(0, ev(3, True, camera="a"))
    assert fired is not None and fired.episode.camera_id == "a"
    assert [e.camera_id for e in debouncer.open_episodes()] == ["a"]
    debouncer.drop(0)
    assert debouncer.open_episodes() == []


def test_episode_ids_are_deterministic_and_a_replay_of_the_tail_rebuilds_the_same_state():
    """The restart recovery: state from the whole history == state from replaying only the last R events,
    when R covers the open episode; both give the same episode id (so the same idempotency key)."""
    rule = DebounceRule(window=6, min_anomalous=3, resolve_normals=4, cooldown_s=3)
    rng = random.Random(7)
    events = [ev(i, rng.random() < 0.45, camera=rng.choice(["a", "b"])) for i in range(400)]
    full, seen_ids = Debouncer(rule), []
    for event in events:
        t = full.feed(0, event)
        if t is not None:
            seen_ids.append((t.status, t.episode.id))
    assert len({i for s, i in seen_ids if s == "firing"}) >= 5
    again = Debouncer(rule)
    assert [(t.status, t.episode.id) for t in (again.feed(0, e) for e in events) if t is not None] == seen_ids
    open_ids = {e.id for e in full.open_episodes()}
    # the earliest start of an open episode, and a cooldown/window margin before it, is what a replay needs
    starts = [next(i for i, e in enumerate(events) if e.frame_id == ep.frame_id) for ep in full.open_episodes()]
    tail_from = max(0, min(starts, default=len(events) - 50) - 60)
    replayed = Debouncer(rule)
    for event in events[tail_from:]:
        replayed.feed(0, event)
    assert {e.id for e in replayed.open_episodes()} == open_ids
    for line, state in full.lines[0].items():
        other = replayed.lines[0][line]
        assert list(other.recent) == list(state.recent) and other.normal_streak == state.normal_streak


def test_rule_refuses_impossible_settings():
    for args in ((5, 6, 1, 0), (0, 1, 1, 0), (5, 0, 1, 0), (5, 2, 0, 0), (5, 2, 1, -1)):
        with pytest.raises(ValueError):
            DebounceRule(*args)


# ------------------------------------------------------------------------------------------ events


def test_real_events_parse_and_bad_ones_get_a_reason():
    event = parse_event(event_bytes("cam-9", 4, True, T0, prompt_version=3))
    assert (event.camera_id, event.frame_id, event.is_anomaly, event.prompt_version) == ("cam-9", "cam-9-00004", True, 3)
    assert event.event_time == T0 and event.random_weights is True  # captured_at wins over scored_at
    good = json.loads(event_bytes("cam-9", 4, False, T0))
    cases = {
        b"": "empty_value", b"{nope": "not_json", b"[1]": "not_json", "\xff".encode("latin-1"): "not_json",
        json.dumps({**good, "schema_version": 2}).encode(): "unsupported_schema_version",
        json.dumps({**good, "is_anomaly": "yes"}).encode(): "invalid_field",
        json.dumps({**good, "score": "NaN"}).encode(): "invalid_field",
        json.dumps({**good, "camera_id": ""}).encode(): "invalid_field",
        json.dumps({**good, "prompt_version": -1}).encode(): "invalid_field",
        json.dumps({**good, "captured_at": None, "scored_at": "yesterday"}).encode(): "invalid_field",
        json.dumps({**good, "captured_at": "2026-12-01T08:00:00"}).encode(): "invalid_field",  # no timezone
    }
    for value, reason in cases.items():
        with pytest.raises(InvalidEventError) as caught:
            parse_event(value)
        assert caught.value.reason == reason, (value, caught.value)
    no_capture = parse_event(json.dumps({**good, "captured_at": None}).encode())
    assert no_capture.event_time == datetime.fromisoformat(good["scored_at"])


# ------------------------------------------------------------------------------------------ payloads


def _episode(status: str = "firing"):
    rule = DebounceRule(window=3, min_anomalous=2, resolve_normals=1, cooldown_s=0)
    state = LineState()
    step(rule, state, ev(0, True, camera="line 7/left"))
    transition = step(rule, state, ev(1, True, camera="line 7/left", score=0.93))
    if status == "resolved":
        transition = step(rule, state, ev(2, False, camera="line 7/left"))
    assert transition is not None and transition.status == status
    return rule, transition.episode


def test_alertmanager_alert_labels_annotations_and_times():
    rule, episode = _episode()
    style = AlertStyle(console_url="http://console.local:8080/")
    now = T0 + timedelta(seconds=30)
    alert = alertmanager_alert(style, rule, episode, now, ttl_s=300)
    assert alert["labels"] == {"alertname": "HpadAnomaly", "camera": "line 7/left", "category": "widget",
                               "severity": "warning", "prompt_version": "0"}
    a = alert["annotations"]
    assert (a["score"], a["frame_id"], a["threshold"]) == ("0.930000", "line 7/left-1", "0.500000")
    assert a["console"] == alert["generatorURL"] == "http://console.local:8080/frame/line%207%2Fleft-1"
    assert "RANDOM" not in a["description"]
    assert alert["startsAt"] == "2026-12-01T08:00:01.000Z" and alert["endsAt"] == "2026-12-01T08:05:30.000Z"
    rule, resolved = _episode("resolved")
    done = alertmanager_alert(style, rule, resolved, now, ttl_s=300)
    assert done["endsAt"] == "2026-12-01T08:00:02.000Z" and done["labels"] == alert["labels"]
    early = alertmanager_alert(style, rule, resolved, T0, ttl_s=300)  # camera clock ahead: endsAt <= now
    assert early["endsAt"] == "2026-12-01T08:00:01.000Z"  # never before startsAt
    bare = alertmanager_alert(AlertStyle(prompt_version_label=False), rule, episode, now, 300)
    assert "prompt_version" not in bare["labels"] and "generatorURL" not in bare and "console" not in bare["annotations"]
    assert console_link(AlertStyle(), "x") is None


def test_webhook_body_matches_its_schema_is_stable_and_signed():
    style = AlertStyle(console_url="http://console.local")
    for status in ("firing", "resolved"):
        rule, episode = _episode(status)
        body = webhook_body(style, rule, episode, status)
        assert body == webhook_body(style, rule, episode, status)  # same bytes on every retry
        document = json.loads(body)
        jsonschema.validate(document, SCHEMA)
        assert document["idempotency_key"] == idempotency_key(episode, status) == f"{episode.id}-{status}"
        assert (document["ends_at"] is None) == (status == "firing")
        secret = b"s3cret"
        header = signature(secret, body)
        assert header.startswith("sha256=") and len(header) == 7 + 64
        assert verify_signature(secret, body, header)
        assert not verify_signature(b"other", body, header)
        assert not verify_signature(secret, body + b" ", header)
        assert not verify_signature(secret, body, None)


# ------------------------------------------------------------------------------------------ settings and docs


def test_settings_validation(clean_hpad_env, monkeypatch):
    monkeypatch.setenv("HPAD_ALERTS_ALERTMANAGER_URL", "http://am:9093")
    settings = load_settings(AlertsSettings)
    assert settings.rule() == DebounceRule(10, 3, 10, 300.0)
    assert alerts_consumer_kwargs(settings)["isolation_level"] == "read_uncommitted"
    monkeypatch.setenv("HPAD_EXACTLY_ONCE", "true")
    kwargs = alerts_consumer_kwargs(load_settings(AlertsSettings))
    assert kwargs["isolation_level"] == "read_committed" and kwargs["enable_auto_commit"] is False
    for env, value, message in [
        ("HPAD_ALERTS_MIN_ANOMALOUS", "11", "HPAD_ALERTS_MIN_ANOMALOUS"),
        ("HPAD_ALERTS_WEBHOOK_URL", "http://hook", "HPAD_ALERTS_WEBHOOK_SECRET"),
        ("HPAD_ALERTS_ALERTMANAGER_URL", "am:9093", "http"),
        ("HPAD_ALERTS_RESEND_S", "600", "HPAD_ALERTS_RESEND_S"),
        ("HPAD_ALERTS_DLQ_TOPIC", "hpad.events", "HPAD_ALERTS_DLQ_TOPIC"),
    ]:
        with monkeypatch.context() as m:
            m.setenv(env, value)
            with pytest.raises(ConfigError, match=message):
                load_settings(AlertsSettings)
    monkeypatch.setenv("HPAD_ALERTS_ALERTMANAGER_URL", "")
    with pytest.raises(ConfigError, match="no sink"):
        load_settings(AlertsSettings)
    monkeypatch.setenv("HPAD_ALERTS_WEBHOOK_URL", "https://hook.example/in?token=x")
    monkeypatch.setenv("HPAD_ALERTS_WEBHOOK_SECRET", "k3y")
    settings = load_settings(AlertsSettings)
    assert "k3y" not in repr(settings) and settings.alerts_webhook_secret.get_secret_value() == "k3y"


def test_readme_tables_are_generated_from_the_code():
    text = README.read_text()
    for name, table in alerts_docs.generated_blocks().items():
        assert block(text, name) == table, f"README.md block {name} is stale: run python -m consumers.alerts.docs"
    for name in AlertsSettings.model_fields:
        if name not in ("client_id",) and name in alerts_docs.own_fields():
            assert f"`HPAD_{name.upper()}`" in block(text, "alerts-settings")
