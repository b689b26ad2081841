"""Prompt sets per category behind a small interface, so they can later be hot-swapped between batches.

The worker asks a `PromptProvider` for one immutable `PromptSnapshot` at the start of each batch and scores
every sub-batch of that batch with it: a swap can only take effect between batches, a batch never mixes
versions, and every event names the version that scored it. `StaticPromptProvider` builds its sets once
at start: zero-shot prompts per category (`hpad.scorer.Scorer.zero_shot_prompts`), or, when a prompt
directory is configured, the verified artifact ``<dir>/<category>.safetensors`` (`hpad.artifact`).
A provider fed from a Kafka prompts topic (a later issue) implements the same interface by replacing its
snapshot atomically.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from hpad.errors import ConfigError
from hpad.prompts import PromptSet
from hpad.scorer import Scorer

log = logging.getLogger(__name__)
ARTIFACT_SUFFIX = ".safetensors"


class PromptSnapshot(Mapping[str, PromptSet]):
    """An immutable category -> PromptSet mapping, taken once per batch."""

    def __init__(self, sets: Mapping[str, PromptSet]) -> None:
        self._sets = MappingProxyType(dict(sets))

    def __getitem__(self, category: str) -> PromptSet:
        return self._sets[category]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sets)

    def __len__(self) -> int:
        return len(self._sets)

    def version(self, category: str) -> int | None:
        prompts = self._sets.get(category)
        return None if prompts is None else prompts.version


class PromptProvider(ABC):
    """Where the worker gets prompt sets. Implementations must make `snapshot` cheap and atomic."""

    @abstractmethod
    def snapshot(self) -> PromptSnapshot:
        """The current sets of every category; the caller keeps it for one whole batch."""

    def get(self, category: str) -> PromptSet | None:
        return self.snapshot().get(category)

    def version(self, category: str) -> int | None:
        return self.snapshot().version(category)

    def categories(self) -> list[str]:
        return sorted(self.snapshot())


class StaticPromptProvider(PromptProvider):
    """Prompt sets fixed at start (zero-shot, or artifacts from a folder)."""

    def __init__(self, sets: Mapping[str, PromptSet]) -> None:
        self._snapshot = PromptSnapshot(sets)

    def snapshot(self) -> PromptSnapshot:
        return self._snapshot

    @classmethod
    def build(cls, scorer: Scorer, categories: Sequence[str], prompt_dir: Path | None = None) -> StaticPromptProvider:
        """Zero-shot sets, or ``prompt_dir/<category>.safetensors`` artifacts checked against the scorer."""
        if prompt_dir is None:
            return cls({category: scorer.zero_shot_prompts(category) for category in categories})
        return cls({category: load_artifact_prompts(scorer, prompt_dir, category) for category in categories})


def load_artifact_prompts(scorer: Scorer, prompt_dir: Path, category: str) -> PromptSet:
    """The verified prompt set of ``prompt_dir/<category>.safetensors`` for this scorer's model and LAA."""
    try:
        artifact = importlib.import_module("hpad.artifact")
    except ImportError as exc:  # pragma: no cover - hpad.artifact ships with hpad
        raise ConfigError(f"HPAD_PROMPT_DIR is set but prompt artifacts are not supported by this hpad build "
                          f"(hpad.artifact cannot be imported: {exc}); unset HPAD_PROMPT_DIR for zero-shot") from exc
    loader = getattr(artifact, "load_prompt_artifact", None)
    if loader is None:  # pragma: no cover
        raise ConfigError("hpad.artifact has no load_prompt_artifact; unset HPAD_PROMPT_DIR for zero-shot prompts")
    path = Path(prompt_dir) / f"{category}{ARTIFACT_SUFFIX}"
    if not path.is_file():
        raise ConfigError(f"no prompt artifact for category {category!r}: {path} does not exist "
                          f"(train one with `hpad train --category {category} --out {path}`)")
    prompts = loader(path, expected_identity=scorer.backbone.identity, expected_laa=scorer.config.laa)
    if prompts.category != category:
        raise ConfigError(f"{path} holds prompts for category {prompts.category!r}, not {category!r}")
    log.info("category %s: prompt artifact %s (%s)", category, path, prompts.label())
    return scorer.check_prompts(prompts)
