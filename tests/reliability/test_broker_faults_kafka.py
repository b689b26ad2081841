"""Broker faults on a 3-node Apache Kafka cluster while a worker scores a stream: nothing is lost.

The cluster (consumers/apache_kafka.py) is KRaft with 3 combined broker+controller nodes; every topic has
replication factor 3 and ``min.insync.replicas=2``; the worker writes events and dead letters with
``acks=all`` (idempotent producer, `consumers.settings.producer_kwargs`), and so does the test's camera.
Two faults, each under a stream of good frames with a poison frame every 10th:

* the leader of the busiest frames partition is SIGKILLed mid-stream, then started again;
* a rolling restart: each node in turn gets SIGTERM, is started again, and the next one goes only when
  every partition's ISR has all three nodes again.

Counts per fault (printed as a table row): in (acknowledged frames), events, dead letters, duplicates and
lost (= 0). A frame may have two outputs only when its batch was not committed: every duplicate (by
frame_id) must be above its partition's committed offset as sampled before its later copy was written.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from consumers import contract as c
from consumers.apache_kafka import ApacheKafka
from consumers.camera import frame_headers
from consumers.events import headers_as_text
from tests.consumers.kafka_helpers import (
    KAFKA_TEST_CONFIG,
    Frame,
    KafkaTools,
    Sent,
    Topics,
    WorkerThread,
    events_by_frame,
    good_frame,
    wait_for,
)

pytestmark = [pytest.mark.apache_kafka, pytest.mark.slow]

PARTITIONS = 3
BUSY = 0  # the busiest frames partition: half the frames; the other two a quarter each


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three nodes for this module, stopped at its end (their logs stay in the test's temporary folder)."""
    root = tmp_path_factory.mktemp("kafka-3")
    with ApacheKafka(nodes=3, root=root, config=KAFKA_TEST_CONFIG, keep_files=True) as kafka:
        assert kafka.replication_factor == 3 and kafka.min_insync_replicas == 2
        yield kafka


def partition_state(cluster: ApacheKafka, topic: str) -> dict[int, tuple[int, set[int]]]:
    """partition -> (leader, ISR) from the cluster's metadata."""
    with cluster.admin() as admin:
        (described,) = admin.describe_topics([topic])
    return {p["partition_index"]: (p["leader_id"], set(p["isr_nodes"])) for p in described["partitions"]}


def state_or_none(cluster: ApacheKafka, topic: str) -> dict[int, tuple[int, set[int]]] | None:
    """`partition_state`, or None while the admin client cannot get an answer (it asked a dead node)."""
    try:
        return partition_state(cluster, topic)
    except Exception:  # noqa: BLE001 - a node is down or still starting: the caller asks again
        return None


def wait_full_isr(cluster: ApacheKafka, topics: list[str], timeout: float = 60.0) -> None:
    def full() -> bool:
        states = [state_or_none(cluster, t) for t in topics]
        return all(s is not None and all(isr == {0, 1, 2} and leader >= 0 for leader, isr in s.values())
                   for s in states)

    wait_for(full, timeout=timeout, interval=0.5, what=f"every ISR of {topics} back to all three nodes")


class Camera:
    """Publishes frames (acks=all, idempotent) at about ``rate`` frames/s until stopped; BUSY gets half."""

    def __init__(self, cluster: ApacheKafka, topic: str, seed: int, rate: float = 25.0) -> None:
        self.producer = KafkaProducer(bootstrap_servers=cluster.bootstrap, acks="all", enable_idempotence=True,
                                      linger_ms=5, request_timeout_ms=5000, delivery_timeout_ms=60000)
        self.topic, self.rate = topic, rate
        self.rng = np.random.default_rng(seed)
        self.sent: list[Sent] = []
        self.poison_ids: set[str] = set()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="camera", daemon=True)

    def frame(self, i: int) -> Frame:
        if i % 10 == 9:  # poison: undecodable
            frame_id = f"junk-{i}"
            self.poison_ids.add(frame_id)
            frame = Frame(b"not an image", frame_headers(frame_id, "cam-j", "widget", "image/jpeg"), b"cam-j")
        else:
            frame = good_frame(self.rng, "widget", f"cam-{i % 4}", (48, 64))
        frame.partition = (BUSY, BUSY, 1, 2)[i % 4]
        return frame

    def _run(self) -> None:
        try:
            i = 0
            while not self._stop.is_set():
                chunk = [self.frame(i + k) for k in range(5)]
                i += 5
                futures = [self.producer.send(self.topic, key=f.key, value=f.value, headers=f.headers,
                                              partition=f.partition) for f in chunk]
                for frame, future in zip(chunk, futures, strict=True):
                    meta = future.get(timeout=90)  # acknowledged by at least min.insync.replicas=2
                    self.sent.append(Sent(frame.frame_id, meta.partition, meta.offset))
                time.sleep(5 / self.rate)
        except BaseException as exc:  # noqa: BLE001 - re-raised by stop()
            self.error = exc

    def start(self) -> Camera:
        self._thread.start()
        return self

    def stop(self) -> list[Sent]:
        self._stop.set()
        self._thread.join(120)
        self.producer.close()
        assert not self._thread.is_alive(), "the camera did not stop"
        if self.error is not None:
            raise self.error
        return self.sent


