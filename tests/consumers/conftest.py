"""Fixtures of the streaming-service tests: a worker factory on the session's tiny model and broker."""

from __future__ import annotations

import logging

import pytest

from consumers.models import model_info
from consumers.prompt_provider import StaticPromptProvider
from consumers.worker import Worker
from hpad.scorer import Scorer, ScorerConfig

logging.getLogger("kafka").setLevel(logging.WARNING)


@pytest.fixture
def make_worker(tiny_backbone):
    """make_worker(settings, scorer=None, provider=None, cls=Worker) -> a worker on the session's tiny model."""

    def build(settings, scorer: Scorer | None = None, provider=None, cls: type[Worker] = Worker) -> Worker:
        scorer = scorer or Scorer(tiny_backbone, config=ScorerConfig(max_batch=settings.max_batch_size))
        provider = provider or StaticPromptProvider.build(scorer, settings.categories)
        return cls(settings, scorer, provider, model_info(scorer, settings.precision))

    return build

