"""Prompt hot-swap in running scorers, on the real brokers (the swap tests on tansu and Apache Kafka, 1 node).

Invariants: every frame ends as an event (none lost); each event's prompt_version is the old or the new one;
per partition (in offset order) the version switches once and never goes back; no batch mixes versions;
bad records on the prompts topic are refused and the version in use keeps scoring; a rollback (published as
a new, higher version) is picked up.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace
from typing import ClassVar

import numpy as np
import pytest
import torch
from kafka import KafkaProducer

from consumers.app import build_provider
from consumers.metrics import WorkerMetrics
from consumers.models import model_info
from consumers.prompt_provider import KafkaPromptProvider
from consumers.prompt_records import record_headers
from consumers.settings import prompts_consumer_kwargs
from consumers.worker import Worker
from hpad.artifact import build_artifact_bytes, read_artifact
from hpad.attention import LAAConfig
from hpad.errors import ArtifactError
from hpad.scorer import Scorer, ScorerConfig
from tests.consumers.kafka_helpers import (
    WorkerThread,
    events_by_frame,
    good_frame,
    new_topics,
    settings,
    wait_for,
)
from tuner.registry import PromptRegistry

pytestmark = pytest.mark.kafka


def learned_artifact(scorer: Scorer, category: str, seed: int, identity: str | None = None,
                     laa: LAAConfig | None = None):
    """A learned-looking prompt artifact for the tiny scorer (random unit text features)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(2, scorer.backbone.embed_dim, generator=g), dim=-1)
    base = scorer.zero_shot_prompts(category)
    prompts = replace(base, text_features=features, source="learned", model_identity=identity or scorer.backbone.identity,
                      laa=laa or scorer.config.laa, threshold=0.5, memory=None)
    return read_artifact(build_artifact_bytes(prompts, version=1, ctx=torch.randn(2, 4, 32, generator=g)))


def make_registry(broker, s, topic: str, scorer: Scorer) -> PromptRegistry:
    from consumers.settings import producer_kwargs

    return PromptRegistry(topic, lambda: __import__("kafka").KafkaConsumer(**prompts_consumer_kwargs(s)),
                          lambda: KafkaProducer(**producer_kwargs(s)), expected_identity=scorer.backbone.identity)


@pytest.fixture
def swap_setup(kafka, tiny_backbone):
    topics = kafka.new_topics(partitions=3, prefix="swap")
    prompts_topic = f"{topics.frames}.prompts"
    kafka.create_topic(prompts_topic, 1)
    s = kafka.settings(topics, categories=["widget"], max_batch_size=4, prompts_topic=prompts_topic,
                 normals_topic=None)
    scorer = Scorer(tiny_backbone, config=ScorerConfig(max_batch=4))
    return topics, prompts_topic, s, scorer


def start_worker(s, scorer: Scorer, **run) -> tuple[Worker, WorkerThread, KafkaPromptProvider]:
    metrics = WorkerMetrics()
    provider = build_provider(s, scorer, metrics)
    assert isinstance(provider, KafkaPromptProvider)
    provider.retry_s = 0.5
    worker = Worker(s, scorer, provider, model_info(scorer, s.precision), metrics)
    thread = WorkerThread(worker, run).start()
    wait_for(lambda: worker.health.ready(), timeout=30, what="worker ready")
    return worker, thread, provider


def check_switch(events: list[dict], old: int, new: int) -> None:
    """Per partition: versions in offset order are old...old new...new (the switch happens once)."""
    by_partition: dict[int, list[tuple[int, int]]] = {}
    for e in events:
        by_partition.setdefault(e["source"]["partition"], []).append((e["source"]["offset"], e["prompt_version"]))
    for partition, rows in by_partition.items():
        versions = [v for _, v in sorted(rows)]
        assert set(versions) <= {old, new}, (partition, versions)
        assert versions == sorted(versions, key=lambda v: v == new), f"partition {partition} went back: {versions}"
    batches: dict[str, set[int]] = {}
    for e in events:
        batches.setdefault(e["batch_id"], set()).add(e["prompt_version"])
    mixed = {b: v for b, v in batches.items() if len(v) > 1}
    assert not mixed, f"batches scored with two versions: {mixed}"


