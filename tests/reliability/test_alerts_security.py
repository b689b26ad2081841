"""Security invariants of `hpad alerts` (the same as tests/reliability/test_security.py's for the other services):
TLS / SASL settings reach its Kafka consumer and dead-letter producer unchanged, and neither the Kafka
secrets nor the webhook's HMAC key ever appear in settings dumps, ``--help`` or a refused configuration."""

from __future__ import annotations

import pytest
from kafka import KafkaConsumer, KafkaProducer

from consumers import kafka_io
from consumers.alerts.settings import AlertsSettings, alerts_consumer_kwargs
from consumers.settings import producer_kwargs
from tests.reliability.test_security import (
    SECURITY_KEYS,
    assert_no_secret,
    expected_security,
    secret_env,
    security_env,
)

HMAC_KEY = "hmac-S3CRET-key"


@pytest.fixture(autouse=True)
def clean_env(clean_hpad_env):
    """No HPAD_* variable or .env file of the machine leaks into these tests."""


@pytest.mark.parametrize("protocol, mechanism", [("SASL_SSL", "SCRAM-SHA-512"), ("SASL_PLAINTEXT", "PLAIN"),
                                                 ("SSL", None)])
def test_security_settings_reach_the_alerts_clients(monkeypatch, tmp_path, protocol, mechanism):
    security_env(monkeypatch, tmp_path, protocol, mechanism)
    monkeypatch.setenv("HPAD_ALERTS_ALERTMANAGER_URL", "http://alertmanager:9093")
    settings = AlertsSettings()
    for kind, kwargs in (("consumer", alerts_consumer_kwargs(settings)), ("producer", producer_kwargs(settings))):
        make = kafka_io.make_consumer if kind == "consumer" else kafka_io.make_producer
        client = make({**kwargs, "api_version": (3, 9)})  # pinned version: no connection needed to build it
        try:
            assert isinstance(client, KafkaConsumer if kind == "consumer" else KafkaProducer)
            got = {key: client.config[key] for key in SECURITY_KEYS}
            assert got == expected_security(settings), kind
            assert got["security_protocol"] == protocol and got["sasl_mechanism"] == mechanism
        finally:
            client.close(**({"timeout": 1} if kind == "producer" else {}))


def test_alerts_settings_and_help_never_show_secrets(monkeypatch, capsys):
    from hpad.cli import main

    secret_env(monkeypatch)
    monkeypatch.setenv("HPAD_ALERTS_WEBHOOK_URL", "https://hooks.example/hpad")
    monkeypatch.setenv("HPAD_ALERTS_WEBHOOK_SECRET", HMAC_KEY)
    settings = AlertsSettings()
    assert settings.alerts_webhook_secret.get_secret_value() == HMAC_KEY  # the value is there ...
    for text in (repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump())):
        assert_no_secret(text, "AlertsSettings dump")  # ... but never shown
        assert HMAC_KEY not in text
    with pytest.raises(SystemExit):
        main(["alerts", "--help"])
    out = capsys.readouterr()
    assert "--alerts-webhook-url" in out.out and "--alerts-webhook-secret" not in out.out  # secrets: env only
    assert_no_secret(out.out + out.err, "alerts --help")
    monkeypatch.setenv("HPAD_ALERTS_MIN_ANOMALOUS", "99")  # invalid: k > n
    assert main(["alerts"]) == 2
    out = capsys.readouterr()
    assert "HPAD_ALERTS_MIN_ANOMALOUS" in out.err and HMAC_KEY not in out.out + out.err
    assert_no_secret(out.out + out.err, "invalid alerts settings error")
