"""Worker integration tests on the real brokers (kafka-python <-> tansu / Apache Kafka) with the tiny random model.

The tests that take ``kafka`` run on both brokers (the ``broker`` fixture); those on ``kafka_broker`` are tansu-only
(named so when it is the broker that makes them so: tansu's schema registry refuses records).

Every test uses its own uuid-named topics and group. Frames are matched to events and dead letters by
frame_id; committed offsets are checked against acknowledged output.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from consumers import contract as c
from consumers.camera import frame_headers
from consumers.events import headers_as_text
from consumers.items import Batch, FrameItem, PipelineConfig
from consumers.metrics import WorkerMetrics
from consumers.offsets import OffsetBook
from consumers.pipeline import ScoreStage
from consumers.prompt_provider import PromptProvider, PromptSnapshot, StaticPromptProvider
from hpad.scorer import Scorer, ScorerConfig
from tests.consumers.kafka_helpers import (
    Frame,
    WorkerThread,
    assert_commits_covered,
    committed_offsets,
    encode,
    events_by_frame,
    good_frame,
    image,
    new_topics,
    png_claiming,
    publish,
    read_all,
    reject_schema,
    settings,
    wait_for,
)

pytestmark = pytest.mark.kafka
EVENT_SCHEMA = json.loads((Path(c.__file__).parent / "schemas" / "event.schema.json").read_text())


def poison_frames(rng: np.random.Generator) -> dict[str, Frame]:
    """One frame per refusal reason, keyed by frame_id (the missing_header one has none)."""

    def h(frame_id: str, content: str = "image/png", category: str = "widget", **extra: str):
        base = frame_headers(frame_id, "cam-p", category, content)
        drop = {k for k, v in extra.items() if v is None}
        base = [(k, v) for k, v in base if k not in drop and k not in extra]
        return base + [(k, v.encode()) for k, v in extra.items() if v is not None]

    png = encode(image(rng, (32, 32)))
    truncated = png[:60] + b"\x00" * 200  # valid IHDR, broken pixel data: fails in the decoder
    frames = {
        "empty_value": Frame(None, h("p-empty"), b"cam-p"),
        "payload_too_large": Frame(b"\x89PNG" + bytes(300_000), h("p-large"), b"cam-p"),
        "missing_header": Frame(png, [x for x in h("p-nofid") if x[0] != "frame_id"], b"cam-p"),
        "invalid_header": Frame(png, h("p-badtime", captured_at="yesterday"), b"cam-p"),
        "unsupported_content_type": Frame(png, h("p-gif", content="image/gif"), b"cam-p"),
        "unknown_category": Frame(png, h("p-cat", category="spaceship"), b"cam-p"),
        "bad_dimensions": Frame(png_claiming(100_000, 100_000), h("p-huge"), b"cam-p"),
        "too_many_pixels": Frame(png_claiming(4000, 4000), h("p-bomb"), b"cam-p"),
        "undecodable": Frame(b"not an image at all", h("p-junk", content="image/jpeg"), b"cam-p"),
        "undecodable-decoder": Frame(truncated, h("p-trunc"), b"cam-p"),
        "undecodable-raw": Frame(bytes(10), h("p-raw", content="application/x-raw; shape=8,8,3"), b"cam-p"),
        "event_rejected": Frame(png, h("p-rejected", category="gadget"), b"cam-p"),
    }
    return frames


def test_frames_in_events_and_dead_letters_out(kafka, make_worker):
    """N good frames + one poison frame per reason -> exactly N events and one dead letter each (on Apache Kafka
    without the event_rejected frame: only tansu's schema registry makes the broker refuse an event)."""
    topics = kafka.new_topics()
    if kafka.has_schema_registry:
        kafka.reject_schema(topics.events, "gadget")  # the broker refuses gadget events for real
    rng = np.random.default_rng(0)
    sizes = [(64, 80), (48, 48), (120, 90)]
    good = [good_frame(rng, "widget", f"cam-{i % 4}", sizes[i % 3], (".png", ".jpg")[i % 2]) for i in range(18)]
    poison = poison_frames(rng)
    if not kafka.has_schema_registry:
        del poison["event_rejected"]
    sent = kafka.publish(topics.frames, good + list(poison.values()))
    s = kafka.settings(topics, max_pixels=1_000_000, max_payload_bytes=200_000)
    worker = make_worker(s)
    result = worker.run(max_frames=len(sent), timeout=60, install_signals=False)
    assert result.exit_code == 0 and result.completed == len(sent)

    events = events_by_frame(kafka.read_all(topics.events, expected=len(good)))
    assert set(events) == {f.frame_id for f in good}
    assert all(len(v) == 1 for v in events.values())
    validator = jsonschema.Draft202012Validator(EVENT_SCHEMA)
    by_id = {f.frame_id: f for f in good}
    for frame_id, (event,) in events.items():
        validator.validate(event)
        assert event["random_weights"] is True and event["weights"] == "random-init"
        assert (event["mask"] is not None) == event["is_anomaly"]
        picture = by_id[frame_id]
        assert event["camera_id"] == picture.key.decode()
        if event["mask"]:
            assert (event["mask"]["width"], event["mask"]["height"]) == (event["width"], event["height"])

    letters = kafka.read_all(topics.dlq, expected=len(poison))
    assert len(letters) == len(poison)
    got = {(int(headers_as_text(r.headers)[c.ORIGINAL_PARTITION]), int(headers_as_text(r.headers)[c.ORIGINAL_OFFSET])): r
           for r in letters}
    for (kind, frame), meta in zip(poison.items(), sent[len(good):], strict=True):
        record = got[(meta.partition, meta.offset)]
        headers = headers_as_text(record.headers)
        assert headers[c.ERROR_CLASS] == kind.split("-")[0], (kind, headers[c.ERROR_MESSAGE])
        assert headers[c.ORIGINAL_TOPIC] == topics.frames and headers[c.ORIGINAL_PARTITION] == str(meta.partition)
        assert record.key == frame.key and record.value == (frame.value or b"")
        original = headers_as_text(frame.headers)
        assert all(headers[k] == v for k, v in original.items())

    counts = {s.labels["reason"]: s.value for s in worker.metrics.dead_letters.collect()[0].samples
              if s.name.endswith("_total")}
    assert counts["undecodable"] == 3 and counts["too_many_pixels"] == 1
    assert counts.get("event_rejected", 0) == (1 if kafka.has_schema_registry else 0)
    committed = kafka.committed_offsets(topics.group, topics.frames)
    ends = {}
    for x in sent:
        ends[x.partition] = max(ends.get(x.partition, 0), x.offset + 1)
    assert {p: o for p, o in committed.items() if o is not None} == ends
    assert_commits_covered(committed, sent, set(events) | {x.frame_id for x in sent[len(good):]})


def test_failed_batch_commits_nothing_tansu_only(kafka_broker, make_worker):
    """An event the broker refuses whose dead letter is refused too: the worker stops, nothing passes it."""
    topics = new_topics(kafka_broker, partitions=1)
    reject_schema(kafka_broker, topics.events, "gadget")
    reject_schema(kafka_broker, topics.dlq, None)  # dead letters carry image bytes, not JSON: all refused
    rng = np.random.default_rng(1)
    first = [good_frame(rng) for _ in range(6)]
    sent = publish(kafka_broker, topics.frames, first)
    s = settings(kafka_broker, topics)
    assert make_worker(s).run(max_frames=6, timeout=30, install_signals=False).exit_code == 0
    assert committed_offsets(kafka_broker, topics.group, topics.frames) == {0: 6}

    second = [good_frame(rng, "gadget"), good_frame(rng), good_frame(rng)]
    sent += publish(kafka_broker, topics.frames, second)
    worker = make_worker(s)
    result = worker.run(timeout=30, install_signals=False)
    assert result.exit_code == 1 and result.reason == "fatal" and "refused" in result.error
    committed = committed_offsets(kafka_broker, topics.group, topics.frames)
    assert committed == {0: 6}, "offsets passed a frame whose output was never acknowledged"
    events = events_by_frame(read_all(kafka_broker, topics.events))
    assert_commits_covered(committed, sent, set(events))
    assert second[0].frame_id not in events


def test_exactly_once_path_delivers_and_commits(kafka_broker, make_worker):
    """Transactional producer + offsets in the transaction (isolation itself cannot be tested on tansu)."""
    topics = new_topics(kafka_broker, partitions=2)
    rng = np.random.default_rng(2)
    frames = [good_frame(rng, camera=f"cam-{i}") for i in range(10)]
    bad = Frame(b"junk", frame_headers("eos-bad", "cam-x", "widget", "image/jpeg"), b"cam-x")
    sent = publish(kafka_broker, topics.frames, [*frames, bad])
    worker = make_worker(settings(kafka_broker, topics, exactly_once=True))
    result = worker.run(max_frames=len(sent), timeout=60, install_signals=False)
    assert result.exit_code == 0
    events = events_by_frame(read_all(kafka_broker, topics.events, expected=10, isolation_level="read_committed"))
    assert set(events) == {f.frame_id for f in frames} and all(len(v) == 1 for v in events.values())
    letters = read_all(kafka_broker, topics.dlq, expected=1, isolation_level="read_committed")
    assert [headers_as_text(r.headers)[c.ERROR_CLASS] for r in letters] == ["undecodable"]
    committed = committed_offsets(kafka_broker, topics.group, topics.frames)
    ends: dict[int, int] = {}
    for x in sent:
        ends[x.partition] = max(ends.get(x.partition, 0), x.offset + 1)
    assert {p: o for p, o in committed.items() if o is not None} == ends


def test_two_workers_split_partitions(kafka, make_worker):
    topics = kafka.new_topics(partitions=4)
    s = kafka.settings(topics)
    first = WorkerThread(make_worker(s)).start()
    wait_for(lambda: first.worker.health.assigned == 4, what="first worker assigned")
    second = WorkerThread(make_worker(s)).start()
    workers = (first.worker, second.worker)
    wait_for(lambda: sum(w.health.assigned for w in workers) == 4 and all(w.health.assigned for w in workers),
             what="partitions split between the workers")
    rng = np.random.default_rng(3)
    frames = [good_frame(rng, camera=f"cam-{i % 4}") for i in range(24)]
    for i, frame in enumerate(frames):
        frame.partition = i % 4
    kafka.publish(topics.frames, frames)
    events = events_by_frame(kafka.read_all(topics.events, expected=24))
    wait_for(lambda: sum(w.pipeline.completed for w in workers) >= 24, what="all frames completed")
    first.stop()
    second.stop()
    assert set(events) == {f.frame_id for f in frames} and all(len(v) == 1 for v in events.values())
    assert all(w.pipeline.completed > 0 for w in workers)
    owned = [w.rebalance_log[-2][1] if w.rebalance_log[-1][0] == "revoked" else w.rebalance_log[-1][1]
             for w in workers]
    assert not owned[0] & owned[1]


class SlowScorer(Scorer):
    """The tiny scorer, made slow (seconds per call) to keep batches in flight."""

    delay_s = 0.2

    def score_batch(self, frames, prompts=None, sizes=None):  # what the worker's score stage calls
        time.sleep(self.delay_s)
        return super().score_batch(frames, prompts, sizes)


def test_revoke_finishes_and_commits_in_flight_work(kafka, make_worker, tiny_backbone):
    """A second worker joins while the first is busy: the first drains and commits; nothing is scored twice."""
    topics = kafka.new_topics(partitions=2)
    s = kafka.settings(topics, max_batch_size=2)
    rng = np.random.default_rng(4)
    frames = [good_frame(rng) for _ in range(30)]
    for i, frame in enumerate(frames):
        frame.partition = i % 2
    kafka.publish(topics.frames, frames)
    slow = SlowScorer(tiny_backbone, config=ScorerConfig(max_batch=2))
    first = WorkerThread(make_worker(s, scorer=slow)).start()
    wait_for(lambda: first.worker.pipeline is not None and first.worker.pipeline.completed >= 4, what="first batches")
    second = WorkerThread(make_worker(s)).start()
    events = events_by_frame(kafka.read_all(topics.events, expected=30, timeout=60))
    first.stop()
    second.stop()
    assert set(events) == {f.frame_id for f in frames}
    duplicates = {k: len(v) for k, v in events.items() if len(v) > 1}
    assert not duplicates, f"frames scored twice after a clean revoke: {duplicates}"
    assert any(kind == "revoked" and tps for kind, tps in first.worker.rebalance_log)
    assert second.worker.pipeline.completed > 0


def test_slow_batches_do_not_expire_max_poll_interval(kafka_broker, make_worker, tiny_backbone):
    """A batch slower than max_poll_interval_ms: the loop keeps polling (paused), the group never evicts."""
    topics = new_topics(kafka_broker, partitions=1)
    s = settings(kafka_broker, topics, max_poll_interval_ms=5000, revoke_timeout_ms=2000, max_batch_size=4,
                 pipeline_depth=1)
    rng = np.random.default_rng(5)
    frames = [good_frame(rng) for _ in range(4)]
    slow = SlowScorer(tiny_backbone, config=ScorerConfig(max_batch=4))
    slow.delay_s = 5.5  # one batch of 4, slower than max_poll_interval_ms
    publish(kafka_broker, topics.frames, frames)
    worker = make_worker(s, scorer=slow)
    result = worker.run(max_frames=4, timeout=40, install_signals=False)
    assert result.exit_code == 0 and result.completed == 4
    kinds = [kind for kind, tps in worker.rebalance_log if tps]
    assert kinds in (["assigned"], ["assigned", "revoked"]), worker.rebalance_log  # the revoke of close()
    assert committed_offsets(kafka_broker, topics.group, topics.frames) == {0: 4}


class SwappingProvider(PromptProvider):
    """A new prompt version on every snapshot (a swap between every two batches)."""

    def __init__(self, base: StaticPromptProvider) -> None:
        self.base, self.calls = base, 0

    def snapshot(self) -> PromptSnapshot:
        self.calls += 1
        from dataclasses import replace

        return PromptSnapshot({k: replace(v, version=self.calls) for k, v in self.base.snapshot().items()})

    def get(self, category):
        return self.base.get(category)


def test_prompt_version_is_fixed_per_batch(kafka_broker, make_worker, tiny_backbone):
    topics = new_topics(kafka_broker, partitions=1)
    s = settings(kafka_broker, topics, max_batch_size=3)
    scorer = Scorer(tiny_backbone, config=ScorerConfig(max_batch=3))
    provider = SwappingProvider(StaticPromptProvider.build(scorer, s.categories))
    rng = np.random.default_rng(6)
    frames = [good_frame(rng, ("widget", "gadget")[i % 2]) for i in range(12)]
    sent = publish(kafka_broker, topics.frames, frames)
    worker = make_worker(s, scorer=scorer, provider=provider)
    assert worker.run(max_frames=12, timeout=30, install_signals=False).exit_code == 0
    events = [e for v in events_by_frame(read_all(kafka_broker, topics.events, expected=12)).values() for e in v]
    by_version: dict[int, list[int]] = {}
    for event in events:
        by_version.setdefault(event["prompt_version"], []).append(event["source"]["offset"])
    assert len(by_version) >= 2  # versions changed during the run
    for offsets in by_version.values():  # one version = one batch: at most 3 consecutive offsets
        assert len(offsets) <= 3 and max(offsets) - min(offsets) == len(offsets) - 1
    assert len(sent) == 12


class OomScorer(Scorer):
    """Runs out of memory on more than two frames at once, and always on frames wider than 100 px."""

    def score_batch(self, frames, prompts=None, sizes=None):  # what the worker's score stage calls
        if len(frames) > 2 or any(f.shape[1] > 100 for f in frames):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().score_batch(frames, prompts, sizes)


def test_out_of_memory_splits_the_batch_then_dead_letters_one_frame(tiny_backbone):
    scorer = OomScorer(tiny_backbone, config=ScorerConfig(max_batch=8))
    provider = StaticPromptProvider.build(scorer, ["widget"])
    config = PipelineConfig(events_topic="e", dlq_topic="d", worker_name="w", limits=c.Limits(),
                            default_category=None, mask_policy="never", max_request_size=2**25, oom_retries=2,
                            retry_backoff_s=0.01)
    import threading

    metrics = WorkerMetrics()
    stage = ScoreStage(config, scorer, metrics, threading.Event())
    rng = np.random.default_rng(7)
    book = OffsetBook()
    items = []
    for i, width in enumerate([40, 40, 40, 200, 40, 40]):
        tp = __import__("kafka").TopicPartition("f", 0)
        item = FrameItem(record=None, tp=tp, epoch=book.track(tp, i), received=time.monotonic(),
                         meta=c.FrameMeta(f"f{i}", "cam", "widget", c.ContentType("png"), None), size=(width, 32))
        item.pixels = image(rng, (32, width))
        items.append(item)
    stage.run(Batch(items), provider.snapshot(), book)
    assert [i.error.reason if i.error else "ok" for i in items] == ["ok", "ok", "ok", "out_of_memory", "ok", "ok"]
    assert all(i.scored is not None for i in items if i.error is None)
    retries = {s.labels["kind"]: s.value for s in metrics.retries.collect()[0].samples if s.name.endswith("_total")}
    assert retries["oom_split"] >= 2 and retries["oom_retry"] == 2


def test_lost_membership_drops_in_flight_work_and_loses_nothing(kafka_broker, make_worker):
    """The main loop stalls past max_poll_interval_ms (simulated): kafka-python gives the partitions up; the
    worker drops their in-flight work, rejoins, and every frame still gets its event."""
    from consumers.worker import Worker

    topics = new_topics(kafka_broker, partitions=1)
    s = settings(kafka_broker, topics, max_poll_interval_ms=5000, revoke_timeout_ms=1000, max_batch_size=2)

    class Stalling(Worker):
        stalled = False

        def _update_lag(self) -> None:
            if not self.stalled and self.pipeline.completed >= 4:
                self.stalled = True
                time.sleep(6.5)  # no poll for longer than max_poll_interval_ms
            super()._update_lag()

    worker = make_worker(s, cls=Stalling)
    rng = np.random.default_rng(8)
    frames = [good_frame(rng) for _ in range(12)]
    publish(kafka_broker, topics.frames, frames)
    thread = WorkerThread(worker).start()
    events = events_by_frame(read_all(kafka_broker, topics.events, expected=12, timeout=60))
    wait_for(lambda: committed_offsets(kafka_broker, topics.group, topics.frames) == {0: 12}, timeout=30,
             interval=0.3, what="all offsets committed after the rejoin")
    thread.stop()
    assert set(events) == {f.frame_id for f in frames}
    assert "lost" in [kind for kind, _ in worker.rebalance_log], worker.rebalance_log


def test_lag_metric_follows_commits(kafka_broker, make_worker):
    topics = new_topics(kafka_broker, partitions=3)
    worker = make_worker(settings(kafka_broker, topics))
    thread = WorkerThread(worker).start()
    rng = np.random.default_rng(9)
    frames = [good_frame(rng, camera=f"cam-{i}") for i in range(9)]
    for i, frame in enumerate(frames):
        frame.partition = i % 3
    publish(kafka_broker, topics.frames, frames)

    def lags() -> dict[str, float]:
        return {s.labels["partition"]: s.value for s in worker.metrics.lag.collect()[0].samples}

    wait_for(lambda: worker.pipeline is not None and worker.pipeline.completed >= 9, what="frames scored")
    wait_for(lambda: lags() == {"0": 0.0, "1": 0.0, "2": 0.0}, timeout=10, what="lag back to 0 on all partitions")
    thread.stop()
    assert committed_offsets(kafka_broker, topics.group, topics.frames) == {0: 3, 1: 3, 2: 3}


@pytest.mark.apache_kafka
def test_worker_joined_before_its_topic_existed_picks_it_up(apache_kafka_broker, make_worker):
    """Apache Kafka without auto-create: the worker joins while its input topic does not exist yet and is
    assigned nothing; once the topic is created it must rejoin and score (kafka-python alone rejoins only at
    its next metadata refresh, metadata_max_age_ms = 5 min; the same path as a topic created just before the
    first join, whose metadata the broker had not yet served)."""
    from tests.consumers.kafka_helpers import KafkaTools

    kafka = KafkaTools(apache_kafka_broker)
    topics = new_topics(apache_kafka_broker, partitions=2)
    late = f"{topics.frames}.late"
    s = kafka.settings(topics, input_topic=late)
    worker = WorkerThread(make_worker(s)).start()
    wait_for(lambda: worker.worker.rebalance_log and worker.worker.rebalance_log[-1] == ("assigned", frozenset()),
             what="the worker joined with nothing assigned")
    kafka.create_topic(late, 2)
    rng = np.random.default_rng(9)
    frames = [good_frame(rng) for _ in range(6)]
    for i, frame in enumerate(frames):
        frame.partition = i % 2
    kafka.publish(late, frames)
    events = events_by_frame(kafka.read_all(topics.events, expected=6, timeout=40))
    worker.stop()
    assert set(events) == {f.frame_id for f in frames}
    assert worker.worker.health.assigned == 2 or any(kind == "assigned" and len(tps) == 2
                                                     for kind, tps in worker.worker.rebalance_log)


@pytest.mark.apache_kafka
def test_metadata_watch_refreshes_only_while_nothing_is_owned_for_want_of_metadata(apache_kafka_broker):
    """A real consumer on Apache Kafka (no auto-create): while its topic has no partition metadata and it owns
    nothing, the watch asks for a refresh, at most once per interval; once partitions are owned it stops."""
    from kafka import KafkaConsumer

    from consumers.kafka_io import MetadataWatch

    topic = f"watch-{np.random.default_rng().integers(1 << 30)}"
    consumer = KafkaConsumer(bootstrap_servers=apache_kafka_broker.bootstrap, group_id=f"{topic}.group",
                             enable_auto_commit=False)
    try:
        consumer.subscribe([topic])
        now = [100.0]
        watch = MetadataWatch(consumer, [topic], interval_s=1.0, clock=lambda: now[0])
        consumer.poll(timeout_ms=500)
        assert watch.missing() == [topic] and not consumer.assignment()
        assert watch.check() and consumer._client.cluster.need_update
        now[0] += 0.5
        assert not watch.check()  # throttled
        now[0] += 0.6
        assert watch.check() and watch.requests == 2
        apache_kafka_broker.create_topic(topic, 2)
        deadline = time.monotonic() + 30
        while not consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(timeout_ms=200)
            now[0] += 1.0
            watch.check()
        assert len(consumer.assignment()) == 2 and watch.missing() == []
        assert watch.rejoins <= 1  # at most once, when the topic appeared before the partitions did
        asked = watch.requests
        now[0] += 5.0
        assert not watch.check() and watch.requests == asked  # owns partitions: nothing to refresh
    finally:
        consumer.close()


@pytest.mark.apache_kafka
def test_a_session_timeout_the_broker_refuses_is_a_config_error_not_a_retry_loop(apache_kafka_broker, make_worker):
    """Apache Kafka refuses a session timeout above group.max.session.timeout.ms (30 min) at JoinGroup: the
    worker stops with a ConfigError naming HPAD_SESSION_TIMEOUT_MS (hpad exits 2) instead of retrying."""
    from hpad.errors import ConfigError
    from tests.consumers.kafka_helpers import KafkaTools

    kafka = KafkaTools(apache_kafka_broker)
    topics = new_topics(apache_kafka_broker, partitions=1)
    s = kafka.settings(topics, session_timeout_ms=2_400_000)
    worker = make_worker(s)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="HPAD_SESSION_TIMEOUT_MS") as refused:
        worker.run(timeout=60, install_signals=False)
    assert "2400000 ms" in str(refused.value) and time.monotonic() - started < 30
