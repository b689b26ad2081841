"""Settings of ``hpad console`` (`ConsoleSettings`): the only place the console reads the environment.

Same rules as every hpad process (`consumers.settings`): ``HPAD_*`` variables, a ``.env`` file, flags win,
secrets are `SecretStr`. The topic names are the worker's (``HPAD_INPUT_TOPIC``, ``HPAD_EVENTS_TOPIC``) so
one ConfigMap can serve both. Console-only settings carry ``CONSOLE`` in their name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from consumers.settings import KafkaSettings, MiB


class ConsoleSettings(KafkaSettings):
    """Everything ``hpad console`` can be told: topics, HTTP address, memory bounds, feedback."""

    client_id: str = Field("hpad-console", description="Kafka client id")
    input_topic: str = Field("hpad.frames", description="topic of the camera frames (read, no consumer group)")
    events_topic: str = Field("hpad.events", description="topic of the scored events (read, no consumer group)")
    feedback_topic: str = Field("hpad.feedback", description="topic operator feedback records are published to")
    console_start_from: Literal["latest", "earliest"] = Field(
        "latest", description="where the console starts reading frames and events: latest or earliest")
    isolation_level: Literal["read_uncommitted", "read_committed"] = Field(
        "read_uncommitted", description="read_committed when the workers run with HPAD_EXACTLY_ONCE=true")
    default_category: str | None = Field(None, description="category of frames without a `category` header")
    console_host: str = Field("127.0.0.1", description="address the web page binds (0.0.0.0 in a pod)")
    console_port: int = Field(8080, ge=0, le=65535, description="port of the web page (0 = any free)")
    console_public_url: str = Field(
        "", description="URL operators reach the console at (shown on the page; alerts link to <url>/frame/<id>)")
    # memory bounds
    console_frames_per_camera: int = Field(
        32, ge=1, le=10000, description="newest frames kept per camera (older ones are evicted)")
    console_anomalies_per_camera: int = Field(
        12, ge=1, le=1000, description="newest anomalous frames kept per camera, with their frame (thumbnails)")
    console_timeline_points: int = Field(300, ge=10, le=100000, description="score points kept per camera")
    console_max_cameras: int = Field(64, ge=1, le=10000, description="cameras shown; frames of further cameras are dropped")
    console_pending_events: int = Field(
        1024, ge=1, description="events kept while their frame has not arrived yet (oldest dropped first)")
    console_max_bytes: int = Field(
        512 * MiB, ge=MiB, description="frame bytes held in memory in all; the oldest plain frames are evicted first")
    console_stale_after_s: float = Field(30.0, gt=0, description="a camera without events this long shows as stale")
    max_payload_bytes: int = Field(16 * MiB, ge=1024, description="frames larger than this are dropped (counted)")
    max_pixels: int = Field(40_000_000, ge=1, description="frames with more pixels are not rendered")
    # feedback
    console_feedback_token: SecretStr | None = Field(
        None, description="feedback token(s): TOKEN (operator = HPAD_CONSOLE_OPERATOR) or name:TOKEN,name:TOKEN; "
        "unset = read-only console")
    console_operator: str = Field("operator", description="operator name recorded for the single-token form")
    producer_max_request_size: int = Field(
        32 * MiB, ge=64 * 1024, description="largest feedback record (it carries the frame), bytes")
    # metrics and health
    metrics_port: int = Field(9402, ge=-1, le=65535, description="/metrics, /healthz, /readyz port (0 = any free, -1 = off)")
    metrics_host: str = Field("0.0.0.0", description="address the metrics server binds")
    liveness_timeout_ms: int = Field(60000, ge=1000, description="/healthz fails when the reader loop is stuck this long")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    @model_validator(mode="after")
    def _check_console(self) -> ConsoleSettings:
        topics = [self.input_topic, self.events_topic, self.feedback_topic]
        if len(set(topics)) != len(topics):
            raise ValueError("HPAD_INPUT_TOPIC, HPAD_EVENTS_TOPIC and HPAD_FEEDBACK_TOPIC must differ")
        if self.producer_max_request_size < self.max_payload_bytes * 4 // 3 + 64 * 1024:
            raise ValueError("HPAD_PRODUCER_MAX_REQUEST_SIZE must hold a base64 frame of HPAD_MAX_PAYLOAD_BYTES "
                             "(4/3 of it + 64 KiB): feedback records carry the frame")
        self.operators()  # validates the token syntax
        return self

    @property
    def read_only(self) -> bool:
        return self.console_feedback_token is None

    def operators(self) -> dict[str, str]:
        """token -> operator name ({} when read-only)."""
        if self.console_feedback_token is None:
            return {}
        text = self.console_feedback_token.get_secret_value().strip()
        if not text:
            raise ValueError("HPAD_CONSOLE_FEEDBACK_TOKEN is empty: unset it for a read-only console")
        if ":" not in text:
            if len(text) < 8:
                raise ValueError("HPAD_CONSOLE_FEEDBACK_TOKEN must be at least 8 characters")
            return {text: self.console_operator}
        tokens: dict[str, str] = {}
        for part in text.split(","):
            name, sep, token = part.strip().partition(":")
            if not sep or not name.strip() or len(token.strip()) < 8:
                raise ValueError("HPAD_CONSOLE_FEEDBACK_TOKEN entries must be name:TOKEN with tokens of at least "
                                 "8 characters")
            if token.strip() in tokens:
                raise ValueError("HPAD_CONSOLE_FEEDBACK_TOKEN gives one token to two operators")
            tokens[token.strip()] = name.strip()
        return tokens
