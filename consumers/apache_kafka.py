"""Apache Kafka in KRaft mode (combined broker+controller nodes) for the tests and the demo.

``with ApacheKafka(nodes=1 | 3) as kafka:`` formats one storage folder per node, writes a ``server.properties``
per node into a temporary folder, starts ``java -cp CLASSPATH kafka.Kafka server.properties`` per node (each in
its own process group, bound to 127.0.0.1 on free ports), waits until every node is registered with the cluster,
and on exit, also on error, terminates each node's process group (SIGTERM, then SIGKILL after a timeout). The
interface follows `consumers.broker.EmbeddedBroker` where it matters: ``.name``, ``.bootstrap``, ``.create_topic(name,
partitions, replication_factor=...)``, ``.schema_dir`` (None), ``.stop()``; ``kill(node)`` / ``start_node(node)`` for fault tests.

Unlike tansu, this broker isolates transactions (``read_committed`` consumers never see aborted records) and
replicates partitions (``min.insync.replicas`` with ``acks=all``), which is what the delivery promises need.

The jars come from Maven Central, resolved by Maven into its own cache: ``make kafka-classpath`` runs
``mvn dependency:build-classpath`` on ``deploy/kafka/pom.xml`` and writes the classpath to
``build/kafka/classpath.txt`` (``$HPAD_KAFKA_CLASSPATH_FILE`` overrides). No jar is ever committed. When java or
the classpath is missing, `KafkaLauncherError` says what is missing and how to get it.

Cluster settings are sized for a small, shared machine (2 cores): 512 MiB heap per node, serial GC, C1 only,
few threads, small internal topics, and short failure detection (a killed node is fenced after 3 s and its
replicas leave the ISRs then), so fault tests take seconds instead of the production default's half minute.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from consumers.broker import BrokerError, free_port

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
POM = REPO / "deploy" / "kafka" / "pom.xml"
CLASSPATH_FILE = REPO / "build" / "kafka" / "classpath.txt"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"  # what bin/kafka-storage.sh runs in Kafka 4.x (in kafka_2.13.jar)
JVM_OPTIONS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:+ExitOnOutOfMemoryError",
               "-Djava.awt.headless=true")

_LIVE: set[ApacheKafka] = set()
_LIVE_LOCK = threading.Lock()


class KafkaLauncherError(BrokerError):
    """Apache Kafka cannot be found (java, the classpath), started, or asked to do something."""


def classpath(path: Path | None = None) -> str:
    """The Kafka runtime classpath written by ``make kafka-classpath``; every jar on it must exist."""
    path = Path(path or os.environ.get("HPAD_KAFKA_CLASSPATH_FILE") or CLASSPATH_FILE)
    if not path.is_file():
        mvn = "" if shutil.which("mvn") else " (and mvn, which it needs, is not on PATH: install Maven 3.8+)"
        raise KafkaLauncherError(f"no Apache Kafka classpath at {path}: run `make kafka-classpath`{mvn}; it "
                                 f"resolves {POM.relative_to(REPO)} from Maven Central into Maven's cache")
    text = path.read_text().strip()
    jars = [jar for jar in text.split(os.pathsep) if jar]
    missing = [jar for jar in jars if not Path(jar).is_file()]
    if not jars or missing:
        raise KafkaLauncherError(f"the classpath in {path} lists {len(missing)} missing jars of {len(jars)} (e.g. "
                                 f"{missing[:1]}): Maven's cache changed; delete {path} and run `make kafka-classpath`")
    if not any(Path(jar).name.startswith("kafka_2.13-") for jar in jars):
        raise KafkaLauncherError(f"the classpath in {path} has no kafka_2.13 jar; run `make kafka-classpath`")
    return text


def java_binary() -> str:
    """``$JAVA_HOME/bin/java`` when set, else ``java`` on PATH (Kafka 4.x needs Java 17+)."""
    home = os.environ.get("JAVA_HOME")
    candidate = Path(home) / "bin" / "java" if home else None
    if candidate is not None and candidate.is_file():
        return str(candidate)
    found = shutil.which("java")
    if not found:
        raise KafkaLauncherError("java is not on PATH (and JAVA_HOME is unset): Apache Kafka 4.x needs Java 17+, "
                                 "e.g. apt-get install openjdk-17-jre-headless")
    return found


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, base64url without padding (what ``kafka-storage random-uuid`` prints).

    Like Kafka's ``Uuid.randomUuid``, never one starting with ``-``: the storage tool would read it as an option.
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class KafkaNode:
    """One combined broker+controller JVM of an `ApacheKafka` cluster."""

    def __init__(self, node_id: int, folder: Path, broker_port: int, controller_port: int,
                 listener_ports: dict[str, int] | None = None) -> None:
        self.node_id = node_id
        self.folder = folder
        self.broker_port = broker_port
        self.controller_port = controller_port
        self.listener_ports = dict(listener_ports or {})  # extra listener name -> port
        self.process: subprocess.Popen[bytes] | None = None
        self._out = None

    @property
    def config_path(self) -> Path:
        return self.folder / "server.properties"

    @property
    def log_path(self) -> Path:
        """Kafka's own log (log4j2); the JVM's stdout/stderr go to ``stdout.log`` beside it."""
        return self.folder / "server.log"

    @property
    def stdout_path(self) -> Path:
        return self.folder / "stdout.log"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class ApacheKafka:
    """A KRaft Apache Kafka cluster of ``nodes`` combined broker+controller JVMs on 127.0.0.1.

    A context manager that always stops every node's process group. ``root`` (default: a new temporary folder,
    removed at `stop` unless ``keep_files``; ``keep_data=False`` removes only the data) holds per node ``node-N/server.properties``, ``node-N/data`` (the
    log dir), ``node-N/server.log`` and ``node-N/stdout.log``. Replication defaults: 1 node -> every replication
    factor and min ISR 1; 3 nodes -> replication factor 3, ``min.insync.replicas`` 2 (``min_insync_replicas``
    overrides). ``config`` adds or overrides server properties on every node.

    ``listeners`` adds client listeners beside PLAINTEXT (which stays the inter-broker and admin listener):
    name -> security protocol, e.g. ``{"MTLS": "SSL", "SCRAM": "SASL_SSL"}``; each gets a free port per node
    (`bootstrap_for`); their TLS / SASL properties go in ``config`` (``listener.name.mtls.ssl.client.auth``...).
    """

    name = "kafka"  # EmbeddedBroker is "tansu"
    schema_dir: Path | None = None  # no broker-side schema registry (tansu has one)

    def __init__(self, nodes: int = 1, root: Path | None = None, *, heap: str = "512m",
                 min_insync_replicas: int | None = None, config: dict[str, str] | None = None,
                 classpath_file: Path | None = None, start_timeout_s: float = 60.0, stop_timeout_s: float = 15.0,
                 keep_files: bool | None = None, keep_data: bool = True,
                 listeners: dict[str, str] | None = None) -> None:
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.listeners = {name.upper(): protocol for name, protocol in (listeners or {}).items()}
        if {"PLAINTEXT", "CONTROLLER"} & set(self.listeners):
            raise ValueError("PLAINTEXT and CONTROLLER are the launcher's own listeners")
        self.java = java_binary()
        self.classpath = classpath(classpath_file)
        self.nodes_count = nodes
        self.heap = heap
        self.replication_factor = min(3, nodes)
        self.min_insync_replicas = min_insync_replicas or (1 if nodes < 3 else 2)
        self.extra_config = dict(config or {})
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="hpad-kafka-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_files = (not self._own_root) if keep_files is None else keep_files
        self.keep_data = keep_data  # False: a clean stop deletes the nodes' log dirs but keeps the logs
        self.cluster_id = new_cluster_id()
        self.nodes = [KafkaNode(i, self.root / f"node-{i}", free_port(), free_port(),
                                {name: free_port() for name in self.listeners}) for i in range(nodes)]
        self.ready_s: float | None = None  # seconds from start() to a cluster answering with every node
        self._formatted = False

    # ---- the EmbeddedBroker-like interface
    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    def bootstrap_for(self, listener: str) -> str:
        """Bootstrap servers of the extra listener ``listener`` (see ``listeners``)."""
        return ",".join(f"127.0.0.1:{node.listener_ports[listener.upper()]}" for node in self.nodes)

    @property
    def log_dir(self) -> Path:
        return self.root

    @property
    def log_path(self) -> Path:
        """The first node's Kafka log (every node has its own: ``nodes[i].log_path``)."""
        return self.nodes[0].log_path

    def __enter__(self) -> ApacheKafka:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> ApacheKafka:
        """Format (once), start every node that is not running, and wait until all answer."""
        began = time.monotonic()
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            if not self._formatted:
                self._write_configs()
                self._format()
            for node in self.nodes:
                if not node.alive():
                    self._launch(node)
            self.wait_ready(self.start_timeout_s)
        except BaseException:
            self.stop(remove=False)  # keep the logs the error points at
            raise
        self.ready_s = time.monotonic() - began
        log.info("Apache Kafka, %d node(s), on %s in %.1f s (logs in %s)", len(self.nodes), self.bootstrap,
                 self.ready_s, self.root)
        return self

    def stop(self, timeout_s: float | None = None, remove: bool | None = None) -> None:
        """SIGTERM every node's process group at once, SIGKILL what is left after ``timeout_s``; idempotent."""
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        running = [node for node in self.nodes if node.process is not None]
        for node in running:
            _signal_group(node, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for node in running:
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("Kafka node %d ignored SIGTERM for %.0f s: SIGKILL", node.node_id, timeout_s)
        for node in running:
            self._reap(node)
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if (not self.keep_files if remove is None else remove) and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        elif remove is None and not self.keep_data:
            for node in self.nodes:
                shutil.rmtree(node.folder / "data", ignore_errors=True)

    def create_topic(self, name: str, partitions: int = 3, replication_factor: int | None = None,
                     config: dict[str, str] | None = None, timeout_s: float = 30.0) -> None:
        """Create ``name`` (it must not exist) and wait until every partition has a leader."""
        from kafka.admin import NewTopic
        from kafka.errors import KafkaError

        rf = replication_factor or self.replication_factor
        topic = NewTopic(name, partitions, rf, topic_configs=dict(config or {}))
        try:
            with self.admin() as admin:
                admin.create_topics([topic], timeout_ms=int(timeout_s * 1000))
                admin.wait_for_topics([name], timeout_ms=int(timeout_s * 1000))
                # and until the metadata lists every partition with a leader: a consumer that joins its group
                # while they are missing is assigned nothing (range assignor) until its next metadata refresh
                deadline = time.monotonic() + timeout_s
                while not _has_leaders(admin, name, partitions):
                    if time.monotonic() > deadline:
                        raise KafkaLauncherError(f"topic {name}: not every partition has a leader after "
                                                 f"{timeout_s:.0f} s")
                    time.sleep(0.05)
        except KafkaError as exc:
            raise KafkaLauncherError(f"creating topic {name} ({partitions} partitions, replication factor {rf}) "
                                     f"failed: {exc!r}") from exc

    def create_topics(self, names: list[str], partitions: int = 3) -> None:
        for name in names:
            self.create_topic(name, partitions)

    # ---- fault injection
    def kill(self, node: int, sig: int = signal.SIGKILL, timeout_s: float = 15.0) -> None:
        """Signal node ``node``'s process group (default SIGKILL: a crash) and wait until it is gone."""
        target = self.nodes[node]
        if target.process is None:
            return
        _signal_group(target, sig)
        try:
            target.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("Kafka node %d still running %.0f s after signal %d: SIGKILL", node, timeout_s, sig)
        self._reap(target)

    def start_node(self, node: int, timeout_s: float | None = None) -> None:
        """Restart a killed node on the same ports and data and wait until the cluster lists every node again."""
        target = self.nodes[node]
        if not target.alive():
            self._reap(target)
            self._launch(target)
        self.wait_ready(timeout_s or self.start_timeout_s)

    def running(self) -> list[int]:
        return [node.node_id for node in self.nodes if node.alive()]

    def pids(self) -> list[int]:
        """Every process whose command line names this cluster's folder (to prove that none is left)."""
        found = []
        marker = str(self.root).encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if marker in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def admin(self, **configs) -> contextlib.closing:
        """A KafkaAdminClient on the running nodes, in a context manager that closes it."""
        return contextlib.closing(self._admin_client(**configs))

    def _admin_client(self, **configs):
        from kafka import KafkaAdminClient

        servers = [node.bootstrap for node in self.nodes if node.alive()] or [self.bootstrap]
        return KafkaAdminClient(bootstrap_servers=servers, **{"request_timeout_ms": 10000, **configs})

    def wait_ready(self, timeout_s: float) -> None:
        """Until ``describe_cluster`` lists every running node unfenced (and a controller); raises if one exits."""
        from kafka.errors import KafkaError

        deadline = time.monotonic() + timeout_s
        wanted = set(self.running())
        last: object = "no answer"
        admin = None
        try:
            while time.monotonic() < deadline:
                self._check_alive(wanted)
                if admin is None:
                    if not all(_accepts(self.nodes[i].broker_port) for i in wanted):
                        time.sleep(0.1)
                        continue
                    try:  # short timeouts: a node that dies meanwhile is noticed within seconds
                        admin = self._admin_client(bootstrap_timeout_ms=3000, request_timeout_ms=3000,
                                                   reconnect_backoff_max_ms=500)
                    except KafkaError as exc:  # NoBrokersAvailable while the JVMs start
                        last = exc
                        time.sleep(0.2)
                        continue
                try:
                    cluster = admin.describe_cluster()
                    brokers = {int(b["broker_id"]) for b in cluster.get("brokers", []) if not b.get("is_fenced")}
                    last = f"brokers {sorted(brokers)}, controller {cluster.get('controller_id')}"
                    if brokers >= wanted and cluster.get("controller_id", -1) >= 0:
                        return
                except KafkaError as exc:
                    last = exc
                time.sleep(0.2)
        finally:
            if admin is not None:
                admin.close()
        raise KafkaLauncherError(f"Apache Kafka ({len(wanted)} node(s)) not ready within {timeout_s:.0f} s "
                                 f"(last: {last}); logs in {self.root}")

    # ---- internals
    def properties(self, node: KafkaNode) -> dict[str, str]:
        rf, isr = str(self.replication_factor), str(self.min_insync_replicas)
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        extra = "".join(f",{name}://127.0.0.1:{node.listener_ports[name]}" for name in self.listeners)
        protocols = "".join(f",{name}:{protocol}" for name, protocol in self.listeners.items())
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{node.broker_port},CONTROLLER://127.0.0.1:{node.controller_port}"
                         f"{extra}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.broker_port}{extra}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": f"CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT{protocols}",
            "log.dirs": str(node.folder / "data"),
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            "default.replication.factor": rf,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": "5",
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "transaction.state.log.num.partitions": "5",
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
            "group.initial.rebalance.delay.ms": "0",
            "unclean.leader.election.enable": "false",
            # a small, shared machine: few threads
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "num.replica.fetchers": "1",
            "log.cleaner.threads": "1",
            # fault tests: a killed node is fenced (and leaves the ISRs) after 3 s, a lagging replica after 5 s
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "3000",
            "replica.lag.time.max.ms": "5000",
        }
        props.update(self.extra_config)
        return props

    def _write_configs(self) -> None:
        for node in self.nodes:
            node.folder.mkdir(parents=True, exist_ok=True)
            text = "".join(f"{key}={value}\n" for key, value in self.properties(node).items())
            node.config_path.write_text(text)
            (node.folder / "log4j2.properties").write_text(_log4j2(node.log_path))

    def _jvm(self, node: KafkaNode) -> list[str]:
        # setpriv --pdeathsig: the JVM is SIGKILLed when its parent dies, even when nothing got to call stop()
        # (Linux: "parent" is the thread that started it, so start nodes from a thread that outlives them)
        prefix = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        return [*prefix, self.java, f"-Xmx{self.heap}", "-Xms64m", *JVM_OPTIONS,
                f"-Dlog4j2.configurationFile={node.folder / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={node.folder}", "-cp", self.classpath]

    def _format(self) -> None:
        """``kafka-storage format`` for every node at once (same cluster id, static voters)."""
        def run(node: KafkaNode) -> tuple[KafkaNode, subprocess.CompletedProcess[bytes]]:
            cmd = [*self._jvm(node), STORAGE_TOOL, "format", "--config", str(node.config_path),
                   "--cluster-id", self.cluster_id]
            return node, subprocess.run(cmd, capture_output=True, timeout=120, check=False,
                                        start_new_session=True)

        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for node, done in pool.map(run, self.nodes):
                if done.returncode != 0:
                    text = (done.stdout + done.stderr).decode(errors="replace").strip()[-800:]
                    raise KafkaLauncherError(f"formatting Kafka storage of node {node.node_id} failed "
                                             f"(exit {done.returncode}): {text}")
        self._formatted = True

    def _launch(self, node: KafkaNode) -> None:
        node._out = open(node.stdout_path, "ab")  # noqa: SIM115 - closed in _reap()
        node.process = subprocess.Popen([*self._jvm(node), MAIN_CLASS, str(node.config_path)], stdout=node._out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def _check_alive(self, wanted: set[int]) -> None:
        for node in self.nodes:
            if node.node_id in wanted and not node.alive():
                code = node.process.returncode if node.process is not None else None
                raise KafkaLauncherError(f"Kafka node {node.node_id} exited with code {code} at start; see "
                                         f"{node.log_path} and {node.stdout_path}:\n"
                                         f"{_tail(node.stdout_path) or _tail(node.log_path)}")

    def _reap(self, node: KafkaNode) -> None:
        """SIGKILL what is left of the node's process group and collect the JVM."""
        if node.process is not None:
            _signal_group(node, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=10)
            node.process = None
        if node._out is not None:
            node._out.close()
            node._out = None


def _has_leaders(admin, topic: str, partitions: int) -> bool:
    from kafka.errors import KafkaError

    try:
        (described,) = admin.describe_topics([topic])
    except KafkaError:
        return False
    found = described.get("partitions") or []
    return len(found) == partitions and all(p.get("leader_id", -1) >= 0 for p in found)


def _signal_group(node: KafkaNode, sig: int) -> None:
    if node.process is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.process.pid, sig)  # start_new_session: the JVM leads its own group


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _log4j2(path: Path) -> str:
    return "\n".join([
        "status = warn",
        "appender.file.type = File",
        "appender.file.name = file",
        f"appender.file.fileName = {path}",
        "appender.file.layout.type = PatternLayout",
        "appender.file.layout.pattern = [%d] %p %m (%c)%n",
        "rootLogger.level = INFO",
        "rootLogger.appenderRef.file.ref = file",
        "logger.stateChange.name = state.change.logger",
        "logger.stateChange.level = WARN",
        "",
    ])


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for cluster in live:
        cluster.stop(timeout_s=5.0)
