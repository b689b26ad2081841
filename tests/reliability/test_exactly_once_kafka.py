"""Exactly-once on Apache Kafka (1 KRaft node, min ISR 1): SIGKILLed workers, zombie fencing, retried batches.

tansu accepts transactions but does not isolate them (/work/shared/ENVIRONMENT.md), so exactly-once can only
be proven against Apache Kafka (`consumers.apache_kafka`). Here ``hpad serve`` runs as a real process with
``HPAD_EXACTLY_ONCE=true`` (model hpad-tiny, random init, cpu) and a fixed ``HPAD_TRANSACTIONAL_ID``:

* `test_sigkill_loop_exactly_once`: 2,000 small frames (2 % poison, dead-lettered), the worker SIGKILLed 8
  times at random points (a seeded RNG picks how far the output topics grow before each kill and where in
  the transaction it is aimed, see `run_and_kill`) and restarted with the same transactional id and group. A ``read_committed`` reader then sees every frame_id
  exactly once (events + dead letters together), and every record a ``read_uncommitted`` reader sees beyond
  that belongs to an aborted transaction (all transactions are decided at the end: last stable offset ==
  high watermark) of a batch none of whose records were committed. The counts table is printed (``-s``).
* `test_second_worker_fences_the_first`: a second worker with the same transactional id fences the first,
  which stops without committing its in-flight batch (exit code 1, "fenced" in its log).
* `test_broker_answers_a_retried_batch_with_its_offset`: what Apache Kafka answers an idempotent producer's
  retried batch (see `consumers.kafka_io.UnconfirmedWriteError`, a tansu-on-S3 workaround).
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import types
import uuid
from dataclasses import dataclass

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaConnectionError, KafkaError, ProducerFencedError
from kafka.net.compat import KafkaNetClient

from consumers import kafka_io
from consumers.apache_kafka import ApacheKafka
from consumers.camera import frame_headers
from consumers.delivery import Deliverer, Output, OutputDeliveryError, TransactionTimeoutError
from consumers.metrics import WorkerMetrics
from tests.consumers.kafka_helpers import Frame, Topics, good_frame, publish, read_all, wait_for

pytestmark = [pytest.mark.apache_kafka, pytest.mark.slow]

SEED = 13
FRAMES = 2000
KILLS = 8
POISON_EVERY = 50  # every 50th frame is not an image: dead-lettered (2 %)


@pytest.fixture(scope="module")
def kafka():
    # the broker's group.min.session.timeout.ms (6 s) refuses the 2 s session that makes a SIGKILLed member
    # leave the group quickly
    with ApacheKafka(nodes=1, config={"group.min.session.timeout.ms": "1000"}) as cluster:
        yield cluster


def new_topics(kafka: ApacheKafka, partitions: int = 2) -> Topics:
    tag = f"eos-{uuid.uuid4().hex[:8]}"
    topics = Topics(f"{tag}.frames", f"{tag}.events", f"{tag}.dlq", f"{tag}.group")
    kafka.create_topic(topics.frames, partitions)
    kafka.create_topic(topics.events, partitions)
    kafka.create_topic(topics.dlq, 1)
    return topics


def make_frames(rng: np.random.Generator, count: int) -> list[Frame]:
    frames = []
    for i in range(count):
        if i % POISON_EVERY == POISON_EVERY - 1:
            frame_id = f"poison-{i}-{uuid.uuid4().hex[:8]}"
            frame = Frame(b"not an image at all", frame_headers(frame_id, "cam-p", "widget", "image/png"), b"cam-p")
        else:
            frame = good_frame(rng, camera=f"cam-{i % 2}", size=(32, 40), ext=".png" if i % 3 else ".jpg")
        frame.partition = i % 2
        frames.append(frame)
    return frames


def spawn(kafka: ApacheKafka, topics: Topics, log_path, transactional_id: str, extra_env: dict | None = None,
          code: str | None = None) -> tuple[subprocess.Popen, object]:
    """``python -m hpad.cli serve`` (or ``python -c code``) with exactly-once on ``transactional_id``."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        "HPAD_BOOTSTRAP_SERVERS": kafka.bootstrap, "HPAD_INPUT_TOPIC": topics.frames,
        "HPAD_EVENTS_TOPIC": topics.events, "HPAD_DLQ_TOPIC": topics.dlq, "HPAD_GROUP_ID": topics.group,
        "HPAD_EXACTLY_ONCE": "true", "HPAD_TRANSACTIONAL_ID": transactional_id,
        "HPAD_MODEL": "hpad-tiny", "HPAD_RANDOM_INIT": "true", "HPAD_DEVICE": "cpu", "HPAD_TORCH_THREADS": "1",
        "HPAD_DECODE_THREADS": "1", "HPAD_CATEGORIES": "widget", "HPAD_METRICS_PORT": "-1",
        "HPAD_SESSION_TIMEOUT_MS": "2000", "HPAD_HEARTBEAT_INTERVAL_MS": "500", "HPAD_RETRY_BACKOFF_MS": "50",
        "HPAD_MAX_BATCH_SIZE": "16", "HPAD_MAX_WAIT_MS": "5", "HPAD_NORMALS_TOPIC": "", "HPAD_PROMPTS_TOPIC": "",
        **(extra_env or {}),
    }
    log = open(log_path, "ab")  # noqa: SIM115 - closed by the caller
    argv = [sys.executable, "-c", code] if code else [sys.executable, "-m", "hpad.cli", "serve"]
    process = subprocess.Popen(argv, env=env, cwd=log_path.parent, stdout=log, stderr=subprocess.STDOUT)
    return process, log


