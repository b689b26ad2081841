"""One camera's capture loop: read -> thin (every n-th, fps cap, change gate) -> JPEG -> publish, and
reconnect a live source that drops or stalls.

`CaptureLoop.run` (one thread per camera) reads `Captured` frames from a `FrameSource`, counts every frame
read, skips by reason (``every_n``, ``rate``, ``change``), encodes decoded frames as JPEG at the camera's
quality (folder images go as they are on disk) and hands them to the shared producer through `Camera`.
Every handed-over frame is followed to its acknowledgement (acks=all): published when the broker has it,
failed (counted and logged) when the producer gave up; at most ``max_pending`` are in flight per camera.

When a live source (RTSP, HTTP, device) gives no frame (dropped, or stalled past the read timeout) the loop
logs the drop, reopens it with capped exponential backoff with jitter (a line per failed attempt), and logs
when frames flow again, with the downtime and an estimate of the frames lost meanwhile: the stream's frame
rate (CAP_PROP_FPS, else the rate measured before the drop) x the downtime. Files and folders end (or start
again with ``loop``).

Gate time: the fps cap runs on the stream's own clock for files and RTSP (so a file gives the same frames
however fast it is read) and on the monotonic clock for the rest; it restarts with every connection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import cv2
import numpy as np

from consumers.camera_metrics import SKIP_REASONS, CameraHealth, CameraMetrics
from consumers.cameras_file import CameraSpec
from consumers.kafka_io import Backoff
from consumers.sources import Captured, FrameSource, SourceKind

log = logging.getLogger("hpad.camera")
THUMB_WIDTH = 64


class Publisher(Protocol):
    """What a capture loop publishes through (consumers.camera.Camera): returns a pending frame whose
    ``delivery.outcome()`` says when the broker acknowledged it."""

    def publish(self, value: bytes, content_type: str, category: str | None = None,
                extra_headers: list[tuple[str, bytes]] | None = None, captured_at: datetime | None = None) -> Any: ...


class RateGate:
    """Frames-per-second cap on a clock of the caller's choice: a frame passes when its time reaches the next
    slot; slots are ``1/fps`` apart and never bank up (a gap in the stream does not allow a burst)."""

    def __init__(self, fps: float | None, tolerance_s: float = 1e-3) -> None:
        self.period = 1.0 / fps if fps else 0.0
        self.tolerance_s = tolerance_s
        self.next_due: float | None = None

    def admit(self, t: float) -> bool:
        if self.period == 0.0:
            return True
        if self.next_due is not None and t < self.next_due - self.tolerance_s:
            return False
        self.next_due = max((self.next_due or t) + self.period, t)
        return True

    def reset(self) -> None:
        self.next_due = None


def thumbnail(pixels: np.ndarray) -> np.ndarray:
    """Grey thumbnail ``THUMB_WIDTH`` pixels wide (area interpolation), float32 [h, 64]."""
    grey = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY) if pixels.ndim == 3 else pixels
    height = max(1, round(grey.shape[0] * THUMB_WIDTH / grey.shape[1]))
    return cv2.resize(grey, (THUMB_WIDTH, height), interpolation=cv2.INTER_AREA).astype(np.float32)


class ChangeGate:
    """Passes a frame when its thumbnail differs from the last passed one by more than ``threshold`` (mean
    absolute grey-level difference, 0-255); the first frame always passes."""

    def __init__(self, threshold: float | None) -> None:
        self.threshold = threshold
        self.last: np.ndarray | None = None

    def admit(self, pixels: np.ndarray | None) -> bool:
        if self.threshold is None or pixels is None:
            return True
        thumb = thumbnail(pixels)
        if self.last is not None and self.last.shape == thumb.shape and \
                float(np.abs(thumb - self.last).mean()) <= self.threshold:
            return False
        self.last = thumb
        return True


@dataclass(frozen=True)
class CaptureOptions:
    """Process-wide knobs of every capture loop (from CameraSettings)."""

    reconnect_backoff_s: float = 0.5
    reconnect_backoff_max_s: float = 30.0
    reconnect_jitter: float = 0.2
    max_pending: int = 1000
    ack_timeout_s: float = 30.0
    max_frames: int | None = None  # stop after this many published frames (tests, demo)


@dataclass
class Connection:
    """Clock anchors of one open source: the first frame's wall and stream time, frames read since."""

    wall0: float | None = None
    stream0_ms: float | None = None
    mono0: float | None = None
    frames: int = 0
    last_wall: float | None = None
    fps: float | None = None

    def measured_fps(self) -> float | None:
        if self.frames >= 2 and self.wall0 is not None and self.last_wall is not None and self.last_wall > self.wall0:
            return (self.frames - 1) / (self.last_wall - self.wall0)
        return None


