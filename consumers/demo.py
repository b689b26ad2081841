"""``make demo`` / ``python -m consumers.demo``: the whole streaming service on one machine.

Starts the embedded broker on 127.0.0.1, creates the topics, starts a scoring worker (``hpad serve``,
random-init weights unless ``--pretrained`` / ``--checkpoint`` is given), the prompt tuner (``hpad tune``)
and a camera (``hpad camera``) streaming the MVTec bottle test images (``../shared/data/mvtec/bottle/test``
next to the repository; generated images when absent). Like an operator, it publishes a few verified normal
frames (the dataset's ``train/good`` images) to the normals topic; the worker adds its own confident-normal
samples. The tuner learns a prompt version from them and publishes it; the running worker swaps it in, and
the demo prints the moment the events' ``prompt_version`` changes. A few poison frames show the dead-letter
topic. A live line every second, a summary at the end (after ``--frames`` frames and the first swap, or
``--swap-wait`` seconds, or Ctrl-C).

``--source video`` makes the camera stream a video instead of the image folder: the demo writes an MP4
(OpenCV VideoWriter, one image per frame at ``--rate`` fps) from the same images and runs
``hpad camera --source <that file> --loop`` (which decodes it, re-encodes JPEG and serves its own metrics);
``--source URL|FILE|DEVICE`` streams any other source the camera reads (an RTSP camera, a video file...).

Every service is a `ManagedProcess` in `Demo.processes` (see `Demo.plan`).
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
from typing import TYPE_CHECKING

import cv2
import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from consumers import contract as c
from consumers.broker import EmbeddedBroker, free_port
from consumers.camera import frame_headers

if TYPE_CHECKING:
    from consumers.apache_kafka import ApacheKafka

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mvtec" / "bottle" / "test"
TOPICS = {"frames": "hpad.frames", "events": "hpad.events", "dlq": "hpad.frames.dlq", "normals": "hpad.normals",
          "prompts": "hpad.prompts"}


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


def write_video(images: Path, path: Path, fps: float, count: int = 60, side: int = 512) -> Path:
    """An MP4 (mp4v) of the first ``count`` images below ``images`` (sorted, all subfolders mixed by name so
    defects and good ones alternate), each resized to ``side`` x ``side``, one image per frame at ``fps``."""
    paths = sorted(p for p in images.rglob("*.png"))
    paths = sorted(paths, key=lambda p: (p.name, p.parent.name))[:count]
    if not paths:
        raise RuntimeError(f"no .png images below {images} to make a video of")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (side, side))
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write an mp4v video here")
    for image_path in paths:
        picture = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        writer.write(cv2.resize(picture, (side, side), interpolation=cv2.INTER_AREA))
    writer.release()
    return path


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
    versions: Counter = field(default_factory=Counter)  # prompt_version -> events
    swaps: list = field(default_factory=list)  # (seconds since start, old version, new version, events so far)
    truth: Counter = field(default_factory=Counter)  # (prompt_version, "good"/"defective", flagged) -> events

    @property
    def done(self) -> int:
        return self.events + sum(self.dead.values())

    def add_event(self, event: dict, now: datetime, truth: str | None = None) -> None:
        version = int(event["prompt_version"])
        if truth is not None:
            self.truth[(version, truth, bool(event["is_anomaly"]))] += 1
        if self.versions and version > max(self.versions):
            self.swaps.append((time.monotonic() - self.started, max(self.versions), version, self.events))
        self.versions[version] += 1
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
        version = f"v{max(self.versions)}" if self.versions else "-"
        return (f"[{time.monotonic() - self.started:6.1f}s] {self.rate():5.1f} frames/s | scored {self.events} | "
                f"anomalies {self.anomalies} | latency p50/p99 {latency} | dead letters {sum(self.dead.values())}"
                f" | prompts {version}{flag}")


class Demo:
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.processes: list[ManagedProcess] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="hpad-demo-"))
        self.metrics_port = ns.metrics_port or free_port()
        self.tuner_port = free_port()
        self.camera_port = free_port()
        self.stats = Stats(random_weights=not (ns.pretrained or ns.checkpoint))
        self._injected = False
        self._tuner_reported = False
        self.truth_by_index: list[str] = []  # ground truth of the camera's images, in its streaming order

    def broker(self) -> EmbeddedBroker | ApacheKafka:
        """``--broker``: the embedded tansu broker (default) or a one-node Apache Kafka (consumers/apache_kafka.py)."""
        if self.ns.broker == "kafka":
            from consumers.apache_kafka import ApacheKafka

            # frames up to the camera's 32 MiB producer limit, like tansu (Kafka's default is 1 MiB)
            return ApacheKafka(nodes=1, root=self.workdir / "kafka", config={"message.max.bytes": str(33 * 2**20)},
                               keep_data=False)
        return EmbeddedBroker(log_path=self.workdir / "tansu.log")

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
            "HPAD_PROMPTS_TOPIC": TOPICS["prompts"], "HPAD_NORMALS_TOPIC": TOPICS["normals"],
            "HPAD_NORMALS_PER_MINUTE": "30",
        }
        if ns.checkpoint:
            env["HPAD_CHECKPOINT"] = str(ns.checkpoint)
        elif ns.pretrained:
            env["HPAD_PRETRAINED"] = ns.pretrained
            env["HPAD_ALLOW_DOWNLOAD"] = str(ns.allow_download).lower()
        else:
            env["HPAD_RANDOM_INIT"] = "true"
        return env

    def tuner_env(self, broker: EmbeddedBroker) -> dict[str, str]:
        """The worker's model settings plus a quick schedule: first run once 8 normals are in, then every 40."""
        keep = ("HF_HUB_OFFLINE", "HPAD_BOOTSTRAP_SERVERS", "HPAD_CATEGORIES", "HPAD_MODEL", "HPAD_PRECISION",
                "HPAD_CHECKPOINT", "HPAD_PRETRAINED", "HPAD_ALLOW_DOWNLOAD", "HPAD_RANDOM_INIT",
                "HPAD_PROMPTS_TOPIC", "HPAD_NORMALS_TOPIC", "HPAD_SESSION_TIMEOUT_MS", "HPAD_HEARTBEAT_INTERVAL_MS")
        env = {k: v for k, v in self.worker_env(broker).items() if k in keep}
        env.update({
            "HPAD_GROUP_ID": "hpad-demo-tuner", "HPAD_RESERVOIR_DIR": str(self.workdir / "reservoir"),
            "HPAD_METRICS_PORT": str(self.tuner_port), "HPAD_METRICS_HOST": "127.0.0.1",
            "HPAD_SHOTS": "4", "HPAD_MIN_NORMALS": "8", "HPAD_GATE_NORMALS": "4", "HPAD_GATE_ANOMALIES": "16",
            "HPAD_EPOCHS": str(self.ns.tune_epochs), "HPAD_STEPS_PER_EPOCH": "4", "HPAD_BATCH_SIZE": "16",
            "HPAD_INTERVAL_S": "0", "HPAD_NEW_SAMPLES": "40", "HPAD_MIN_GAP_S": "30", "HPAD_TORCH_THREADS": "1",
        })
        return env

    def publish_verified(self, broker: EmbeddedBroker) -> int:
        """What an operator does: publish known-good frames with ``verified=true`` to the normals topic."""
        # the category's train/good beside the streamed test/ folder (``.../bottle/test`` -> ``.../bottle/train/good``)
        folder = next((f for f in (self.ns.data.parent / "train" / "good", self.ns.data.parent.parent / "train" / "good")
                       if f.is_dir()), None)
        paths = sorted(folder.glob("*.png"))[: self.ns.verified] if folder is not None else []
        if not paths:
            generated = generated_images(self.workdir / "verified", count=4 * self.ns.verified)
            paths = [p for i, p in enumerate(sorted(generated.glob("*.png"))) if i % 4 != 3][: self.ns.verified]
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=32 * 1024 * 1024)
        for i, path in enumerate(paths):
            headers = [*frame_headers(f"verified-{i:03d}", "operator", self.ns.category, "image/png"),
                       ("verified", b"true")]
            producer.send(TOPICS["normals"], key=b"operator", value=path.read_bytes(), headers=headers)
        producer.flush()
        producer.close()
        return len(paths)

    def plan(self, broker: EmbeddedBroker, data: Path) -> None:
        """The managed processes, in start order (append new services here)."""
        hpad = [sys.executable, "-m", "hpad.cli"]
        ready = f"http://127.0.0.1:{self.metrics_port}/readyz"
        self.processes.append(ManagedProcess("worker", [*hpad, "serve"], self.worker_env(broker),
                                             self.workdir / "worker.log", ready_url=ready))
        if not self.ns.no_tuner:
            self.processes.append(ManagedProcess("tuner", [*hpad, "tune"], self.tuner_env(broker),
                                                 self.workdir / "tuner.log",
                                                 ready_url=f"http://127.0.0.1:{self.tuner_port}/healthz"))
        camera = [*hpad, "camera", *self.camera_source(data), "--category", self.ns.category,
                  "--bootstrap", broker.bootstrap, "--input-topic", TOPICS["frames"]]
        self.processes.append(ManagedProcess("camera", camera, {}, self.workdir / "camera.log", grace_s=5.0))

    def camera_source(self, data: Path) -> list[str]:
        """The camera's flags: the image folder (three simulated cameras), or ``--source`` (one stream)."""
        if self.ns.source is None:
            return ["--dir", str(data), "--rate", str(self.ns.rate), "--loop", "--cameras", "3"]
        if self.ns.source == "video":
            video = write_video(data, self.workdir / "demo.mp4", self.ns.rate)
            print(f"wrote {video} ({int(cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FRAME_COUNT))} frames at "
                  f"{self.ns.rate:g} fps) for the camera to stream")
            source = [str(video), "--loop"]
        else:
            source = [self.ns.source]
        print(f"camera metrics: http://127.0.0.1:{self.camera_port}/metrics  (also /healthz)")
        return ["--source", *source, "--camera-id", "cam-video", "--metrics-port", str(self.camera_port),
                "--metrics-host", "127.0.0.1"]

    def run(self) -> int:
        with self.broker() as broker:
            for name, partitions in (("frames", 3), ("events", 3), ("dlq", 1), ("normals", 1), ("prompts", 1)):
                broker.create_topic(TOPICS[name], partitions)
            data = self.data_dir()
            # good/defective per frame is known only for the folder camera (its frame ids carry the image's
            # index); a stream's frames (--source) are not mapped back to images
            self.truth_by_index = ground_truth(data) if self.ns.source is None else []
            self.plan(broker, data)
            print(f"broker {broker.bootstrap}; logs in {self.workdir}; frames from {data}")
            print(f"worker metrics: http://127.0.0.1:{self.metrics_port}/metrics  (also /healthz, /readyz)")
            if not self.ns.no_tuner:
                print(f"tuner metrics:  http://127.0.0.1:{self.tuner_port}/metrics")
                print(f"published {self.publish_verified(broker)} verified normal frames to {TOPICS['normals']} "
                      f"(as an operator would)")
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
        ok = codes.get("worker") in (0, None) and codes.get("tuner") in (0, None)
        return 0 if ok and (self.ns.no_tuner or self.stats.swaps) else 1

    def watch(self, broker: EmbeddedBroker) -> None:
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50,
                                 max_partition_fetch_bytes=16 * 1024 * 1024)
        parts = [TopicPartition(TOPICS["events"], p) for p in range(3)] + [TopicPartition(TOPICS["dlq"], 0)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        poison = poison_frames()
        target = self.ns.frames + (0 if self.ns.no_poison else len(poison))
        next_line = time.monotonic() + 1.0
        swap_deadline = time.monotonic() + self.ns.swap_wait
        try:
            while not self.finished(target, swap_deadline):
                self.maybe_inject(broker, poison)
                for tp, records in consumer.poll(timeout_ms=200).items():
                    for record in records:
                        self.record(tp.topic, record)
                if time.monotonic() >= next_line:
                    print(self.stats.line(), flush=True)
                    next_line += 1.0
                tuner = next((p for p in self.processes if p.name == "tuner"), None)
                if tuner is not None and not tuner.alive() and not self._tuner_reported:
                    print(f"tuner exited with code {tuner.process.returncode}; see {tuner.log_path}")
                    self._tuner_reported = True
                worker = self.processes[0]
                if not worker.alive():
                    print(f"worker exited with code {worker.process.returncode}; see {worker.log_path}")
                    return
        finally:
            consumer.close()
        print(self.stats.line())

    def finished(self, target: int, swap_deadline: float) -> bool:
        """``--frames`` outputs seen and, with the tuner, the first swap seen (or ``--swap-wait`` over)."""
        if self.stats.done < target:
            return False
        return self.ns.no_tuner or bool(self.stats.swaps) or time.monotonic() >= swap_deadline

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
            swaps = len(self.stats.swaps)
            event = json.loads(record.value)
            self.stats.add_event(event, datetime.now(UTC), frame_truth(event["frame_id"], self.truth_by_index))
            if len(self.stats.swaps) > swaps:
                at, old, new, count = self.stats.swaps[-1]
                print(f">>> prompt swap on the live line after {at:.0f} s: events now carry prompt_version {new} "
                      f"(was {old}) from event {count + 1} on; no frame was held back", flush=True)
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
        versions = ", ".join(f"v{v}: {n}" for v, n in sorted(s.versions.items()))
        if not self.ns.no_tuner:
            swaps = "; ".join(f"v{old} -> v{new} after {at:.0f} s" for at, old, new, _ in s.swaps) or \
                f"none within --swap-wait {self.ns.swap_wait:.0f} s (see {self.workdir / 'tuner.log'})"
            print(f"prompt versions in events: {versions or '-'} (v0 = zero-shot); swaps: {swaps}")
        for line in truth_lines(s.truth):
            print(line)
        if self.ns.source is not None:
            print("good/defective split: only with the folder camera (a stream's frames are not mapped back to images)")
        if latencies:
            print(f"end-to-end latency (camera capture -> event read): p50 {statistics.median(latencies):.0f} ms, "
                  f"p99 {s.percentile(0.99):.0f} ms")
        if s.first is not None:
            streaming = time.monotonic() - s.first
            print(f"throughput: {s.done / max(streaming, 1e-3):.1f} frames/s while streaming ({streaming:.0f} s; "
                  f"{elapsed:.0f} s including start-up)")
        camera_log = self.workdir / "camera.log"
        if self.ns.source is not None and camera_log.is_file():
            for line in camera_log.read_text(errors="replace").splitlines():
                if ": captured " in line or "stream resumed" in line or "stream dropped" in line:
                    print(line.split("hpad.camera: ", 1)[-1])
        print(f"exit codes: {codes}; logs in {self.workdir}")


def ground_truth(folder: Path) -> list[str]:
    """"good" / "defective" for each image the camera streams from ``folder``, in its order (`find_images`):
    an image in a ``good`` folder is good (MVTec layout ``test/good``), any other folder holds defects."""
    from consumers.camera import find_images

    return ["good" if p.parent.name == "good" else "defective" for p in find_images(folder)]


def frame_truth(frame_id: str, truth_by_index: list[str]) -> str | None:
    """The ground truth of a camera frame: its frame id ends in the camera's sequence number (``<camera>-<run>-
    <seq>``) and the camera loops over its sorted images, so frame ``seq`` is image ``seq % len(images)``.
    None for frames not from the camera (poison frames) or without images."""
    seq = frame_id.rsplit("-", 1)[-1]
    if not truth_by_index or not seq.isdigit() or not frame_id.startswith("cam-"):
        return None
    return truth_by_index[int(seq) % len(truth_by_index)]


def truth_lines(truth: Counter) -> list[str]:
    """Flagged share of good and of defective frames, per prompt version (the summary's split)."""
    lines = []
    for version in sorted({v for v, _, _ in truth}):
        parts = []
        for kind in ("good", "defective"):
            flagged, total = truth[(version, kind, True)], truth[(version, kind, True)] + truth[(version, kind, False)]
            if total:
                parts.append(f"{kind} frames flagged {flagged} of {total} ({100 * flagged / total:.0f} %)")
        lines.append(f"prompts v{version}: " + "; ".join(parts))
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m consumers.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=["tansu", "kafka"], default="tansu",
                        help="tansu (embedded, default) or kafka (Apache Kafka KRaft; needs java, make kafka-classpath)")
    parser.add_argument("--frames", type=int, default=200, help="stop after this many camera frames")
    parser.add_argument("--rate", type=float, default=10.0, help="camera frames per second")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of images to stream")
    parser.add_argument("--source", help="video: stream an MP4 the demo makes from the images; or any camera "
                        "source (rtsp://..., http(s)://... MJPEG, a video file, /dev/videoN) instead of the folder")
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
    parser.add_argument("--no-tuner", action="store_true", help="do not run the prompt tuner")
    parser.add_argument("--verified", type=int, default=12, help="verified normal frames the operator publishes")
    parser.add_argument("--tune-epochs", type=int, default=6, help="MPTS epochs of each tuning run")
    parser.add_argument("--swap-wait", type=float, default=300.0,
                        help="after --frames, keep streaming up to this many seconds for the first swap")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return Demo(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
