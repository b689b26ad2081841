"""Prompt provider: zero-shot sets, verified artifacts from a folder, immutable per-batch snapshots."""

from __future__ import annotations

from dataclasses import replace

import pytest
from kafka.errors import KafkaTimeoutError, UnknownError

from consumers import kafka_io
from consumers.prompt_provider import PromptSnapshot, StaticPromptProvider
from hpad.artifact import build_artifact_bytes, save_artifact
from hpad.errors import ArtifactError, ConfigError
from hpad.scorer import Scorer


def test_zero_shot_sets_per_category(tiny_backbone):
    scorer = Scorer(tiny_backbone)
    provider = StaticPromptProvider.build(scorer, ["bottle", "widget"])
    assert provider.categories() == ["bottle", "widget"]
    assert provider.version("bottle") == 0 and provider.get("bottle").source == "zero-shot"
    assert provider.get("spaceship") is None and provider.version("spaceship") is None
    snapshot = provider.snapshot()
    with pytest.raises(TypeError):
        snapshot._sets["bottle"] = None  # read-only view


def test_artifacts_from_a_folder(tiny_backbone, tmp_path):
    scorer = Scorer(tiny_backbone)
    learned = replace(scorer.zero_shot_prompts("bottle"), source="learned", threshold=0.61, laa=scorer.config.laa)
    save_artifact(tmp_path / "bottle.safetensors", build_artifact_bytes(learned, version=3))
    provider = StaticPromptProvider.build(scorer, ["bottle"], tmp_path)
    prompts = provider.get("bottle")
    assert provider.version("bottle") == 3 and prompts.threshold == pytest.approx(0.61) and prompts.sha256
    with pytest.raises(ConfigError, match="widget"):
        StaticPromptProvider.build(scorer, ["widget"], tmp_path)  # no widget.safetensors
    save_artifact(tmp_path / "widget.safetensors", build_artifact_bytes(learned, version=1))
    with pytest.raises(ConfigError, match="category"):
        StaticPromptProvider.build(scorer, ["widget"], tmp_path)  # a bottle artifact under the widget name
    other = replace(learned, model_identity="ViT-B-16/openai")
    save_artifact(tmp_path / "bottle.safetensors", build_artifact_bytes(other, version=4))
    with pytest.raises(ArtifactError):
        StaticPromptProvider.build(scorer, ["bottle"], tmp_path)


def test_snapshot_is_a_mapping():
    snapshot = PromptSnapshot({})
    assert len(snapshot) == 0 and list(snapshot) == [] and snapshot.version("x") is None


def test_connect_retries_transient_errors_only():
    import threading

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise KafkaTimeoutError("broker not up yet")
        return "client"

    stop = threading.Event()
    assert kafka_io.connect(flaky, "test", stop, kafka_io.Backoff(0.001, 0.002)) == "client" and len(calls) == 3

    def broken():
        raise UnknownError("no")

    with pytest.raises(UnknownError):
        kafka_io.connect(broken, "test", stop, kafka_io.Backoff(0.001, 0.002))
    stop.set()
    assert kafka_io.connect(flaky, "test", stop, kafka_io.Backoff(0.001, 0.002)) is None


def test_backoff_doubles_up_to_the_cap():
    backoff = kafka_io.Backoff(0.1, 0.5)
    assert [backoff.next_delay() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next_delay() == 0.1
