"""``hpad console`` end to end with real parts: the tansu broker, the console as a real process, Debian's
Chromium driven by Playwright, and the tuner.

Frames are synthetic product photos with a painted defect; their events are built by the worker's own event
builder (`consumers.events.build_event`, validated against ``event.schema.json``) with the painted defect as
mask: a random-weight worker's mask would not sit on the defect, and the point here is where the overlay lands.
Screenshots go to ``$HPAD_TEST_SCREENSHOTS`` (or the test's tmp folder; the path is printed).
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest

from tests.consumers.console_helpers import (
    chromium,
    console_process,
    decode_jpeg,
    event_for,
    frame_and_event,
    http_get,
    http_post,
    make_frame,
    publish,
    screenshot_dir,
)
from tests.consumers.kafka_helpers import read_all, wait_for

SCHEMAS = Path(__file__).resolve().parents[2] / "consumers" / "schemas"
TOKEN = "alice:tok-alice-0123456789"


def new_topics(broker) -> dict[str, str]:
    tag = f"console-{uuid.uuid4().hex[:8]}"
    topics = {name: f"{tag}.{name}" for name in ("frames", "events", "feedback", "normals", "prompts")}
    for name, topic in topics.items():
        broker.create_topic(topic, 2 if name in ("frames", "events") else 1)
    return topics


def overlay_sits_on_defect(overlay: np.ndarray, bare: np.ndarray, defect: np.ndarray) -> tuple[float, float]:
    """(share of the changed pixels that lie on the defect or its outline, share of defect pixels changed)."""
    changed = np.abs(overlay.astype(np.int16) - bare.astype(np.int16)).max(axis=2) > 40
    near = cv2.dilate(defect.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    return float(changed[near].sum() / max(1, changed.sum())), float(changed[defect].mean())


@pytest.mark.kafka
@pytest.mark.slow
def test_console_shows_the_overlay_live_and_false_alarm_feedback_reaches_the_tuner(kafka_broker, tmp_path,
                                                                                    tiny_backbone):
    """Invariants: an anomalous event appears on the page with its overlay within 2 s of being published; the
    overlay covers the painted defect and little else; "false alarm" publishes one schema-valid feedback record
    carrying the frame, "real defect" on the frame page another; the next tuner run counts the false alarm
    among its normals and scores the real defect in its gate."""
    from tuner import app as tuner_app
    from tuner.settings import TunerSettings

    topics = new_topics(kafka_broker)
    shots = screenshot_dir(tmp_path)
    print(f"\nconsole screenshots: {shots}")
    rng = np.random.default_rng(11)
    event_schema = json.loads((SCHEMAS / "event.schema.json").read_text())
    with console_process(kafka_broker.bootstrap, topics, tmp_path / "console", "console", token=TOKEN) as console, \
            chromium() as browser:
        page = browser.new_page()
        page.goto(console.url + "/")
        page.wait_for_selector("#live.on", timeout=10000)
        assert page.inner_text("#mode") == "feedback on"
        # a normal stretch first (the timeline has something to show), prompt version 0 then 1
        normals = [make_frame(rng, "cam-1", "widget", defect=False) for _ in range(6)]
        records = []
        for i, frame in enumerate(normals):
            event = event_for(frame, score=0.2 + 0.03 * i, prompt_version=0 if i < 3 else 1, offset=i,
                              frames_topic=topics["frames"])
            jsonschema.validate(event, event_schema)
            records += frame_and_event(topics, frame, event)
        publish(kafka_broker.bootstrap, records)
        page.wait_for_selector("section.camera[data-camera-id='cam-1']", timeout=5000)

        bad = make_frame(rng, "cam-1", "widget", defect=True)
        event = event_for(bad, score=0.91, prompt_version=1, offset=6, frames_topic=topics["frames"])
        jsonschema.validate(event, event_schema)
        assert event["mask"] is not None and event["is_anomaly"]
        published = time.monotonic()
        publish(kafka_broker.bootstrap, frame_and_event(topics, bad, event))
        thumb = f"figure.anomaly[data-frame-id='{bad.frame_id}'] img"
        # the anomaly's thumbnail (with overlay) is on the page and loaded, within 2 s of the publish
        page.wait_for_function(
            "sel => { const i = document.querySelector(sel); return i && i.complete && i.naturalWidth > 0; }",
            arg=thumb, timeout=2000)
        seen_after = time.monotonic() - published
        print(f"anomaly on the page with its overlay {seen_after:.2f} s after its frame and event were acknowledged")
        page.wait_for_function(
            "id => { const i = document.querySelector('.latest img'); return i && i.dataset.frameId === id + ':s'"
            " && i.complete && i.naturalWidth > 0; }", arg=bad.frame_id, timeout=5000)
        assert page.inner_text("section.camera[data-camera-id='cam-1'] .status") == "ANOMALY"
        caption = page.inner_text(f"figure.anomaly[data-frame-id='{bad.frame_id}'] figcaption")
        assert "score 0.910" in caption and "v1" in caption
        versions = page.locator("section.camera[data-camera-id='cam-1'] table.prompts td").all_inner_texts()
        assert "v0" in versions and "v1" in versions
        page.screenshot(path=str(shots / "1-line-anomaly.png"), full_page=True)
        page.locator(f"figure.anomaly[data-frame-id='{bad.frame_id}']").screenshot(path=str(shots / "2-thumbnail.png"))

        # the overlay the page shows sits on the painted defect
        status, full = http_get(f"{console.url}/api/overlay/full/{bad.frame_id}")
        assert status == 200
        _, bare = http_get(f"{console.url}/api/overlay/full/{bad.frame_id}?mask=0")
        on_defect, covered = overlay_sits_on_defect(decode_jpeg(full), decode_jpeg(bare), bad.defect)
        print(f"overlay: {on_defect:.1%} of the changed pixels on the defect (+4 px outline), {covered:.1%} of the "
              "defect tinted")
        assert on_defect > 0.95 and covered > 0.9

        # the alert link target: one frame's page, and a clear 404 for a frame not in memory
        frame_page = browser.new_page()
        frame_page.goto(f"{console.url}/frame/{bad.frame_id}")
        frame_page.wait_for_selector(".frame-page button.false_alarm", timeout=5000)
        frame_page.screenshot(path=str(shots / "3-frame-page.png"), full_page=True)
        missing = frame_page.goto(f"{console.url}/frame/no-such-frame")
        assert missing.status == 404 and "not in memory" in frame_page.inner_text("h1").lower()
        assert "default-src 'self'" in missing.headers["content-security-policy"]  # no inline code, no CDN
        frame_page.screenshot(path=str(shots / "4-frame-404.png"))
        frame_page.close()

        # feedback: without the token the server refuses it (the page is only a client)
        body = json.dumps({"frame_id": bad.frame_id, "verdict": "false_alarm"}).encode()
        assert http_post(f"{console.url}/api/feedback", body, {"Content-Type": "application/json"})[0] == 403
        assert http_post(f"{console.url}/api/feedback", body, {"Content-Type": "application/json",
                                                               "Authorization": "Bearer wrong-token-123"})[0] == 403
        page.fill("#token", TOKEN.split(":", 1)[1])
        figure = page.locator(f"figure.anomaly[data-frame-id='{bad.frame_id}']")
        figure.locator("input.note").fill("reflection on the label")
        figure.locator("button.false_alarm").click()
        wait_for(lambda: "recorded by alice" in figure.locator(".verdict").inner_text(), timeout=10,
                 what="feedback acknowledged on the page")
        page.screenshot(path=str(shots / "5-after-false-alarm.png"), full_page=True)
        _, metrics = http_get(f"{console.metrics_url}/metrics")
        text = metrics.decode()
        assert 'hpad_console_feedback_total{verdict="false_alarm"} 1.0' in text
        assert 'hpad_console_feedback_refused_total{reason="bad_token"} 2.0' in text

        # a second anomaly, confirmed as a real defect from its own page (where alerts link)
        defect = make_frame(rng, "cam-1", "widget", defect=True)
        publish(kafka_broker.bootstrap, frame_and_event(topics, defect, event_for(defect, score=0.88, prompt_version=1,
                                                                                  offset=7)))
        page.wait_for_selector(f"figure.anomaly[data-frame-id='{defect.frame_id}'] img", timeout=5000)
        frame_page = browser.new_page()
        frame_page.goto(f"{console.url}/frame/{defect.frame_id}")
        frame_page.fill("#token", TOKEN.split(":", 1)[1])  # the token lives in the tab's sessionStorage
        frame_page.click(".frame-page button.real_defect")
        wait_for(lambda: "recorded by alice" in frame_page.inner_text(".frame-page .verdict"), timeout=10,
                 what="real defect acknowledged on the frame page")
        frame_page.close()

    records = [json.loads(r.value) for r in read_all(kafka_broker, topics["feedback"], expected=2, timeout=20)]
    assert sorted(r["verdict"] for r in records) == ["false_alarm", "real_defect"]
    record = next(r for r in records if r["verdict"] == "false_alarm")
    validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "feedback.schema.json").read_text()),
                                                format_checker=jsonschema.FormatChecker())
    for r in records:
        validator.validate(r)
    assert {k: record[k] for k in ("frame_id", "camera_id", "category", "prompt_version", "score", "captured_at")} \
        == {k: event[k] for k in ("frame_id", "camera_id", "category", "prompt_version", "score", "captured_at")}
    assert (record["verdict"], record["operator"], record["note"]) == ("false_alarm", "alice", "reflection on the label")
    assert base64.b64decode(record["frame"]["data"]) == bad.value

    # the tuner: 5 scorer-sampled normals in its reservoir (below HPAD_MIN_NORMALS=6); the false alarm is the 6th
    ts = TunerSettings(
        bootstrap_servers=kafka_broker.bootstrap, model="hpad-tiny", random_init=True, device="cpu",
        categories=["widget"], normals_topic=topics["normals"], prompts_topic=topics["prompts"],
        feedback_topic=topics["feedback"], group_id=f"tuner-{uuid.uuid4().hex[:6]}",
        reservoir_dir=tmp_path / "reservoir", reservoir_recent=16, reservoir_verified=4, shots=2, min_normals=6,
        gate_normals=2, gate_anomalies=4, epochs=1, steps_per_epoch=2, batch_size=8, n_ctx=4, new_samples=1,
        interval_s=0, min_gap_s=0, retry_s=1, margin=0.9, metrics_port=-1, session_timeout_ms=2000,
        heartbeat_interval_ms=500, feedback_max_share=0.25)
    from tuner.reservoir import Reservoir

    reservoir = Reservoir(ts.reservoir_dir, 16, 4)
    for frame in normals[:5]:
        reservoir.add("widget", frame.frame_id, frame.image)
    tuner = tuner_app.build_tuner(ts)
    thread = threading.Thread(target=tuner.run, kwargs={"max_runs": 1, "timeout": 150, "install_signals": False})
    thread.start()
    thread.join(timeout=170)
    assert not thread.is_alive()
    assert len(tuner.reports) == 1, "the tuner never ran"
    report = tuner.reports[0]
    print(f"tuner run: {report.outcome} ({report.reason}); normals {report.normals}; feedback {report.feedback}")
    assert report.outcome in ("published", "rejected")  # random weights: either is a finished run
    assert report.normals == 6 and report.feedback["false_alarms"] == [bad.frame_id]
    assert report.feedback["real_defects"] == [defect.frame_id] and report.feedback["defects"] == 1
    assert report.feedback["threshold"] <= report.feedback["threshold_calibrated"]  # defects only lower it
    if report.outcome == "published":  # the artifact says what feedback did
        manifest = tuner.current_version("widget").manifest
        assert manifest["gate"]["feedback"]["defects"] == 1
        assert manifest["threshold"] == pytest.approx(report.feedback["threshold"])
    exposition = tuner.metrics.exposition().decode()
    assert 'hpad_tuner_feedback_received_total{category="widget",verdict="false_alarm"} 1.0' in exposition
    assert 'hpad_tuner_feedback_used{category="widget",verdict="false_alarm"} 1.0' in exposition
    assert 'hpad_tuner_feedback_used{category="widget",verdict="real_defect"} 1.0' in exposition


@pytest.mark.kafka
def test_a_read_only_console_shows_no_buttons_and_refuses_feedback(kafka_broker, tmp_path):
    topics = new_topics(kafka_broker)
    rng = np.random.default_rng(5)
    with console_process(kafka_broker.bootstrap, topics, tmp_path / "console", "ro") as console, \
            chromium() as browser:
        page = browser.new_page()
        page.goto(console.url + "/")
        page.wait_for_selector("#live.on", timeout=10000)
        assert page.inner_text("#mode") == "read-only"
        bad = make_frame(rng, "cam-9", "widget", defect=True)
        publish(kafka_broker.bootstrap, frame_and_event(topics, bad, event_for(bad, 0.8)))
        figure = f"figure.anomaly[data-frame-id='{bad.frame_id}']"
        page.wait_for_selector(figure + " img", timeout=5000)
        assert page.locator(figure + " button").count() == 0 and page.locator("#token").count() == 0
        page.screenshot(path=str(screenshot_dir(tmp_path) / "6-read-only.png"), full_page=True)
        body = json.dumps({"frame_id": bad.frame_id, "verdict": "real_defect"}).encode()
        status, answer = http_post(f"{console.url}/api/feedback", body, {"Content-Type": "application/json",
                                                                         "Authorization": "Bearer anything-123"})
        assert status == 403 and json.loads(answer)["error"] == "read_only"
    assert read_all(kafka_broker, topics["feedback"], timeout=3, idle=1.0) == []


@pytest.mark.kafka
@pytest.mark.slow
def test_the_overlay_of_a_real_workers_event_is_exactly_its_mask(kafka_broker, tmp_path, tiny_backbone):
    """A real scoring worker (tiny model, random weights, HPAD_MASK_POLICY=always) scores a frame; the console
    joins its event to the frame and tints exactly the pixels of the worker's mask (wherever a random model
    puts it)."""
    from consumers.app import build_provider
    from consumers.metrics import WorkerMetrics
    from consumers.models import model_info
    from consumers.worker import Worker
    from hpad.masks import decode_mask_png
    from hpad.scorer import Scorer, ScorerConfig
    from tests.consumers.kafka_helpers import Topics, WorkerThread, settings

    topics = new_topics(kafka_broker)
    kafka_broker.create_topic(f"{topics['frames']}.dlq", 1)
    ws = settings(kafka_broker, Topics(topics["frames"], topics["events"], f"{topics['frames']}.dlq",
                                       f"g-{uuid.uuid4().hex[:6]}"), categories=["widget"], mask_policy="always",
                  prompts_topic=None)
    scorer = Scorer(tiny_backbone, config=ScorerConfig(max_batch=4))
    worker = Worker(ws, scorer, build_provider(ws, scorer, WorkerMetrics()), model_info(scorer, ws.precision),
                    WorkerMetrics())
    rng = np.random.default_rng(21)
    frame = make_frame(rng, "cam-7", "widget", defect=True, size=(120, 160))
    with console_process(kafka_broker.bootstrap, topics, tmp_path / "console", "worker") as console:
        thread = WorkerThread(worker, {"timeout": 90}).start()
        try:
            publish(kafka_broker.bootstrap, [(topics["frames"], b"cam-7", frame.value, frame.headers)])

            def joined() -> bool:
                state = json.loads(http_get(f"{console.url}/api/state")[1])
                latest = [c["latest"] for c in state["cameras"] if c["camera_id"] == "cam-7" and c["latest"]]
                return bool(latest) and latest[0]["scored"]

            wait_for(joined, timeout=60, what="the worker's event joined to its frame in the console")
        finally:
            thread.stop()
        (event_record,) = read_all(kafka_broker, topics["events"], expected=1)
        event = json.loads(event_record.value)
        jsonschema.validate(event, json.loads((SCHEMAS / "event.schema.json").read_text()))
        mask = decode_mask_png(base64.b64decode(event["mask"]["data"]))
        assert mask.shape == (120, 160) and int(mask.sum()) == event["mask"]["anomalous_pixels"]
        full = decode_jpeg(http_get(f"{console.url}/api/overlay/full/{frame.frame_id}")[1])
        cv2.imwrite(str(screenshot_dir(tmp_path) / "7-real-worker-overlay.png"), full)
        bare = decode_jpeg(http_get(f"{console.url}/api/overlay/full/{frame.frame_id}?mask=0")[1])
    changed = np.abs(full.astype(np.int16) - bare.astype(np.int16)).max(axis=2) > 40
    print(f"worker mask: {mask.sum()} of {mask.size} pixels (random weights); overlay changed {changed.sum()}")
    if mask.any():
        near = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        assert changed[~near].sum() <= 0.01 * changed.size and changed[mask].mean() > 0.9
    else:
        assert changed.sum() <= 0.01 * changed.size  # nothing to draw: the frame is shown as it is
