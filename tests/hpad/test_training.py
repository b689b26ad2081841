"""hpad.training: one training facade and one manifest schema for `hpad train` and the tuner."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hpad.artifact import read_artifact
from hpad.errors import ConfigError
from hpad.metrics import PoolMetrics
from hpad.mpts import TrainConfig, TrainMetrics
from hpad.training import build_artifact, train
from tests.synthetic import make_object_image

CONFIG = TrainConfig(epochs=2, steps_per_epoch=2, batch_size=8, train_normals=4, train_anomalies=6, val_normals=4,
                     val_anomalies=4, n_ctx=4, seed=5)


@pytest.fixture(scope="module")
def result(tiny_scorer):
    rng = np.random.default_rng(2)
    return train(tiny_scorer, [make_object_image(rng, (96, 96))[0] for _ in range(2)], "widget", CONFIG)


def test_training_metrics_are_typed_with_anomalib_names(result):
    metrics = result.metrics
    assert isinstance(metrics, TrainMetrics) and isinstance(metrics.val_after, PoolMetrics)
    assert metrics.epochs_run == len(result.history) and math.isfinite(metrics.val_after.loss)
    assert result.prompts.threshold == metrics.calibration.threshold
    data = metrics.to_json()
    assert set(data["val_before"]) == set(data["val_after"]) == {"image_AUROC", "pixel_AUROC", "loss"}
    assert {"image_F1Max", "pixel_F1Max", "threshold", "pixel_threshold"} <= set(data["calibration"])
    json.dumps(data)  # plain JSON
    assert {"val_loss", "val_image_AUROC"} <= set(result.history[-1])


def test_artifact_carries_the_one_training_schema(tiny_scorer, result):
    data = build_artifact(result, k=2, image_size=tiny_scorer.backbone.image_size, extra={"note": "x"})
    manifest = read_artifact(data, expected_identity=tiny_scorer.backbone.identity).manifest
    assert manifest["training"] == json.loads(json.dumps({
        "config": CONFIG.describe(), "metrics": result.metrics.to_json(), "history_tail": result.history[-3:]}))
    assert manifest["k"] == 2 and manifest["seed"] == 5 and manifest["n_ctx"] == 4
    assert manifest["class_name"] == "widget" and manifest["calibration"] == {"rule": "f1"}
    assert len(manifest["object_regions"]) == 2 and manifest["note"] == "x" and manifest["version"] == 1
    with pytest.raises(ConfigError, match="training"):
        build_artifact(result, k=2, image_size=tiny_scorer.backbone.image_size, extra={"training": {}})
