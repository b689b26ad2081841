"""Settings: env / .env / CLI precedence, validation messages, secrets, Kafka kwargs, the README tables."""

from __future__ import annotations

import argparse

import pytest
from kafka import KafkaConsumer, KafkaProducer
from pydantic import ValidationError

from consumers import docs
from consumers.app import parse_args
from consumers.settings import (
    CameraSettings,
    KafkaSettings,
    WorkerSettings,
    add_cli_flags,
    cli_overrides,
    connection_kwargs,
    consumer_kwargs,
    load_settings,
    producer_kwargs,
    settings_table,
)
from hpad.errors import ConfigError

SECURITY = ("security_protocol", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_check_hostname",
            "sasl_mechanism", "sasl_plain_username", "sasl_plain_password", "bootstrap_servers", "client_id")


@pytest.fixture(autouse=True)
def clean_env(clean_hpad_env):
    """No HPAD_* variable or .env file of the machine leaks into these tests."""


def test_defaults_are_valid_and_sane():
    s = WorkerSettings()
    assert (s.input_topic, s.events_topic, s.dlq_topic) == ("hpad.frames", "hpad.events", "hpad.frames.dlq")
    assert s.session_timeout_ms >= 3 * s.heartbeat_interval_ms and s.max_poll_interval_ms >= 60000
    assert s.weights_pretrained == "laion400m_e32" and not s.exactly_once and s.mask_policy == "anomalous"


