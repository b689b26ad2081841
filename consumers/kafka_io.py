"""kafka-python plumbing shared by the worker, the camera and the demo: clients, checked sends, retries.

`connect` builds a client and retries transient failures (broker not up yet) with capped exponential
backoff until it works or the caller asks to stop. A client that cannot bootstrap because of its security
settings (untrusted or expired certificate, refused client certificate, wrong SASL credentials, plaintext on a
TLS listener) is not retried: `make_consumer` / `make_producer` probe the first bootstrap server
(`diagnose_security`) and raise a `ConfigError` naming the ``HPAD_*`` setting to fix (the command exits 2). `send` never raises for a per-record problem: it
returns a `Delivery` whose outcome is known after the producer is flushed (a future, or the error
``KafkaProducer.send`` raised at once, e.g. MessageSizeTooLargeError), so callers check every record.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from kafka import KafkaConsumer, KafkaProducer
from kafka import errors as Errors
from kafka.errors import KafkaError, KafkaTimeoutError

from hpad.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


class Backoff:
    """Capped exponential backoff: first, 2x first, 4x first... up to ``cap`` seconds, each delay times
    1 +/- ``jitter`` (uniform; 0 = exact delays) so that many clients do not retry in step."""

    def __init__(self, first_s: float, cap_s: float, jitter: float = 0.0, rng: random.Random | None = None) -> None:
        self.first_s, self.cap_s, self.jitter = first_s, cap_s, jitter
        self.rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.cap_s, self.first_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        if not self.jitter:
            return delay
        return max(0.0, delay * (1 + self.jitter * self.rng.uniform(-1.0, 1.0)))

    def reset(self) -> None:
        self.attempt = 0


def is_retriable(exc: BaseException) -> bool:
    """Transient Kafka failures (timeouts, leader moves, broker down) are worth retrying; others are not."""
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


def connect(factory: Callable[[], T], what: str, stop: threading.Event, backoff: Backoff) -> T | None:
    """Call ``factory`` until it succeeds; None when ``stop`` is set first. Non-retriable errors raise."""
    while not stop.is_set():
        try:
            client = factory()
        except KafkaError as exc:
            if not is_retriable(exc):
                raise
            delay = backoff.next_delay()
            log.warning("cannot create Kafka %s yet (%s); retrying in %.1f s", what, exc, delay)
            stop.wait(delay)
            continue
        backoff.reset()
        return client
    return None


def make_consumer(kwargs: dict) -> KafkaConsumer:
    with security_diagnosed(kwargs):
        return KafkaConsumer(**kwargs)


def make_producer(kwargs: dict) -> KafkaProducer:
    with security_diagnosed(kwargs):
        return KafkaProducer(**kwargs)


# a consumer group's join errors that retrying cannot fix (kafka-python raises them from poll)
FATAL_GROUP_ERRORS: tuple[type[KafkaError], ...] = (
    Errors.InvalidSessionTimeoutError, Errors.InvalidGroupIdError, Errors.GroupAuthorizationFailedError,
    Errors.TopicAuthorizationFailedError)


def group_error_message(exc: KafkaError, group_id: str, session_timeout_ms: int, prefix: str = "HPAD_") -> str:
    """What to change, for one of `FATAL_GROUP_ERRORS` (the command exits 2 with it)."""
    if isinstance(exc, Errors.InvalidSessionTimeoutError):
        return (f"the broker refused the group session timeout {session_timeout_ms} ms: it is outside the "
                f"broker's group.min.session.timeout.ms .. group.max.session.timeout.ms (defaults 6000 .. "
                f"1800000); set {prefix}SESSION_TIMEOUT_MS inside that range")
    if isinstance(exc, Errors.InvalidGroupIdError):
        return f"the broker refused the consumer group id {group_id!r}; set {prefix}GROUP_ID"
    return (f"the broker refused access ({type(exc).__name__}: {exc}); grant the client's principal READ on "
            f"the group {group_id!r} and its topics (ACLs), or use another principal")


class MetadataWatch:
    """Keeps a group member that owns nothing from waiting minutes for its topic's metadata.

    kafka-python's group leader assigns partitions from its metadata cache. When a join races the first
    metadata fetch of a topic (created a moment before, or a metadata response that answered a request sent
    before ``subscribe`` and so clears the refresh that the assignment asked for), the leader assigns nothing
    and rejoins only once a later refresh shows the partitions: by default ``metadata_max_age_ms`` (5 minutes)
    later. `check`, called from the poll loop, asks for a refresh (at most every ``interval_s``) while the
    member owns no partition and its cache has none for a subscribed topic; kafka-python's coordinator then
    sees its metadata snapshot change and rejoins. That does not always happen (seen with kafka-python 3.0.12
    on Apache Kafka: the partitions arrived, the member stayed without them), so when a topic this member saw
    missing shows up while it still owns nothing, the watch also asks the coordinator to rejoin, once per
    appearance. A member left without partitions in an over-provisioned group (its cache knew the partitions
    all along) costs nothing.
    """

    def __init__(self, consumer: KafkaConsumer, topics: list[str], interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.consumer, self.topics, self.interval_s, self.clock = consumer, list(topics), interval_s, clock
        self.requests = 0  # metadata refreshes asked for so far
        self.rejoins = 0  # rebalances asked for because a missing topic appeared
        self._last: float | None = None
        self._seen_missing = False

    def missing(self) -> list[str]:
        """Subscribed topics whose partitions kafka-python's metadata cache does not know (no network)."""
        cluster = self.consumer._client.cluster  # kafka-python's ClusterMetadata: read-only use
        return [topic for topic in self.topics if not cluster.partitions_for_topic(topic)]

    def check(self) -> bool:
        """Ask for a metadata refresh when this member owns nothing for want of metadata; True if it asked."""
        if self.consumer.assignment():
            self._last, self._seen_missing = None, False
            return False
        missing = self.missing()
        now = self.clock()
        if not missing and self._seen_missing:  # the metadata came, the partitions did not: rebalance
            self._seen_missing = False
            self.rejoins += 1
            log.info("partition metadata for %s arrived while this member owns nothing; asking the group to "
                     "rebalance", ", ".join(self.topics))
            self.consumer._coordinator.request_rejoin()  # kafka-python's coordinator: sets its rejoin flag
            return False
        self._seen_missing = self._seen_missing or bool(missing)
        if not missing or (self._last is not None and now - self._last < self.interval_s):
            return False
        if self._last is None:
            log.info("no partitions assigned and no partition metadata yet for %s; refreshing metadata "
                     "every %.1f s until the group rebalances with them", ", ".join(missing), self.interval_s)
        self._last = now
        self.requests += 1
        self.consumer._client.cluster.request_update()
        return True


