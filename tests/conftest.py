"""Shared fixtures: tiny random-initialised open_clip models (no weights are ever downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: no test may reach a hub
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_backbone():
    from hpad.backbone import WeightsSpec, load_backbone

    return load_backbone(WeightsSpec(model="hpad-tiny", random_init=True, seed=0), device="cpu")


@pytest.fixture(scope="session")
def tiny_scorer(tiny_backbone):
    from hpad.scorer import Scorer

    return Scorer.zero_shot(tiny_backbone, category="widget")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """One embedded tansu broker (Kafka protocol) on 127.0.0.1 for the whole session, stopped at the end.

    Tests create their own uuid-named topics and groups. ``kafka_broker.schema_dir`` is tansu's JSON schema
    registry: a ``<topic>.json`` schema written there makes the broker refuse records of that topic that do
    not match it (used to provoke real broker-side errors).
    """
    from consumers.broker import EmbeddedBroker

    root = tmp_path_factory.mktemp("tansu")
    with EmbeddedBroker(schema_dir=root / "schemas", log_path=root / "tansu.log") as broker:
        yield broker


@pytest.fixture
def clean_hpad_env(monkeypatch, tmp_path):
    """Remove every HPAD_* variable and run in an empty folder (no .env) so settings see only what a test sets."""
    import os

    for name in list(os.environ):
        if name.startswith("HPAD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
