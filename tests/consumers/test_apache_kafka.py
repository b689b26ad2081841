"""Apache Kafka (KRaft) launcher: transactions isolated on 1 node, a replicated 3-node cluster survives a crash.

These need java and the classpath of ``make kafka-classpath`` (``make test`` builds it); without them the
launcher fails with a message naming what is missing (tested below) and these tests fail: never skipped.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from consumers import apache_kafka
from consumers.apache_kafka import ApacheKafka, KafkaLauncherError

pytestmark = pytest.mark.apache_kafka


def read_all(bootstrap: str, topic: str, partitions: int, expected: int, isolation: str = "read_committed",
             timeout_s: float = 30.0) -> list[bytes]:
    """Every value of ``topic`` from the beginning: until ``expected`` arrived and one more empty poll."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level=isolation, enable_auto_commit=False,
                             fetch_max_wait_ms=100)
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500)
            values += [record.value for records in batch.values() for record in records]
            if len(values) >= expected and not batch:
                break
        return values
    finally:
        consumer.close()


def test_missing_classpath_and_java_are_named(tmp_path, monkeypatch):
    with pytest.raises(KafkaLauncherError, match=r"no Apache Kafka classpath at .*make kafka-classpath"):
        apache_kafka.classpath(tmp_path / "absent.txt")
    stale = tmp_path / "classpath.txt"
    stale.write_text(f"{tmp_path / 'gone.jar'}")
    with pytest.raises(KafkaLauncherError, match="missing jars"):
        apache_kafka.classpath(stale)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KafkaLauncherError, match="java is not on PATH"):
        ApacheKafka()


def test_one_node_isolates_transactions_and_leaves_no_process(tmp_path):
    topic = f"tx-{uuid.uuid4().hex[:8]}"
    with ApacheKafka(nodes=1, root=tmp_path / "kafka") as kafka:
        assert kafka.ready_s is not None and kafka.ready_s < 30, kafka.ready_s
        pids = [node.process.pid for node in kafka.nodes]
        kafka.create_topic(topic, partitions=2)

        plain = KafkaProducer(bootstrap_servers=kafka.bootstrap, enable_idempotence=True, acks="all")
        for i in range(20):
            plain.send(topic, key=str(i).encode(), value=f"idem-{i}".encode())
        plain.flush()
        plain.close()

        tx = KafkaProducer(bootstrap_servers=kafka.bootstrap, transactional_id=f"t-{topic}")
        tx.init_transactions()
        for outcome in ("commit", "abort", "commit"):
            tx.begin_transaction()
            for i in range(10):
                tx.send(topic, key=str(i).encode(), value=f"{outcome}-{i}".encode())
            tx.flush()  # on the broker before the outcome (an abort drops records still in the buffer)
            tx.commit_transaction() if outcome == "commit" else tx.abort_transaction()
        tx.close()

        committed = read_all(kafka.bootstrap, topic, 2, expected=40)
        everything = read_all(kafka.bootstrap, topic, 2, expected=50, isolation="read_uncommitted")
    # read_committed: the idempotent records once each, both committed transactions, nothing aborted
    assert sorted(committed) == sorted([f"idem-{i}".encode() for i in range(20)]
                                       + [f"commit-{i}".encode() for i in range(10)] * 2)
    # the aborted records were written to the log: isolation, not absence, hides them
    assert sorted(v for v in everything if v.startswith(b"abort-")) == sorted(f"abort-{i}".encode() for i in range(10))
    assert kafka.pids() == [] and all(node.process is None for node in kafka.nodes)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            apache_kafka.os.kill(pid, 0)
    kafka.stop()  # idempotent


def test_failed_start_names_the_log_and_leaves_no_process(tmp_path):
    kafka = ApacheKafka(nodes=1, root=tmp_path / "kafka")
    with socket.socket() as taken:  # the broker's port is in use: the JVM exits at start
        taken.bind(("127.0.0.1", kafka.nodes[0].broker_port))
        taken.listen()
        with pytest.raises(KafkaLauncherError, match=r"exited with code .* see .*server\.log"):
            kafka.start()
    assert kafka.pids() == [] and kafka.nodes[0].process is None
    assert kafka.nodes[0].log_path.is_file()  # kept for the message to point at