# ------------------------------------------------------------------------------------------ security diagnosis

_TLS_ALERT_HINTS = ("ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_UNKNOWN", "ALERT_CERTIFICATE_EXPIRED",
                    "ALERT_CERTIFICATE_REQUIRED", "ALERT_UNKNOWN_CA", "ALERT_HANDSHAKE_FAILURE")


@contextlib.contextmanager
def security_diagnosed(kwargs: dict) -> Iterator[None]:
    """Around building a client: a bootstrap failure that `diagnose_security` explains becomes a ConfigError."""
    try:
        yield
    except KafkaTimeoutError as exc:  # "Unable to bootstrap from ..."
        problem = diagnose_security(kwargs)
        if problem is not None:
            raise ConfigError(f"cannot connect to Kafka at {_first_server(kwargs)}: {problem}") from exc
        raise


def _first_server(kwargs: dict) -> str:
    servers = kwargs.get("bootstrap_servers") or ["127.0.0.1:9092"]
    return (servers.split(",") if isinstance(servers, str) else list(servers))[0].strip()


def _api_versions_request() -> bytes:
    """A Kafka ApiVersions v0 request (the first thing every client sends), length-prefixed."""
    client = b"hpad-probe"
    body = struct.pack(">hhih", 18, 0, 1, len(client)) + client
    return struct.pack(">i", len(body)) + body


