"""Security end to end on Apache Kafka (1 KRaft node): TLS, mutual TLS and SASL_SSL with SCRAM-SHA-512.

One broker per module with four listeners: PLAINTEXT (the launcher's own: admin, topic setup, reading results),
TLS (SSL), MTLS (SSL with ``ssl.client.auth=required``) and SCRAM (SASL_SSL, SCRAM-SHA-512). The CA, the broker
certificate (SAN 127.0.0.1 and localhost, PEM keystore: no JKS) and the client certificates are made here with
`cryptography`; the SCRAM user is created through the broker's admin API (AlterUserScramCredentials, kafka-python's
``alter_user_scram_credentials``). Over each secure listener ``hpad camera`` publishes frames, ``hpad serve``
scores them (N in, N out), ``hpad prompts list`` reads the registry and ``hpad tune`` connects and is stopped with
SIGTERM. Misconfigured clients (wrong password, a CA that did not sign the broker, an expired client certificate,
plaintext on the TLS port) exit 2 within the request timeout with a message naming the setting, commit nothing,
and no secret reaches their output.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from consumers.apache_kafka import ApacheKafka
from tests.consumers.kafka_helpers import committed_offsets

on_kafka = [pytest.mark.apache_kafka, pytest.mark.slow]

USER, PASSWORD, WRONG_PASSWORD, KEY_PASSWORD = "hpad-svc", "scram-S3CRET-pw", "wrong-S3CRET-pw", "key-S3CRET-pass"
SECRETS = (PASSWORD, WRONG_PASSWORD, KEY_PASSWORD)
REQUEST_TIMEOUT_MS = 4000
LISTENERS = {"TLS": "SSL", "MTLS": "SSL", "SCRAM": "SASL_SSL"}


# ------------------------------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    broker: Path  # key + certificate chain, PEM (Kafka's PEM keystore)
    client_cert: Path
    client_key: Path  # encrypted with KEY_PASSWORD
    expired_cert: Path
    expired_key: Path
    expired_broker: Path  # key + an expired server certificate (SAN 127.0.0.1)


def make_pki(folder: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(ca_key, ca_cert, cn: str, server: bool, expired: bool = False):
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = (now - dt.timedelta(days=2), now - dt.timedelta(days=1)) if expired else \
            (now - dt.timedelta(hours=1), now + dt.timedelta(days=1))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    def cert_pem(cert) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(key, password: str | None = None) -> bytes:
        encryption = serialization.BestAvailableEncryption(password.encode()) if password else \
            serialization.NoEncryption()
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = ca("hpad test CA")
    _, other_cert = ca("some other CA")
    broker_key, broker_cert = leaf(ca_key, ca_cert, "broker", server=True)
    client_key, client_cert = leaf(ca_key, ca_cert, "hpad-client", server=False)
    old_key, old_cert = leaf(ca_key, ca_cert, "hpad-client", server=False, expired=True)
    old_broker_key, old_broker_cert = leaf(ca_key, ca_cert, "broker", server=True, expired=True)
    pki = Pki(folder / "ca.pem", folder / "other-ca.pem", folder / "broker.pem", folder / "client.pem",
              folder / "client.key", folder / "expired.pem", folder / "expired.key", folder / "expired-broker.pem")
    pki.expired_broker.write_bytes(key_pem(old_broker_key) + cert_pem(old_broker_cert))
    pki.ca.write_bytes(cert_pem(ca_cert))
    pki.other_ca.write_bytes(cert_pem(other_cert))
    pki.broker.write_bytes(key_pem(broker_key) + cert_pem(broker_cert))
    pki.client_cert.write_bytes(cert_pem(client_cert))
    pki.client_key.write_bytes(key_pem(client_key, KEY_PASSWORD))
    pki.expired_cert.write_bytes(cert_pem(old_cert))
    pki.expired_key.write_bytes(key_pem(old_key))
    return pki


# ------------------------------------------------------------------------------------------ the broker


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def kafka(pki, tmp_path_factory):
    from kafka.admin import UserScramCredentialUpsertion

    config = {
        "ssl.keystore.type": "PEM", "ssl.keystore.location": str(pki.broker),
        "ssl.truststore.type": "PEM", "ssl.truststore.location": str(pki.ca),
        "listener.name.mtls.ssl.client.auth": "required",
        "listener.name.scram.sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.scram.scram-sha-512.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
    }
    with ApacheKafka(nodes=1, root=tmp_path_factory.mktemp("kafka"), config=config, listeners=LISTENERS) as cluster:
        with cluster.admin() as admin:  # KIP-554: SCRAM users through the admin API, stored in the metadata log
            result = admin.alter_user_scram_credentials(
                [UserScramCredentialUpsertion(USER, "SCRAM-SHA-512", PASSWORD)])
        assert result == {USER: None}, result
        yield cluster


def mode_env(kafka: ApacheKafka, pki: Pki, mode: str) -> dict[str, str]:
    """HPAD_* connection settings of a client in ``mode`` (the working ones and the broken ones)."""
    tls = {"HPAD_SECURITY_PROTOCOL": "SSL", "HPAD_SSL_CAFILE": str(pki.ca)}
    mtls = {**tls, "HPAD_SSL_CERTFILE": str(pki.client_cert), "HPAD_SSL_KEYFILE": str(pki.client_key),
            "HPAD_SSL_PASSWORD": KEY_PASSWORD}
    scram = {**tls, "HPAD_SECURITY_PROTOCOL": "SASL_SSL", "HPAD_SASL_MECHANISM": "SCRAM-SHA-512",
             "HPAD_SASL_PLAIN_USERNAME": USER, "HPAD_SASL_PLAIN_PASSWORD": PASSWORD}
    listener, env = {
        "tls": ("TLS", tls),
        "mtls": ("MTLS", mtls),
        "scram-sha-512": ("SCRAM", scram),
        "wrong-password": ("SCRAM", {**scram, "HPAD_SASL_PLAIN_PASSWORD": WRONG_PASSWORD}),
        "unknown-ca": ("TLS", {**tls, "HPAD_SSL_CAFILE": str(pki.other_ca)}),
        "expired-client-cert": ("MTLS", {**tls, "HPAD_SSL_CERTFILE": str(pki.expired_cert),
                                         "HPAD_SSL_KEYFILE": str(pki.expired_key)}),
        "plaintext-on-tls": ("TLS", {"HPAD_SECURITY_PROTOCOL": "PLAINTEXT"}),
    }[mode]
    return {"HPAD_BOOTSTRAP_SERVERS": kafka.bootstrap_for(listener), "HPAD_REQUEST_TIMEOUT_MS": str(REQUEST_TIMEOUT_MS),
            **env}


# ------------------------------------------------------------------------------------------ processes


@dataclass
class Topics:
    frames: str
    events: str
    dlq: str
    normals: str
    prompts: str
    group: str


def new_topics(kafka: ApacheKafka) -> Topics:
    tag = uuid.uuid4().hex[:8]
    topics = Topics(f"frames-{tag}", f"events-{tag}", f"dlq-{tag}", f"normals-{tag}", f"prompts-{tag}", f"g-{tag}")
    for name in (topics.frames, topics.events, topics.dlq, topics.normals):
        kafka.create_topic(name, partitions=1)
    kafka.create_topic(topics.prompts, partitions=1, config={"cleanup.policy": "compact"})
    return topics


def service_env(security: dict[str, str], topics: Topics, folder: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HPAD_")}
    return {
        **base, "HF_HUB_OFFLINE": "1", **security,
        "HPAD_INPUT_TOPIC": topics.frames, "HPAD_EVENTS_TOPIC": topics.events, "HPAD_DLQ_TOPIC": topics.dlq,
        "HPAD_NORMALS_TOPIC": topics.normals, "HPAD_PROMPTS_TOPIC": topics.prompts, "HPAD_GROUP_ID": topics.group,
        "HPAD_MODEL": "hpad-tiny", "HPAD_RANDOM_INIT": "true", "HPAD_DEVICE": "cpu", "HPAD_TORCH_THREADS": "1",
        "HPAD_CATEGORIES": "widget", "HPAD_METRICS_PORT": "-1", "HPAD_SESSION_TIMEOUT_MS": "6000",
        "HPAD_HEARTBEAT_INTERVAL_MS": "1000", "HPAD_MAX_BATCH_SIZE": "4", "HPAD_RESERVOIR_DIR": str(folder / "reservoir"),
    }


def hpad_command(command: str, folder: Path) -> list[str]:
    args = {
        "serve": ["serve", "--max-frames", "3", "--timeout", "60"],
        "camera": ["camera", "--dir", str(folder / "images"), "--frames", "3", "--rate", "0", "--category", "widget"],
        "prompts": ["prompts", "list"],
        "tune": ["tune"],
    }[command]
    return [sys.executable, "-m", "hpad.cli", *args]


def write_images(folder: Path, count: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(count):
        picture = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        assert cv2.imwrite(str(folder / f"frame-{i}.png"), picture)


def run(command: str, env: dict[str, str], folder: Path, timeout_s: float = 120) -> tuple[int, str, float]:
    began = time.monotonic()
    done = subprocess.run(hpad_command(command, folder), env=env, cwd=folder, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - began


def assert_no_secret(text: str, where: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"secret {leaked} in the output of {where}:\n{text[-3000:]}"


def read_records(kafka: ApacheKafka, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        records: list = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=300)
            records += [r for rs in batch.values() for r in rs]
            if len(records) >= expected and not batch:
                break
        return records
    finally:
        consumer.close()


def committed(kafka: ApacheKafka, group: str, topic: str) -> dict[int, int | None]:
    return committed_offsets(kafka, group, topic)  # over the PLAINTEXT listener


# ------------------------------------------------------------------------------------------ it works


@pytest.mark.parametrize("mode", ["tls", "mtls", "scram-sha-512"])
@on_kafka[0]
@on_kafka[1]
def test_every_process_streams_over_the_secure_listener(kafka, pki, mode, tmp_path):
    """Invariant: over TLS, mutual TLS and SASL_SSL/SCRAM-SHA-512 the camera publishes 3 frames, the worker
    scores all 3 (3 events, offsets committed), ``hpad prompts list`` reads the registry, and the tuner connects
    to the normals topic and stops cleanly on SIGTERM; no secret in any output."""
    topics = new_topics(kafka)
    write_images(tmp_path / "images")
    env = service_env(mode_env(kafka, pki, mode), topics, tmp_path)

    code, out, _ = run("camera", env, tmp_path)
    assert code == 0, out[-3000:]
    assert_no_secret(out, f"camera over {mode}")
    assert len(read_records(kafka, topics.frames, 3)) == 3

    code, out, _ = run("serve", env, tmp_path)
    assert code == 0, out[-3000:]
    assert_no_secret(out, f"serve over {mode}")
    assert len(read_records(kafka, topics.events, 3)) == 3, out[-3000:]
    assert committed(kafka, topics.group, topics.frames) == {0: 3}

    code, out, _ = run("prompts", env, tmp_path)
    assert code == 0 and "no prompt versions" in out, out[-3000:]
    assert_no_secret(out, f"prompts over {mode}")

    log_path = tmp_path / "tune.log"
    with log_path.open("w") as log:
        tuner = subprocess.Popen(hpad_command("tune", tmp_path), env=env, cwd=tmp_path, stdout=log,
                                 stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while "tuner consuming" not in log_path.read_text() and tuner.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "tuner consuming" in log_path.read_text(), log_path.read_text()[-3000:]
        tuner.send_signal(signal.SIGTERM)
        assert tuner.wait(timeout=30) == 0, log_path.read_text()[-3000:]
    finally:
        if tuner.poll() is None:
            tuner.kill()
            tuner.wait()
    assert_no_secret(log_path.read_text(), f"tune over {mode}")


# ------------------------------------------------------------------------------------------ it fails, clearly

FAILURES = {  # mode -> the setting the message must name
    "wrong-password": "HPAD_SASL_PLAIN_PASSWORD",
    "unknown-ca": "HPAD_SSL_CAFILE",
    "expired-client-cert": "HPAD_SSL_CERTFILE",
    "plaintext-on-tls": "HPAD_SECURITY_PROTOCOL",
}


@pytest.mark.parametrize("mode", list(FAILURES))
@on_kafka[0]
@on_kafka[1]
def test_misconfigured_security_exits_2_naming_the_setting(kafka, pki, mode, tmp_path):
    """Invariant: every process (serve, camera, prompts list, tune, started together) whose security settings
    cannot work (wrong SCRAM password, a CA that did not sign the broker, an expired client certificate on the
    mTLS listener, plaintext on the TLS listener) exits 2 within the request timeout (plus start-up) with a
    message naming the setting, never retries forever, commits and publishes nothing, and prints no secret."""
    topics = new_topics(kafka)
    write_images(tmp_path / "images")
    code, out, _ = run("camera", service_env(mode_env(kafka, pki, "tls"), topics, tmp_path), tmp_path)
    assert code == 0, out[-3000:]  # 3 frames wait for the worker: none may be scored or committed
    env = service_env(mode_env(kafka, pki, mode), topics, tmp_path)
    began = time.monotonic()
    processes, logs, exited = {}, {}, {}
    for command in ("serve", "camera", "prompts", "tune"):
        folder = tmp_path / command
        folder.mkdir()
        (folder / "images").symlink_to(tmp_path / "images")
        logs[command] = folder / "output.log"
        with logs[command].open("w") as log:
            processes[command] = subprocess.Popen(hpad_command(command, folder), env=env, cwd=folder,
                                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(exited) < len(processes) and time.monotonic() < deadline:
            for command, process in processes.items():
                if command not in exited and process.poll() is not None:
                    exited[command] = time.monotonic() - began
            time.sleep(0.1)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    results = {command: (process.returncode, logs[command].read_text(), exited.get(command, float("inf")))
               for command, process in processes.items()}
    for command, (code, out, took) in results.items():
        last = out.strip().splitlines()[-1] if out.strip() else ""
        print(f"{command} {mode}: exit {code} after {took:.1f} s: {last}")
        assert code == 2, f"{command}: {out[-3000:]}"
        assert FAILURES[mode] in last, f"{command}: {out[-3000:]}"
        assert_no_secret(out, f"{command} with {mode}")
        assert took < 2 * REQUEST_TIMEOUT_MS / 1000 + 30, f"{command} took {took:.1f} s"
    assert read_records(kafka, topics.events, 0, timeout_s=2) == []
    assert read_records(kafka, topics.normals, 0, timeout_s=1) == []
    assert read_records(kafka, topics.prompts, 0, timeout_s=1) == []
    assert len(read_records(kafka, topics.frames, 3, timeout_s=2)) == 3  # the camera added nothing
    assert committed(kafka, topics.group, topics.frames) == {0: None}


# ------------------------------------------------------------------------------------------ the diagnosis alone


def test_diagnosis_names_an_expired_broker_certificate_and_leaves_a_down_broker_to_retries(pki):
    """Invariant: `kafka_io.diagnose_security` (what turns a bootstrap timeout into exit 2) says that the broker's
    certificate has expired (a plain TLS server with an expired certificate stands in for the broker: the
    client's check happens in its handshake either way), and returns None for a port nobody listens on (a
    broker that is not up yet is retried, never a configuration error)."""
    import socket
    import ssl
    import threading

    from consumers import kafka_io
    from consumers.broker import free_port

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.expired_broker)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_once() -> None:
        conn, _ = listener.accept()
        with conn, contextlib.suppress(OSError):
            server.wrap_socket(conn, server_side=True)

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    try:
        problem = kafka_io.diagnose_security({"bootstrap_servers": [f"127.0.0.1:{port}"], "security_protocol": "SSL",
                                              "ssl_cafile": str(pki.ca)}, timeout_s=5)
    finally:
        thread.join(timeout=5)
        listener.close()
    assert problem is not None and "certificate has expired" in problem, problem
    assert kafka_io.diagnose_security({"bootstrap_servers": [f"127.0.0.1:{free_port()}"],
                                       "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512"}) is None
