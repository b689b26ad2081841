"""``hpad camera``: publish a folder of images as camera frames (simulator for the demo, tests, benchmarks).

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
from consumers import kafka_io
from consumers.service import run_main, stop_signals
from consumers.settings import CameraSettings, add_cli_flags, cli_overrides, load_settings, producer_kwargs
from hpad.errors import ConfigError

log = logging.getLogger("hpad.camera")
IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


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
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConfigError(f"no .png/.jpg/.jpeg images below {folder}")
    return paths


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
                extra_headers: list[tuple[str, bytes]] | None = None) -> PendingFrame:
        """Send one frame (not flushed); `PendingFrame.result` gives its partition and offset."""
        camera_id = self.camera_ids[self.seq % len(self.camera_ids)]
        frame_id = f"{camera_id}-{self.run_id}-{self.seq:07d}"
        self.seq += 1
        headers = frame_headers(frame_id, camera_id, category or self.category, content_type) + (extra_headers or [])
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
    parser.add_argument("--dir", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--rate", type=float, default=5.0, help="frames per second (0 = as fast as possible)")
    parser.add_argument("--loop", action="store_true", help="repeat the folder until --frames or Ctrl-C")
    parser.add_argument("--frames", type=int, help="stop after this many frames")
    parser.add_argument("--camera-id", default="cam-1")
    parser.add_argument("--cameras", type=int, default=1, help="spread frames over N camera ids")
    parser.add_argument("--category", default="object", help="category header (which prompt set scores it)")
    parser.add_argument("--bootstrap", dest="bootstrap_servers", help="alias of --bootstrap-servers")
    add_cli_flags(parser, CameraSettings)
    ns = parser.parse_args(list(argv))
    settings = load_settings(CameraSettings, cli_overrides(ns, CameraSettings))
    assert isinstance(settings, CameraSettings)
    return settings, ns


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
    return run_main(argv, parse_args, publish_folder, packages=(), fatal=(), logger=log)