def stop(process: subprocess.Popen, log, sig: int = signal.SIGKILL, timeout: float = 60) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


class Offsets:
    """End offsets of a few topics: the high watermark (read_uncommitted) or the last stable offset."""

    def __init__(self, kafka: ApacheKafka, topics: list[str], isolation: str = "read_uncommitted") -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap, isolation_level=isolation)
        self.parts = [TopicPartition(t, p) for t in topics for p in sorted(self.consumer.partitions_for_topic(t))]

    def ends(self) -> dict[TopicPartition, int]:
        return self.consumer.end_offsets(self.parts)

    def total(self) -> int:
        return sum(self.ends().values())

    def close(self) -> None:
        self.consumer.close()


@dataclass(frozen=True)
class Out:
    """One output record as a reader sees it."""

    topic: str
    partition: int
    offset: int
    frame_id: str
    batch: str  # events: their batch_id; dead letters: the hpad-worker header (they carry no batch id)


def outputs(kafka: ApacheKafka, topics: Topics, isolation: str) -> list[Out]:
    found = []
    for record in read_all(kafka, topics.events, isolation_level=isolation, timeout=60, idle=1.5):
        event = json.loads(record.value)
        found.append(Out(record.topic, record.partition, record.offset, event["frame_id"], event["batch_id"]))
    for record in read_all(kafka, topics.dlq, isolation_level=isolation, timeout=60, idle=1.5):
        headers = {k: v.decode() for k, v in record.headers}
        found.append(Out(record.topic, record.partition, record.offset, headers.get("frame_id", ""),
                         headers.get("hpad-worker", "")))
    return found


def committed(kafka: ApacheKafka, group: str, topic: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in sorted(consumer.partitions_for_topic(topic))}
    finally:
        consumer.close(autocommit=False)


