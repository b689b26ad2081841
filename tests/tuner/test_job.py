"""The tuning job: splits, the validation gate, and a real warm-started run on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpad.errors import ConfigError
from hpad.metrics import PoolMetrics
from hpad.mpts import TrainConfig
from tuner.job import TuneConfig, candidate_artifact, gate, split_normals, tune_category


def test_split_is_disjoint_and_newest_first():
    parts = split_normals(12, shots=4, gate_normals=3)
    assert parts["train"] == [0, 1, 2, 3]
    assert parts["gate"] == [4, 6, 8]
    assert set(parts["early_stop"]) == {5, 7, 9, 10, 11}
    with pytest.raises(ConfigError):
        split_normals(5, shots=4, gate_normals=3)


def test_gate_rules():
    cur = PoolMetrics(image_AUROC=0.80, pixel_AUROC=0.90)
    assert gate(cur, PoolMetrics(image_AUROC=0.80, pixel_AUROC=0.89), margin=0.02).publish  # within margin
    worse = gate(cur, PoolMetrics(image_AUROC=0.70, pixel_AUROC=0.85), margin=0.02)
    assert not worse.publish and "worse" in worse.reason
    assert worse.current == cur  # both scores are recorded
    assert not gate(cur, PoolMetrics(image_AUROC=math.nan, pixel_AUROC=0.99), 0.02).publish
    assert gate(PoolMetrics(image_AUROC=math.nan), PoolMetrics(image_AUROC=0.5), 0.02).publish


def test_tune_config_validation():
    with pytest.raises(ConfigError):
        TuneConfig(shots=4, min_normals=5)
    with pytest.raises(ConfigError):
        TuneConfig(margin=1.5)


def test_tune_category_warm_start_and_gate(tiny_scorer):
    from hpad.artifact import build_artifact_bytes, read_artifact
    from tests.synthetic import make_object_image

    rng = np.random.default_rng(5)
    normals = [make_object_image(rng, (96, 96))[0] for _ in range(10)]
    train = TrainConfig(epochs=4, steps_per_epoch=3, batch_size=16, train_normals=8, train_anomalies=12,
                        val_normals=4, val_anomalies=8)
    config = TuneConfig(shots=2, min_normals=6, gate_normals=4, gate_anomalies=12, margin=0.05, train=train)
    current = tiny_scorer.zero_shot_prompts("widget")
    first = tune_category(tiny_scorer, "widget", normals, current, config, seed=1)
    assert first.splits == {"train": 2, "gate": 4, "early_stop": 4, "gate_anomalies": 12}
    assert set(first.decision.candidate.to_json()) == {"image_AUROC", "pixel_AUROC"}
    assert all(math.isfinite(v) for v in first.decision.current.to_json().values())
    tuned = read_artifact(candidate_artifact(first, k=2, image_size=tiny_scorer.backbone.image_size,
                                             warm_start_from=0)).manifest
    assert set(tuned["training"]) == {"config", "metrics", "history_tail"}  # the schema of `hpad train`
    assert tuned["training"]["config"]["seed"] == tuned["seed"] == 1 and tuned["k"] == 2
    assert set(tuned["gate"]) == {"current", "candidate", "reason", "splits"} and tuned["tuned_by"] == "hpad tune"
    # warm start from the first candidate's artifact: the second run starts where the first ended
    artifact = read_artifact(build_artifact_bytes(first.result.prompts, version=1, ctx=first.result.ctx))
    second = tune_category(tiny_scorer, "widget", normals, artifact.prompts, config, current_artifact=artifact, seed=2)
    np.testing.assert_allclose(second.result.initial_prompts.text_features.numpy(),
                               first.result.prompts.text_features.numpy(), atol=1e-5)
