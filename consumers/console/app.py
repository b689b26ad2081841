"""``hpad console``: the reader thread, the web app (Starlette, served by uvicorn) and the process.

Reader (one thread): assign every partition of the frames and events topics (no consumer group, nothing is
committed), start at the end (or the beginning), poll, hand frames and events to the `FrameStore`.

HTTP (``HPAD_CONSOLE_HOST``:``HPAD_CONSOLE_PORT``):

* ``GET /`` the page (``static/``: plain HTML, JS and CSS shipped with the package, no CDN);
* ``GET /api/state`` every camera as JSON, and the console's mode (read-only or feedback);
* ``GET /api/stream`` server-sent events: ``camera`` with a camera's JSON whenever it changed;
* ``GET /api/overlay/{size}/{frame_id}`` the frame with its mask overlaid, JPEG (size ``thumb``, ``page``,
  ``full``; ``?mask=0`` for the bare frame);
* ``GET /frame/{frame_id}`` one frame's page (alerts link here); a 404 page once it left memory;
* ``POST /api/feedback`` ``{frame_id, verdict, note}`` with ``Authorization: Bearer <token>``: publishes the
  feedback record and answers 201 with it (without the frame bytes); 403 on a read-only console or a wrong
  token, 404 for a frame not in memory, 422 for a bad body, 503 when Kafka did not acknowledge;
* ``GET /healthz``.

``/metrics``, ``/healthz`` and ``/readyz`` are also on the metrics port, like every hpad process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import html
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from consumers import kafka_io
from consumers.console.feedback import (
    FeedbackRefused,
    check_request,
    encode_record,
    feedback_record,
    public_view,
)
from consumers.console.metrics import ConsoleMetrics
from consumers.console.render import render_jpeg
from consumers.console.settings import ConsoleSettings
from consumers.console.store import FrameEntry, FrameStore
from consumers.contract import Limits, header_map, parse_frame_headers, rfc3339
from consumers.metrics import Health
from consumers.service import Stoppable, Telemetry, run_main, stop_signals
from consumers.settings import connection_kwargs, parse_service_args, producer_kwargs
from hpad.errors import FrameError

log = logging.getLogger("hpad.console")
STATIC = Path(__file__).resolve().parent / "static"
SIZES = {"thumb": 200, "page": 720, "full": 16384}
LIVE_INTERVAL_S = 0.2
RESEND_ALL_S = 5.0
MAX_FEEDBACK_BODY = 16 * 1024
SECURITY_HEADERS = [
    # everything the page needs comes from the console itself: no inline code, no CDN, not framed elsewhere
    (b"content-security-policy", b"default-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def reader_kwargs(s: ConsoleSettings) -> dict[str, Any]:
    return {
        **connection_kwargs(s), "group_id": None, "enable_auto_commit": False,
        "auto_offset_reset": s.console_start_from, "fetch_max_wait_ms": 100,
        "max_partition_fetch_bytes": s.max_payload_bytes + 1024 * 1024,
        "fetch_max_bytes": max(52428800, s.max_payload_bytes + 1024 * 1024),
        "isolation_level": s.isolation_level,
    }


class Console(Stoppable):
    """The store, the Kafka reader thread and the feedback producer of one console process."""

    def __init__(self, settings: ConsoleSettings, metrics: ConsoleMetrics | None = None,
                 health: Health | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.metrics = metrics or ConsoleMetrics()
        self.health = health or Health(settings.liveness_timeout_ms / 1000)
        self.health.model_loaded = True  # nothing to load: ready once the topics are assigned
        s = settings
        self.store = FrameStore(frames_per_camera=s.console_frames_per_camera,
                                anomalies_per_camera=s.console_anomalies_per_camera,
                                timeline_points=s.console_timeline_points, max_cameras=s.console_max_cameras,
                                pending_events=s.console_pending_events, max_bytes=s.console_max_bytes,
                                on_drop=lambda reason: self.metrics.dropped.labels(reason=reason).inc())
        self.limits = Limits(s.max_payload_bytes, s.max_pixels)
        self.operators = s.operators()
        self.identity = f"{s.client_id}@{socket.gethostname()}:{os.getpid()}"
        self._producer: KafkaProducer | None = None
        self._producer_lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name="hpad-console-reader", daemon=True)

    # ------------------------------------------------------------------------------ reader
    def start(self) -> Console:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.request_stop("stop")
        self._thread.join(timeout=10)
        with self._producer_lock:
            if self._producer is not None:
                self._producer.close(timeout=5)
                self._producer = None

    def _read(self) -> None:
        consumer: KafkaConsumer | None = None
        backoff = kafka_io.Backoff(0.5, 5.0)
        try:
            while not self.stop_event.is_set():
                self.health.beat()
                self.metrics.heartbeat.set_to_current_time()
                if consumer is None:
                    consumer = self._connect(backoff)
                    continue
                try:
                    batch = consumer.poll(timeout_ms=200, max_records=256)
                except KafkaError as exc:
                    log.warning("poll failed (%s); retrying", exc)
                    self.stop_event.wait(backoff.next_delay())
                    continue
                for tp, records in batch.items():
                    for record in records:
                        if tp.topic == self.settings.input_topic:
                            self.on_frame(record)
                        else:
                            self.on_event(record.value)
                self._update_gauges()
        finally:
            if consumer is not None:
                consumer.close(autocommit=False)

    def _connect(self, backoff: kafka_io.Backoff) -> KafkaConsumer | None:
        s = self.settings
        try:
            consumer = kafka_io.make_consumer(reader_kwargs(s))
            partitions: list[TopicPartition] = []
            for topic in (s.input_topic, s.events_topic):
                ids = consumer.partitions_for_topic(topic)
                if not ids:
                    consumer.close()
                    log.warning("topic %s does not exist yet; waiting for it", topic)
                    self.stop_event.wait(backoff.next_delay())
                    return None
                partitions += [TopicPartition(topic, p) for p in sorted(ids)]
            consumer.assign(partitions)
            if s.console_start_from == "latest":
                consumer.seek_to_end(*partitions)
            else:
                consumer.seek_to_beginning(*partitions)
            for tp in partitions:  # resolve the positions now: what is published after "ready" is seen
                consumer.position(tp)
        except KafkaError as exc:
            log.warning("cannot read from Kafka yet (%s); retrying", exc)
            self.stop_event.wait(backoff.next_delay())
            return None
        backoff.reset()
        self.health.assigned = len(partitions)
        log.info("console reading %s and %s from the %s (%d partitions)", s.input_topic, s.events_topic,
                 s.console_start_from, len(partitions))
        return consumer

    def on_frame(self, record: Any) -> None:
        self.metrics.records.labels(kind="frames").inc()
        value = record.value or b""
        if len(value) > self.settings.max_payload_bytes:
            self.store._drop("too_large")
            return
        try:
            meta = parse_frame_headers(record.headers, record.key, self.settings.default_category)
        except FrameError as exc:
            log.debug("frame at %s@%d dropped: %s", record.topic, record.offset, exc)
            self.store._drop("bad_header")
            return
        if not value:
            self.store._drop("bad_header")
            return
        content_type = header_map(record.headers).get("content-type", "")
        self.store.add_frame(FrameEntry(meta.frame_id, meta.camera_id, meta.category, content_type,
                                        rfc3339(meta.captured_at) if meta.captured_at else None, value))

    def on_event(self, value: bytes | None) -> None:
        self.metrics.records.labels(kind="events").inc()
        try:
            event = json.loads(value or b"")
        except ValueError:
            event = None
        self.store.add_event(event)

    def _update_gauges(self) -> None:
        with self.store.lock:
            self.metrics.frames.set(len(self.store.index))
            self.metrics.bytes.set(self.store.bytes)
            self.metrics.cameras.set(len(self.store.cameras))

    # ------------------------------------------------------------------------------ feedback
    def operator_for(self, authorization: str | None) -> str:
        if not self.operators:
            raise FeedbackRefused(403, "read_only", "this console is read-only: feedback needs "
                                  "HPAD_CONSOLE_FEEDBACK_TOKEN on the console")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise FeedbackRefused(403, "bad_token", "feedback needs the operator token (Authorization: Bearer ...)")
        for known, operator in self.operators.items():
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                return operator
        raise FeedbackRefused(403, "bad_token", "the operator token is not valid")

    def give_feedback(self, authorization: str | None, body: object) -> dict[str, Any]:
        """Check, publish (acknowledged by the broker) and return the record; `FeedbackRefused` otherwise."""
        try:
            operator = self.operator_for(authorization)
            frame_id, verdict, note = check_request(body)
            entry = self.store.get(frame_id)
            if entry is None:
                raise FeedbackRefused(404, "unknown_frame", f"frame {frame_id} is no longer in the console's memory")
            record = feedback_record(entry, verdict, note, operator, self.identity)
            self._publish(record)
        except FeedbackRefused as refusal:
            self.metrics.refused.labels(reason=refusal.reason).inc()
            raise
        self.store.note_feedback(frame_id, verdict, operator)
        self.metrics.feedback.labels(verdict=verdict).inc()
        log.info("feedback %s on %s by %s published to %s", verdict, frame_id, operator, self.settings.feedback_topic)
        return record

    def _publish(self, record: dict[str, Any]) -> None:
        s = self.settings
        try:
            with self._producer_lock:
                if self._producer is None:
                    self._producer = kafka_io.make_producer(producer_kwargs(s))
                future = self._producer.send(
                    s.feedback_topic, key=record["camera_id"].encode(), value=encode_record(record),
                    headers=[("content-type", b"application/json"),
                             ("hpad-feedback-id", record["feedback_id"].encode())])
            future.get(timeout=s.request_timeout_ms / 1000)
        except KafkaError as exc:
            raise FeedbackRefused(503, "kafka_error", f"the feedback was not acknowledged by Kafka ({exc}); "
                                  "try again") from exc

    # ------------------------------------------------------------------------------ views
    def page_config(self) -> dict[str, Any]:
        s = self.settings
        return {"feedback_enabled": bool(self.operators), "public_url": s.console_public_url,
                "frames_per_camera": s.console_frames_per_camera,
                "anomalies_per_camera": s.console_anomalies_per_camera,
                "stale_after_s": s.console_stale_after_s, "topics": {"frames": s.input_topic,
                                                                     "events": s.events_topic,
                                                                     "feedback": s.feedback_topic}}

    def overlay(self, frame_id: str, size: str, with_mask: bool) -> bytes | None:
        entry = self.store.get(frame_id)
        if entry is None or entry.event is None:  # only frames a worker scored (and so size-checked) are drawn
            return None
        key = f"{size}:{int(with_mask)}"
        cached = entry.cache.get(key)
        if cached is not None:
            return cached
        data = render_jpeg(entry.value, entry.content_type, entry.event, max_side=SIZES[size], limits=self.limits,
                           with_mask=with_mask)
        if size == "thumb":
            entry.cache[key] = data
        return data


# ------------------------------------------------------------------------------------------ web app


def frame_page(console: Console, frame_id: str) -> tuple[int, str]:
    entry = console.store.get(frame_id)
    esc = html.escape
    if entry is None:
        s = console.settings
        body = (f"<h1>Frame not in memory</h1><p>Frame <code>{esc(frame_id)}</code> is not (or no longer) held "
                f"by this console. It keeps the newest {s.console_frames_per_camera} frames and the newest "
                f"{s.console_anomalies_per_camera} anomalies of each camera since it started.</p>"
                "<p><a href=\"/\">Back to the line</a></p>")
        return 404, _page("frame not found", body, "missing")
    event = entry.event or {}
    quoted = esc(frame_id, quote=True)
    rows = "".join(f"<tr><th>{esc(name)}</th><td>{esc(str(event.get(name, '')))}</td></tr>" for name in (
        "camera_id", "category", "score", "threshold", "is_anomaly", "prompt_version", "prompt_source",
        "captured_at", "scored_at", "model_identity", "random_weights"))
    verdicts = "".join(f"<li>{esc(f['verdict'])} by {esc(f['operator'])}</li>" for f in entry.feedback)
    body = (f"<h1>Frame <code>{esc(frame_id)}</code></h1>"
            f"<p><a href=\"/\">Back to the line</a></p>"
            f"<div class=\"frame-page\"><img class=\"overlay\" alt=\"frame {quoted} with anomaly overlay\" "
            f"data-frame-id=\"{quoted}\" src=\"/api/overlay/page/{_url(frame_id)}\">"
            f"<div><table class=\"fields\">{rows}</table>"
            f"<div class=\"feedback\" data-frame-id=\"{quoted}\"></div><ul class=\"verdicts\">{verdicts}</ul>"
            f"<figure class=\"bare\"><img alt=\"frame {quoted} without overlay\" "
            f"src=\"/api/overlay/page/{_url(frame_id)}?mask=0\"><figcaption>without overlay</figcaption></figure>"
            "</div></div>")
    return 200, _page(f"frame {frame_id}", body, "frame")


def _url(frame_id: str) -> str:
    from urllib.parse import quote

    return quote(frame_id, safe="")


def _page(title: str, body: str, page: str) -> str:
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>hpad console: "
            f"{html.escape(title)}</title><link rel=\"stylesheet\" href=\"/static/console.css\"></head>"
            f"<body data-page=\"{page}\"><header><a class=\"brand\" href=\"/\">hpad console</a>"
            "<span id=\"mode\"></span><span id=\"token-box\"></span></header>"
            f"<main>{body}</main><script src=\"/static/console.js\"></script></body></html>")


class SecurityHeaders:
    """ASGI middleware adding `SECURITY_HEADERS` to every response (streaming ones included)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def build_app(console: Console):  # -> Starlette
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import (
        FileResponse,
        HTMLResponse,
        JSONResponse,
        PlainTextResponse,
        Response,
        StreamingResponse,
    )
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    stale = console.settings.console_stale_after_s

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def state(request: Request) -> Response:
        return JSONResponse({"config": console.page_config(), "cameras": console.store.snapshots(stale)})

    async def stream(request: Request) -> Response:
        async def events():
            console.metrics.clients.inc()
            try:
                seen: dict[str, int] = {}
                last_all = time.monotonic()
                yield "retry: 1000\n\n"
                while not console.stop_event.is_set():
                    versions = console.store.versions()
                    resend = time.monotonic() - last_all >= RESEND_ALL_S  # stale states appear without traffic
                    if resend:
                        last_all = time.monotonic()
                    for camera_id, version in versions.items():
                        if resend or seen.get(camera_id) != version:
                            snap = console.store.snapshot(camera_id, stale)
                            if snap is not None:
                                seen[camera_id] = snap["version"]
                                yield f"event: camera\ndata: {json.dumps(snap, separators=(',', ':'))}\n\n"
                    if resend:
                        yield ": keep-alive\n\n"
                    await asyncio.sleep(LIVE_INTERVAL_S)
            finally:
                console.metrics.clients.dec()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def overlay(request: Request) -> Response:
        size = request.path_params["size"]
        if size not in SIZES:
            return PlainTextResponse(f"size must be one of {', '.join(SIZES)}\n", status_code=404)
        try:
            data = console.overlay(request.path_params["frame_id"], size, request.query_params.get("mask") != "0")
        except FrameError as exc:
            return PlainTextResponse(f"the frame cannot be rendered: {exc}\n", status_code=422)
        if data is None:
            return PlainTextResponse("frame not in memory (or not scored yet)\n", status_code=404)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=60"})

    def frame(request: Request) -> Response:
        status, text = frame_page(console, request.path_params["frame_id"])
        return HTMLResponse(text, status_code=status)

    async def feedback(request: Request) -> Response:
        # the token travels in the Authorization header, never in a cookie: a cross-site form cannot send it
        if int(request.headers.get("content-length") or 0) > MAX_FEEDBACK_BODY:
            return JSONResponse({"error": "bad_request", "message": "the body is too large"}, status_code=413)
        try:
            raw = await request.body()
            body = json.loads(raw) if len(raw) <= MAX_FEEDBACK_BODY else None
        except ValueError:
            body = None
        try:
            record = await run_in_threadpool(console.give_feedback, request.headers.get("authorization"), body)
        except FeedbackRefused as refusal:
            return JSONResponse({"error": refusal.reason, "message": refusal.message}, status_code=refusal.status)
        return JSONResponse(public_view(record), status_code=201)

    async def healthz(request: Request) -> Response:
        ok = console.health.live()
        return PlainTextResponse("ok\n" if ok else "stuck\n", status_code=200 if ok else 503)

    routes = [
        Route("/", index),
        Route("/api/state", state),
        Route("/api/stream", stream),
        Route("/api/overlay/{size}/{frame_id:path}", overlay),
        Route("/api/feedback", feedback, methods=["POST"]),
        Route("/frame/{frame_id:path}", frame),
        Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    from starlette.middleware import Middleware

    return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])


