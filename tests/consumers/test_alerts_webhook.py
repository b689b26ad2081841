"""`hpad alerts`' webhook against a local HTTP receiver with failures injected (``hpad alerts`` as a process,
tansu broker, events in the real schema).

* 5xx twice then 200: three attempts, one body, the same idempotency key, every signature verified by the
  receiver; no dead letter.
* always 500: the notification goes to the dead-letter topic after the last attempt (body, key, reason).
* a receiver that hangs: nothing is committed until it answers (at-least-once).
* an unreadable event: a dead letter with reason ``invalid_event``, the stream goes on.
* SIGTERM, restart (state rebuilt by re-reading), normal frames: one ``resolved`` notification per episode,
  no second ``firing`` (the receiver counts distinct keys).
* SIGKILL between sending a notification and committing (the receiver kills the process): the next process
  sends it again with the same body and idempotency key.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import jsonschema
import pytest
from kafka import KafkaProducer

from consumers.alerts.notify import verify_signature
from tests.consumers.alerting_helpers import (
    AlertsProcess,
    Request,
    WebhookReceiver,
    event_bytes,
    now,
    sample,
    wait_until,
)
from tests.consumers.kafka_helpers import KafkaTools

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
SECRET = b"test-webhook-key"
SCHEMA = json.loads((Path(__file__).parents[2] / "consumers/schemas/alert_webhook.schema.json").read_text())


def test_webhook_retries_dead_letters_and_commits_only_after_the_answer(kafka_broker, tmp_path):
    tansu = KafkaTools(kafka_broker)
    tag = uuid.uuid4().hex[:8]
    topic, dlq, group = f"wh-{tag}.events", f"wh-{tag}.dlq", f"wh-{tag}.group"
    tansu.create_topic(topic, 1)
    tansu.create_topic(dlq, 1)
    flaky, down, slow, crash = f"flaky-{tag}", f"down-{tag}", f"slow-{tag}", f"crash-{tag}"
    release = threading.Event()
    running: dict[str, AlertsProcess] = {}

    def plan(attempt: int, request: Request) -> int:
        camera = json.loads(request.body)["camera_id"]
        if camera == flaky and json.loads(request.body)["status"] == "firing":
            return 503 if attempt <= 2 else 200
        if camera == down:
            return 500
        if camera == slow:
            release.wait(20)  # hangs until the test has looked at the committed offsets
        if camera == crash and attempt == 1:  # the process dies after sending, before the answer and the commit
            running["now"].kill()
            return 200
        return 200

    start = now()
    seq: dict[str, int] = {}

    def events(camera: str, pattern: str) -> list[bytes]:
        out = []
        for char in pattern:
            n = seq.setdefault(camera, 0)
            out.append(event_bytes(camera, n, char == "A", start + timedelta(seconds=n)))
            seq[camera] = n + 1
        return out

    def produce(values: list[tuple[str, bytes]]) -> None:
        producer = KafkaProducer(bootstrap_servers=tansu.bootstrap)
        for key, value in values:
            producer.send(topic, key=key.encode(), value=value)
        producer.flush()
        producer.close()

    with WebhookReceiver(plan) as receiver:
        env = {"HPAD_BOOTSTRAP_SERVERS": tansu.bootstrap, "HPAD_EVENTS_TOPIC": topic, "HPAD_GROUP_ID": group,
               "HPAD_ALERTS_DLQ_TOPIC": dlq, "HPAD_ALERTS_WEBHOOK_URL": f"{receiver.url}/hook?token=abc",
               "HPAD_ALERTS_WEBHOOK_SECRET": SECRET.decode(), "HPAD_ALERTS_WEBHOOK_MAX_ATTEMPTS": "4",
               "HPAD_ALERTS_RETRY_BACKOFF_MS": "50", "HPAD_ALERTS_RETRY_BACKOFF_MAX_MS": "200",
               "HPAD_ALERTS_HTTP_TIMEOUT_MS": "30000", "HPAD_ALERTS_WINDOW": "4", "HPAD_ALERTS_MIN_ANOMALOUS": "2",
               "HPAD_ALERTS_RESOLVE_NORMALS": "2", "HPAD_ALERTS_COOLDOWN_S": "0"}
        produce([(flaky, v) for v in events(flaky, "AA")] + [(down, v) for v in events(down, "AA")]
                + [("junk", b"{not an event")] + [(slow, v) for v in events(slow, "AA")])
        first = AlertsProcess(tmp_path, "alerts-webhook-1", env)
        second = None
        try:
            wait_until(lambda: any(json.loads(r.body)["camera_id"] == slow for r in receiver.on("/hook?token=abc")),
                       60, "the slow receiver's request")
            # the receiver has not answered: the slow camera's firing event (offset 6) must not be committed
            # (None when all 7 events came in one batch, as they usually do)
            held = tansu.committed_offsets(group, topic)[0]
            assert held is None or held <= 6, held
            release.set()
            wait_until(lambda: tansu.committed_offsets(group, topic) == {0: 7}, 30, "offsets committed after the answer")

            hook = receiver.on("/hook?token=abc")
            for request in hook:  # the receiver verifies every signature over the exact body bytes
                assert verify_signature(SECRET, request.body, request.headers["x-hpad-signature-256"])
                body = json.loads(request.body)
                jsonschema.validate(body, SCHEMA)
                assert request.headers["idempotency-key"] == body["idempotency_key"]
            tries = [r for r in hook if json.loads(r.body)["camera_id"] == flaky]
            assert [r.status for r in tries] == [503, 503, 200]
            assert len({r.body for r in tries}) == 1 and len({r.headers["idempotency-key"] for r in tries}) == 1
            failed = [r for r in hook if json.loads(r.body)["camera_id"] == down]
            assert [r.status for r in failed] == [500] * 4

            letters = tansu.read_all(dlq, expected=2, timeout=30)
            by_reason = {dict(r.headers)["hpad-error-class"].decode(): r for r in letters}
            assert set(by_reason) == {"webhook_failed", "invalid_event"}, [r.headers for r in letters]
            letter = by_reason["webhook_failed"]
            headers = {k: v.decode() for k, v in letter.headers}
            assert letter.value == failed[-1].body and letter.key.decode() == headers["idempotency-key"]
            assert headers["idempotency-key"] == failed[-1].headers["idempotency-key"]
            assert headers["hpad-attempts"] == "4" and "HTTP 500" in headers["hpad-error-message"]
            assert headers["hpad-webhook-host"] == receiver.url.removeprefix("http://")  # no path, no token
            assert "token" not in json.dumps(headers)
            invalid = {k: v.decode() for k, v in by_reason["invalid_event"].headers}
            assert by_reason["invalid_event"].value == b"{not an event"
            assert invalid["hpad-original-offset"] == "4" and invalid["hpad-error-message"].startswith("not_json")
            port = first.metrics_port
            assert sample(port, "hpad_alerts_dead_letters_total", reason="webhook_failed") == 1
            assert sample(port, "hpad_alerts_dead_letters_total", reason="invalid_event") == 1
            assert sample(port, "hpad_alerts_events_total", result="invalid") == 1
            assert sample(port, "hpad_alerts_notifications_total", sink="webhook", status="firing") == 2
            assert sample(port, "hpad_alerts_sink_errors_total", sink="webhook") == 6  # 2 + 4 failed attempts
            assert first.stop() == 0  # SIGTERM: clean exit

            second = AlertsProcess(tmp_path, "alerts-webhook-2", env)
            produce([(flaky, v) for v in events(flaky, "..")] + [(slow, v) for v in events(slow, "A..")])
            second.wait_live(5)
            wait_until(lambda: tansu.committed_offsets(group, topic) == {0: 12}, 30, "offsets after restart")
            keys: dict[str, list[str]] = {}
            for request in receiver.on("/hook?token=abc"):
                if request.status == 200:
                    body = json.loads(request.body)
                    keys.setdefault(body["camera_id"], []).append(body["idempotency_key"])
            episode = {camera: {k.rsplit("-", 1)[0] for k in found} for camera, found in keys.items()}
            assert sorted(k.rsplit("-", 1)[1] for k in keys[flaky]) == ["firing", "resolved"]
            assert sorted(k.rsplit("-", 1)[1] for k in keys[slow]) == ["firing", "resolved"]
            assert len(episode[flaky]) == 1 and len(episode[slow]) == 1  # the rebuilt state is the same episode
            assert sample(second.metrics_port, "hpad_alerts_events_total", result="replayed") == 6  # invalid skipped
            print(f"\nWEBHOOK: flaky receiver 503, 503, 200 (1 body, 1 key, signatures verified); always-500 "
                  f"receiver -> dead letter after 4 attempts; nothing committed while the receiver hung; "
                  f"after a restart: firing + resolved per episode, duplicates "
                  f"{sum(len(v) for v in keys.values()) - 2 * len(keys)}")
            assert second.stop() == 0

            # a crash between the send and the commit: the next process sends the same notification again,
            # with the same body and idempotency key (the receiver acts once)
            third = running["now"] = AlertsProcess(tmp_path, "alerts-webhook-3", env)
            produce([(crash, v) for v in events(crash, "AA")])
            wait_until(lambda: third.process.poll() is not None, 60, "the crash-camera's receiver kills the process")
            crashed_at = tansu.committed_offsets(group, topic)[0]
            assert crashed_at in (12, 13), crashed_at  # the firing event (offset 13) was not committed
            fourth = running["now"] = AlertsProcess(tmp_path, "alerts-webhook-4", env)
            crashed = wait_until(lambda: [r for r in receiver.on("/hook?token=abc") if crash in r.body.decode()
                                          and r.status == 200][1:], 60, "the notification sent again")
            wait_until(lambda: tansu.committed_offsets(group, topic) == {0: 14}, 30, "offsets after the crash")
            sent = [r for r in receiver.on("/hook?token=abc") if crash in r.body.decode()]
            assert len(sent) == 2 and sent[0].body == sent[1].body, sent
            assert sent[0].headers["idempotency-key"] == sent[1].headers["idempotency-key"] == crashed[0].headers[
                "idempotency-key"]
            replayed = sample(fourth.metrics_port, "hpad_alerts_events_total", result="replayed")
            assert replayed == crashed_at - 1  # everything before the committed offset but the unreadable record
            print(f"WEBHOOK: SIGKILL between send and commit -> sent again with the same key "
                  f"({len(sent)} deliveries, 1 distinct key, 1 notification acted on)")
            assert fourth.stop() == 0
            for process in (first, second, third, fourth):  # the HMAC key never reaches a log
                assert SECRET.decode() not in process.log() and "token=abc" not in process.log()
        finally:
            release.set()
            first.stop()
            if second is not None:
                second.stop()
            for process in running.values():
                process.stop()