def test_environment_and_dotenv(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("HPAD_CATEGORIES=bottle, widget\nHPAD_MAX_BATCH_SIZE=16\nOTHER=1\n")
    monkeypatch.setenv("HPAD_MAX_BATCH_SIZE", "32")  # the environment beats .env
    s = WorkerSettings()
    assert s.categories == ["bottle", "widget"] and s.max_batch_size == 32


def test_cli_flags_override_environment(monkeypatch):
    monkeypatch.setenv("HPAD_GROUP_ID", "from-env")
    monkeypatch.setenv("HPAD_MAX_WAIT_MS", "7")
    s, ns = parse_args(["--group-id", "from-cli", "--no-laa", "--categories", "a,b", "--random-init",
                        "--max-frames", "5"])
    assert (s.group_id, s.max_wait_ms, s.laa, s.categories, s.random_init) == ("from-cli", 7, False, ["a", "b"], True)
    assert ns.max_frames == 5 and s.weights_pretrained is None


def test_secrets_have_no_cli_flags():
    parser = argparse.ArgumentParser()
    add_cli_flags(parser, WorkerSettings)
    flags = {a.dest for a in parser._actions}
    assert "sasl_plain_password" not in flags and "ssl_password" not in flags and "max_batch_size" in flags
    assert cli_overrides(parser.parse_args(["--max-batch-size", "3"]), WorkerSettings) == {"max_batch_size": "3"}


def test_settings_are_frozen():
    s = WorkerSettings()
    with pytest.raises(ValidationError):
        s.max_batch_size = 3


def sasl_env(monkeypatch, mechanism="SCRAM-SHA-512"):
    monkeypatch.setenv("HPAD_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("HPAD_SASL_MECHANISM", mechanism)
    monkeypatch.setenv("HPAD_SASL_PLAIN_USERNAME", "svc-hpad")
    monkeypatch.setenv("HPAD_SASL_PLAIN_PASSWORD", "hunter2-very-secret")
    monkeypatch.setenv("HPAD_SSL_PASSWORD", "key-pass-secret")


def test_secrets_are_masked_everywhere(monkeypatch):
    sasl_env(monkeypatch)
    s = WorkerSettings()
    for text in (repr(s), str(s), s.model_dump_json()):
        assert "hunter2-very-secret" not in text and "key-pass-secret" not in text and "svc-hpad" not in text
    assert "**********" in repr(s)


def test_security_options_reach_consumer_and_producer(monkeypatch, tmp_path):
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n")
    sasl_env(monkeypatch, "PLAIN")
    monkeypatch.setenv("HPAD_SSL_CAFILE", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("HPAD_SSL_CERTFILE", str(tmp_path / "cert.pem"))
    monkeypatch.setenv("HPAD_SSL_KEYFILE", str(tmp_path / "key.pem"))
    monkeypatch.setenv("HPAD_BOOTSTRAP_SERVERS", "k1:9093, k2:9093")
    s = WorkerSettings()
    consumer, producer = consumer_kwargs(s), producer_kwargs(s)
    for key in SECURITY:
        assert consumer[key] == producer[key] == connection_kwargs(s)[key], key
    assert consumer["sasl_plain_password"] == "hunter2-very-secret" and consumer["sasl_mechanism"] == "PLAIN"
    assert consumer["ssl_password"] == "key-pass-secret" and consumer["ssl_cafile"] == str(tmp_path / "ca.pem")
    assert consumer["bootstrap_servers"] == ["k1:9093", "k2:9093"]
    camera = producer_kwargs(CameraSettings())
    assert all(camera[k] == producer[k] for k in SECURITY if k != "client_id")


def test_kafka_kwargs_are_known_to_kafka_python():
    s = WorkerSettings(exactly_once=True)
    consumer = consumer_kwargs(s)
    producer = producer_kwargs(s, transactional_id="hpad-1")
    assert set(consumer) <= set(KafkaConsumer.DEFAULT_CONFIG)
    assert set(producer) <= set(KafkaProducer.DEFAULT_CONFIG)
    assert consumer["enable_auto_commit"] is False and consumer["isolation_level"] == "read_committed"
    assert producer["transactional_id"] == "hpad-1" and producer["acks"] == "all" and producer["enable_idempotence"]
    assert consumer["max_poll_records"] == s.max_batch_size
    assert consumer_kwargs(WorkerSettings())["isolation_level"] == "read_uncommitted"


@pytest.mark.parametrize("env, needle", [
    ({"HPAD_SECURITY_PROTOCOL": "SASL_SSL"}, "HPAD_SASL_MECHANISM"),
    ({"HPAD_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "HPAD_SASL_MECHANISM": "PLAIN"}, "HPAD_SASL_PLAIN_USERNAME"),
    ({"HPAD_SASL_MECHANISM": "PLAIN"}, "not SASL"),
    ({"HPAD_SASL_MECHANISM": "GSSAPI"}, "HPAD_SASL_MECHANISM"),
    ({"HPAD_SSL_CAFILE": "/nonexistent/ca.pem"}, "HPAD_SSL_CAFILE"),
    ({"HPAD_HEARTBEAT_INTERVAL_MS": "5000"}, "HPAD_HEARTBEAT_INTERVAL_MS"),
    ({"HPAD_PRETRAINED": "openai", "HPAD_RANDOM_INIT": "true"}, "one weights source"),
    ({"HPAD_CATEGORIES": "bottle", "HPAD_DEFAULT_CATEGORY": "widget"}, "HPAD_DEFAULT_CATEGORY"),
    ({"HPAD_CATEGORIES": ""}, "HPAD_CATEGORIES"),
    ({"HPAD_CATEGORIES": "a,a"}, "repeated"),
    ({"HPAD_CATEGORIES": "bad name!"}, "category names"),
    ({"HPAD_MAX_BATCH_SIZE": "0"}, "HPAD_MAX_BATCH_SIZE"),
    ({"HPAD_MAX_PAYLOAD_BYTES": str(64 * 2**20)}, "HPAD_PRODUCER_MAX_REQUEST_SIZE"),
    ({"HPAD_REVOKE_TIMEOUT_MS": "400000"}, "HPAD_REVOKE_TIMEOUT_MS"),
    ({"HPAD_EVENTS_TOPIC": "hpad.frames"}, "topics must all differ"),
    ({"HPAD_MASK_POLICY": "sometimes"}, "HPAD_MASK_POLICY"),
    ({"HPAD_DEVICE": "cpu", "HPAD_PRECISION": "fp16"}, "bf16"),
    ({"HPAD_FETCH_MAX_WAIT_MS": "5000", "HPAD_REQUEST_TIMEOUT_MS": "4000", "HPAD_LIVENESS_TIMEOUT_MS": "60000"},
     "HPAD_FETCH_MAX_WAIT_MS"),
    ({"HPAD_LIVENESS_TIMEOUT_MS": "10000"}, "HPAD_LIVENESS_TIMEOUT_MS"),
])
def test_invalid_settings_fail_with_a_clear_message(monkeypatch, env, needle):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings(WorkerSettings)
    assert needle in str(info.value)


def test_cli_reports_bad_settings_with_exit_code_2(capsys):
    from hpad.cli import main

    assert main(["serve", "--max-batch-size", "0"]) == 2
    assert "HPAD_MAX_BATCH_SIZE" in capsys.readouterr().err


def test_every_setting_is_documented():
    for cls in (KafkaSettings, WorkerSettings, CameraSettings):
        for name, info in cls.model_fields.items():
            assert info.description, f"{cls.__name__}.{name} has no description"
    table = settings_table(WorkerSettings)
    assert all(f"`HPAD_{name.upper()}`" in table for name in WorkerSettings.model_fields)


def test_contract_tables_are_generated_from_the_code():
    from tuner import docs as tuner_docs

    text = docs.README.read_text()
    for module in (docs, tuner_docs):
        for name, table in module.generated_blocks().items():
            assert docs.block(text, name) == table, f"README.md block {name} is stale: run python -m {module.__name__}"