def _answers_kafka(sock: socket.socket) -> bool:
    """Send ApiVersions; True when its response comes back (length, correlation id 1), False when the broker
    closes the connection or answers something else (a TLS alert)."""
    sock.sendall(_api_versions_request())
    head = b""
    try:
        while len(head) < 8:
            chunk = sock.recv(8 - len(head))
            if not chunk:
                return False
            head += chunk
    except ConnectionResetError:
        return False
    return struct.unpack(">i", head[4:8])[0] == 1


def _tls_context(kwargs: dict, verify: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=kwargs.get("ssl_cafile"))
    if not verify:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    else:
        context.check_hostname = bool(kwargs.get("ssl_check_hostname", True))
    if kwargs.get("ssl_certfile"):
        context.load_cert_chain(kwargs["ssl_certfile"], kwargs.get("ssl_keyfile"), kwargs.get("ssl_password"))
    return context


def diagnose_security(kwargs: dict, timeout_s: float = 5.0) -> str | None:
    """Why a client with these kafka-python ``kwargs`` cannot bootstrap, when it is a security setting.

    One probe of the first bootstrap server: TCP, the TLS handshake with the client's own TLS settings (for SSL
    and SASL_SSL), then an ApiVersions request. Returns a message naming the setting to fix, or None when the
    cause is not (provably) a setting: the broker is not reachable, or everything worked (then retrying is
    right). Without TLS, a broker that closes the connection on a Kafka request but completes a TLS handshake
    is a TLS listener. With SASL, a broker that answers Kafka requests over the same transport but whose
    connections still fail refused the SASL credentials. Never includes a secret."""
    server = _first_server(kwargs)
    host, _, port_text = server.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    protocol = kwargs.get("security_protocol") or "PLAINTEXT"
    tls = protocol in ("SSL", "SASL_SSL")
    sasl = protocol.startswith("SASL")
    try:
        raw = socket.create_connection((host, int(port_text)), timeout=timeout_s)
    except (OSError, ValueError):
        return None  # not up (yet): retrying is right
    with raw:
        if not tls:
            try:
                if _answers_kafka(raw):
                    return (f"the broker answers Kafka requests but refused the SASL {kwargs.get('sasl_mechanism')} "
                            "login: check HPAD_SASL_PLAIN_USERNAME, HPAD_SASL_PLAIN_PASSWORD and "
                            "HPAD_SASL_MECHANISM") if sasl else None
            except OSError:
                pass
            return _tls_listener_hint(host, int(port_text), timeout_s, protocol)
        try:
            context = _tls_context(kwargs)
        except (ssl.SSLError, OSError) as exc:
            return (f"the client certificate or key cannot be loaded ({type(exc).__name__}: {exc.args[-1]}): check "
                    "HPAD_SSL_CERTFILE, HPAD_SSL_KEYFILE and HPAD_SSL_PASSWORD")
        try:
            with context.wrap_socket(raw, server_hostname=host) as conn:
                answered = _answers_kafka(conn)
        except ssl.SSLCertVerificationError as exc:
            if exc.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
                return (f"the broker's TLS certificate has expired ({exc.verify_message}): renew the broker's "
                        "certificate")
            if exc.verify_code in (62, 64):  # host name / IP address mismatch
                return (f"the broker's TLS certificate does not name {host} ({exc.verify_message}): use a "
                        "name it lists in HPAD_BOOTSTRAP_SERVERS (or HPAD_SSL_CHECK_HOSTNAME=false)")
            return (f"the broker's TLS certificate is not trusted ({exc.verify_message}): HPAD_SSL_CAFILE "
                    f"({kwargs.get('ssl_cafile') or 'the system CAs'}) must hold the CA that signed it")
        except ssl.SSLError as exc:
            reason = str(exc.reason or exc)
            if any(hint in reason for hint in _TLS_ALERT_HINTS):
                return (f"the broker refused the TLS handshake ({reason}): it requires a client certificate it "
                        "trusts and that is valid: check HPAD_SSL_CERTFILE and HPAD_SSL_KEYFILE")
            return f"TLS failed ({reason}): check HPAD_SECURITY_PROTOCOL and HPAD_SSL_CAFILE"
        except OSError:
            return None
    if answered and sasl:
        return (f"TLS to the broker works but it refused the SASL {kwargs.get('sasl_mechanism')} login (or the "
                "listener offers no SASL): check HPAD_SASL_PLAIN_USERNAME, HPAD_SASL_PLAIN_PASSWORD and "
                "HPAD_SASL_MECHANISM")
    return None