class CommitLog:
    """Samples the group's committed offsets every 0.25 s: [(wall time, {partition: offset})]."""

    def __init__(self, cluster: ApacheKafka, topics: Topics) -> None:
        self.cluster, self.topics = cluster, topics
        self.samples: list[tuple[float, dict[int, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-log", daemon=True)

    def _run(self) -> None:
        consumer = None
        parts = [TopicPartition(self.topics.frames, p) for p in range(PARTITIONS)]
        while not self._stop.wait(0.25):
            try:
                if consumer is None:
                    consumer = KafkaConsumer(bootstrap_servers=self.cluster.bootstrap, group_id=self.topics.group,
                                             enable_auto_commit=False, request_timeout_ms=5000)
                at = time.time()
                offsets = {tp.partition: consumer.committed(tp) for tp in parts}
                self.samples.append((at, {p: o for p, o in offsets.items() if o is not None}))
            except Exception:  # noqa: BLE001 - the coordinator is moving: sample again later
                if consumer is not None:
                    consumer.close(autocommit=False)
                consumer = None
        if consumer is not None:
            consumer.close(autocommit=False)

    def start(self) -> CommitLog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def committed_before(self, wall_s: float, partition: int) -> int:
        """The highest committed offset of ``partition`` sampled before ``wall_s`` (0: none yet)."""
        return max((s.get(partition, 0) for at, s in self.samples if at < wall_s), default=0)


def outputs(kafka: KafkaTools, topics: Topics) -> tuple[list, list]:
    return kafka.read_all(topics.events, timeout=30), kafka.read_all(topics.dlq, timeout=30)


def frame_id_of(record) -> str:
    """An event's frame_id (its JSON value) or a dead letter's (its copied headers)."""
    if record.value and record.value.startswith(b"{"):
        return json.loads(record.value)["frame_id"]
    return headers_as_text(record.headers).get("frame_id", "")


def records_by_frame(records: list) -> dict[str, list]:
    out: dict[str, list] = {}
    for record in records:
        out.setdefault(frame_id_of(record), []).append(record)
    return out


def letter_ids(letters: list) -> dict[str, list]:
    return records_by_frame(letters)


def joined_worker(make_worker, settings) -> tuple[object, WorkerThread]:
    """A worker thread that owns partitions. kafka-python 3.0.12 now and then leads the first JoinGroup on a
    fresh topic without its metadata ("No partition metadata for topic", ``assigned []``) and does not rejoin
    when the metadata arrives (an open worker issue, see tests/reliability/test_exactly_once_kafka.py); such a
    worker is stopped and started again, once, before any frame is sent, so the fault under test starts from
    a scoring worker. Said on stdout when it happens."""
    for attempt in range(2):
        worker = make_worker(settings)
        thread = WorkerThread(worker).start()
        try:
            wait_for(lambda w=worker: any(kind == "assigned" and tps for kind, tps in w.rebalance_log),
                     timeout=20, what="the worker's first partitions")
            return worker, thread
        except AssertionError:
            if attempt == 1:
                raise
            print("worker joined without partitions (kafka-python race); restarting it once")
            worker.request_stop()
            thread.join()
    raise AssertionError("unreachable")


def stream_through(cluster: ApacheKafka, make_worker, seed: int, name: str,
                   fault: Callable[[ApacheKafka, Topics], None]) -> dict[str, int]:
    """A worker scores a stream while ``fault`` runs; then checks and returns the counts."""
    kafka = KafkaTools(cluster)
    topics = kafka.new_topics(partitions=PARTITIONS, prefix=name)
    for topic in (topics.frames, topics.events, topics.dlq):
        state = partition_state(cluster, topic)
        assert all(len(isr) == 3 for _, isr in state.values()), (topic, state)
    settings = kafka.settings(topics, categories=["widget"], max_batch_size=4)
    worker, thread = joined_worker(make_worker, settings)
    commits = CommitLog(cluster, topics).start()
    camera = Camera(cluster, topics.frames, seed).start()
    try:
        wait_for(lambda: worker.pipeline is not None and worker.pipeline.completed >= 30, timeout=60,
                 what="the worker scoring the stream")
        fault(cluster, topics)
        time.sleep(2.0)  # the stream goes on a little after the fault
        sent = camera.stop()
        good = {s.frame_id for s in sent} - camera.poison_ids
        poison = {s.frame_id for s in sent} & camera.poison_ids

        def all_out() -> bool:
            events, letters = outputs(kafka, topics)
            return set(events_by_frame(events)) >= good and set(letter_ids(letters)) >= poison

        wait_for(all_out, timeout=120, interval=1.0, what="an output for every acknowledged frame")
        result = thread.stop()
    finally:
        camera._stop.set()
        commits.stop()
        if thread.thread.is_alive():
            worker.request_stop()
    assert result.exit_code == 0, result
    events, letters = outputs(kafka, topics)
    by_event, by_letter = events_by_frame(events), letter_ids(letters)
    assert set(by_event) == good and set(by_letter) == poison, "an output for a frame that was never sent"
    assert all(headers_as_text(r.headers)[c.ERROR_CLASS] == "undecodable" for r in letters)
    where = {s.frame_id: s for s in sent}
    duplicates = 0
    for copies in [*records_by_frame(events).values(), *letter_ids(letters).values()]:
        if len(copies) < 2:
            continue
        duplicates += len(copies) - 1
        frame = where[frame_id_of(copies[0])]
        written = max(r.timestamp for r in copies) / 1000  # when the later copy was produced
        committed = commits.committed_before(written - 1.0, frame.partition)
        assert frame.offset >= committed, f"{frame} scored again below committed offset {committed}"
    final = kafka.committed_offsets(topics.group, topics.frames)
    ends: dict[int, int] = {}
    for s in sent:
        ends[s.partition] = max(ends.get(s.partition, 0), s.offset + 1)
    assert {p: o for p, o in final.items() if o is not None} == ends
    counts = {"in": len(sent), "events": len(events), "dead letters": len(letters), "duplicates": duplicates,
              "lost": len(good - set(by_event)) + len(poison - set(by_letter))}
    print(f"\n| {name} | {counts['in']} | {counts['events']} | {counts['dead letters']} | {counts['duplicates']} | "
          f"{counts['lost']} |  (busiest partition {BUSY}: {sum(s.partition == BUSY for s in sent)} frames; "
          f"worker rebalance callbacks {len(worker.rebalance_log)})")
    assert counts["lost"] == 0
    assert counts["events"] + counts["dead letters"] == counts["in"] + duplicates
    return counts


def test_leader_of_the_busiest_partition_killed_mid_stream_loses_nothing(cluster, make_worker):
    def kill_the_leader(cluster: ApacheKafka, topics: Topics) -> None:
        leader, isr = partition_state(cluster, topics.frames)[BUSY]
        assert isr == {0, 1, 2}
        cluster.kill(leader)  # SIGKILL: a crash
        wait_for(lambda: (s := state_or_none(cluster, topics.frames)) is not None and s[BUSY][0] not in (leader, -1),
                 timeout=30, interval=0.25, what="a new leader of the busiest partition")
        time.sleep(3.0)  # the stream goes on on two nodes (min.insync.replicas=2 still met)
        cluster.start_node(leader)
        wait_full_isr(cluster, [topics.frames, topics.events, topics.dlq])

    stream_through(cluster, make_worker, 20, "leader-sigkill", kill_the_leader)


def test_rolling_restart_of_all_three_brokers_under_load_loses_nothing(cluster, make_worker):
    def rolling_restart(cluster: ApacheKafka, topics: Topics) -> None:
        for node in range(3):
            cluster.kill(node, sig=signal.SIGTERM)  # a clean, controlled shutdown
            cluster.start_node(node)
            wait_full_isr(cluster, [topics.frames, topics.events, topics.dlq])

    stream_through(cluster, make_worker, 21, "rolling-restart", rolling_restart)