def check_exactly_once(kafka: ApacheKafka, topics: Topics, frames: list[Frame]) -> tuple[dict[str, int], list[Out]]:
    """read_committed: every frame once; read_uncommitted extras: aborted only. Returns (counts, extras)."""
    ids = {f.frame_id for f in frames}
    poison = {f.frame_id for f in frames if f.frame_id.startswith("poison-")}
    hw = Offsets(kafka, [topics.events, topics.dlq])
    lso = Offsets(kafka, [topics.events, topics.dlq], "read_committed")
    try:
        assert lso.ends() == hw.ends(), "a transaction is still open: the extras could not be called aborted"
    finally:
        hw.close()
        lso.close()
    good = outputs(kafka, topics, "read_committed")
    seen = outputs(kafka, topics, "read_uncommitted")
    per_frame = collections.Counter(o.frame_id for o in good)
    lost = ids - set(per_frame)
    duplicates = sum(n - 1 for n in per_frame.values() if n > 1)
    assert not lost, f"{len(lost)} frames lost, e.g. {sorted(lost)[:3]}"
    assert duplicates == 0, f"{duplicates} duplicates: {[f for f, n in per_frame.items() if n > 1][:3]}"
    assert set(per_frame) == ids, "outputs for frames that were never sent"
    assert {o.frame_id for o in good if o.topic == topics.dlq} == poison  # poison dead-lettered, the rest scored

    places = {(o.topic, o.partition, o.offset) for o in good}
    assert places <= {(o.topic, o.partition, o.offset) for o in seen}
    extra = [o for o in seen if (o.topic, o.partition, o.offset) not in places]
    committed_batches = {o.batch for o in good if o.topic == topics.events}
    aborted_batches = {o.batch for o in extra if o.topic == topics.events}
    # an aborted batch has no committed record, and every frame of it was committed once by a later batch
    assert not aborted_batches & committed_batches, sorted(aborted_batches & committed_batches)[:3]
    assert all(per_frame[o.frame_id] == 1 for o in extra)
    assert committed(kafka, topics.group, topics.frames) == {0: len(frames) // 2, 1: len(frames) // 2}
    return {
        "frames in": len(frames), "events (read_committed)": sum(o.topic == topics.events for o in good),
        "dead letters (read_committed)": sum(o.topic == topics.dlq for o in good), "duplicates": duplicates,
        "lost": len(lost), "records seen read_uncommitted": len(seen), "aborted-only records": len(extra),
        "aborted events": sum(o.topic == topics.events for o in extra),
        "aborted dead letters": sum(o.topic == topics.dlq for o in extra),
        "aborted batches (distinct batch_id)": len(aborted_batches),
    }, extra


def table(counts: dict[str, int]) -> str:
    width = max(map(len, counts))
    return "\n".join(["| count | value |", "|---|---|", *(f"| {k:<{width}} | {v} |" for k, v in counts.items())])


SLOW_COMMIT = """
import os, time
from kafka.producer.transaction_manager import TransactionManager
from hpad.cli import main

real = TransactionManager.begin_commit
delay = float(os.environ["EOS_TEST_COMMIT_DELAY_S"])
def slow_commit(self):  # widen the in-flight window: the batch's records and offsets are sent, not committed
    time.sleep(delay)
    return real(self)
TransactionManager.begin_commit = slow_commit
raise SystemExit(main(["serve"]))
"""


def run_and_kill(kafka: ApacheKafka, topics: Topics, log_path, txn_id: str, rng: random.Random, growth: Offsets,
                 stable: Offsets) -> tuple[int, str, int] | None:
    """Start a worker, SIGKILL it once the output topics grew by a random amount, at a point drawn from:

    * ``anywhere``: 0-50 ms later (scoring, sending, committing or between transactions);
    * ``open transaction``: as soon as a transaction's records are on the log (high watermark ahead of the
      last stable offset): before or while its commit markers are written;
    * ``before EndTxn``: the worker runs with a commit that waits 0.3 s first (`SLOW_COMMIT`), so the batch's
      records and its offsets (``send_offsets_to_transaction``) are sent and not committed; killed 0-0.2 s
      into that wait: the offsets must not advance with the aborted transaction.

    Returns (how far the output grew, where the kill was aimed, the worker's pid), or None when the worker got
    no partitions: kafka-python 3.0.12 now and then leads the first JoinGroup without the topic's metadata
    ("No partition metadata for topic", assigned []) and does not rejoin when it arrives; such a worker is
    SIGKILLed after 20 s and does not count as a kill."""
    mode = rng.choices(["anywhere", "open transaction", "before EndTxn"], [0.4, 0.3, 0.3])[0]
    process, log = spawn(kafka, topics, log_path, txn_id, code=SLOW_COMMIT if mode == "before EndTxn" else None,
                         extra_env={"EOS_TEST_COMMIT_DELAY_S": "0.3"})
    base = growth.total()
    target = base + rng.randint(40, 200)  # offsets of the output topics: records and transaction markers
    try:
        try:
            wait_for(lambda: growth.total() >= target or process.poll() is not None, timeout=20, interval=0.01,
                     what=f"output grows to {target}")
        except AssertionError:
            assigned = [line for line in log_path.read_text().splitlines() if "consumers.rebalance: assigned" in line]
            if assigned and all(line.endswith("assigned []") for line in assigned):
                return None
            raise
        if mode == "anywhere":
            time.sleep(rng.uniform(0, 0.05))
        else:
            wait_for(lambda: stable.ends() != growth.ends() or process.poll() is not None, timeout=30,
                     interval=0.002, what="an open transaction")
            if mode == "before EndTxn":
                time.sleep(rng.uniform(0, 0.2))
        assert process.poll() is None, log_path.read_text()[-3000:]
    finally:
        code = stop(process, log)
    assert code == -signal.SIGKILL
    return growth.total() - base, mode, process.pid


def test_sigkill_loop_exactly_once(kafka, tmp_path):
    rng = random.Random(SEED)
    topics = new_topics(kafka)
    frames = make_frames(np.random.default_rng(SEED), FRAMES)
    publish(kafka, topics.frames, frames)
    growth = Offsets(kafka, [topics.events, topics.dlq])  # high watermarks
    stable = Offsets(kafka, [topics.events, topics.dlq], "read_committed")  # last stable offsets
    txn_id = f"hpad-eos-{uuid.uuid4().hex[:6]}"
    kills, at_kill = 0, []
    try:
        stalled = 0
        while kills < KILLS:
            done = run_and_kill(kafka, topics, tmp_path / f"worker-{kills}-{stalled}.log", txn_id, rng, growth, stable)
            if done is None:
                stalled += 1
                assert stalled <= 3, "too many workers without partitions"
                continue
            at_kill.append(done)
            kills += 1
        at_last_kill = committed(kafka, topics.group, topics.frames)
        assert sum(o or 0 for o in at_last_kill.values()) < FRAMES, "finished before the last kill"
        process, log = spawn(kafka, topics, tmp_path / "worker-final.log", txn_id)
        try:
            wait_for(lambda: committed(kafka, topics.group, topics.frames) == {0: FRAMES // 2, 1: FRAMES // 2},
                     timeout=120, interval=0.5, what="every frame committed after the last restart")
        finally:
            code = stop(process, log, signal.SIGTERM)
        assert code == 0, (tmp_path / "worker-final.log").read_text()[-3000:]
    finally:
        growth.close()
        stable.close()
    counts, extra = check_exactly_once(kafka, topics, frames)
    counts = {**counts, "kills (SIGKILL)": kills, "restarts without partitions (kafka-python race)": stalled}
    aborted_by = collections.Counter(o.batch.split("#")[0].rsplit(":", 1)[-1] for o in extra)
    kill_lines = [f"| {i + 1} | {mode} | {grown} | {aborted_by.get(str(pid), 0)} |"
                  for i, (grown, mode, pid) in enumerate(at_kill)]
    print("\n| kill | aimed at | output offsets grown | its records aborted |\n|---|---|---|---|\n"
          + "\n".join(kill_lines) + f"\ncommitted input offsets at the last kill: {at_last_kill}\n{table(counts)}")
    assert counts["aborted-only records"] > 0, "no kill landed inside a transaction: nothing was tested"




def test_second_worker_fences_the_first(kafka, tmp_path):
    topics = new_topics(kafka)
    frames = make_frames(np.random.default_rng(SEED + 1), 400)
    publish(kafka, topics.frames, frames)
    txn_id = f"hpad-fence-{uuid.uuid4().hex[:6]}"
    growth = Offsets(kafka, [topics.events, topics.dlq])
    first, first_log = spawn(kafka, topics, tmp_path / "first.log", txn_id, code=SLOW_COMMIT,
                             extra_env={"HPAD_CLIENT_ID": "first", "EOS_TEST_COMMIT_DELAY_S": "0.4"})
    second = second_log = None
    try:
        wait_for(lambda: growth.total() >= 40 or first.poll() is not None, timeout=90, interval=0.05,
                 what="the first worker producing")
        second, second_log = spawn(kafka, topics, tmp_path / "second.log", txn_id,
                                   extra_env={"HPAD_CLIENT_ID": "second"})
        first_code = first.wait(timeout=60)  # fenced: stops by itself
        wait_for(lambda: committed(kafka, topics.group, topics.frames) == {0: 200, 1: 200}, timeout=120,
                 interval=0.5, what="the second worker finishing the stream")
    finally:
        first_code = stop(first, first_log, signal.SIGKILL)
        second_code = stop(second, second_log, signal.SIGTERM) if second is not None else None
        growth.close()
    first_text = (tmp_path / "first.log").read_text()
    assert first_code == 1, first_text[-3000:]
    assert second_code == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert "fenced" in first_text.lower(), first_text[-3000:]
    counts, _ = check_exactly_once(kafka, topics, frames)
    seen = outputs(kafka, topics, "read_uncommitted")
    good = {(o.topic, o.partition, o.offset) for o in outputs(kafka, topics, "read_committed")}
    first_aborted = [o for o in seen if (o.topic, o.partition, o.offset) not in good and o.batch.startswith("first@")]
    lines = [line for line in first_text.splitlines() if "fenced" in line.lower() or "ERROR" in line]
    print(f"\nfirst worker exit code {first_code}; its aborted (in-flight) records {len(first_aborted)} in "
          f"batches {sorted({o.batch for o in first_aborted})}\n{table(counts)}\nfirst worker log:\n"
          + "\n".join(lines[:8]))
    assert first_aborted, "the first worker had nothing in flight when it was fenced: nothing was tested"


def test_broker_answers_a_retried_batch_with_its_offset(kafka):
    """Apache Kafka answers an idempotent producer's retried batch with the first write's offset; only tansu on
    s3:// answered DUPLICATE_SEQUENCE_NUMBER (offset -1 after kafka-python turns it into a success).

    1. The first produce response is lost (the client sees a connection error instead): kafka-python 3.0.12
       sends the same batch again with the same producer id, epoch and sequence; the broker answers NONE with
       base offset 0 (it keeps the last 5 batches per producer for exactly this), the record is stored once,
       and `kafka_io.Delivery.outcome(require_offset=True)` is satisfied: hpad re-sends nothing.
    2. The same request replayed after 6 newer batches (outside that window; a producer with at most 5 in
       flight never does this) is answered OUT_OF_ORDER_SEQUENCE_NUMBER (45), never DUPLICATE_SEQUENCE_NUMBER
       (46), and nothing is appended: so the offset-less "duplicate" success that hpad re-sends never occurs on
       Apache Kafka, and the re-send stays as the guard for brokers that do answer that way.
    """
    topic = f"retry-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, 1)
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, enable_idempotence=True, acks="all", linger_ms=0,
                             retry_backoff_ms=50)
    sender = producer._sender  # kafka-python internals: the only way to lose one response on purpose
    answers, requests = [], []
    handle, build = sender._handle_produce_response, sender._produce_request

    def lossy(node_id, send_time, batches, response):
        answers.append([(p.error_code, p.base_offset) for t in response.responses for p in t.partition_responses])
        if len(answers) == 1:
            return sender._failed_produce(batches, node_id, KafkaConnectionError("response lost (test)"))
        return handle(node_id, send_time, batches, response)

    def capture(node_id, *args, **kwargs):
        request = build(node_id, *args, **kwargs)
        requests.append((node_id, request))
        return request

    sender._handle_produce_response, sender._produce_request = lossy, capture
    try:
        delivery = kafka_io.send(producer, topic, None, b"v0")
        producer.flush(timeout=10)
        assert delivery.outcome(require_offset=True) == (True, None)
        assert delivery.future.value.offset == 0
        assert answers == [[(0, 0)], [(0, 0)]]  # the retry: NONE and the original offset, not 46
        for i in range(1, 7):
            producer.send(topic, f"v{i}".encode()).get(timeout=10)
        client = KafkaNetClient(bootstrap_servers=kafka.bootstrap)
        try:
            client.check_version()
            node_id, first = requests[0]
            [[replayed]] = [t.partition_responses for t in client.send_and_receive(node_id, first).responses]
        finally:
            client.close()
    finally:
        producer.close()
    assert (replayed.error_code, replayed.base_offset) == (45, -1)  # OUT_OF_ORDER_SEQUENCE_NUMBER
    values = [r.value for r in read_all(kafka, topic, expected=7, timeout=20)]
    assert values == [f"v{i}".encode() for i in range(7)]  # each once


def test_kafka_python_after_fencing(kafka):
    """kafka-python 3.0.12 after ProducerFencedError: only the first call says so by type; abort and begin then
    raise a plain KafkaError whose text names it (`consumers.delivery.is_fenced` reads both), at once (no
    hang), and close() returns. The zombie's flushed records are aborted by the broker, not by the client."""
    topic = f"fence-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, 1)
    zombie = KafkaProducer(bootstrap_servers=kafka.bootstrap, transactional_id=f"z-{topic}")
    zombie.init_transactions()
    zombie.begin_transaction()
    zombie.send(topic, b"zombie")
    zombie.flush()
    successor = KafkaProducer(bootstrap_servers=kafka.bootstrap, transactional_id=f"z-{topic}")
    successor.init_transactions()  # bumps the epoch, aborts the zombie's open transaction
    with pytest.raises(ProducerFencedError):
        zombie.commit_transaction()
    for call in (zombie.abort_transaction, zombie.begin_transaction):
        with pytest.raises(KafkaError, match="ProducerFencedError") as raised:
            call()
        assert type(raised.value) is KafkaError
    zombie.close(timeout=5)
    successor.begin_transaction()
    successor.send(topic, b"successor")
    successor.commit_transaction()
    successor.close()
    assert [r.value for r in read_all(kafka, topic, expected=1, isolation_level="read_committed")] == [b"successor"]
    assert [r.value for r in read_all(kafka, topic, expected=2)] == [b"zombie", b"successor"]


@pytest.mark.parametrize("fenced", ["before the batch", "while sending it"])
def test_fencing_seen_on_the_records_is_fencing_not_a_refusal(kafka, fenced):
    """Fenced before the commit, kafka-python fails the records' futures with ProducerFencedError (the
    AddPartitionsToTxn answer). Before the fix the Deliverer took that for a refused record (careful mode
    armed: had the abort worked, the next round would have dead-lettered the events) and stopped with "cannot
    abort the transaction" (kafka-python refuses the abort); now: reported as fenced, nothing swapped."""
    topic = f"fence-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, 1)
    txn_id = f"z-{topic}"
    zombie = KafkaProducer(bootstrap_servers=kafka.bootstrap, transactional_id=txn_id)
    zombie.init_transactions()
    successor = KafkaProducer(bootstrap_servers=kafka.bootstrap, transactional_id=txn_id)
    swapped = []
    deliverer = Deliverer(zombie, lambda: zombie, WorkerMetrics(), threading.Event(),
                          lambda out, error: swapped.append(out) or out)
    if fenced == "before the batch":
        successor.init_transactions()
    else:
        real_send = deliverer._send

        def send(outs):
            successor.init_transactions()
            real_send(outs)

        deliverer._send = send
    item = types.SimpleNamespace(source=(topic, 0, 0))
    outs = [Output(item, topic, None, b"event", [])]
    try:
        with pytest.raises(OutputDeliveryError, match="fenced"):
            deliverer.deliver_transaction(outs, {}, lambda: None)
    finally:
        zombie.close(timeout=5)
        successor.close()
    assert swapped == [] and outs[0].reason is None
    assert isinstance(outs[0].delivery.outcome()[1], ProducerFencedError)
    assert read_all(kafka, topic, isolation_level="read_committed", idle=0.5) == []


def test_commit_with_the_broker_gone_stops_in_time(kafka):
    """kafka-python 3.0.12's commit_transaction waits without a deadline (max_block_ms does not apply; with
    the broker killed mid-commit it was still blocked 150 s after the broker came back). The Deliverer waits
    at most its flush timeout and stops with the transaction undecided (`TransactionTimeoutError`); the next
    producer with the same transactional id aborts it: nothing of the batch is committed.
    (Runs last: it kills the module's broker and starts it again.)"""
    topic = f"gone-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, 1)
    txn_id = f"g-{topic}"
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, transactional_id=txn_id, max_block_ms=3000)
    producer.init_transactions()
    deliverer = Deliverer(producer, lambda: producer, WorkerMetrics(), threading.Event(), lambda out, error: out,
                          flush_timeout_s=3.0)
    real_round = deliverer._round

    def round_then_crash(outs, waiting):
        result = real_round(outs, waiting)
        kafka.kill(0)  # the records are on the log; EndTxn finds no broker
        return result

    deliverer._round = round_then_crash
    outs = [Output(types.SimpleNamespace(source=(topic, 0, 0)), topic, None, b"event", [])]
    began = time.monotonic()
    try:
        with pytest.raises(TransactionTimeoutError, match="did not finish in 3 s"):
            deliverer.deliver_transaction(outs, {}, lambda: None)
        waited = time.monotonic() - began
    finally:
        producer.close(timeout=0)
        kafka.start_node(0)
    assert waited < 10, waited
    successor = KafkaProducer(bootstrap_servers=kafka.bootstrap, transactional_id=txn_id)
    successor.init_transactions()  # aborts the undecided transaction
    successor.close()
    assert read_all(kafka, topic, isolation_level="read_committed", idle=0.5) == []
    assert [r.value for r in read_all(kafka, topic, expected=1)] == [b"event"]  # written, then aborted
