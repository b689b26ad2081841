"""Operator feedback in the tuner: parsing, the on-disk store, the per-operator caps, the bounded threshold drop
and a run that uses confirmed defects."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from consumers.console.feedback import feedback_record
from consumers.console.store import FrameEntry
from hpad.calibration import lower_threshold_for_defects
from hpad.errors import FrameError
from tests.consumers.console_helpers import event_for, make_frame
from tuner.feedback import FeedbackRef, FeedbackStore, admit_defects, admit_false_alarms, parse_feedback


def ref(i: int, camera: str = "cam-1", operator: str = "alice", verdict: str = "false_alarm") -> FeedbackRef:
    return FeedbackRef("widget", verdict, i, f"f{i}", camera, operator, str(i), "", Path(f"/x/{i}.png"))


def test_false_alarms_are_capped_per_camera_and_operator():
    newest_first = [ref(i) for i in range(10, 0, -1)]
    assert [r.seq for r in admit_false_alarms(newest_first, others=12, share=0.25)] == [10, 9, 8]
    assert admit_false_alarms(newest_first, others=0, share=0.25) == []  # feedback alone never tunes
    assert admit_false_alarms(newest_first, others=12, share=0.0) == []
    mixed = [ref(1, operator="alice"), ref(2, operator="bob"), ref(3, operator="alice"), ref(4, camera="cam-2"),
             ref(5, operator="bob"), ref(6, operator="alice")]
    assert [r.seq for r in admit_false_alarms(mixed, others=8, share=0.25)] == [1, 2, 3, 4, 5]
    assert [r.seq for r in admit_defects([ref(i, verdict="real_defect") for i in range(5)], 2)] == [0, 1]


def test_real_defects_only_lower_the_threshold_and_by_a_bounded_amount():
    assert lower_threshold_for_defects(0.6, np.array([0.58, 0.7]), max_drop=0.05) == pytest.approx(0.58)
    assert lower_threshold_for_defects(0.6, np.array([0.3]), max_drop=0.05) == pytest.approx(0.55)  # bounded
    assert lower_threshold_for_defects(0.6, np.array([0.9, 0.61]), max_drop=0.05) == 0.6  # all caught: unchanged
    assert lower_threshold_for_defects(0.6, np.array([]), max_drop=0.05) == 0.6
    assert lower_threshold_for_defects(0.6, np.array([0.1]), max_drop=0.0) == 0.6
    assert lower_threshold_for_defects(0.6, np.array([math.nan]), max_drop=0.5) == 0.6


def feedback_value(rng, verdict: str = "false_alarm", operator: str = "alice", camera: str = "cam-1",
                   category: str = "widget", frame=None) -> tuple[bytes, object]:
    frame = frame or make_frame(rng, camera, category, defect=True, size=(64, 80))
    entry = FrameEntry(frame.frame_id, camera, category, "image/png", None, frame.value)
    entry.event = event_for(frame, score=0.9)
    return json.dumps(feedback_record(entry, verdict, "", operator, "test")).encode(), frame


def test_malformed_feedback_is_refused_with_a_reason():
    rng = np.random.default_rng(1)
    good, _ = feedback_value(rng)
    record, meta, data = parse_feedback(good)
    assert meta.category == "widget" and hashlib.sha256(data).hexdigest() == record["frame"]["sha256"]
    tampered = json.loads(good)
    tampered["frame"]["data"] = base64.b64encode(b"other bytes").decode()
    for value in (b"{", json.dumps({"schema_version": 2}).encode(), json.dumps({**json.loads(good), "verdict": "x"}).encode(),
                  json.dumps({**json.loads(good), "operator": ""}).encode(), json.dumps(tampered).encode()):
        with pytest.raises(FrameError) as err:
            parse_feedback(value)
        assert err.value.reason == "bad_feedback"


def test_store_keeps_one_verdict_per_frame_and_operator_bounded_and_persistent(tmp_path):
    rng = np.random.default_rng(2)
    store = FeedbackStore(tmp_path, max_per_verdict=3)
    image = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    base = {"category": "widget", "camera_id": "cam-1", "operator": "alice", "given_at": ""}
    store.add({**base, "frame_id": "a", "verdict": "false_alarm", "feedback_id": "1"}, image)
    store.add({**base, "frame_id": "a", "verdict": "real_defect", "feedback_id": "2"}, image)  # changed her mind
    store.add({**base, "frame_id": "a", "operator": "bob", "verdict": "false_alarm", "feedback_id": "3"}, image)
    assert [(r.frame_id, r.operator) for r in store.samples("widget", "false_alarm")] == [("a", "bob")]
    assert [r.feedback_id for r in store.samples("widget", "real_defect")] == ["2"]
    for i in range(4):
        store.add({**base, "frame_id": f"n{i}", "verdict": "false_alarm", "feedback_id": f"n{i}"}, image)
    assert [r.frame_id for r in store.samples("widget", "false_alarm")] == ["n1", "n2", "n3"]
    again = FeedbackStore(tmp_path, max_per_verdict=3)
    assert again.samples("widget", "false_alarm") == store.samples("widget", "false_alarm")
    assert (again.load(again.samples("widget", "real_defect"))[0] == image).all()
    assert len(list((tmp_path / "widget" / "feedback").glob("*.png"))) == 4


def test_tuner_ingests_feedback_and_caps_it_in_a_run(tmp_path, tiny_backbone):
    from tests.tuner.test_app import offline_tuner

    tuner = offline_tuner(tmp_path, tiny_backbone, feedback_topic="fb", feedback_max_share=0.25)
    rng = np.random.default_rng(3)

    def rec(value):
        return SimpleNamespace(value=value, headers=[], key=b"cam-1", topic="fb", partition=0, offset=0)

    for _ in range(4):
        assert tuner.ingest(rec(feedback_value(rng)[0])) == "stored"
    assert tuner.ingest(rec(feedback_value(rng, verdict="real_defect")[0])) == "stored"
    assert tuner.ingest(rec(feedback_value(rng, category="gadget")[0])) == "unknown_category"
    assert tuner.ingest(rec(b"not json")) == "bad_feedback"
    assert tuner.states["widget"].since == 4  # false alarms count towards the next run; defects do not
    for i in range(8):
        tuner.reservoir.add("widget", f"n{i}", rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
    alarms, defects, held = tuner.feedback_for_run("widget", others=8)
    assert len(alarms) == 2 and len(defects) == 1 and held == {"false_alarm": 2, "real_defect": 0}
    m = tuner.metrics
    assert m.feedback.labels(category="widget", verdict="false_alarm")._value.get() == 4
    assert m.dropped.labels(reason="bad_feedback")._value.get() == 1


@pytest.mark.slow
def test_a_run_scores_confirmed_defects_in_the_gate_and_lowers_the_threshold_within_the_bound(tiny_scorer):
    from dataclasses import replace

    from hpad.mpts import TrainConfig, score_pool
    from tests.synthetic import make_object_image
    from tuner.job import TuneConfig, encode_defects, tune_category

    rng = np.random.default_rng(5)
    normals = [make_object_image(rng, (96, 96))[0] for _ in range(8)]
    defects = [make_frame(rng, "cam-1", "widget", defect=True, size=(96, 96)).image for _ in range(3)]
    train = TrainConfig(epochs=2, steps_per_epoch=2, batch_size=8, train_normals=6, train_anomalies=6,
                        val_normals=4, val_anomalies=4)
    config = TuneConfig(shots=2, min_normals=6, gate_normals=3, gate_anomalies=4, margin=0.9, train=train,
                        max_threshold_drop=1.0)
    current = tiny_scorer.zero_shot_prompts("widget")
    fed = tune_category(tiny_scorer, "widget", normals, current, config, seed=1, defects=defects)
    calibrated = fed.result.metrics.calibration.threshold  # what calibration on normals + OAGM gave
    assert fed.feedback["threshold_calibrated"] == pytest.approx(calibrated)
    scores, _ = score_pool(tiny_scorer, encode_defects(tiny_scorer, defects), fed.result.prompts)  # same ctx
    print(f"calibrated threshold {calibrated:.4f}; confirmed defects scored {np.round(scores, 4).tolist()}")
    assert scores.min() < calibrated, "this seed must give a defect the calibrated threshold misses"
    assert fed.result.prompts.threshold == pytest.approx(scores.min()) and fed.feedback["defect_recall"] == 1.0
    assert fed.splits["real_defects"] == 3 and fed.splits["gate_anomalies"] == config.gate_anomalies + 3
    bounded = tune_category(tiny_scorer, "widget", normals, current, replace(config, max_threshold_drop=1e-4),
                            seed=1, defects=defects)
    assert bounded.result.prompts.threshold == pytest.approx(max(calibrated - 1e-4, scores.min()))
