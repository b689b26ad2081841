"""Prompt sets per category behind a small interface, so they can later be hot-swapped between batches.

The worker asks a `PromptProvider` for one immutable `PromptSnapshot` at the start of each batch and scores
every sub-batch of that batch with it: a swap can only take effect between batches, a batch never mixes
versions, and every event names the version that scored it. `StaticPromptProvider` builds its sets once
at start: zero-shot prompts per category (`hpad.scorer.Scorer.zero_shot_prompts`), or, when a prompt
directory is configured, the verified artifact ``<dir>/<category>.safetensors`` (`hpad.artifact`).
`KafkaPromptProvider` starts from those sets and follows the prompt registry topic (``hpad.prompts``, record
format in `consumers.prompt_records`): it reads the topic from the beginning without a consumer group (every worker sees every
version), verifies each record (checksum, model identity, LAA, shapes, finiteness, category = key), and
installs a version only if it is newer than the one in use, by replacing the whole snapshot in one
reference assignment. A bad record is counted and logged; the current version keeps scoring.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from consumers.metrics import WorkerMetrics
from consumers.prompt_records import parse_record
from hpad.artifact import load_prompt_artifact
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

    def start(self, wait_s: float = 0.0) -> bool:
        """Begin following updates (if any); True once the initial versions are known."""
        return True

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to stop for static providers
        """Stop following updates."""


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
    path = Path(prompt_dir) / f"{category}{ARTIFACT_SUFFIX}"
    if not path.is_file():
        raise ConfigError(f"no prompt artifact for category {category!r}: {path} does not exist "
                          f"(train one with `hpad train --category {category} --out {path}`)")
    prompts = load_prompt_artifact(path, expected_identity=scorer.backbone.identity, expected_laa=scorer.config.laa)
    if prompts.category != category:
        raise ConfigError(f"{path} holds prompts for category {prompts.category!r}, not {category!r}")
    log.info("category %s: prompt artifact %s (%s)", category, path, prompts.label())
    return scorer.check_prompts(prompts)


class KafkaPromptProvider(PromptProvider):
    """Prompt sets that follow the prompt registry topic; swaps are atomic snapshot replacements."""

    def __init__(self, scorer: Scorer, initial: Mapping[str, PromptSet], topic: str,
                 consumer_factory: Callable[[], KafkaConsumer], metrics: WorkerMetrics | None = None,
                 poll_ms: int = 500, retry_s: float = 5.0) -> None:
        self.scorer = scorer
        self.topic = topic
        self._consumer_factory = consumer_factory
        self.metrics = metrics
        self.poll_ms = poll_ms
        self.retry_s = retry_s
        self._snapshot = PromptSnapshot(initial)
        self._stop = threading.Event()
        self.caught_up = threading.Event()
        self._positions: dict[TopicPartition, int] = {}  # next offset to read, kept across reconnects
        self._thread: threading.Thread | None = None
        self.error: ConfigError | None = None  # a security setting the follower cannot connect with
        self.swaps: list[tuple[str, int]] = []  # (category, version) installed after the initial catch-up
        self.rejected: list[tuple[str, int, str]] = []  # (category, version, reason)
        now = time.time()
        if metrics is not None:
            for category in initial:
                metrics.prompt_swap_time.labels(category=category).set(now)

    def snapshot(self) -> PromptSnapshot:
        return self._snapshot

    # ------------------------------------------------------------------------------ lifecycle
    def start(self, wait_s: float = 30.0) -> bool:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hpad-prompts", daemon=True)
            self._thread.start()
        caught_up = self.caught_up.wait(wait_s)
        if self.error is not None:
            raise self.error
        if not caught_up:
            log.warning("prompts topic %s not read to its end within %.0f s; scoring starts with the versions "
                        "known so far and swaps as the rest arrive", self.topic, wait_s)
            return False
        return True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------------------ records
    def offer(self, record, live: bool = True) -> str:
        """Verify one prompts-topic record and install it if newer. Returns what happened: ``swapped``,
        ``ignored`` (a category not served here) or the rejection reason."""
        category = record.key.decode("utf-8", "replace") if record.key else ""
        current = self._snapshot.get(category)
        if current is None:
            log.debug("prompts record for category %r ignored: not served here", category)
            return "ignored"
        parsed = parse_record(record, expected_identity=self.scorer.backbone.identity,
                              expected_laa=self.scorer.config.laa)
        if parsed.artifact is None:
            reason = parsed.reason if parsed.reason in ("wrong_model", "wrong_laa") else "invalid"
            return self._reject(category, parsed.version, reason, parsed.error or "unreadable record")
        try:
            prompts = self.scorer.check_prompts(parsed.artifact.prompts)
        except ConfigError as exc:
            return self._reject(category, parsed.version, "wrong_model", str(exc))
        if prompts.version <= current.version:
            return self._reject(category, prompts.version, "not_newer",
                                f"version {prompts.version} is not newer than the one in use ({current.version})")
        sets = dict(self._snapshot)
        sets[category] = prompts
        self._snapshot = PromptSnapshot(sets)  # one reference assignment: batches see old or new, never a mix
        if self.metrics is not None:
            self.metrics.set_prompt(category, prompts.version, prompts.source)
            self.metrics.prompt_swap_time.labels(category=category).set(time.time())
            if live:
                self.metrics.prompt_swaps.labels(category=category).inc()
        if live:
            self.swaps.append((category, prompts.version))
            log.info("category %s: swapped in prompt version %d (%s, sha256 %s) from %s[%d]@%d", category,
                     prompts.version, prompts.source, prompts.sha256[:12], record.topic, record.partition,
                     record.offset)
        return "swapped"

    def _reject(self, category: str, version: int, reason: str, message: str) -> str:
        self.rejected.append((category, version, reason))
        if self.metrics is not None:
            self.metrics.prompt_rejected.labels(reason=reason).inc()
        in_use = self._snapshot.version(category)
        log.warning("category %s: prompt version %d refused (%s: %s); version %s keeps scoring", category, version,
                    reason, message, in_use)
        return reason

    # ------------------------------------------------------------------------------ follower thread
    def _run(self) -> None:
        consumer: KafkaConsumer | None = None
        warned_missing = False
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = self._consumer_factory()
                partitions = consumer.partitions_for_topic(self.topic)
                if not partitions:
                    if not warned_missing:
                        log.info("prompts topic %s does not exist yet; checking every %.0f s", self.topic,
                                 self.retry_s)
                        warned_missing = True
                    self._announce_caught_up()
                    self._stop.wait(self.retry_s)
                    continue
                self._follow(consumer, [TopicPartition(self.topic, p) for p in sorted(partitions)])
            except ConfigError as exc:  # a security setting: start() raises it (the process exits 2)
                self.error = exc
                self.caught_up.set()
                return
            except KafkaError as exc:
                log.warning("prompts topic %s: %s; reconnecting in %.0f s (current versions keep scoring)",
                            self.topic, exc, self.retry_s)
                self._close_consumer(consumer)
                consumer = None
                self._stop.wait(self.retry_s)
        self._close_consumer(consumer)

    def _follow(self, consumer: KafkaConsumer, tps: list[TopicPartition]) -> None:
        consumer.assign(tps)
        for tp in tps:
            if tp in self._positions:
                consumer.seek(tp, self._positions[tp])
            else:
                consumer.seek_to_beginning(tp)
        ends = consumer.end_offsets(tps) if not self.caught_up.is_set() else {}
        last_data = time.monotonic()
        refresh = time.monotonic() + 30.0
        while not self._stop.is_set():
            batch = consumer.poll(timeout_ms=self.poll_ms)
            for tp, records in batch.items():
                for record in records:
                    try:
                        self.offer(record, live=self.caught_up.is_set())
                    except Exception as exc:  # a record must never kill the follower  # noqa: BLE001
                        self._reject(record.key.decode("utf-8", "replace") if record.key else "", -1, "invalid",
                                     f"{type(exc).__name__}: {exc}")
                    self._positions[tp] = record.offset + 1
            if batch:
                last_data = time.monotonic()
            elif not self.caught_up.is_set():
                done = all(consumer.position(tp) >= ends.get(tp, 0) for tp in tps)
                if done and time.monotonic() - last_data >= 0.3:
                    self._announce_caught_up()
            if time.monotonic() >= refresh:  # partitions may have been added
                refresh = time.monotonic() + 30.0
                if len(consumer.partitions_for_topic(self.topic) or ()) != len(tps):
                    return

    def _announce_caught_up(self) -> None:
        if self.caught_up.is_set():
            return
        for category in sorted(self._snapshot):
            prompts = self._snapshot[category]
            if prompts.source == "zero-shot":
                log.info("category %s: no prompt version on %s yet; scoring with zero-shot prompts (version %d)",
                         category, self.topic, prompts.version)
            else:
                log.info("category %s: prompt version %d (%s)", category, prompts.version, prompts.label())
        self.caught_up.set()

    @staticmethod
    def _close_consumer(consumer: KafkaConsumer | None) -> None:
        if consumer is None:
            return
        try:
            consumer.close(autocommit=False)
        except KafkaError as exc:
            log.debug("prompts consumer close: %s", exc)