# ------------------------------------------------------------------------------------------ process


def parse_args(argv: Sequence[str]) -> tuple[ConsoleSettings, argparse.Namespace]:
    return parse_service_args("hpad console", __doc__.split("\n\n")[0], ConsoleSettings, argv)


def serve(settings: ConsoleSettings, ns: argparse.Namespace, telemetry: Telemetry | None) -> int:
    import uvicorn

    assert telemetry is not None
    console = Console(settings, telemetry.metrics, telemetry.health).start()
    sock = socket.socket(socket.AF_INET6 if ":" in settings.console_host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.console_host, settings.console_port))
    port = sock.getsockname()[1]
    mode = "read-only" if settings.read_only else f"feedback on ({len(console.operators)} operator token(s))"
    log.info("console on http://%s:%d/ (%s)", settings.console_host, port, mode)
    config = uvicorn.Config(build_app(console), log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    server = _server_class(uvicorn)(config)
    try:
        server.run(sockets=[sock])
    finally:
        console.stop()
        sock.close()
    log.info("console stopped")
    return 0


def _server_class(uvicorn):
    """uvicorn's Server with hpad's stop signals: SIGTERM/SIGINT stop it and the process exits 0 like every hpad
    service (uvicorn's own handlers re-raise the signal after shutdown, so the exit status would be -15)."""

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with stop_signals(self._stop):
                yield

        def _stop(self, signum: int) -> None:
            log.info("received %s: stopping", signal.Signals(signum).name)
            if self.should_exit:
                self.force_exit = True  # a second signal: do not wait for open connections
            self.should_exit = True

    return Server


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(argv, parse_args, serve, packages=("hpad", "consumers"),
                    metrics=lambda settings: ConsoleMetrics(), logger=log)
