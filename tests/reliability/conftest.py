"""Fixtures of the reliability suite: the worker factory, a local S3 server (moto) and private brokers.

Every server a test starts is stopped by the fixture that started it (terminate, wait, kill), and every
server listens on 127.0.0.1 only. The S3 server backs tansu's ``s3://`` storage, the only compiled-in
engine that survives a broker restart (``memory://`` loses everything).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.broker import EmbeddedBroker, free_port
from tests.consumers.conftest import make_worker  # noqa: F401 - the worker factory fixture, re-exported

logging.getLogger("kafka").setLevel(logging.WARNING)


class S3Server:
    """``moto`` in server mode on 127.0.0.1 (dummy credentials); ``bucket()`` makes a fresh bucket."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def env(self) -> dict[str, str]:
        """What tansu (object_store) and boto3 need to talk to this server."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT": self.endpoint, "AWS_ALLOW_HTTP": "true"}

    def start(self, timeout_s: float = 30.0) -> S3Server:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (code := self.process.poll()) is not None:
                self.stop()
                raise RuntimeError(f"moto server exited with {code}; see {self.log_path}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto server did not listen on {self.endpoint} within {timeout_s} s")

    def bucket(self) -> str:
        import boto3

        name = f"tansu-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A local S3 server for the whole session (skips the tests that need it when moto is not installed)."""
    pytest.importorskip("moto.server", reason="broker-restart tests need moto[server] (pip install -e '.[dev]')")
    pytest.importorskip("boto3")
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_broker(s3_server, tmp_path) -> Iterator[EmbeddedBroker]:
    """A private tansu broker whose storage is a fresh bucket on the S3 server: it can be stopped and started
    again on the same port and keeps its topics, records and committed offsets."""
    broker = EmbeddedBroker(storage=f"s3://{s3_server.bucket()}/", log_path=tmp_path / "tansu.log",
                            env={**os.environ, **s3_server.env})
    try:
        yield broker.start()
    finally:
        broker.stop()
