"""The batch former alone, on a fake clock: when a batch is ready, how long to poll, what is taken."""

from __future__ import annotations

from dataclasses import dataclass

from consumers.batching import IDLE_POLL_MS, MAX_POLL_MS, BatchFormer


@dataclass
class Frame:
    received: float


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1000


def former(max_batch_size: int = 4, max_wait_ms: float = 20) -> tuple[BatchFormer[Frame], Clock]:
    clock = Clock()
    return BatchFormer(max_batch_size, max_wait_ms, clock), clock


def test_nothing_forming_is_never_ready_and_polls_the_idle_timeout():
    batch, _ = former()
    assert not batch.ready(scorer_idle=True)
    assert batch.poll_timeout_ms(blocked=False) == IDLE_POLL_MS
    assert batch.poll_limit() == 4
    assert batch.waited_ms() == 0


def test_an_idle_scorer_takes_a_single_frame_at_once():
    batch, clock = former()
    batch.add([Frame(clock())])
    assert batch.ready(scorer_idle=True)
    assert not batch.ready(scorer_idle=False)


def test_a_busy_scorer_waits_until_the_first_frame_waited_max_wait():
    batch, clock = former(max_wait_ms=20)
    batch.add([Frame(clock())])
    clock.advance_ms(5)
    batch.add([Frame(clock())])
    assert not batch.ready(scorer_idle=False)
    assert batch.poll_timeout_ms(blocked=False) == 15  # until the first frame's wait is up
    clock.advance_ms(16)
    assert batch.ready(scorer_idle=False)
    assert batch.poll_timeout_ms(blocked=False) == 1  # overdue: poll as briefly as possible


def test_poll_timeout_is_capped_and_zero_while_blocked():
    batch, clock = former(max_wait_ms=500)
    batch.add([Frame(clock())])
    assert batch.poll_timeout_ms(blocked=False) == MAX_POLL_MS
    assert batch.poll_timeout_ms(blocked=True) == 0


def test_a_full_batch_is_ready_and_polls_one_record_for_heartbeats():
    batch, clock = former(max_batch_size=3)
    batch.add([Frame(clock()) for _ in range(5)])
    assert batch.full() and batch.ready(scorer_idle=False)
    assert batch.poll_limit() == 1
    assert len(batch.take()) == 3 and len(batch) == 2
    assert batch.poll_limit() == 1  # 3 - 2


def test_keep_drops_frames_of_moved_partitions():
    batch, clock = former()
    frames = [Frame(clock()), Frame(clock() + 1)]
    batch.add(frames)
    batch.keep(lambda frame: frame is frames[1])
    assert batch.items == [frames[1]]
