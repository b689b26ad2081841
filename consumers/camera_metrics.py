"""Prometheus metrics and health of ``hpad camera`` (served on ``/metrics``, ``/healthz``, ``/readyz`` by the
kernel's metrics server, consumers/metrics.py).

Unlike the scorer's, these metrics carry a ``camera`` label: a camera process serves the fixed, small set
of cameras its cameras file lists, and which camera is down is the point of watching it. ``/healthz`` is
200 while every capture thread has looped within HPAD_LIVENESS_TIMEOUT_MS (a thread that waits out a
reconnect backoff still loops) and lists each camera (stream up/down, age of the last frame, reconnects);
``/readyz`` is 200 while every camera's stream is up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

from consumers.metrics import Health, MetricSet

SKIP_REASONS = ("every_n", "rate", "change")
FAILURE_REASONS = ("encode", "broker")


class CameraMetrics(MetricSet):
    """Every metric of one camera process, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.captured = Counter("hpad_camera_frames_captured", "Frames read from the source", ["camera"],
                                registry=r)
        self.published = Counter("hpad_camera_frames_published", "Frames acknowledged by the broker (acks=all)",
                                 ["camera"], registry=r)
        self.skipped = Counter("hpad_camera_frames_skipped", "Captured frames not published, by reason (every_n, "
                               "rate = over the fps cap, change = below the change threshold)",
                               ["camera", "reason"], registry=r)
        self.failed = Counter("hpad_camera_frames_failed", "Frames that could not be published, by reason "
                              "(encode, broker = refused or not acknowledged after the producer's retries)",
                              ["camera", "reason"], registry=r)
        self.lost = Counter("hpad_camera_frames_lost", "Frames a live source delivered while its stream was "
                            "down (an estimate: the stream's frame rate x downtime)", ["camera"], registry=r)
        self.drops = Counter("hpad_camera_stream_drops", "Times a live stream dropped or stalled (read timeout)",
                             ["camera"], registry=r)
        self.reconnects = Counter("hpad_camera_reconnects", "Times a dropped stream was reconnected (frames "
                                  "flowing again)", ["camera"], registry=r)
        self.connect_failures = Counter("hpad_camera_connect_failures", "Attempts to open a source that failed "
                                        "(each followed by a backoff)", ["camera"], registry=r)
        self.up = Gauge("hpad_camera_stream_up", "1 while the camera's source delivers frames, 0 while it is down "
                        "or reconnecting", ["camera"], registry=r)
        self.last_frame = Gauge("hpad_camera_last_frame_timestamp_seconds", "Unix time the last frame was read",
                                ["camera"], registry=r)
        self.last_frame_age = Gauge("hpad_camera_last_frame_age_seconds", "Seconds since the last frame was read "
                                    "(since start while none was)", ["camera"], registry=r)
        self.pending = Gauge("hpad_camera_pending_frames", "Frames handed to the producer, not yet acknowledged",
                             ["camera"], registry=r)
        self._started = time.time()
        self._last: dict[str, float] = {}

    def add_camera(self, camera: str) -> None:
        """Create every series of ``camera`` at zero (so dashboards and alerts see it before its first frame)."""
        for metric in (self.captured, self.published, self.lost, self.drops, self.reconnects,
                       self.connect_failures):
            metric.labels(camera=camera)
        for reason in SKIP_REASONS:
            self.skipped.labels(camera=camera, reason=reason)
        for reason in FAILURE_REASONS:
            self.failed.labels(camera=camera, reason=reason)
        self.up.labels(camera=camera).set(0)
        self.pending.labels(camera=camera).set(0)
        self.last_frame.labels(camera=camera)
        self.last_frame_age.labels(camera=camera).set_function(lambda: self.age(camera))

    def frame_read(self, camera: str, wall: float) -> None:
        self._last[camera] = wall
        self.captured.labels(camera=camera).inc()
        self.last_frame.labels(camera=camera).set(wall)

    def age(self, camera: str) -> float:
        return time.time() - self._last.get(camera, self._started)


class CameraHealth(Health):
    """Liveness = every capture thread beat recently; readiness = every stream is up."""

    def __init__(self, liveness_timeout_s: float, metrics: CameraMetrics | None = None) -> None:
        super().__init__(liveness_timeout_s)
        self.metrics = metrics
        self._lock = threading.Lock()
        self._beats: dict[str, float] = {}
        self._up: dict[str, bool] = {}
        self._reconnects: dict[str, int] = {}

    def add(self, cameras: Iterable[str]) -> None:
        with self._lock:
            for camera in cameras:
                self._beats[camera] = time.monotonic()
                self._up[camera] = False
                self._reconnects[camera] = 0

    def camera_beat(self, camera: str) -> None:
        with self._lock:
            self._beats[camera] = time.monotonic()
        self.beat()

    def set_up(self, camera: str, up: bool) -> None:
        with self._lock:
            self._up[camera] = up

    def reconnected(self, camera: str) -> None:
        with self._lock:
            self._reconnects[camera] += 1

    def finished(self, camera: str) -> None:
        """A camera whose source ended (a file without loop) no longer needs to beat."""
        with self._lock:
            self._beats.pop(camera, None)

    def heartbeat_age(self) -> float:
        with self._lock:
            beats = list(self._beats.values())
        return max((time.monotonic() - b for b in beats), default=super().heartbeat_age())

    def ready(self) -> bool:
        with self._lock:
            return bool(self._up) and all(self._up.values())

    def liveness_text(self) -> str:
        ok = self.live()
        lines = [f"{'ok' if ok else 'stuck'}: oldest capture-thread heartbeat {self.heartbeat_age():.1f} s ago"]
        with self._lock:
            for camera, up in sorted(self._up.items()):
                age = f"{self.metrics.age(camera):.1f} s" if self.metrics is not None else "-"
                lines.append(f"camera {camera}: stream {'up' if up else 'down'}, last frame {age} ago, "
                             f"reconnects {self._reconnects[camera]}")
        return "\n".join(lines) + "\n"

    def readiness_text(self) -> str:
        with self._lock:
            down = sorted(camera for camera, up in self._up.items() if not up)
        return f"streams down: {', '.join(down) or 'none'}\n"
