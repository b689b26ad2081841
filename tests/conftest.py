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
    not match it (used to provoke real broker-side errors). Tests that use this fixture run on tansu only;
    the broker-parametrised ones use `broker` (or `kafka`).
    """
    from consumers.broker import EmbeddedBroker

    root = tmp_path_factory.mktemp("tansu")
    with EmbeddedBroker(schema_dir=root / "schemas", log_path=root / "tansu.log") as broker:
        yield broker


@pytest.fixture(scope="session")
def apache_kafka_broker(tmp_path_factory):
    """One single-node Apache Kafka (KRaft, consumers/apache_kafka.py) for the whole session, started on first
    use and stopped at the end. It has no schema registry (``schema_dir`` is None): broker-side refusals by
    schema are tansu-only."""
    from consumers.apache_kafka import ApacheKafka
    from tests.consumers.kafka_helpers import KAFKA_TEST_CONFIG

    root = tmp_path_factory.mktemp("apache-kafka")
    with ApacheKafka(nodes=1, root=root, config=KAFKA_TEST_CONFIG, keep_files=True) as cluster:
        yield cluster


@pytest.fixture(scope="session", params=["tansu", pytest.param("kafka", marks=pytest.mark.apache_kafka)])
def broker(request):
    """The broker-parametrised suites: each test that takes it runs on tansu and on Apache Kafka (1 node).

    Both brokers are session-scoped (each started once, stopped at the end) and give what the helpers use:
    ``.name``, ``.bootstrap``, ``.create_topic(name, partitions)``, ``.schema_dir`` (tansu's registry; None
    on Kafka). Tests that only make sense on one broker take `kafka_broker` and say so in their name.
    """
    return request.getfixturevalue("kafka_broker" if request.param == "tansu" else "apache_kafka_broker")


@pytest.fixture
def kafka(broker):
    """The shared Kafka helpers bound to `broker` (tests.consumers.kafka_helpers.KafkaTools): ``kafka.new_topics()``,
    ``kafka.publish(topic, frames)``, ``kafka.read_all(topic, ...)``, ``kafka.settings(topics, ...)``,
    ``kafka.committed_offsets(group, topic)``; ``kafka.broker`` is the broker itself."""
    from tests.consumers.kafka_helpers import KafkaTools

    return KafkaTools(broker)


@pytest.fixture(autouse=True)
def no_leaked_hpad_env():
    """A test that sets HPAD_* in os.environ without monkeypatch leaks it into every later test and into the
    processes they start (hpad serve would then read it): fail that test, and put the environment back."""
    import os

    before = {k: v for k, v in os.environ.items() if k.startswith("HPAD_")}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith("HPAD_")}
    if after != before:
        for name in set(after) - set(before):
            del os.environ[name]
        os.environ.update(before)
        pytest.fail(f"the test left HPAD_* variables changed in os.environ: {sorted(set(after) ^ set(before))}; "
                    "use monkeypatch.setenv")


@pytest.fixture
def clean_hpad_env(monkeypatch, tmp_path):
    """Remove every HPAD_* variable and run in an empty folder (no .env) so settings see only what a test sets."""
    import os

    for name in list(os.environ):
        if name.startswith("HPAD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
