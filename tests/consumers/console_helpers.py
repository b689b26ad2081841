"""Helpers of the console tests: a real ``hpad console`` process, a headless Chromium, test frames and events."""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from consumers import contract as c
from consumers.broker import free_port
from consumers.camera import frame_headers
from consumers.events import ModelInfo, Scored, Timings, build_event, encode_event, mask_field
from tests.synthetic import add_defect, make_object_image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODEL = ModelInfo("hpad-tiny", "random-init", "hpad-tiny/random-init", True, "cpu", "fp32")


@dataclass
class TestFrame:
    frame_id: str
    camera_id: str
    category: str
    value: bytes  # PNG
    headers: list[tuple[str, bytes]]
    image: np.ndarray  # RGB
    defect: np.ndarray | None  # bool [H, W]


def make_frame(rng: np.random.Generator, camera_id: str, category: str, *, defect: bool,
               size: tuple[int, int] = (300, 400)) -> TestFrame:
    """A synthetic product photo (tests/synthetic.py), with a dark blob defect painted on the object if asked."""
    image, obj = make_object_image(rng, size)
    mask = None
    if defect:
        image, mask = add_defect(rng, image, obj, kind="blob")
        mask = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # a defect big enough to see
        image = image.copy()
        image[mask] = (25, 22, 20)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    frame_id = f"{camera_id}-{os.urandom(5).hex()}"
    return TestFrame(frame_id, camera_id, category, buf.tobytes(),
                     frame_headers(frame_id, camera_id, category, "image/png", datetime.now(UTC)), image, mask)


def event_for(frame: TestFrame, score: float, threshold: float = 0.5, prompt_version: int = 0,
              offset: int = 0, frames_topic: str = "hpad.frames") -> dict:
    """The event a worker would write for ``frame`` (the worker's own `build_event`), with the frame's defect
    as its mask: a random-weight model's mask would not sit on the synthetic defect."""
    meta = c.parse_frame_headers(frame.headers, frame.camera_id.encode())
    anomalous = score >= threshold
    mask = None
    if anomalous and frame.defect is not None:
        mask = mask_field(frame.defect.astype(np.float32), 0.5)
    scored = Scored(score, threshold, 0.5, prompt_version, "zero-shot" if prompt_version == 0 else "tuned",
                    "" if prompt_version == 0 else "ab" * 32)
    h, w = frame.image.shape[:2]
    return build_event(meta, scored, MODEL, Timings(1.0, 1.0, 5.0, 7.0), datetime.now(UTC),
                       (frames_topic, 0, offset), (w, h), mask, batch_id="test#1")


def publish(bootstrap: str, records: list[tuple[str, bytes, bytes, list]]) -> None:
    """(topic, key, value, headers) records, acknowledged before returning."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=32 * 1024 * 1024, linger_ms=0)
    try:
        futures = [producer.send(t, key=k, value=v, headers=h) for t, k, v, h in records]
        producer.flush()
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close()


def frame_and_event(topics, frame: TestFrame, event: dict) -> list[tuple[str, bytes, bytes, list]]:
    key = frame.camera_id.encode()
    return [(topics["frames"], key, frame.value, frame.headers),
            (topics["events"], key, encode_event(event), [("content-type", b"application/json")])]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(url: str, body: bytes, headers: dict[str, str], timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class ConsoleProcess:
    process: subprocess.Popen
    url: str
    metrics_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def console_process(bootstrap: str, topics: dict[str, str], workdir: Path, name: str,
                    token: str | None = None) -> Iterator[ConsoleProcess]:
    """``hpad console`` as a real process on 127.0.0.1 (free ports), ready when its topics are assigned;
    terminated (then killed) on the way out."""
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPAD_")}
    env.update({"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "HPAD_BOOTSTRAP_SERVERS": bootstrap,
                "HPAD_INPUT_TOPIC": topics["frames"], "HPAD_EVENTS_TOPIC": topics["events"],
                "HPAD_FEEDBACK_TOPIC": topics["feedback"], "HPAD_CONSOLE_HOST": "127.0.0.1",
                "HPAD_CONSOLE_PORT": str(port), "HPAD_METRICS_HOST": "127.0.0.1",
                "HPAD_METRICS_PORT": str(metrics_port), "HPAD_LOG_LEVEL": "INFO"})
    if token is not None:
        env["HPAD_CONSOLE_FEEDBACK_TOKEN"] = token
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "hpad.cli", "console"], env=env, cwd=workdir,
                                   stdout=log, stderr=subprocess.STDOUT)
    proc = ConsoleProcess(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}", log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"hpad console exited with {process.returncode}:\n{proc.log()}"
            with contextlib.suppress(OSError):
                if http_get(f"{proc.metrics_url}/readyz", 1.0)[0] == 200 and http_get(f"{proc.url}/healthz", 1.0)[0] == 200:
                    break
            assert time.monotonic() < deadline, f"hpad console not ready in 60 s:\n{proc.log()}"
            time.sleep(0.1)
        yield proc
    except BaseException:
        _stop(process)
        raise
    code = _stop(process)
    assert code == 0, f"hpad console exited with {code} on SIGTERM:\n{proc.log()}"


def _stop(process: subprocess.Popen) -> int | None:
    """SIGTERM, then SIGKILL after 15 s; the exit code of the SIGTERM (None when it had to be killed)."""
    if process.poll() is not None:
        return process.returncode
    process.terminate()
    try:
        return process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        return None


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A fresh headless Chromium (Debian's) driven by Playwright; a new profile each time, removed after."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="hpad-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                       args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        try:
            yield context
        finally:
            context.close()


def screenshot_dir(tmp_path: Path) -> Path:
    """HPAD_TEST_SCREENSHOTS when set (a stable path to look at), else a folder under the test's tmp path."""
    folder = Path(os.environ.get("HPAD_TEST_SCREENSHOTS") or tmp_path / "console-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def decode_jpeg(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a JPEG"
    return image


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
