"""Real programs for the alerting tests: Alertmanager, Prometheus, a webhook receiver, events in the real schema.

`Alertmanager` and `Prometheus` run Debian's ``prometheus-alertmanager`` and ``prometheus`` on 127.0.0.1 with
free ports and temporary storage (Alertmanager's gossip off: ``--cluster.listen-address=``); each is stopped
(SIGTERM, then SIGKILL) by the context manager that started it. `WebhookReceiver` is an ``http.server`` on a
thread that records every request and answers what its ``plan`` says.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from consumers.contract import ContentType, FrameMeta
from consumers.events import ModelInfo, Scored, Timings, build_event, encode_event

MODEL = ModelInfo("hpad-tiny", "random-init", "hpad-tiny/random-init", True, "cpu", "fp32")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def program(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(f"none of {names} on PATH: `make system-tools` installs the Debian packages")


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Poll ``condition`` until it returns something truthy (returned); AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except OSError as exc:  # a server not up yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


class ManagedProgram:
    """A started program with its log file; `stop` terminates, then kills."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @classmethod
    def ready(cls, args: list[str], log_path: Path, url: str, timeout_s: float, what: str) -> ManagedProgram:
        """Start ``args`` and wait until ``url``/-/ready answers 200 (stopped again if it never does)."""
        started = cls(args, log_path)
        try:
            wait_until(lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200, timeout_s, what)
        except BaseException:
            started.stop()
            raise
        return started


class Alertmanager:
    """``prometheus-alertmanager`` on 127.0.0.1; ``notify_url`` gets its webhook notifications (send_resolved)."""

    def __init__(self, root: Path, notify_url: str | None = None, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        receiver: dict = {"name": "test"}
        if notify_url:
            receiver["webhook_configs"] = [{"url": notify_url, "send_resolved": True}]
        config = {"route": {"receiver": "test", "group_by": ["alertname", "camera", "reason"], "group_wait": "1s",
                            "group_interval": "1s", "repeat_interval": "1h"},
                  "receivers": [receiver]}
        root.mkdir(parents=True, exist_ok=True)
        (root / "alertmanager.yml").write_text(yaml.safe_dump(config))
        self.program: ManagedProgram | None = None

    def __enter__(self) -> Alertmanager:
        args = [program("prometheus-alertmanager", "alertmanager"), f"--config.file={self.root / 'alertmanager.yml'}",
                f"--storage.path={self.root / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address="]
        self.program = ManagedProgram.ready(args, self.root / "alertmanager.log", self.url, 30, "Alertmanager ready")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.program is not None
        self.program.stop()

    def alerts(self, **label_filter: str) -> list[dict]:
        """Active alerts (GET /api/v2/alerts) whose labels match ``label_filter``."""
        query = urllib.parse.urlencode([("filter", f'{k}="{v}"') for k, v in label_filter.items()])
        return get_json(f"{self.url}/api/v2/alerts?{query}")


class Prometheus:
    """``prometheus`` on 127.0.0.1 scraping ``targets`` every second and alerting to ``alertmanager``."""

    def __init__(self, root: Path, targets: dict[str, list[str]], rule_files: list[Path], alertmanager: str) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(p) for p in rule_files],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts}]}
                               for job, hosts in targets.items()],
        }
        root.mkdir(parents=True, exist_ok=True)
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.program: ManagedProgram | None = None

    def __enter__(self) -> Prometheus:
        args = [program("prometheus"), f"--config.file={self.root / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.root / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                "--rules.alert.resend-delay=1s"]
        self.program = ManagedProgram.ready(args, self.root / "prometheus.log", self.url, 60, "Prometheus ready")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.program is not None
        self.program.stop()

    def query(self, expr: str) -> list[dict]:
        data = get_json(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        assert data["status"] == "success", data
        return data["data"]["result"]

    def rule_alerts(self) -> list[dict]:
        return get_json(f"{self.url}/api/v1/alerts")["data"]["alerts"]


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered (0 while its plan is still deciding)


@dataclass
class WebhookReceiver:
    """Records every POST; ``plan(request_number_for_this_key, request) -> status`` decides the answer."""

    plan: Callable[[int, Request], int] = lambda n, request: 200
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body, 0)
                with receiver._lock:  # recorded before the plan runs: a test sees a request the plan holds
                    key = request.headers.get("idempotency-key", self.path)
                    seen = sum(1 for r in receiver.requests if r.headers.get("idempotency-key", r.path) == key)
                    receiver.requests.append(request)
                request.status = receiver.plan(seen + 1, request)
                self.send_response(request.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def on(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]


def event_bytes(camera: str, seq: int, anomalous: bool, at: datetime, category: str = "widget",
                prompt_version: int = 0, threshold: float = 0.5) -> bytes:
    """One event in the real schema (consumers.events.build_event), as the worker writes it."""
    score = 0.9 if anomalous else 0.1
    meta = FrameMeta(frame_id=f"{camera}-{seq:05d}", camera_id=camera, category=category,
                     content_type=ContentType("png"), captured_at=at)
    scored = Scored(score, threshold, 0.5, prompt_version, "zero-shot" if prompt_version == 0 else "learned", "")
    event = build_event(meta, scored, MODEL, Timings(1.0, 1.0, 1.0, 3.0), at + timedelta(milliseconds=50),
                        ("frames", 0, seq), (64, 48), None, batch_id="test#1")
    return encode_event(event)


def now() -> datetime:
    return datetime.now(UTC)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A process's /metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(port: int, name: str, **labels: str) -> float:
    try:
        return scrape(port).get((name, tuple(sorted(labels.items()))), 0.0)
    except OSError:
        return 0.0


class AlertsProcess:
    """``hpad alerts`` as a real process (``python -m hpad.cli alerts``) with its own metrics port."""

    def __init__(self, root: Path, name: str, env: dict[str, str]) -> None:
        import os
        import sys

        self.metrics_port = free_port()
        self.env = {**os.environ, "HPAD_METRICS_PORT": str(self.metrics_port), "HPAD_METRICS_HOST": "127.0.0.1",
                    "HPAD_SESSION_TIMEOUT_MS": "2000", "HPAD_HEARTBEAT_INTERVAL_MS": "500",
                    "HPAD_AUTO_OFFSET_RESET": "earliest", "HPAD_LOG_LEVEL": "INFO", **env}
        self.log_path = root / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, "-m", "hpad.cli", "alerts"], env=self.env, cwd=root,
                                        stdout=self._log, stderr=subprocess.STDOUT)

    def live_events(self) -> float:
        return sample(self.metrics_port, "hpad_alerts_events_total", result="live")

    def wait_live(self, count: int, timeout: float = 60) -> None:
        wait_until(lambda: self.live_events() >= count or self._dead(), timeout, f"{count} live events")
        assert self.process.poll() is None, f"hpad alerts exited {self.process.returncode}:\n{self.log()}"

    def _dead(self) -> bool:
        return self.process.poll() is not None

    def kill(self) -> int:
        self.process.kill()
        return self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