def partition_state(kafka: ApacheKafka, topic: str) -> dict[int, tuple[int, set[int]]]:
    """partition -> (leader, ISR) from the cluster's metadata."""
    with kafka.admin() as admin:
        [described] = admin.describe_topics([topic])
    return {p["partition_index"]: (p["leader_id"], set(p["isr_nodes"])) for p in described["partitions"]}


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout_s} s: {what}")


@pytest.mark.slow
def test_three_nodes_keep_acks_all_through_a_crash_and_a_restart(tmp_path):
    topic = f"rep-{uuid.uuid4().hex[:8]}"
    with ApacheKafka(nodes=3, root=tmp_path / "kafka") as kafka:
        assert kafka.ready_s is not None and kafka.ready_s < 30, kafka.ready_s
        assert kafka.min_insync_replicas == 2
        kafka.create_topic(topic, partitions=3, replication_factor=3)
        assert all(isr == {0, 1, 2} for _, isr in partition_state(kafka, topic).values())
        producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True,
                                 delivery_timeout_ms=30000, request_timeout_ms=5000, linger_ms=5)
        sent = 0

        def produce(count: int) -> None:
            nonlocal sent
            futures = [producer.send(topic, key=str(i % 7).encode(), value=f"m-{i}".encode())
                       for i in range(sent, sent + count)]
            for future in futures:
                future.get(timeout=30)  # acknowledged by min.insync.replicas=2 at least
            sent += count

        produce(100)
        victim = partition_state(kafka, topic)[0][0]  # the leader of partition 0 crashes
        kafka.kill(victim)
        assert victim not in kafka.running() and kafka.nodes[victim].process is None
        produce(100)  # leadership moves, the ISR shrinks to two: acks=all still succeeds
        state = wait_for(lambda: (s := partition_state(kafka, topic)) and all(
            victim not in isr and leader != victim for leader, isr in s.values()) and s, 15,
            "the crashed node leaves every ISR")
        assert all(len(isr) == 2 for _, isr in state.values())
        assert sorted(read_all(kafka.bootstrap, topic, 3, expected=200)) == sorted(
            f"m-{i}".encode() for i in range(200))

        kafka.start_node(victim)
        wait_for(lambda: all(isr == {0, 1, 2} for _, isr in partition_state(kafka, topic).values()), 45,
                 "the restarted node back in every ISR")
        produce(100)
        producer.close()
        values = read_all(kafka.bootstrap, topic, 3, expected=300)
    assert sorted(values) == sorted(f"m-{i}".encode() for i in range(300))  # none lost, none twice
    assert kafka.pids() == []


def test_cluster_ids_never_look_like_options():
    ids = {apache_kafka.new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000 and all(len(i) == 22 and not i.startswith("-") for i in ids)


def test_nodes_die_with_a_killed_launcher(tmp_path):
    """SIGKILL the Python process that started a node (no stop() runs): the JVM goes too (setpriv --pdeathsig)."""
    root = tmp_path / "kafka"
    script = ("import sys, time; from consumers.apache_kafka import ApacheKafka; "
              f"k = ApacheKafka(root={str(root)!r}).start(); print('ready', flush=True); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert child.stdout.readline().strip() == b"ready"
        cluster = ApacheKafka.__new__(ApacheKafka)  # only for pids(): what runs with this folder on its command line
        cluster.root = root
        assert cluster.pids(), "the node should be running"
    finally:
        child.kill()
        child.wait()
    wait_for(lambda: not cluster.pids(), 10, "the JVM exits with its launcher")


def test_demo_broker_option(tmp_path):
    from consumers.demo import Demo, parse_args

    assert parse_args([]).broker == "tansu"
    demo = Demo(parse_args(["--broker", "kafka"]))
    broker = demo.broker()  # not started: nothing runs until `with`
    assert isinstance(broker, ApacheKafka) and broker.root == demo.workdir / "kafka" and not broker.keep_data
    assert broker.properties(broker.nodes[0])["message.max.bytes"] == str(33 * 2**20)
    shutil.rmtree(demo.workdir)
