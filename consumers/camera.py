"""``hpad camera``: publish camera frames: RTSP / HTTP MJPEG streams, video files, V4L2 devices and folders.

``--source URL|FILE|DEVICE|DIR`` (one camera) or ``--cameras FILE`` (a YAML cameras file, one capture thread
per camera; consumers/cameras_file.py) run the capture loops of consumers/capture.py: fps cap, every n-th
frame, change gate, JPEG quality, reconnect with backoff, ``/metrics`` and ``/healthz``
(consumers/camera_metrics.py). The rest of this docstring is the folder simulator, ``--dir``:

Images (``*.png``, ``*.jpg``, ``*.jpeg``, found recursively, sorted) are sent as they are on disk, with the
frame contract's headers: ``content-type``, ``camera_id``, ``frame_id`` (``<camera>-<run>-<seq>``: unique
across runs), ``captured_at`` (RFC 3339, now) and ``category``; the record key is the camera id. ``--rate``
paces frames per second on a fixed schedule (0 = as fast as the broker takes them); ``--cameras N`` spreads
frames round-robin over N camera ids (so over several partitions); ``--frames`` stops after N frames and
``--loop`` repeats the folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import cycle
from pathlib import Path

from kafka import KafkaProducer

from consumers import contract as c
from consumers import kafka_io, sources
from consumers.camera_metrics import CameraHealth, CameraMetrics
from consumers.cameras_file import CameraSpec, camera_specs, load_cameras_file
from consumers.capture import CaptureLoop, CaptureOptions
from consumers.metrics import start_metrics_server
from consumers.service import run_main, stop_signals
from consumers.settings import CameraSettings, add_cli_flags, cli_overrides, load_settings, producer_kwargs
from consumers.sources import IMAGE_SUFFIXES, open_source, set_ffmpeg_capture_options
from hpad.errors import ConfigError

log = logging.getLogger("hpad.camera")


@dataclass(frozen=True)
class PendingFrame:
    """A frame handed to the producer, not yet acknowledged."""

    frame_id: str
    camera_id: str
    delivery: kafka_io.Delivery

    def result(self, timeout_s: float = 30.0) -> SentFrame:
        ok, error = self.delivery.outcome(wait_s=timeout_s)
        if not ok:
            raise ConfigError(f"frame {self.frame_id} was not accepted by the broker: {error or 'timeout'}")
        meta = self.delivery.future.value  # type: ignore[union-attr]
        return SentFrame(self.frame_id, self.camera_id, meta.partition, meta.offset)


@dataclass(frozen=True)
class SentFrame:
    """Where a published frame landed (for matching events to frames)."""

    frame_id: str
    camera_id: str
    partition: int
    offset: int


def find_images(folder: Path) -> list[Path]:
    """Every PNG/JPEG below ``folder``, sorted by path."""
    if not folder.is_dir():
        raise ConfigError(f"camera folder {folder} does not exist")
    try:
        return sources.find_images(folder)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def frame_headers(frame_id: str, camera_id: str, category: str, content_type: str,
                  captured_at: datetime | None = None) -> list[tuple[str, bytes]]:
    """The contract's headers for one frame."""
    moment = captured_at or datetime.now(UTC)
    return [(c.CONTENT_TYPE, content_type.encode()), (c.CAMERA_ID, camera_id.encode()),
            (c.FRAME_ID, frame_id.encode()), (c.CAPTURED_AT, c.rfc3339(moment).encode()),
            (c.CATEGORY, category.encode())]


class Camera:
    """Publishes frames to the input topic through one producer."""

    def __init__(self, producer: KafkaProducer, topic: str, camera_id: str = "cam-1", category: str = "object",
                 cameras: int = 1) -> None:
        self.producer, self.topic, self.category = producer, topic, category
        self.camera_ids = [camera_id] if cameras <= 1 else [f"{camera_id}-{i}" for i in range(1, cameras + 1)]
        self.run_id = os.urandom(3).hex()
        self.seq = 0

    def publish(self, value: bytes, content_type: str, category: str | None = None,
                extra_headers: list[tuple[str, bytes]] | None = None,
                captured_at: datetime | None = None) -> PendingFrame:
        """Send one frame (not flushed); `PendingFrame.result` gives its partition and offset."""
        camera_id = self.camera_ids[self.seq % len(self.camera_ids)]
        frame_id = f"{camera_id}-{self.run_id}-{self.seq:07d}"
        self.seq += 1
        headers = frame_headers(frame_id, camera_id, category or self.category, content_type, captured_at) + \
            (extra_headers or [])
        delivery = kafka_io.send(self.producer, self.topic, camera_id.encode(), value, headers)
        return PendingFrame(frame_id, camera_id, delivery)

    def stream(self, images: Sequence[tuple[bytes, str]], rate: float = 0.0, frames: int | None = None,
               loop: bool = False, stop: Callable[[], bool] = lambda: False) -> list[SentFrame]:
        """Publish ``images`` ((bytes, content-type) pairs) at ``rate`` frames/s; returns every sent frame."""
        source: Iterator[tuple[bytes, str]] = cycle(images) if loop else iter(images)
        limit = frames if frames is not None else (None if loop else len(images))
        start, pending = time.monotonic(), []
        for index, (value, content_type) in enumerate(source):
            if (limit is not None and index >= limit) or stop():
                break
            if rate > 0:
                delay = start + index / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            pending.append(self.publish(value, content_type))
        self.producer.flush()
        return [frame.result() for frame in pending]


