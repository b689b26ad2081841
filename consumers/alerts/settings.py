"""Settings of ``hpad alerts`` (`AlertsSettings`): the only reader of its environment.

The Kafka connection and security options are `consumers.settings.KafkaSettings`' (shared by every
process); the alert-specific ones are prefixed ``HPAD_ALERTS_`` so that one ``.env`` can hold the settings of
several processes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from consumers.alerts.notify import AlertStyle
from consumers.alerts.rules import DebounceRule
from consumers.settings import KafkaSettings, group_consumer_kwargs


class AlertsSettings(KafkaSettings):
    """Everything ``hpad alerts`` can be told: events topic and group, the debounce rule, the sinks."""

    client_id: str = Field("hpad-alerts", description="Kafka client id")
    events_topic: str = Field("hpad.events", description="topic of the scored events (one per frame)")
    group_id: str = Field("hpad-alerts", description="consumer group of the alerts service on the events topic")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "latest", description="where a new group starts: latest (no alerts for old events) or earliest")
    exactly_once: bool = Field(
        False, description="the scorers write events transactionally (HPAD_EXACTLY_ONCE): read with read_committed")
    session_timeout_ms: int = Field(10000, ge=1000, description="group session timeout")
    heartbeat_interval_ms: int = Field(3000, ge=100, description="group heartbeat interval (< session timeout / 3)")
    max_poll_interval_ms: int = Field(
        300000, ge=5000, description="max time between polls (a sink retried longer than this costs the partitions)")
    # the rule
    alerts_window: int = Field(10, ge=1, le=10000, description="n: frames of a line (camera, category) the rule looks at")
    alerts_min_anomalous: int = Field(3, ge=1, description="k: anomalous frames among the last n that open an episode")
    alerts_resolve_normals: int = Field(10, ge=1, description="m: normal frames in a row that resolve an episode")
    alerts_cooldown_s: float = Field(
        300.0, ge=0, description="after an episode resolved, no new one on that line for this long (event time)")
    alerts_replay_records: int = Field(
        5000, ge=0, description="on assignment, re-read this many events per partition before the committed offset "
        "to rebuild the rule's state (no notifications): must cover the longest episode")
    # alert identity
    alerts_alertname: str = Field("HpadAnomaly", description="alertname label")
    alerts_severity: str = Field("warning", description="severity label")
    alerts_prompt_version_label: bool = Field(
        True, description="put the opening frame's prompt_version in the labels (fixed for the episode)")
    alerts_console_url: str | None = Field(
        None, description="base URL of hpad console; alerts link to {url}/frame/{frame_id}")
    # Alertmanager
    alerts_alertmanager_url: str | None = Field(
        None, description="Alertmanager base URL, e.g. http://alertmanager:9093 (empty = off)")
    alerts_resend_s: float = Field(60.0, gt=0, description="re-send firing alerts to Alertmanager this often")
    alerts_ttl_s: float = Field(
        300.0, gt=0, description="endsAt of a firing alert = now + this (Alertmanager resolves it if hpad alerts stops)")
    # webhook
    alerts_webhook_url: str | None = Field(None, description="generic JSON webhook URL (empty = off)")
    alerts_webhook_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key of the webhook signature (required with a webhook)")
    alerts_webhook_max_attempts: int = Field(
        5, ge=1, le=100, description="webhook attempts per notification before it goes to the dead-letter topic")
    alerts_retry_backoff_ms: int = Field(500, ge=1, description="first retry delay of a sink (doubles)")
    alerts_retry_backoff_max_ms: int = Field(10000, ge=1, description="longest retry delay of a sink")
    alerts_http_timeout_ms: int = Field(5000, ge=100, description="timeout of one HTTP request to a sink")
    alerts_dlq_topic: str = Field(
        "hpad.alerts.dlq", description="dead-letter topic: webhook notifications that failed every attempt, "
        "unreadable events")
    # metrics and health
    metrics_port: int = Field(9402, ge=-1, le=65535, description="/metrics, /healthz, /readyz port (0 = any free, -1 = off)")
    metrics_host: str = Field("0.0.0.0", description="address the metrics server binds")
    liveness_timeout_ms: int = Field(
        120000, ge=1000, description="/healthz fails when the main loop is stuck this long (each sink attempt counts as progress)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    @field_validator("alerts_alertmanager_url", "alerts_webhook_url", "alerts_console_url", mode="before")
    @classmethod
    def _empty_is_off(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("alerts_alertmanager_url", "alerts_webhook_url", "alerts_console_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _check_alerts(self) -> AlertsSettings:
        if self.alerts_min_anomalous > self.alerts_window:
            raise ValueError("HPAD_ALERTS_MIN_ANOMALOUS (k) must be at most HPAD_ALERTS_WINDOW (n)")
        if self.alerts_alertmanager_url is None and self.alerts_webhook_url is None:
            raise ValueError("no sink: set HPAD_ALERTS_ALERTMANAGER_URL and/or HPAD_ALERTS_WEBHOOK_URL")
        if self.alerts_webhook_url is not None and (
                self.alerts_webhook_secret is None or not self.alerts_webhook_secret.get_secret_value()):
            raise ValueError("HPAD_ALERTS_WEBHOOK_URL needs HPAD_ALERTS_WEBHOOK_SECRET (the HMAC key receivers verify)")
        if self.alerts_retry_backoff_max_ms < self.alerts_retry_backoff_ms:
            raise ValueError("HPAD_ALERTS_RETRY_BACKOFF_MAX_MS must be >= HPAD_ALERTS_RETRY_BACKOFF_MS")
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("HPAD_HEARTBEAT_INTERVAL_MS must be at most a third of HPAD_SESSION_TIMEOUT_MS")
        if self.alerts_dlq_topic == self.events_topic:
            raise ValueError("HPAD_ALERTS_DLQ_TOPIC must differ from HPAD_EVENTS_TOPIC")
        if self.alerts_resend_s >= self.alerts_ttl_s:
            raise ValueError("HPAD_ALERTS_RESEND_S must be below HPAD_ALERTS_TTL_S (or firing alerts expire between sends)")
        return self

    def rule(self) -> DebounceRule:
        return DebounceRule(window=self.alerts_window, min_anomalous=self.alerts_min_anomalous,
                            resolve_normals=self.alerts_resolve_normals, cooldown_s=self.alerts_cooldown_s)

    def style(self) -> AlertStyle:
        return AlertStyle(alertname=self.alerts_alertname, severity=self.alerts_severity,
                          prompt_version_label=self.alerts_prompt_version_label, console_url=self.alerts_console_url)


def alerts_consumer_kwargs(s: AlertsSettings) -> dict[str, Any]:
    """KafkaConsumer options: manual commits, read_committed when the scorers write transactionally."""
    return group_consumer_kwargs(s, 500)
