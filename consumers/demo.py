"""``make demo`` / ``python -m consumers.demo``: the whole streaming service on one machine.

Starts the embedded broker on 127.0.0.1, creates the topics, starts a scoring worker (``hpad serve``,
random-init weights unless ``--pretrained`` / ``--checkpoint`` is given) and a camera (``hpad camera``)
streaming the MVTec bottle test images (``../shared/data/mvtec/bottle/test`` next to the repository;
generated images when absent), injects a few poison frames to show the dead-letter topic, prints a live line
every second and a summary at the end (after ``--frames`` frames, or Ctrl-C).

Every service is a `ManagedProcess` in `Demo.processes`; another one (e.g. the prompt tuner) is added by
appending to that list in `Demo.plan`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from consumers import contract as c
from consumers.broker import EmbeddedBroker, free_port
from consumers.camera import frame_headers

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mvtec" / "bottle" / "test"
TOPICS = {"frames": "hpad.frames", "events": "hpad.events", "dlq": "hpad.frames.dlq"}


@dataclass
class ManagedProcess:
    """A child process the demo starts and always stops (SIGTERM, then SIGKILL)."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    ready_url: str | None = None  # start() returns once this answers 200 (None: at once)
    grace_s: float = 0.0  # on stop, time to finish by itself before SIGTERM
    process: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - child owns it
        self.process = subprocess.Popen(self.argv, env={**os.environ, **self.env}, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        if self.ready_url:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.ready_url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout_s} s; see {self.log_path}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.grace_s > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=self.grace_s)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def generated_images(folder: Path, count: int = 24, size: int = 256) -> Path:
    """Stand-in 'bottle' photos (a bright ring on a dark background; every fourth one with a dark defect)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        picture = np.full((size, size, 3), 30, np.uint8) + rng.integers(0, 12, (size, size, 3), dtype=np.uint8)
        center = (size // 2 + int(rng.integers(-8, 9)), size // 2 + int(rng.integers(-8, 9)))
        cv2.circle(picture, center, size // 3, (200, 190, 170), thickness=size // 8)
        if i % 4 == 3:
            cv2.circle(picture, (center[0] + size // 3, center[1]), size // 16, (10, 10, 10), thickness=-1)
        cv2.imwrite(str(folder / f"{i:03d}.png"), picture)
    return folder


def poison_frames() -> list[tuple[str, bytes, list[tuple[str, bytes]]]]:
    """(label, value, headers) of frames that must end up in the dead-letter topic."""
    def headers(frame_id: str, content: str = "image/png", category: str = "bottle"):
        return frame_headers(frame_id, "cam-poison", category, content)

    bomb = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (10000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
    return [
        ("undecodable", b"this is not a JPEG", headers("poison-junk", "image/jpeg")),
        ("too_many_pixels", bomb + b"\x00" * 64, headers("poison-bomb")),
        ("unknown_category", b"\x89PNG\r\n\x1a\n", headers("poison-cat", category="spaceship")),
    ]


@dataclass
class Stats:
    """What the live line and the summary show (computed from the events and dead letters read back)."""

    started: float = field(default_factory=time.monotonic)
    events: int = 0
    anomalies: int = 0
    dead: Counter = field(default_factory=Counter)
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=2000))
    recent: deque = field(default_factory=deque)  # arrival times, last few seconds
    random_weights: bool | None = None
    model: str = ""
    first: float | None = None  # monotonic time of the first output

    @property
    def done(self) -> int:
        return self.events + sum(self.dead.values())

    def add_event(self, event: dict, now: datetime) -> None:
        self.events += 1
        self.anomalies += int(event["is_anomaly"])
        self.random_weights = event["random_weights"]
        self.model = f"{event['model']} ({event['weights']}, {event['precision']}, {event['device']})"
        if event.get("captured_at"):
            captured = datetime.fromisoformat(event["captured_at"])
            self.latencies_ms.append(1000 * (now - captured).total_seconds())
        self._arrived()

    def _arrived(self) -> None:
        now = time.monotonic()
        self.first = self.first or now
        self.recent.append(now)

    def add_dead(self, reason: str) -> None:
        self.dead[reason] += 1
        self._arrived()

    def rate(self, window_s: float = 3.0) -> float:
        now = time.monotonic()
        while self.recent and self.recent[0] < now - window_s:
            self.recent.popleft()
        return len(self.recent) / min(window_s, max(1e-3, now - self.started))

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        values = sorted(self.latencies_ms)
        return values[min(len(values) - 1, int(q * len(values)))]

    def line(self) -> str:
        p50, p99 = self.percentile(0.50), self.percentile(0.99)
        latency = "-" if p50 is None else f"{p50:.0f}/{p99:.0f} ms"
        flag = " | RANDOM WEIGHTS" if self.random_weights else ""
        return (f"[{time.monotonic() - self.started:6.1f}s] {self.rate():5.1f} frames/s | scored {self.events} | "
                f"anomalies {self.anomalies} | latency p50/p99 {latency} | dead letters {sum(self.dead.values())}"
                f"{flag}")


class Demo:
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.processes: list[ManagedProcess] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="hpad-demo-"))
        self.metrics_port = ns.metrics_port or free_port()
        self.stats = Stats(random_weights=not (ns.pretrained or ns.checkpoint))
        self._injected = False

    def data_dir(self) -> Path:
        if self.ns.data.is_dir() and any(self.ns.data.rglob("*.png")):
            return self.ns.data
        print(f"{self.ns.data} not found: streaming generated stand-in images instead")
        return generated_images(self.workdir / "images")

    def worker_env(self, broker: EmbeddedBroker) -> dict[str, str]:
        ns = self.ns
        env = {
            "HF_HUB_OFFLINE": "0" if ns.allow_download else "1",
            "HPAD_BOOTSTRAP_SERVERS": broker.bootstrap, "HPAD_INPUT_TOPIC": TOPICS["frames"],
            "HPAD_EVENTS_TOPIC": TOPICS["events"], "HPAD_DLQ_TOPIC": TOPICS["dlq"], "HPAD_GROUP_ID": "hpad-demo",
            "HPAD_CATEGORIES": ns.category, "HPAD_MODEL": ns.model, "HPAD_PRECISION": ns.precision,
            "HPAD_MAX_BATCH_SIZE": str(ns.batch_size), "HPAD_METRICS_PORT": str(self.metrics_port),
            "HPAD_METRICS_HOST": "127.0.0.1", "HPAD_SESSION_TIMEOUT_MS": "6000", "HPAD_HEARTBEAT_INTERVAL_MS": "1000",
        }
        if ns.checkpoint:
            env["HPAD_CHECKPOINT"] = str(ns.checkpoint)
        elif ns.pretrained:
            env["HPAD_PRETRAINED"] = ns.pretrained
            env["HPAD_ALLOW_DOWNLOAD"] = str(ns.allow_download).lower()
        else:
            env["HPAD_RANDOM_INIT"] = "true"
        return env

    def plan(self, broker: EmbeddedBroker, data: Path) -> None:
        """The managed processes, in start order (append new services here)."""
        hpad = [sys.executable, "-m", "hpad.cli"]
        ready = f"http://127.0.0.1:{self.metrics_port}/readyz"
        self.processes.append(ManagedProcess("worker", [*hpad, "serve"], self.worker_env(broker),
                                             self.workdir / "worker.log", ready_url=ready))
        camera = [*hpad, "camera", "--dir", str(data), "--rate", str(self.ns.rate), "--loop", "--frames",
                  str(self.ns.frames), "--cameras", "3", "--category", self.ns.category,
                  "--bootstrap", broker.bootstrap, "--input-topic", TOPICS["frames"]]
        self.processes.append(ManagedProcess("camera", camera, {}, self.workdir / "camera.log", grace_s=5.0))

    def run(self) -> int:
        with EmbeddedBroker(log_path=self.workdir / "tansu.log") as broker:
            for name, partitions in (("frames", 3), ("events", 3), ("dlq", 1)):
                broker.create_topic(TOPICS[name], partitions)
            data = self.data_dir()
            self.plan(broker, data)
            print(f"broker {broker.bootstrap}; logs in {self.workdir}; frames from {data}")
            print(f"metrics: http://127.0.0.1:{self.metrics_port}/metrics  (also /healthz, /readyz)")
            try:
                for process in self.processes:
                    print(f"starting {process.name}...", flush=True)
                    process.start()
                self.watch(broker)
            except KeyboardInterrupt:
                print("\ninterrupted")
            except RuntimeError as exc:
                print(f"demo failed: {exc}")
            finally:
                codes = {p.name: p.stop() for p in reversed(self.processes)}
        self.summary(codes)
        return 0 if codes.get("worker") in (0, None) else 1

    def watch(self, broker: EmbeddedBroker) -> None:
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50,
                                 max_partition_fetch_bytes=16 * 1024 * 1024)
        parts = [TopicPartition(TOPICS["events"], p) for p in range(3)] + [TopicPartition(TOPICS["dlq"], 0)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        poison = poison_frames()
        target = self.ns.frames + (0 if self.ns.no_poison else len(poison))
        next_line = time.monotonic() + 1.0
        try:
            while self.stats.done < target:
                self.maybe_inject(broker, poison)
                for tp, records in consumer.poll(timeout_ms=200).items():
                    for record in records:
                        self.record(tp.topic, record)
                if time.monotonic() >= next_line:
                    print(self.stats.line(), flush=True)
                    next_line += 1.0
                worker = self.processes[0]
                if not worker.alive():
                    print(f"worker exited with code {worker.process.returncode}; see {worker.log_path}")
                    return
        finally:
            consumer.close()
        print(self.stats.line())

    def maybe_inject(self, broker: EmbeddedBroker, poison: list) -> None:
        """Poison frames once a third of the stream is through."""
        if self.ns.no_poison or self._injected or self.stats.events < self.ns.frames // 3:
            return
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for label, value, headers in poison:
            producer.send(TOPICS["frames"], key=b"cam-poison", value=value, headers=headers)
            print(f"injected a poison frame ({label})")
        producer.flush()
        producer.close()
        self._injected = True

    def record(self, topic: str, record) -> None:
        if topic == TOPICS["events"]:
            self.stats.add_event(json.loads(record.value), datetime.now(UTC))
        else:
            reason = dict(record.headers).get(c.ERROR_CLASS, b"?").decode()
            self.stats.add_dead(reason)

    def summary(self, codes: dict[str, int | None]) -> None:
        s = self.stats
        elapsed = time.monotonic() - s.started
        latencies = list(s.latencies_ms)
        print("\n=== hpad demo summary ===")
        print(f"model: {s.model or self.ns.model}{'  RANDOM WEIGHTS: scores carry no meaning' if s.random_weights else ''}")
        print(f"frames scored: {s.events}  anomalies: {s.anomalies}  dead letters: {dict(s.dead) or 0}")
        if latencies:
            print(f"end-to-end latency (camera capture -> event read): p50 {statistics.median(latencies):.0f} ms, "
                  f"p99 {s.percentile(0.99):.0f} ms")
        if s.first is not None:
            streaming = time.monotonic() - s.first
            print(f"throughput: {s.done / max(streaming, 1e-3):.1f} frames/s while streaming ({streaming:.0f} s; "
                  f"{elapsed:.0f} s including start-up)")
        print(f"exit codes: {codes}; logs in {self.workdir}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m consumers.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200, help="stop after this many camera frames")
    parser.add_argument("--rate", type=float, default=10.0, help="camera frames per second")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of images to stream")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--model", default="hpad-small",
                        help="open_clip model (default hpad-small: quick on a laptop CPU; e.g. ViT-B-16-plus-240)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", help="pretrained tag instead of random weights (e.g. laion400m_e32)")
    weights.add_argument("--checkpoint", type=Path, help="local open_clip checkpoint instead of random weights")
    parser.add_argument("--allow-download", action="store_true", help="let --pretrained download weights")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--metrics-port", type=int, default=0, help="worker metrics port (0 = a free one)")
    parser.add_argument("--no-poison", action="store_true", help="do not inject poison frames")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return Demo(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