def load_images(paths: Sequence[Path]) -> list[tuple[bytes, str]]:
    return [(path.read_bytes(), IMAGE_SUFFIXES[path.suffix.lower()]) for path in paths]


def parse_args(argv: Sequence[str]) -> tuple[CameraSettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="hpad camera", description=__doc__.split("\n\n")[0])
    what = parser.add_argument_group("what to capture (one of --source, --cameras FILE, --dir)")
    what.add_argument("--source", help="rtsp://..., http(s)://... (MJPEG), a video file, /dev/videoN or a folder")
    what.add_argument("--cameras", dest="cameras_arg", metavar="FILE|N",
                      help="a cameras file (YAML, one capture thread per camera); with --dir: a number N spreads "
                           "the folder's frames over N camera ids")
    what.add_argument("--dir", type=Path, help="folder of images (the simulator: searched recursively, --rate)")
    one = parser.add_argument_group("one camera (--source; a cameras file sets these per camera)")
    one.add_argument("--camera-id", default="cam-1")
    one.add_argument("--category", default="object", help="category header (which prompt set scores it)")
    one.add_argument("--fps", type=float, help="most frames per second published (a folder: its pace)")
    one.add_argument("--every-n", type=int, default=1, help="keep only every n-th captured frame")
    one.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of published frames")
    one.add_argument("--change-threshold", type=float,
                     help="publish only when the scene changed by more than this (mean grey-level difference)")
    one.add_argument("--roi", help="region of interest x,y,w,h sent to the scorer (header roi)")
    one.add_argument("--tiling", help="auto, off or COLSxROWS[@OVERLAP] sent to the scorer (header tiling)")
    one.add_argument("--no-realtime", dest="realtime", action="store_false",
                     help="read a video file as fast as possible instead of at its frame rate")
    one.add_argument("--clock", choices=["auto", "stream", "wall"], default="auto",
                     help="captured_at from the stream's timestamps or the wall clock (auto: see README)")
    parser.add_argument("--rate", type=float, default=5.0, help="--dir: frames per second (0 = as fast as possible)")
    parser.add_argument("--loop", action="store_true", help="files and folders: repeat until --frames or Ctrl-C")
    parser.add_argument("--frames", type=int, help="stop after this many published frames (per camera)")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--bootstrap", dest="bootstrap_servers", help="alias of --bootstrap-servers")
    add_cli_flags(parser, CameraSettings)
    ns = parser.parse_args(list(argv))
    ns.cameras = 1
    if ns.cameras_arg is not None and ns.cameras_arg.isdigit():
        if ns.dir is None:
            parser.error("--cameras N (a number) goes with --dir; give a cameras file for streams")
        ns.cameras, ns.cameras_file = int(ns.cameras_arg), None
    else:
        ns.cameras_file = Path(ns.cameras_arg) if ns.cameras_arg is not None else None
    given = [name for name, value in (("--source", ns.source), ("--cameras FILE", ns.cameras_file),
                                      ("--dir", ns.dir)) if value is not None]
    if len(given) != 1:
        parser.error(f"give exactly one of --source, --cameras FILE, --dir (got {', '.join(given) or 'none'})")
    settings = load_settings(CameraSettings, cli_overrides(ns, CameraSettings))
    assert isinstance(settings, CameraSettings)
    return settings, ns


def specs_from_args(ns: argparse.Namespace) -> list[CameraSpec]:
    """The cameras to run: the cameras file's, or one from the ``--source`` flags."""
    if ns.cameras_file is not None:
        return load_cameras_file(ns.cameras_file)
    entry = {"id": ns.camera_id, "source": ns.source, "category": ns.category, "fps": ns.fps, "every_n": ns.every_n,
             "jpeg_quality": ns.jpeg_quality, "change_threshold": ns.change_threshold, "roi": ns.roi,
             "tiling": ns.tiling, "loop": ns.loop, "realtime": ns.realtime, "clock": ns.clock}
    return camera_specs([{k: v for k, v in entry.items() if v is not None}], where="--source")


