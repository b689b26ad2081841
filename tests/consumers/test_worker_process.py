"""`hpad serve` as a real process: SIGKILL mid-stream loses nothing; SIGTERM drains, commits and exits 0.

Both run on tansu and on Apache Kafka (1 node): the ``kafka`` fixture is bound to the parametrised ``broker``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.consumers.kafka_helpers import (
    WorkerThread,
    assert_commits_covered,
    events_by_frame,
    good_frame,
    wait_for,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def spawn(broker, topics, tmp_path, name: str) -> tuple[subprocess.Popen, object]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HPAD_BOOTSTRAP_SERVERS": broker.bootstrap, "HPAD_INPUT_TOPIC": topics.frames,
        "HPAD_EVENTS_TOPIC": topics.events, "HPAD_DLQ_TOPIC": topics.dlq, "HPAD_GROUP_ID": topics.group,
        "HPAD_MODEL": "hpad-tiny", "HPAD_RANDOM_INIT": "true", "HPAD_DEVICE": "cpu", "HPAD_TORCH_THREADS": "1",
        "HPAD_CATEGORIES": "widget", "HPAD_SESSION_TIMEOUT_MS": "2000", "HPAD_HEARTBEAT_INTERVAL_MS": "500",
        "HPAD_METRICS_PORT": "-1", "HPAD_MAX_BATCH_SIZE": "2", "HPAD_MAX_WAIT_MS": "5",
        # no normals sampling (as in the in-process tests): on Apache Kafka (no auto-created topics) each sample
        # for the absent default topic waited 2 s for its metadata, which doubled these tests' time
        "HPAD_NORMALS_TOPIC": "",
    }
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed by the caller
    process = subprocess.Popen([sys.executable, "-m", "hpad.cli", "serve"], env=env, cwd=tmp_path, stdout=log,
                               stderr=subprocess.STDOUT)
    return process, log


def events_seen(kafka, topic: str, at_least: int) -> dict[str, list[dict]]:
    return events_by_frame(kafka.read_all(topic, expected=at_least, timeout=60))


def signal_mid_stream(kafka, tmp_path, seed: int, name: str, signum: int, wait_s: float):
    """120 frames over 2 partitions: 10 up front, the rest at about 60 frames/s from a camera thread; `hpad
    serve` as a process gets ``signum`` once 30 events are out (mid-stream: frames are being scored and
    published). Returns (topics, frames, sent, exit code)."""
    topics = kafka.new_topics(partitions=2)
    rng = np.random.default_rng(seed)
    frames = [good_frame(rng, camera=f"cam-{i % 2}", size=(240, 320)) for i in range(120)]
    for i, frame in enumerate(frames):
        frame.partition = i % 2
    sent = kafka.publish(topics.frames, frames[:10])

    def camera() -> None:  # the stream goes on while the worker gets the signal
        for start in range(10, len(frames), 6):
            sent.extend(kafka.publish(topics.frames, frames[start : start + 6]))
            time.sleep(0.1)

    process, log = spawn(kafka.broker, topics, tmp_path, name)
    stream = threading.Thread(target=camera)
    try:
        events_seen(kafka, topics.events, 10)  # the worker is up and producing
        stream.start()
        events_seen(kafka, topics.events, 30)
        process.send_signal(signum)
        code = process.wait(timeout=wait_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
        stream.join(timeout=60)
    return topics, frames, sent, code


def test_sigkill_mid_stream_then_restart_loses_nothing(kafka, make_worker, tmp_path):
    topics, frames, sent, code = signal_mid_stream(kafka, tmp_path, 10, "killed", signal.SIGKILL, 30)
    assert code == -signal.SIGKILL
    at_kill = kafka.committed_offsets(topics.group, topics.frames)
    before = events_by_frame(kafka.read_all(topics.events))
    assert_commits_covered(at_kill, sent, set(before))

    assert sum(o or 0 for o in at_kill.values()) < len(frames), "killed after the end: nothing was tested"

    restarted = WorkerThread(make_worker(kafka.settings(topics, categories=["widget"]))).start()
    wait_for(lambda: set(events_by_frame(kafka.read_all(topics.events))) >= {f.frame_id for f in frames},
             timeout=60, interval=0.5, what="every frame scored after the restart")
    restarted.stop()
    events = events_by_frame(kafka.read_all(topics.events))
    assert set(events) == {f.frame_id for f in frames}, "frames were lost"
    offsets = {s.frame_id: s for s in sent}
    for frame_id, copies in events.items():
        if len(copies) > 1:  # only frames after the last commit before the kill may be scored twice
            where = offsets[frame_id]
            assert at_kill.get(where.partition) is None or where.offset >= at_kill[where.partition], where
    final = kafka.committed_offsets(topics.group, topics.frames)
    assert final == {p: 60 for p in (0, 1)}
    duplicates = sum(len(copies) - 1 for copies in events.values())
    print(f"committed at kill {at_kill}, events before restart {len(before)}, duplicates {duplicates}")


def test_sigterm_drains_commits_and_exits_zero(kafka, make_worker, tmp_path):
    topics, frames, sent, code = signal_mid_stream(kafka, tmp_path, 11, "terminated", signal.SIGTERM, 60)
    assert code == 0, (tmp_path / "terminated.log").read_text()[-3000:]
    committed = kafka.committed_offsets(topics.group, topics.frames)
    events = events_by_frame(kafka.read_all(topics.events))
    offsets = {s.frame_id: s for s in sent}
    for frame_id in events:  # everything the worker published before exiting is committed
        where = offsets[frame_id]
        assert committed[where.partition] is not None and where.offset < committed[where.partition], where
    assert_commits_covered(committed, sent, set(events))
    assert len(events) < len(frames), "the worker finished everything before SIGTERM: nothing was tested"

    rest = make_worker(kafka.settings(topics, categories=["widget"]))
    result = rest.run(max_frames=len(frames) - len(events), timeout=60, install_signals=False)
    assert result.exit_code == 0
    events = events_by_frame(kafka.read_all(topics.events, expected=len(frames)))
    assert set(events) == {f.frame_id for f in frames}
    assert all(len(copies) == 1 for copies in events.values()), "a clean SIGTERM must not cause duplicates"
