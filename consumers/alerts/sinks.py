"""Delivery of ``hpad alerts``: Alertmanager, the webhook (both HTTP with capped-backoff retries), dead letters.

* `AlertmanagerSink.post` sends a list of alerts in one ``POST /api/v2/alerts`` and retries transient failures
  (connection errors, timeouts, 5xx, 429) until Alertmanager accepts them or the service stops: nothing is
  committed before it did. A 4xx answer means the request itself is wrong and is raised as `SinkRefusedError`
  (the process exits 1 without committing).
* `WebhookSink.deliver` POSTs one signed body; 5xx / 408 / 429 / connection errors are retried up to
  ``HPAD_ALERTS_WEBHOOK_MAX_ATTEMPTS`` times; other 4xx are not retried. Either way the caller then writes
  the notification to the dead-letter topic (`dead_letter_headers`) before the offsets move.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from consumers.alerts.notify import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, rfc3339, signature
from consumers.kafka_io import Backoff
from hpad.errors import HpadError

log = logging.getLogger(__name__)
RETRIABLE_STATUS = {408, 425, 429}
USER_AGENT = "hpad-alerts/1"


class SinkRefusedError(HpadError):
    """A sink answered that the request itself is wrong (4xx): retrying cannot help."""


@dataclass(frozen=True)
class Answer:
    """One HTTP attempt: status (0 = no answer) and a short reason."""

    status: int
    reason: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def retriable(self) -> bool:
        return self.status == 0 or self.status >= 500 or self.status in RETRIABLE_STATUS


def http_post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Answer:
    """POST ``body``; never raises for HTTP or network failures (they are the `Answer`)."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": USER_AGENT, **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
            return Answer(response.status, "ok")
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:200].decode("utf-8", errors="replace").strip()
        return Answer(exc.code, f"HTTP {exc.code}: {detail or exc.reason}")
    except (urllib.error.URLError, OSError) as exc:  # refused, reset, DNS, timeout
        reason = getattr(exc, "reason", exc)
        return Answer(0, f"{type(exc).__name__}: {reason}")


@dataclass
class Outcome:
    """A webhook delivery: acknowledged, or the last answer after ``attempts`` tries."""

    ok: bool
    attempts: int
    last: Answer


Report = Callable[[str, float, Answer], None]  # (sink, seconds, answer) for metrics


class AlertmanagerSink:
    """``POST {url}/api/v2/alerts`` until accepted (or stopped)."""

    def __init__(self, base_url: str, timeout_s: float, backoff: Backoff, stop: threading.Event,
                 report: Report | None = None) -> None:
        self.url = base_url.rstrip("/") + "/api/v2/alerts"
        self.timeout_s, self.backoff, self.stop = timeout_s, backoff, stop
        self.report = report or (lambda sink, seconds, answer: None)

    def _attempt(self, body: bytes) -> Answer:
        start = time.monotonic()
        answer = http_post(self.url, body, {}, self.timeout_s)
        self.report("alertmanager", time.monotonic() - start, answer)
        return answer

    def post(self, alerts: list[dict], retry: bool = True) -> bool:
        """True once Alertmanager accepted ``alerts``; False when stopped first (or ``retry`` is off and the
        one attempt failed). Raises `SinkRefusedError` on a 4xx."""
        if not alerts:
            return True
        body = json.dumps(alerts, separators=(",", ":")).encode()
        self.backoff.reset()
        while True:
            answer = self._attempt(body)
            if answer.ok:
                return True
            if not answer.retriable:
                raise SinkRefusedError(f"Alertmanager at {self.url} refused {len(alerts)} alerts: {answer.reason}")
            if not retry:
                log.warning("Alertmanager at %s: %s (tried once)", self.url, answer.reason)
                return False
            delay = self.backoff.next_delay()
            log.warning("Alertmanager at %s: %s; retrying in %.1f s", self.url, answer.reason, delay)
            if self.stop.wait(delay):
                return False


class WebhookSink:
    """Signed POSTs to one webhook, each retried up to ``max_attempts`` times with capped backoff."""

    def __init__(self, url: str, secret: bytes, max_attempts: int, timeout_s: float, backoff: Backoff,
                 stop: threading.Event, report: Report | None = None) -> None:
        self.url, self.secret, self.max_attempts = url, secret, max_attempts
        self.timeout_s, self.backoff, self.stop = timeout_s, backoff, stop
        self.report = report or (lambda sink, seconds, answer: None)

    @property
    def host(self) -> str:
        """The webhook's host (for dead letters and logs: the URL's path or query may hold a token)."""
        return urlsplit(self.url).netloc

    def deliver(self, body: bytes, key: str) -> Outcome:
        headers = {SIGNATURE_HEADER: signature(self.secret, body), IDEMPOTENCY_HEADER: key}
        self.backoff.reset()
        answer = Answer(0, "not tried")
        for attempt in range(1, self.max_attempts + 1):
            start = time.monotonic()
            answer = http_post(self.url, body, headers, self.timeout_s)
            self.report("webhook", time.monotonic() - start, answer)
            if answer.ok:
                return Outcome(True, attempt, answer)
            if not answer.retriable:
                log.warning("webhook %s refused %s: %s (not retried)", self.host, key, answer.reason)
                return Outcome(False, attempt, answer)
            if attempt < self.max_attempts:
                delay = self.backoff.next_delay()
                log.warning("webhook %s: %s for %s (attempt %d of %d); retrying in %.2f s", self.host,
                            answer.reason, key, attempt, self.max_attempts, delay)
                if self.stop.wait(delay):
                    return Outcome(False, attempt, Answer(answer.status, "stopped while retrying"))
        return Outcome(False, self.max_attempts, answer)


def dead_letter_headers(reason: str, message: str, when: datetime, worker: str,
                        extra: dict[str, str] | None = None) -> list[tuple[str, bytes]]:
    """Headers of an alerts dead letter (same ``hpad-*`` names as the scorers' dead letters)."""
    values = {"hpad-error-class": reason, "hpad-error-message": message[:1000], "hpad-dead-lettered-at": rfc3339(when),
              "hpad-worker": worker, **(extra or {})}
    return [(name, value.encode()) for name, value in values.items()]
