"""Payloads of ``hpad alerts``: the Alertmanager v2 alert, the webhook body, its signature and idempotency key.

Pure functions of an `Episode` (plus the wall-clock time for a firing alert's ``endsAt``).

**Alertmanager** (``POST /api/v2/alerts``, a JSON list): labels ``alertname``, ``camera``, ``category``,
``severity`` and, unless turned off, ``prompt_version`` (the opening frame's version, fixed for the episode);
annotations ``summary``, ``description``, ``score``, ``threshold``, ``frame_id`` (the frame that opened the
episode), ``last_frame_id``, ``peak_score``, ``last_prompt_version``, ``rule`` and ``console`` (a link to the
frame in ``hpad console``). A firing alert is sent with ``endsAt`` = now + TTL and re-sent while it fires (as
Prometheus does): if ``hpad alerts`` stops for good, Alertmanager resolves it after the TTL. A resolved alert
carries the episode's end as ``endsAt``.

**Webhook**: one JSON body per notification (schema ``consumers/schemas/alert_webhook.schema.json``),
identical on every retry, signed with HMAC-SHA256 over the exact body bytes: header
``X-Hpad-Signature-256: sha256=<hex>``. ``Idempotency-Key: <episode id>-<status>``: the same on retries and
after a restart (episode ids are deterministic), so a receiver that keeps the keys it processed never acts
twice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from consumers.alerts.rules import DebounceRule, Episode

WEBHOOK_SCHEMA_VERSION = 1
SIGNATURE_HEADER = "X-Hpad-Signature-256"
IDEMPOTENCY_HEADER = "Idempotency-Key"


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class AlertStyle:
    """How alerts are named and linked (from the settings)."""

    alertname: str = "HpadAnomaly"
    severity: str = "warning"
    prompt_version_label: bool = True
    console_url: str | None = None


def console_link(style: AlertStyle, frame_id: str) -> str | None:
    """``{console}/frame/{frame_id}`` (the frame page of ``hpad console``), or None without a console URL."""
    if not style.console_url:
        return None
    return f"{style.console_url.rstrip('/')}/frame/{quote(frame_id, safe='')}"


def labels(style: AlertStyle, episode: Episode) -> dict[str, str]:
    """The alert's identity in Alertmanager: the same for the whole episode (and after a restart)."""
    out = {"alertname": style.alertname, "camera": episode.camera_id, "category": episode.category,
           "severity": style.severity}
    if style.prompt_version_label:
        out["prompt_version"] = str(episode.prompt_version)
    return out


def _summary(rule: DebounceRule, episode: Episode) -> str:
    return (f"camera {episode.camera_id}: {episode.anomalous_in_window} of the last {rule.window} frames of "
            f"{episode.category} anomalous")


def alertmanager_alert(style: AlertStyle, rule: DebounceRule, episode: Episode, now: datetime,
                       ttl_s: float) -> dict[str, Any]:
    """One element of the ``POST /api/v2/alerts`` list: firing (endsAt = now + TTL) or resolved."""
    link = console_link(style, episode.frame_id)
    note = " RANDOM WEIGHTS: scores carry no meaning." if episode.random_weights else ""
    annotations = {
        "summary": _summary(rule, episode),
        "description": (f"hpad opened an anomaly episode on camera {episode.camera_id} (category "
                        f"{episode.category}, prompt version {episode.prompt_version}) at frame "
                        f"{episode.frame_id}, score {episode.score:.4f} >= threshold {episode.threshold:.4f}."
                        + note),
        "score": f"{episode.score:.6f}",
        "threshold": f"{episode.threshold:.6f}",
        "frame_id": episode.frame_id,
        "last_frame_id": episode.last_frame_id,
        "peak_score": f"{episode.peak_score:.6f}",
        "last_prompt_version": str(episode.last_prompt_version),
        "rule": f"{rule.min_anomalous} of {rule.window} to fire, {rule.resolve_normals} normal in a row to resolve",
        "episode_id": episode.id,
    }
    if link:
        annotations["console"] = link
    ends = episode.ended_at if episode.ended_at is not None else now + timedelta(seconds=ttl_s)
    if episode.ended_at is not None:
        ends = min(ends, now)  # a camera clock ahead of Alertmanager's must not keep a resolved alert open
    alert: dict[str, Any] = {"labels": labels(style, episode), "annotations": annotations,
                             "startsAt": rfc3339(episode.started_at), "endsAt": rfc3339(max(ends, episode.started_at))}
    if link:
        alert["generatorURL"] = link
    return alert


def idempotency_key(episode: Episode, status: str) -> str:
    """``<episode id>-<status>``: one key per notification, stable across retries and restarts."""
    return f"{episode.id}-{status}"


def webhook_body(style: AlertStyle, rule: DebounceRule, episode: Episode, status: str) -> bytes:
    """The webhook's JSON body (compact, sorted keys: identical bytes on every retry)."""
    body = {
        "schema_version": WEBHOOK_SCHEMA_VERSION,
        "kind": "hpad.alert",
        "status": status,
        "idempotency_key": idempotency_key(episode, status),
        "episode_id": episode.id,
        "alertname": style.alertname,
        "labels": labels(style, episode),
        "camera_id": episode.camera_id,
        "category": episode.category,
        "prompt_version": episode.prompt_version,
        "last_prompt_version": episode.last_prompt_version,
        "starts_at": rfc3339(episode.started_at),
        "ends_at": rfc3339(episode.ended_at) if episode.ended_at is not None else None,
        "frame_id": episode.frame_id,
        "score": episode.score,
        "threshold": episode.threshold,
        "peak_score": episode.peak_score,
        "peak_frame_id": episode.peak_frame_id,
        "last_frame_id": episode.last_frame_id,
        "resolved_by_frame_id": episode.resolved_by,
        "anomalous_in_window": episode.anomalous_in_window,
        "rule": {"window": rule.window, "min_anomalous": rule.min_anomalous,
                 "resolve_normals": rule.resolve_normals, "cooldown_s": rule.cooldown_s},
        "console_url": console_link(style, episode.frame_id),
        "random_weights": episode.random_weights,
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def signature(secret: bytes, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of the body>`` (the value of ``X-Hpad-Signature-256``)."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: str | None) -> bool:
    """What a receiver does: recompute and compare in constant time."""
    return header is not None and hmac.compare_digest(signature(secret, body), header)
