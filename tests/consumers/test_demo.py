"""The demo's building blocks (the full demo runs with `make demo`): stand-in images, poison frames, live line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from consumers import contract as c
from consumers.camera import find_images
from consumers.decode import inspect_frame
from consumers.demo import ManagedProcess, Stats, generated_images, poison_frames
from hpad.errors import FrameError


def test_generated_images_are_found_by_the_camera(tmp_path):
    folder = generated_images(tmp_path / "images", count=5, size=64)
    assert len(find_images(folder)) == 5


def test_poison_frames_are_refused_for_their_reason():
    for label, value, headers in poison_frames():
        with pytest.raises(FrameError) as info:
            c.check_payload_size(value, c.Limits())
            meta = c.parse_frame_headers(headers, b"cam-poison")
            if meta.category != "bottle":
                raise FrameError("unknown_category", meta.category)
            inspect_frame(meta, value, c.Limits())
        assert info.value.reason == label


def test_live_line_says_random_weights_and_latency():
    stats = Stats()
    now = datetime.now(UTC)
    event = {"is_anomaly": True, "random_weights": True, "model": "hpad-small", "weights": "random-init",
             "precision": "fp32", "device": "cpu", "captured_at": (now - timedelta(milliseconds=40)).isoformat(),
             "prompt_version": 0}
    stats.add_event(event, now)
    stats.add_dead("undecodable")
    line = stats.line()
    assert "RANDOM WEIGHTS" in line and "dead letters 1" in line and "anomalies 1" in line and "40/40 ms" in line
    assert "prompts v0" in line and stats.swaps == []
    stats.add_event({**event, "prompt_version": 2}, now)
    stats.add_event({**event, "prompt_version": 2}, now)
    assert [(old, new, count) for _, old, new, count in stats.swaps] == [(0, 2, 1)]  # one swap, seen once
    assert "prompts v2" in stats.line()


def test_managed_process_stops_what_it_started(tmp_path):
    import sys

    process = ManagedProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"]).start()
    assert process.alive()
    assert process.stop(timeout_s=5) == -15 and not process.alive()


def test_summary_splits_good_and_defective_frames(tmp_path):
    """The camera's frame ids carry its sequence number; the demo maps it back to the image's folder (MVTec
    layout: good/ vs defect folders) and splits the flagged counts per prompt version."""
    from consumers.demo import frame_truth, ground_truth, truth_lines

    for folder, names in {"good": ["000.png", "001.png"], "broken": ["000.png"]}.items():
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_bytes(b"png")
    truth = ground_truth(tmp_path)
    assert truth == ["defective", "good", "good"]  # sorted by path, as the camera streams them
    assert [frame_truth(f"cam-1-2-abc123-{seq:07d}", truth) for seq in range(4)] == \
        ["defective", "good", "good", "defective"]  # --loop wraps around
    assert frame_truth("poison-junk", truth) is None and frame_truth("cam-1-run-0000001", []) is None
    stats = Stats()
    now = datetime.now(UTC)
    event = {"prompt_version": 0, "is_anomaly": True, "random_weights": True, "model": "m", "weights": "w",
             "precision": "fp32", "device": "cpu"}
    for truth_kind, flagged in (("good", True), ("good", False), ("defective", True), ("defective", True)):
        stats.add_event({**event, "is_anomaly": flagged}, now, truth_kind)
    stats.add_event({**event, "prompt_version": 1, "is_anomaly": False}, now, "good")
    assert truth_lines(stats.truth) == [
        "prompts v0: good frames flagged 1 of 2 (50 %); defective frames flagged 2 of 2 (100 %)",
        "prompts v1: good frames flagged 0 of 1 (0 %)",
    ]
