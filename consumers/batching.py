"""When the worker dispatches a batch (pure: a clock is injected, nothing here touches Kafka or the model).

`BatchFormer` holds the frames polled but not yet dispatched. A batch is ready when it is full
(``max_batch_size``), when its first frame waited ``max_wait_ms``, or at once when the scorer is idle, so
batches grow with load and latency stays low when the line is quiet. The poll timeout follows from the
same rule: 0 while a ready batch waits for room in the pipeline (the worker then sleeps on the pipeline
instead), 100 ms with nothing forming, else until the first frame's wait is up (1..50 ms).

Sizes are counted in model images: an optional ``weight`` says what one frame costs (the worker passes its
tile count, `consumers.items.FrameItem.tiles`), so a batch of tiled frames is as full as a batch of whole
ones. A frame is never split across batches: one heavier than ``max_batch_size`` forms a batch of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

IDLE_POLL_MS = 100  # nothing forming: poll this long
MAX_POLL_MS = 50  # a batch forming: poll at most this long before checking it again


class Polled(Protocol):
    received: float  # the clock's time when poll returned the frame


T = TypeVar("T", bound=Polled)


class BatchFormer(Generic[T]):
    """The frames forming the next batch, and the rule that says when to dispatch them."""

    def __init__(self, max_batch_size: int, max_wait_ms: float, clock: Callable[[], float] = time.monotonic,
                 weight: Callable[[T], int] | None = None) -> None:
        self.max_batch_size, self.max_wait_ms, self.clock = max_batch_size, max_wait_ms, clock
        self.weight: Callable[[T], int] = weight or (lambda item: 1)
        self.items: list[T] = []

    def __len__(self) -> int:
        return len(self.items)

    def load(self) -> int:
        """Model images forming (the sum of the frames' weights)."""
        return sum(self.weight(item) for item in self.items)

    def add(self, items: list[T]) -> None:
        self.items += items

    def keep(self, wanted: Callable[[T], bool]) -> None:
        """Drop the frames no longer wanted (their partition moved away)."""
        self.items = [item for item in self.items if wanted(item)]

    def full(self) -> bool:
        return self.load() >= self.max_batch_size

    def waited_ms(self) -> float:
        """How long the first frame has waited (0 with nothing forming)."""
        return 1000 * (self.clock() - self.items[0].received) if self.items else 0.0

    def ready(self, scorer_idle: bool) -> bool:
        """A batch should go now: full, its first frame waited long enough, or the scorer has nothing to do."""
        return bool(self.items) and (self.full() or self.waited_ms() >= self.max_wait_ms or scorer_idle)

    def poll_timeout_ms(self, blocked: bool) -> int:
        """0 when a ready batch waits for the scorer; else until the batch is due (or `IDLE_POLL_MS`)."""
        if blocked:
            return 0
        if not self.items:
            return IDLE_POLL_MS
        return int(min(MAX_POLL_MS, max(1, self.max_wait_ms - self.waited_ms())))

    def poll_limit(self) -> int:
        """Records to ask the next poll for: what fills the batch (1 when full: keep polling for heartbeats)."""
        return max(1, self.max_batch_size - self.load())

    def take(self) -> list[T]:
        """The next batch: the first frames up to ``max_batch_size`` images, at least one frame (the rest keep
        forming)."""
        count, load = 0, 0
        for item in self.items:
            cost = self.weight(item)
            if count and load + cost > self.max_batch_size:
                break
            count, load = count + 1, load + cost
        batch, self.items = self.items[:count], self.items[count:]
        return batch
