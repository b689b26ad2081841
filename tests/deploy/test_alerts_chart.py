"""The chart's `hpad alerts` Deployment (alerts.enabled): what it renders, how its values reach the settings,
and what it refuses. The shared checks (schemas, secure pods, every HPAD_* a settings field, the settings
accept the rendered environment) run on examples/values-alerts.yaml in tests/deploy/test_deploy.py."""

from __future__ import annotations

import json

import pytest

from tests.deploy.chart import CHART, CRD_APIS, by_kind, helm, load_values, objects, one, render, validate


@pytest.fixture(scope="module")
def alerts_objects():
    return objects(render(load_values("values-alerts.yaml"), CRD_APIS))


def test_alerts_are_off_by_default():
    assert not [o for o in objects(render({}, CRD_APIS)) if o["metadata"]["name"].endswith("-alerts")]


def test_alerts_deployment_service_and_settings(alerts_objects, monkeypatch, tmp_path):
    from consumers.alerts.settings import AlertsSettings
    from consumers.settings import load_settings

    deployment = one(alerts_objects, "Deployment", "-alerts")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["alerts"] and container["image"].endswith(":0.1.0-cpu")
    assert container["ports"] == [{"name": "metrics", "containerPort": 9402, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]  # no weights volume: no model here
    env = {e["name"]: e for e in container["env"]}
    assert env["HPAD_ALERTS_WEBHOOK_SECRET"]["valueFrom"] == {
        "secretKeyRef": {"name": "hpad-alerts-webhook", "key": "hmac-key"}}
    data = one(alerts_objects, "ConfigMap", "-alerts")["data"]
    assert not {k for k in data if "SECRET" in k or "PASSWORD" in k}
    assert data["HPAD_EXACTLY_ONCE"] == "true"  # follows scorer.config.exactly_once: read_committed
    assert data["HPAD_EVENTS_TOPIC"] == one(alerts_objects, "ConfigMap", "-scorer")["data"]["HPAD_EVENTS_TOPIC"]
    service = one(alerts_objects, "Service", "-alerts")
    assert service["spec"]["ports"][0]["name"] == "metrics"  # scraped by the ServiceMonitor's `metrics` endpoint
    monitor = one(alerts_objects, "ServiceMonitor", "")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    notes = render(load_values("values-alerts.yaml"), CRD_APIS)["hpad/templates/NOTES.txt"]
    assert "3 anomalous of the last 10 frames" in notes and "hpad.alerts.dlq" in notes
    topics = json.loads(one(alerts_objects, "ConfigMap", "-topics")["data"]["topics.json"])
    assert "hpad.alerts.dlq" in [t["name"] for t in topics]
    for obj in alerts_objects:
        validate(obj)

    monkeypatch.chdir(tmp_path)
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HPAD_ALERTS_WEBHOOK_SECRET", "k")
    settings = load_settings(AlertsSettings)
    assert settings.rule().window == 10 and settings.alerts_resend_s == 30
    assert settings.alerts_alertmanager_url == "http://alertmanager-operated.monitoring.svc:9093"


def test_free_form_alerts_config_keys_are_settings_the_chart_does_not_set():
    from consumers.alerts.settings import AlertsSettings
    from consumers.settings import cli_fields

    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["properties"]["alerts"]["properties"]["config"]["propertyNames"]["enum"])
    values = load_values("values-alerts.yaml")
    values["alerts"]["config"] = {}
    data = one(objects(render(values, CRD_APIS)), "ConfigMap", "-alerts")["data"]
    managed = {n.removeprefix("HPAD_").lower() for n in data}
    assert allowed <= set(cli_fields(AlertsSettings)) and not allowed & managed


@pytest.mark.parametrize("values,message", [
    ({"alerts": {"enabled": True}}, "needs alerts.alertmanagerUrl and/or alerts.webhook.url"),
    ({"alerts": {"enabled": True, "webhook": {"url": "https://x"}}}, "needs alerts.webhook.secretName"),
    ({"alerts": {"enabled": True, "alertmanagerUrl": "http://am:9093", "rule": {"window": 3, "minAnomalous": 4}}},
     "alerts.rule.minAnomalous (4) exceeds alerts.rule.window (3)"),
])
def test_chart_refuses_alerts_without_a_sink_or_with_an_impossible_rule(values, message):
    with pytest.raises(helm().HelmRenderError) as caught:
        render(values, CRD_APIS)
    assert message in str(caught.value)


@pytest.mark.parametrize("values,message", [
    ({"alerts": {"alertmanagerUrl": "am:9093"}}, "/alerts/alertmanagerUrl"),
    ({"alerts": {"config": {"alerts_window": 5}}}, "alerts_window"),  # the chart owns it: alerts.rule.window
    ({"alerts": {"config": {"alerts_webhook_secret": "x"}}}, "alerts_webhook_secret"),  # secrets from Secrets
    ({"alerts": {"rule": {"window": 0}}}, "/alerts/rule/window"),
])
def test_values_schema_rejects_bad_alerts_values(values, message):
    with pytest.raises(helm().HelmValuesError) as caught:
        render(values)
    assert message in str(caught.value)


def test_alerts_dead_letter_topic_only_with_alerts():
    full = {"topics": {"strimzi": {"enabled": True}}}
    plain = {t["spec"]["topicName"] for t in by_kind(objects(render(full, CRD_APIS)), "KafkaTopic")}
    assert "hpad.alerts.dlq" not in plain
    on = {**full, "alerts": {"enabled": True, "alertmanagerUrl": "http://am:9093"}}
    assert "hpad.alerts.dlq" in {t["spec"]["topicName"] for t in by_kind(objects(render(on, CRD_APIS)), "KafkaTopic")}