def _tls_listener_hint(host: str, port: int, timeout_s: float, protocol: str) -> str | None:
    """A plaintext Kafka request was refused: is it a TLS listener? (a handshake, certificates unchecked)"""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                _tls_context({}, verify=False).wrap_socket(raw, server_hostname=host):
            pass
    except (OSError, ssl.SSLError):
        return None
    wanted = "SASL_SSL" if protocol == "SASL_PLAINTEXT" else "SSL"
    return (f"{host}:{port} is a TLS listener but HPAD_SECURITY_PROTOCOL is {protocol}: set "
            f"HPAD_SECURITY_PROTOCOL={wanted} and HPAD_SSL_CAFILE")


class UnconfirmedWriteError(KafkaError):
    """The broker acknowledged a record without an offset: the write cannot be confirmed (retriable).

    kafka-python's idempotent producer turns a DUPLICATE_SEQUENCE_NUMBER answer ("already written") into a
    success with offset -1. A broker whose producer state outlives its log says that for records it never
    stored: tansu 0.6 on s3:// storage, killed between advancing the producer sequence and writing the record
    batch (separate S3 objects), answered the producer's retry that way and four events were lost (found by
    tests/reliability). Re-sending gets new sequence numbers, so the record is written; if it really was
    written before, it is there twice, which at-least-once allows (readers deduplicate by frame_id).

    Kept for Apache Kafka, where it never fires (tests/reliability/test_exactly_once_kafka.py): the broker
    keeps the metadata of each producer's last 5 batches and answers a retried batch among them with error
    NONE and the first write's offset (a producer with at most 5 requests in flight never retries an older
    one); an older sequence is answered OUT_OF_ORDER_SEQUENCE_NUMBER, not DUPLICATE_SEQUENCE_NUMBER, and
    nothing is appended. So on Apache Kafka an acknowledgement always carries its offset and nothing is
    re-sent, while on a broker that answers DUPLICATE_SEQUENCE_NUMBER for a write it did not keep (tansu on
    s3://) the re-send is what saves the record. Under exactly-once the re-send is a retry of the whole
    transaction (aborted first), so it cannot duplicate anything on either broker.
    """

    retriable = True


@dataclass
class Delivery:
    """One record handed to the producer: its future, or the error raised when it was handed over."""

    future: object | None
    error: BaseException | None = None

    def outcome(self, wait_s: float = 0.0, require_offset: bool = False) -> tuple[bool, BaseException | None]:
        """(acknowledged, error). Not acknowledged and no error means still pending after ``wait_s``.
        With ``require_offset`` an acknowledgement without an offset is returned as an `UnconfirmedWriteError`."""
        if self.error is not None:
            return False, self.error
        future = self.future
        deadline = time.monotonic() + wait_s
        while not future.is_done and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.001)
        if not future.is_done:  # type: ignore[union-attr]
            return False, None
        if future.failed():  # type: ignore[union-attr]
            return False, future.exception  # type: ignore[union-attr]
        offset = getattr(future.value, "offset", None)  # type: ignore[union-attr]
        if require_offset and (offset is None or offset < 0):
            return False, UnconfirmedWriteError("acknowledged as a duplicate without an offset; the write is unconfirmed")
        return True, None


def send(producer: KafkaProducer, topic: str, key: bytes | None, value: bytes | None,
         headers: list[tuple[str, bytes]] | None = None) -> Delivery:
    """Hand one record to the producer without raising for per-record errors."""
    try:
        return Delivery(producer.send(topic, key=key, value=value, headers=headers or []))
    except KafkaError as exc:
        return Delivery(None, exc)


def flush(producer: KafkaProducer, timeout_s: float) -> bool:
    """Flush; False (not an exception) when the timeout passed with records still pending."""
    try:
        producer.flush(timeout=timeout_s)
    except KafkaError as exc:
        if not is_retriable(exc):
            raise
        log.warning("producer flush did not finish in %.1f s: %s", timeout_s, exc)
        return False
    return True