def test_swap_while_streaming_loses_nothing_and_switches_once(kafka, swap_setup):
    topics, prompts_topic, s, scorer = swap_setup
    registry = make_registry(kafka.broker, s, prompts_topic, scorer)
    registry.publish(learned_artifact(scorer, "widget", 1))  # version 1 exists before the worker starts
    worker, thread, provider = start_worker(s, scorer, timeout=150)
    assert provider.snapshot().version("widget") == 1  # read from the beginning before consuming
    rng = np.random.default_rng(0)
    sent, stop = [], threading.Event()

    def stream() -> None:  # 4 frames every 50 ms until told to stop: the line never pauses for the swap
        i = 0
        while not stop.is_set():
            frames = [good_frame(rng, "widget", camera=f"cam-{(i + j) % 6}") for j in range(4)]
            sent.extend(kafka.publish(topics.frames, frames))
            i += 4
            time.sleep(0.05)

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        wait_for(lambda: len(sent) >= 24, timeout=60, what="24 frames sent")
        v2 = registry.publish(learned_artifact(scorer, "widget", 2))
        assert v2.version == 2
        wait_for(lambda: provider.swaps, timeout=30, what="version 2 swapped in")
        at_swap = len(sent)
        wait_for(lambda: len(sent) >= at_swap + 24, timeout=60, what="24 more frames sent")
    finally:
        stop.set()
        streamer.join(timeout=60)
    total = len(sent)
    wait_for(lambda: worker.pipeline.completed >= total, timeout=90, what=f"{total} frames done")
    assert thread.stop().exit_code == 0
    events = [e for v in events_by_frame(kafka.read_all(topics.events, expected=total)).values() for e in v]
    assert {e["frame_id"] for e in events} == {f.frame_id for f in sent}  # nothing lost
    assert {e["prompt_version"] for e in events} == {1, 2}
    assert {e["prompt_sha256"] for e in events if e["prompt_version"] == 2} == {v2.sha256}
    check_switch(events, 1, 2)
    assert provider.swaps == [("widget", 2)]
    assert worker.metrics.prompt_swaps.labels(category="widget")._value.get() == 1
    exposition = worker.metrics.exposition().decode()
    assert 'hpad_prompt_version_info{category="widget",source="learned",version="2"} 1.0' in exposition
    assert 'version="1"' not in exposition  # the old version's series is gone


def _tampered(data: bytes) -> bytes:
    raw = bytearray(data)
    raw[-5] ^= 0xFF  # flip bits inside the tensor data: the checksum no longer matches
    return bytes(raw)


