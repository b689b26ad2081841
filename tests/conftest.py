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