def start(settings: CameraSettings, ns: argparse.Namespace, telemetry: object = None) -> int:
    if ns.dir is not None:
        return publish_folder(settings, ns, telemetry)
    return run_cameras(settings, specs_from_args(ns), max_frames=ns.frames, duration_s=ns.duration)


def capture_options(settings: CameraSettings, max_frames: int | None = None) -> CaptureOptions:
    return CaptureOptions(reconnect_backoff_s=settings.reconnect_backoff_ms / 1000,
                          reconnect_backoff_max_s=settings.reconnect_backoff_max_ms / 1000,
                          reconnect_jitter=settings.reconnect_jitter, max_pending=settings.max_pending_frames,
                          ack_timeout_s=settings.ack_timeout_ms / 1000, max_frames=max_frames)


def run_cameras(settings: CameraSettings, specs: Sequence[CameraSpec], max_frames: int | None = None,
                duration_s: float | None = None, stop: threading.Event | None = None) -> int:
    """One capture thread per camera, one producer; until every source ended, ``duration_s``, ``max_frames``
    per camera, ``stop`` or SIGTERM/SIGINT. Exit code 0, or 1 when a camera failed or a frame was not acknowledged."""
    set_ffmpeg_capture_options(settings.rtsp_transport)
    metrics = CameraMetrics()
    health = CameraHealth(settings.liveness_timeout_ms / 1000, metrics)
    health.add(spec.id for spec in specs)
    stop = stop or threading.Event()
    producer = kafka_io.make_producer(producer_kwargs(settings))
    options = capture_options(settings, max_frames)
    loops = [CaptureLoop(spec, open_source(spec.source, settings.open_timeout_ms, settings.read_timeout_ms,
                                           decode_folder=spec.change_threshold is not None),
                         Camera(producer, settings.input_topic, spec.id, spec.category), metrics, health, stop,
                         options) for spec in specs]
    threads = [threading.Thread(target=loop.run, name=f"camera-{loop.id}", daemon=True) for loop in loops]
    deadline = None if duration_s is None else time.monotonic() + duration_s
    server = None
    try:
        server = start_metrics_server(metrics, health, settings.metrics_host, settings.metrics_port)
        with stop_signals(lambda signum: stop.set()):
            for thread in threads:
                thread.start()
            log.info("capturing %d camera(s) to %s: %s", len(loops), settings.input_topic,
                     ", ".join(f"{s.id} ({s.kind.value})" for s in specs))
            while any(t.is_alive() for t in threads) and not stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    log.info("--duration %.0f s reached: stopping", duration_s)
                    break
                stop.wait(0.2)
            stop.set()
            join_s = (settings.open_timeout_ms + 3 * settings.read_timeout_ms + settings.ack_timeout_ms) / 1000
            for thread in threads:
                thread.join(timeout=join_s)
    finally:
        stop.set()
        kafka_io.flush(producer, settings.ack_timeout_ms / 1000)
        producer.close()
        if server is not None:
            server.stop()
    for loop in loops:
        log.info("%s", loop.summary())
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        log.error("capture threads still blocked at exit: %s", ", ".join(stuck))
    bad = [loop for loop in loops if loop.failure or loop.failed]
    for loop in bad:
        log.error("camera %s: %s", loop.id, loop.failure or f"{loop.failed} frames not published")
    return 1 if bad or stuck else 0


def publish_folder(settings: CameraSettings, ns: argparse.Namespace, telemetry: object = None) -> int:
    """Publish ``--dir`` until done, ``--frames`` or SIGTERM (finish the frame in hand, flush, exit 0)."""
    images = load_images(find_images(ns.dir))
    producer = kafka_io.make_producer(producer_kwargs(settings))
    camera = Camera(producer, settings.input_topic, ns.camera_id, ns.category, ns.cameras)
    stopping = threading.Event()
    try:
        with stop_signals(lambda signum: stopping.set(), install=True, signals=(signal.SIGTERM,)):
            sent = camera.stream(images, rate=ns.rate, frames=ns.frames, loop=ns.loop, stop=stopping.is_set)
    except KeyboardInterrupt:
        log.info("interrupted after %d frames", camera.seq)
        return 130
    finally:
        producer.close()
    log.info("published %d frames to %s", len(sent), settings.input_topic)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(argv, parse_args, start, packages=("hpad",), fatal=(), logger=log)