def test_bad_versions_are_refused_and_the_current_one_keeps_scoring(kafka, swap_setup, caplog):
    topics, prompts_topic, s, scorer = swap_setup
    registry = make_registry(kafka.broker, s, prompts_topic, scorer)
    v1 = registry.publish(learned_artifact(scorer, "widget", 1))
    worker, thread, provider = start_worker(s, scorer, timeout=90)
    from hpad.artifact import with_version

    good_v2 = with_version(learned_artifact(scorer, "widget", 2), 2)
    wrong_model = with_version(learned_artifact(scorer, "widget", 3, identity="ViT-B-16/openai"), 3)
    wrong_laa = with_version(learned_artifact(scorer, "widget", 4, laa=LAAConfig(enabled=True, layers=1, radius=3)), 4)
    wrong_category = with_version(learned_artifact(scorer, "gadget", 5), 5)
    bad = [
        (b"widget", b"not a safetensors file", "invalid"),
        (b"widget", _tampered(good_v2), "invalid"),
        (b"widget", good_v2[: len(good_v2) // 2], "invalid"),  # truncated
        (b"widget", wrong_model, "wrong_model"),
        (b"widget", wrong_laa, "wrong_laa"),
        (b"widget", wrong_category, "invalid"),  # key says widget, manifest says gadget
        (b"widget", with_version(v1, 1), "not_newer"),
    ]
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap)
    for key, value, _ in bad:  # headers only where the value parses (a record may come without them)
        try:
            headers = record_headers(read_artifact(value))
        except ArtifactError:
            headers = []
        producer.send(prompts_topic, key=key, value=value, headers=headers)
    producer.flush()
    producer.close()
    wait_for(lambda: len(provider.rejected) >= len(bad), timeout=30, what="all bad versions seen")
    assert [reason for _, _, reason in provider.rejected] == [reason for _, _, reason in bad]
    assert provider.snapshot().version("widget") == 1 and provider.swaps == []
    for reason in ("invalid", "wrong_model", "wrong_laa", "not_newer"):
        expected = sum(1 for *_, r in bad if r == reason)
        assert worker.metrics.prompt_rejected.labels(reason=reason)._value.get() == expected
    # the current version keeps scoring
    rng = np.random.default_rng(1)
    sent = kafka.publish(topics.frames, [good_frame(rng, "widget") for _ in range(6)])
    wait_for(lambda: worker.pipeline is not None and worker.pipeline.completed >= 6, timeout=30, what="6 frames")
    events = [e for v in events_by_frame(kafka.read_all(topics.events, expected=6)).values() for e in v]
    assert {e["frame_id"] for e in events} == {f.frame_id for f in sent}
    assert {(e["prompt_version"], e["prompt_sha256"]) for e in events} == {(1, v1.sha256)}
    # a rollback (old content as a new, higher version) is picked up by the running scorer
    newer = registry.publish(learned_artifact(scorer, "widget", 2))
    assert newer.version == 6  # above every version on the topic, refused ones included
    wait_for(lambda: provider.snapshot().version("widget") == 6, timeout=30, what="version 6 picked up")
    back = registry.rollback("widget", 1)  # version 7 = content of version 1
    assert back.version == 7
    wait_for(lambda: provider.snapshot().version("widget") == 7, timeout=30, what="rollback picked up")
    assert provider.snapshot()["widget"].sha256 == back.sha256
    assert torch.allclose(provider.snapshot()["widget"].text_features.float().cpu(),
                          v1.prompts.text_features.float())
    sent = kafka.publish(topics.frames, [good_frame(rng, "widget") for _ in range(4)])
    wait_for(lambda: worker.pipeline.completed >= 10, timeout=30, what="4 more frames")
    events = [e for v in events_by_frame(kafka.read_all(topics.events, expected=10)).values() for e in v]
    assert {e["prompt_version"] for e in events if e["frame_id"] in {f.frame_id for f in sent}} == {7}
    assert provider.swaps == [("widget", 6), ("widget", 7)]
    assert thread.stop().exit_code == 0


def test_scorer_starts_zero_shot_without_a_topic_and_follows_it_once_created(kafka_broker, tiny_backbone, caplog):
    topics = new_topics(kafka_broker, partitions=1, prefix="zs")
    prompts_topic = f"late-prompts-{uuid.uuid4().hex[:8]}"
    s = settings(kafka_broker, topics, categories=["widget"], prompts_topic=prompts_topic, normals_topic=None)
    scorer = Scorer(tiny_backbone, config=ScorerConfig(max_batch=4))
    provider = build_provider(s, scorer, WorkerMetrics())
    provider.retry_s = 0.3
    with caplog.at_level(logging.INFO, logger="consumers"):
        assert provider.start(wait_s=10)
        assert provider.snapshot().version("widget") == 0
        assert any("zero-shot" in r.getMessage() and "widget" in r.getMessage() for r in caplog.records)
        kafka_broker.create_topic(prompts_topic, 1)
        registry = make_registry(kafka_broker, s, prompts_topic, scorer)
        registry.publish(learned_artifact(scorer, "widget", 7))
        wait_for(lambda: provider.snapshot().version("widget") == 1, timeout=30, what="version 1 picked up")
    provider.close()
    assert provider.swaps == [("widget", 1)]


def test_records_on_the_topic_are_verified_with_the_headers(tiny_backbone):
    """A record whose header version disagrees with its manifest is refused (unit level, no broker)."""
    scorer = Scorer(tiny_backbone, config=ScorerConfig(max_batch=2))
    provider = KafkaPromptProvider(scorer, {"widget": scorer.zero_shot_prompts("widget")}, "p", lambda: None)
    art = read_artifact(__import__("hpad.artifact", fromlist=["with_version"]).with_version(
        learned_artifact(scorer, "widget", 1), 4))

    class Rec:
        key, topic, partition, offset, timestamp = b"widget", "p", 0, 0, 0
        value = build_artifact_bytes(art.prompts, version=4, ctx=art.ctx)
        headers: ClassVar = [("hpad-prompt-version", b"5")]

    assert provider.offer(Rec()) == "invalid"
    Rec.headers = record_headers(read_artifact(Rec.value))
    assert provider.offer(Rec()) == "swapped"
    assert provider.snapshot().version("widget") == 4
    Rec.key = b"gizmo"
    assert provider.offer(Rec()) == "ignored"  # a category this scorer does not serve