class CaptureLoop:
    """Captures one camera until its source ends, ``max_frames`` are published, or ``stop`` is set."""

    def __init__(self, spec: CameraSpec, source: FrameSource, camera: Publisher, metrics: CameraMetrics,
                 health: CameraHealth, stop: threading.Event, options: CaptureOptions = CaptureOptions(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spec, self.source, self.camera = spec, source, camera
        self.metrics, self.health, self.stop, self.options = metrics, health, stop, options
        self.clock = clock
        self.id = spec.id
        self.kind = source.kind
        self.rate = RateGate(spec.fps if self.kind is not SourceKind.FOLDER else None)
        self.change = ChangeGate(spec.change_threshold)
        self.backoff = Backoff(options.reconnect_backoff_s, options.reconnect_backoff_max_s,
                               options.reconnect_jitter)
        self.pending: deque[Any] = deque()  # consumers.camera.PendingFrame
        self.extra_headers = spec.extra_headers()
        self.stream_time = self.kind in (SourceKind.FILE, SourceKind.RTSP)
        self.use_stream_clock = spec.stream_clock() and self.stream_time
        self.captured = self.handed = self.published = self.failed = 0
        self.lost = self.reconnects = 0
        self.failure: str | None = None
        self.connection = Connection()
        self.previous_fps: float | None = None
        self.attempts = 0  # failed (re)connect attempts of the current outage
        self.skips = {reason: 0 for reason in SKIP_REASONS}
        self._folder_next: float | None = None
        metrics.add_camera(self.id)

    # ---------------------------------------------------------------------------------------- loop

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a thread must say why it ended; the process exits 1
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("camera %s: capture failed", self.id)
        finally:
            self.source.close()
            self._set_up(False)
            self.finish()
            self.health.finished(self.id)

    def _run(self) -> None:
        if not self._connect(first=True):
            return
        down_since: float | None = None
        while not self._done():
            self.health.camera_beat(self.id)
            frame = self.source.read()
            if frame is None:
                if self.kind.live:
                    if down_since is None:
                        down_since = self._dropped()
                    else:  # reopened, but no frame came: a failed attempt
                        self.source.close()
                        self._failed_attempt("reconnect", "opened, but no frame came")
                    if not self._connect(first=False):
                        self._count_lost(down_since, time.time(), resumed=False)
                        return
                    continue
                if self.spec.loop and self.connection.frames > 0:
                    self._reopen_file()
                    continue
                log.info("camera %s: %s ended after %d frames", self.id, self.kind.value, self.captured)
                return
            if down_since is not None:
                self._resumed(down_since, frame.wall)
                down_since = None
            self._handle(frame)

    def _done(self) -> bool:
        limit = self.options.max_frames
        return self.stop.is_set() or (limit is not None and self.handed >= limit)

    # ---------------------------------------------------------------------------------------- connecting

    def _connect(self, first: bool) -> bool:
        """Open the source, retrying with backoff (live sources); False when stopped (or a file cannot open)."""
        while not self.stop.is_set():
            self.health.camera_beat(self.id)
            if self.source.open():
                self.connection = Connection(fps=self.source.nominal_fps())
                self.rate.reset()
                if first:
                    self.attempts = 0
                    self.backoff.reset()
                    log.info("camera %s: opened %s source %s (%s fps)", self.id, self.kind.value, self.spec.source,
                             f"{self.connection.fps:g}" if self.connection.fps else "unknown")
                    self._set_up(True)
                return True
            if not self.kind.live:
                self.metrics.connect_failures.labels(camera=self.id).inc()
                self.failure = f"cannot open {self.kind.value} {self.spec.source}"
                log.error("camera %s: %s", self.id, self.failure)
                return False
            self._failed_attempt("open" if first else "reconnect", "cannot open the source")
        return False

    def _failed_attempt(self, what: str, why: str) -> None:
        """Count and log a failed attempt, then wait out the backoff (returns early on stop)."""
        self.metrics.connect_failures.labels(camera=self.id).inc()
        self.attempts += 1
        delay = self.backoff.next_delay()
        log.warning("camera %s: %s attempt %d failed (%s); backoff: next attempt in %.2f s", self.id, what,
                    self.attempts, why, delay)
        self.stop.wait(delay)

    def _dropped(self) -> float:
        since = self.connection.last_wall or time.time()
        self.metrics.drops.labels(camera=self.id).inc()
        self._set_up(False)
        log.warning("camera %s: stream dropped (no frame within the read timeout, or the connection closed) "
                    "after %d frames on this connection; reconnecting", self.id, self.connection.frames)
        self.previous_fps = self.connection.fps or self.connection.measured_fps() or self.spec.fps
        self.source.close()
        return since

    def _resumed(self, down_since: float, now: float) -> None:
        downtime, lost, fps = self._count_lost(down_since, now, resumed=True)
        self.reconnects += 1
        self.metrics.reconnects.labels(camera=self.id).inc()
        self.health.reconnected(self.id)
        self._set_up(True)
        self.backoff.reset()
        rate = f"{fps:g} fps" if fps else "unknown fps"
        log.warning("camera %s: stream resumed after %.1f s down (%d failed attempts); about %d frames lost "
                    "while down (estimate: %s x %.1f s)", self.id, downtime, self.attempts, lost, rate, downtime)
        self.attempts = 0

    def _count_lost(self, down_since: float, now: float, resumed: bool) -> tuple[float, int, float | None]:
        downtime = max(0.0, now - down_since)
        fps = self.previous_fps
        lost = max(0, round(downtime * fps) - (1 if resumed else 0)) if fps else 0
        self.lost += lost
        self.metrics.lost.labels(camera=self.id).inc(lost)
        if not resumed and lost:
            log.warning("camera %s: stopped while the stream was down for %.1f s; about %d frames lost", self.id,
                        downtime, lost)
        return downtime, lost, fps

    def _reopen_file(self) -> None:
        if not self.source.open():
            raise RuntimeError(f"cannot reopen {self.spec.source} for the next loop")
        self.connection = Connection(fps=self.source.nominal_fps())
        self.rate.reset()

    def _set_up(self, up: bool) -> None:
        self.metrics.up.labels(camera=self.id).set(1 if up else 0)
        self.health.set_up(self.id, up)

    # ---------------------------------------------------------------------------------------- one frame

    def _handle(self, frame: Captured) -> None:
        conn = self.connection
        if conn.frames == 0:
            conn.wall0, conn.stream0_ms, conn.mono0 = frame.wall, frame.stream_ms, self.clock()
        conn.frames += 1
        conn.last_wall = frame.wall
        self.captured += 1
        self.metrics.frame_read(self.id, frame.wall)
        offset_s = self._stream_offset(frame)
        if self.kind is SourceKind.FILE and self.spec.realtime and offset_s is not None:
            wait = conn.mono0 + offset_s - self.clock()
            if wait > 0:
                self.stop.wait(wait)
        if (self.captured - 1) % self.spec.every_n:
            return self._skip("every_n")
        gate_time = offset_s if offset_s is not None else self.clock()
        if not self.rate.admit(gate_time):
            return self._skip("rate")
        if not self.change.admit(frame.pixels):
            return self._skip("change")
        if self.kind is SourceKind.FOLDER and self.spec.fps:
            self._pace_folder()
        self._publish(frame, offset_s)
        return None

    def _stream_offset(self, frame: Captured) -> float | None:
        """Seconds since the connection's first frame on the stream's own clock (files, RTSP), else None."""
        conn = self.connection
        if not self.stream_time or frame.stream_ms is None or conn.stream0_ms is None:
            return None
        return (frame.stream_ms - conn.stream0_ms) / 1000.0

    def _pace_folder(self) -> None:
        now = self.clock()
        due = self._folder_next if self._folder_next is not None else now
        if due > now:
            self.stop.wait(due - now)
        self._folder_next = max(due, now) + 1.0 / self.spec.fps if self.spec.fps else None

    def _skip(self, reason: str) -> None:
        self.skips[reason] += 1
        self.metrics.skipped.labels(camera=self.id, reason=reason).inc()

    def captured_at(self, frame: Captured, offset_s: float | None) -> datetime:
        if self.use_stream_clock and offset_s is not None and self.connection.wall0 is not None:
            return datetime.fromtimestamp(self.connection.wall0 + offset_s, tz=UTC)
        return datetime.fromtimestamp(frame.wall, tz=UTC)

    def _publish(self, frame: Captured, offset_s: float | None) -> None:
        if frame.encoded is not None and frame.content_type is not None:
            value, content_type = frame.encoded, frame.content_type
        else:
            ok, buffer = cv2.imencode(".jpg", frame.pixels, [cv2.IMWRITE_JPEG_QUALITY, self.spec.jpeg_quality])
            if not ok:
                self.failed += 1
                self.metrics.failed.labels(camera=self.id, reason="encode").inc()
                log.error("camera %s: could not encode frame %d as JPEG", self.id, self.captured)
                return
            value, content_type = buffer.tobytes(), "image/jpeg"
        pending = self.camera.publish(value, content_type, self.spec.category, self.extra_headers,
                                      captured_at=self.captured_at(frame, offset_s))
        self.handed += 1
        self.pending.append(pending)
        self.reap()
        while len(self.pending) > self.options.max_pending and not self.stop.is_set():
            self.reap(wait_s=1.0)

    # ---------------------------------------------------------------------------------------- acks

    def reap(self, wait_s: float = 0.0) -> None:
        """Count acknowledged / failed frames at the head of the queue (waiting up to ``wait_s`` for the first)."""
        while self.pending:
            ok, error = self.pending[0].delivery.outcome(wait_s=wait_s)
            if not ok and error is None:
                break
            frame = self.pending.popleft()
            wait_s = 0.0
            if ok:
                self.published += 1
                self.metrics.published.labels(camera=self.id).inc()
            else:
                self.failed += 1
                self.metrics.failed.labels(camera=self.id, reason="broker").inc()
                log.error("camera %s: frame %s was not accepted by the broker: %s", self.id, frame.frame_id, error)
        self.metrics.pending.labels(camera=self.id).set(len(self.pending))

    def finish(self) -> None:
        """Wait (up to the ack timeout) for every frame in flight; those still unacknowledged count as failed."""
        deadline = time.monotonic() + self.options.ack_timeout_s
        while self.pending and time.monotonic() < deadline:
            self.reap(wait_s=min(1.0, max(0.0, deadline - time.monotonic())))
        for frame in self.pending:
            self.failed += 1
            self.metrics.failed.labels(camera=self.id, reason="broker").inc()
            log.error("camera %s: frame %s not acknowledged within %.0f s", self.id, frame.frame_id,
                      self.options.ack_timeout_s)
        self.pending.clear()
        self.metrics.pending.labels(camera=self.id).set(0)

    def summary(self) -> str:
        return (f"camera {self.id}: captured {self.captured}, published {self.published}, skipped {self.skips}, "
                f"failed {self.failed}, lost while down about {self.lost} (estimate), reconnects {self.reconnects}")
