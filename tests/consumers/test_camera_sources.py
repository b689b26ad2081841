"""`hpad camera` with real sources made by the tests: MP4 files (OpenCV VideoWriter), a folder, an HTTP MJPEG
stream (ffmpeg) and an RTSP stream (ffmpeg into rtsp-server-perl) that is killed and restarted, all through
the embedded broker; the gates counted, the reconnect proven from logs and metrics, the cameras file validated.
"""

from __future__ import annotations

import itertools
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from consumers import contract as c
from consumers.broker import free_port
from consumers.camera import main, run_cameras
from consumers.cameras_file import (
    ROI_HEADER,
    TILING_HEADER,
    camera_specs,
    check_tiling,
    load_cameras_file,
    parse_roi,
)
from consumers.capture import ChangeGate, RateGate
from consumers.events import headers_as_text
from consumers.kafka_io import Backoff
from consumers.settings import CameraSettings
from consumers.sources import SourceKind, classify_source
from hpad.errors import ConfigError
from tests.consumers.kafka_helpers import encode, image, new_topics, read_all
from tests.consumers.media import FFMPEG, RTSP_RELAY, MjpegStream, RtspStream, stop, write_clip

REPO = Path(__file__).resolve().parents[2]
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="Debian ffmpeg is not installed (make system-tools)")
needs_relay = pytest.mark.skipif(FFMPEG is None or RTSP_RELAY is None,
                                 reason="ffmpeg / rtsp-server-perl not installed (make system-tools)")


def by_camera(records) -> dict[str, list]:
    out: dict[str, list] = {}
    for record in records:
        out.setdefault(record.key.decode(), []).append(record)
    return out


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics_text(port: int) -> str:
    """``/metrics``, or "" while nothing serves it yet."""
    try:
        return scrape(port)[1]
    except OSError:
        return ""


@pytest.fixture(autouse=True)
def _ffmpeg_options(monkeypatch):
    """`hpad camera` sets OPENCV_FFMPEG_CAPTURE_OPTIONS for its process; in-process runs here must not leak it."""
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", "")


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            got = series[len(name):].strip("{}")
            if ",".join(sorted(got.split(","))) == want or (not want and not got):
                return float(value)
    return 0.0


# ------------------------------------------------------------------------------------------ pure parts


def test_rate_gate_caps_on_the_given_clock_without_bursts():
    gate = RateGate(5.0)
    times = [i * 0.05 for i in range(40)]  # 20 fps for 2 s
    assert sum(gate.admit(t) for t in times) == 10
    gate = RateGate(3.0)
    assert sum(gate.admit(i * 0.1) for i in range(30)) == 9  # 10 fps -> 3 per second, not 2.5
    gate.reset()
    assert gate.admit(100.0) and not gate.admit(100.1) and gate.admit(100.4)  # a gap allows no burst
    assert all(RateGate(None).admit(0.0) for _ in range(5))


def test_change_gate_passes_the_first_frame_and_real_changes_only():
    gate = ChangeGate(5.0)
    rng = np.random.default_rng(0)
    flat = np.full((90, 120, 3), 80, np.uint8)
    noisy = [flat + rng.integers(0, 4, flat.shape, np.uint8) for _ in range(5)]
    assert [gate.admit(f) for f in noisy] == [True, False, False, False, False]
    assert gate.admit(np.full_like(flat, 140))  # the scene changed
    assert not gate.admit(np.full_like(flat, 142))
    assert ChangeGate(None).admit(flat) and ChangeGate(1.0).admit(None)


def test_reconnect_backoff_grows_to_its_cap_with_bounded_jitter():
    backoff = Backoff(0.5, 4.0, jitter=0.2, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    for delay, base in zip(delays, [0.5, 1, 2, 4, 4, 4, 4, 4], strict=True):
        assert base * 0.8 <= delay <= base * 1.2
    assert len(set(delays)) == len(delays)  # jitter: no two cameras retry in lockstep
    backoff.reset()
    assert backoff.next_delay() <= 0.6


def test_source_kinds(tmp_path):
    clip = write_clip(tmp_path / "a.mp4", frames=2)
    assert classify_source("rtsp://10.0.0.1/s") is SourceKind.RTSP
    assert classify_source("https://cam/mjpg") is SourceKind.HTTP
    assert classify_source("/dev/video0") is SourceKind.DEVICE and classify_source("2") is SourceKind.DEVICE
    assert classify_source(str(clip)) is SourceKind.FILE and classify_source(str(tmp_path)) is SourceKind.FOLDER
    for bad in ("ftp://x/y", str(tmp_path / "missing.mp4")):
        with pytest.raises(ValueError, match="source"):
            classify_source(bad)


def test_roi_and_tiling_header_values():
    assert parse_roi("10, 20,300,200") == (10, 20, 300, 200) == parse_roi([10, 20, 300, 200])
    for bad in ("1,2,3", "1,2,0,4", "a,b,c,d", [1, 2, -3, 4], [1.5, 2, 3, 4], 7):
        with pytest.raises(ValueError):
            parse_roi(bad)
    assert [check_tiling(t) for t in ("auto", "OFF", "4x3", "4x3@0.25", "2x2@.5")] == \
        ["auto", "off", "4x3", "4x3@0.25", "2x2@.5"]
    for bad in ("4x", "0x3", "65x1", "4x3@0.95", "4x3@-1", "big"):
        with pytest.raises(ValueError):
            check_tiling(bad)


def test_cameras_file_errors_name_the_camera_and_the_field(tmp_path):
    clip = write_clip(tmp_path / "a.mp4", frames=2)
    path = tmp_path / "cameras.yaml"
    path.write_text(f"""
defaults: {{category: bottle}}
cameras:
  - {{id: line-1, source: {clip}, fps: 5}}
  - {{id: line-2, source: {clip}, roi: "10,20,0,5"}}
  - {{id: line-3, source: {clip}, tiling: 4x3@2}}
  - {{id: line-4, source: rtsp://127.0.0.1:1/x, loop: true}}
  - {{id: line-5, source: {tmp_path / "nope.mkv"}}}
  - {{id: line-6, source: {clip}, fsp: 5}}
  - {{id: line-1, source: {clip}}}
""")
    with pytest.raises(ConfigError) as info:
        load_cameras_file(path)
    text = str(info.value)
    for expected in ("cameras.yaml: camera 'line-2' field 'roi': ", "width and height must be at least 1",
                     "cameras.yaml: camera 'line-3' field 'tiling': overlap must be",
                     "cameras.yaml: camera 'line-4' field 'loop': loop is for video files and folders only",
                     "cameras.yaml: camera 'line-5' field 'source': ", "cameras.yaml: camera 'line-6' field 'fsp': "
                     "unknown field", "camera 'line-1' field 'id': the id is used by another camera"):
        assert expected in text, text
    assert "line-1' field 'fps'" not in text  # the valid camera is not blamed

    path.write_text("cameras:\n  - id: a\n    source: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cameras.yaml: not valid YAML \(line"):
        load_cameras_file(path)
    path.write_text("cameras: []\n")
    with pytest.raises(ConfigError, match=r"cameras\.yaml: key 'cameras'"):
        load_cameras_file(path)
    path.write_text(f"defaults: {{source: {clip}}}\ncameras: [{{id: a, source: {clip}}}]\n")
    with pytest.raises(ConfigError, match="defaults may not set"):
        load_cameras_file(path)
    spec = camera_specs([{"id": "x", "source": str(clip), "roi": [1, 2, 3, 4], "tiling": "2x2@0.1"}])[0]
    assert spec.extra_headers() == [(ROI_HEADER, b"1,2,3,4"), (TILING_HEADER, b"2x2@0.1")]


def test_camera_settings_check_liveness_against_the_stream_timeouts(clean_hpad_env):
    with pytest.raises(ValueError, match="HPAD_LIVENESS_TIMEOUT_MS"):
        CameraSettings(read_timeout_ms=30000, liveness_timeout_ms=60000)
    with pytest.raises(ValueError, match="HPAD_RECONNECT_BACKOFF_MAX_MS"):
        CameraSettings(reconnect_backoff_ms=2000, reconnect_backoff_max_ms=1000)


def test_command_line_refuses_bad_cameras_before_connecting(tmp_path, clean_hpad_env):
    clip = write_clip(tmp_path / "a.mp4", frames=2)
    with pytest.raises(ConfigError, match=r"--source: camera 'cam-1' field 'roi': must have 4 integers"):
        main(["--source", str(clip), "--roi", "1,2,3", "--metrics-port", "-1"])
    with pytest.raises(ConfigError, match=r"--source: camera 'door' field 'source': "):
        main(["--source", "ftp://x/y", "--camera-id", "door", "--metrics-port", "-1"])
    with pytest.raises(SystemExit):  # argparse: exactly one of --source, --cameras FILE, --dir
        main(["--source", str(clip), "--dir", str(tmp_path)])
    with pytest.raises(SystemExit):  # --cameras N is the folder simulator's
        main(["--source", str(clip), "--cameras", "3"])


def test_demo_video_is_what_the_camera_reads(tmp_path):
    from consumers.demo import generated_images, write_video
    from consumers.sources import open_source

    images = generated_images(tmp_path / "images", count=6, size=64)
    video = write_video(images, tmp_path / "demo.mp4", fps=10, side=96)
    source = open_source(str(video))
    assert source.open() and source.nominal_fps() == 10
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    source.close()
    assert len(frames) == 6 and frames[0].pixels.shape == (96, 96, 3)
    assert [round(f.stream_ms) for f in frames] == [0, 100, 200, 300, 400, 500]


# ------------------------------------------------------------------------------------------ through the broker


@pytest.mark.kafka
def test_video_file_gates_are_counted_exactly(kafka_broker, tmp_path, caplog):
    """One process, three cameras on one 40-frame 20 fps MP4 of 4 still scenes: an fps cap of 5 keeps 10,
    every 4th frame keeps 10, the change gate keeps the 4 scene starts; stream-clock captured_at follows
    the video's own timeline."""
    clip = write_clip(tmp_path / "scenes.mp4", frames=40, fps=20, scenes=4)
    topics = new_topics(kafka_broker, partitions=3)
    cameras = tmp_path / "cameras.yaml"
    cameras.write_text(f"""
defaults: {{realtime: false, category: bottle, jpeg_quality: 80}}
cameras:
  - {{id: capped, source: {clip}, fps: 5, clock: stream, roi: [8, 4, 100, 80], tiling: "2x2@0.25"}}
  - {{id: every4, source: {clip}, every_n: 4}}
  - {{id: changes, source: {clip}, change_threshold: 5}}
""")
    caplog.set_level("INFO", logger="hpad.camera")
    code = main(["--cameras", str(cameras), "--bootstrap", kafka_broker.bootstrap, "--input-topic", topics.frames,
                 "--metrics-port", "-1"])
    assert code == 0
    records = by_camera(read_all(kafka_broker, topics.frames, expected=24))
    assert {k: len(v) for k, v in records.items()} == {"capped": 10, "every4": 10, "changes": 4}
    summaries = [r.getMessage() for r in caplog.records if "captured 40" in r.getMessage()]
    assert any("camera capped: captured 40, published 10, skipped {'every_n': 0, 'rate': 30, 'change': 0}" in s
               for s in summaries), summaries
    assert any("camera changes: captured 40, published 4, skipped {'every_n': 0, 'rate': 0, 'change': 36}" in s
               for s in summaries), summaries
    capped = records["capped"]
    metas = [c.parse_frame_headers(r.headers, r.key) for r in capped]
    assert all(m.category == "bottle" and m.content_type.kind == "jpeg" for m in metas)
    gaps = {round((b.captured_at - a.captured_at).total_seconds(), 3) for a, b in itertools.pairwise(metas)}
    assert gaps == {0.2}  # every 4th frame of a 20 fps video: 200 ms apart on the stream's clock
    headers = headers_as_text(capped[0].headers)
    assert headers[ROI_HEADER] == "8,4,100,80" and headers[TILING_HEADER] == "2x2@0.25"
    assert ROI_HEADER not in headers_as_text(records["every4"][0].headers)
    import cv2

    first = cv2.imdecode(np.frombuffer(records["changes"][1].value, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert first.shape == (120, 160) and abs(float(first.mean()) - 91) < 4  # the second scene (grey 90 + noise)


@pytest.mark.kafka
@needs_ffmpeg
def test_cameras_file_serves_a_file_a_folder_and_an_mjpeg_stream(kafka_broker, tmp_path):
    """Three kinds of source in one process; /metrics and /healthz tell them apart; an ended file is not an
    unhealthy process."""
    clip = write_clip(tmp_path / "moving.mp4", frames=30, fps=10, moving=True)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        (folder / f"{i:02d}.png").write_bytes(encode(image(rng, (48, 64))))
    mjpeg = MjpegStream(clip, tmp_path / "mjpeg.log")
    topics = new_topics(kafka_broker, partitions=3)
    port = free_port()
    try:
        specs = camera_specs([
            {"id": "file", "source": str(clip), "realtime": False, "category": "bottle"},
            {"id": "folder", "source": str(folder), "fps": 20, "category": "bottle"},
            {"id": "mjpeg", "source": mjpeg.url, "fps": 5, "category": "bottle", "tiling": "auto"},
        ])
        settings = CameraSettings(bootstrap_servers=kafka_broker.bootstrap, input_topic=topics.frames,
                                  metrics_port=port, metrics_host="127.0.0.1", reconnect_backoff_ms=100,
                                  reconnect_backoff_max_ms=500)
        stop_event = threading.Event()
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(run_cameras(settings, specs, stop=stop_event)))
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                text = metrics_text(port) if thread.is_alive() else ""
                if sample(text, "hpad_camera_frames_published_total", camera="mjpeg") >= 6 and \
                        sample(text, "hpad_camera_frames_published_total", camera="file") == 30:
                    break
                time.sleep(0.3)
            status, health = scrape(port, "/healthz")
            ready_status, ready = scrape(port, "/readyz")
        finally:
            stop_event.set()
            thread.join(timeout=40)
        assert not thread.is_alive() and result == [0]
    finally:
        mjpeg.stop()
    assert sample(text, "hpad_camera_frames_published_total", camera="folder") == 4
    assert sample(text, "hpad_camera_frames_captured_total", camera="file") == 30
    assert sample(text, "hpad_camera_stream_up", camera="mjpeg") == 1
    assert sample(text, "hpad_camera_frames_skipped_total", camera="mjpeg", reason="rate") > 0
    assert status == 200 and "camera mjpeg: stream up" in health and "camera file: stream down" in health
    assert ready_status == 503 and "streams down: file, folder" in ready  # those two ended
    records = by_camera(read_all(kafka_broker, topics.frames, expected=40, idle=2.0))
    assert len(records["file"]) == 30 and len(records["folder"]) == 4 and len(records["mjpeg"]) >= 6
    folder_types = {headers_as_text(r.headers)[c.CONTENT_TYPE] for r in records["folder"]}
    assert folder_types == {"image/png"}  # folder images go as they are on disk
    assert {r.value for r in records["folder"]} == {p.read_bytes() for p in folder.iterdir()}
    assert headers_as_text(records["mjpeg"][0].headers)[TILING_HEADER] == "auto"


# ------------------------------------------------------------------------------------------ RTSP reconnect

DROP = re.compile(r"camera rtsp-1: stream dropped .* reconnecting")
BACKOFF = re.compile(r"camera rtsp-1: reconnect attempt (\d+) failed \((.*?)\); backoff: next attempt in ([\d.]+) s")
RESUMED = re.compile(r"camera rtsp-1: stream resumed after ([\d.]+) s down \((\d+) failed attempts\); about (\d+) "
                     r"frames lost while down \(estimate: ([\d.]+) fps x ([\d.]+) s\)")


@pytest.mark.kafka
@pytest.mark.slow
@needs_relay
def test_rtsp_stall_and_restart_are_reconnected_and_losses_counted(kafka_broker, tmp_path):
    """`hpad camera --source rtsp://...` (a subprocess) reads a live 10 fps H.264 stream through two outages:
    a stall (the publisher frozen with SIGSTOP: the relay stays up, no frames come, the read timeout fires)
    and a restart (relay and publisher killed, down for a few seconds, started again). Each time the camera
    logs the drop, each backoff and the resumption, counts the frames lost while down (10 fps x downtime)
    and a reconnect, and keeps running; every frame it counted as published is on the topic."""
    clip = write_clip(tmp_path / "live.mp4", frames=50, fps=10, moving=True)
    stream = RtspStream(clip, tmp_path).start()
    topics = new_topics(kafka_broker, partitions=1)
    port = free_port()
    log_path = tmp_path / "camera.log"
    camera = None
    outages = []
    try:
        with open(log_path, "wb") as out:
            camera = subprocess.Popen(
                [sys.executable, "-m", "hpad.cli", "camera", "--source", stream.url, "--camera-id", "rtsp-1",
                 "--category", "bottle", "--bootstrap", kafka_broker.bootstrap, "--input-topic", topics.frames,
                 "--rtsp-transport", "udp", "--open-timeout-ms", "3000", "--read-timeout-ms", "1000",
                 "--reconnect-backoff-ms", "250", "--reconnect-backoff-max-ms", "1000",
                 "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**_env(), "PYTHONPATH": str(REPO)})

        def wait_for(name: str, at_least: float, timeout_s: float = 40.0) -> str:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                assert camera.poll() is None, f"camera exited ({camera.returncode}):\n{log_path.read_text()}"
                text = metrics_text(port)
                if sample(text, name, camera="rtsp-1") >= at_least:
                    return text
                time.sleep(0.2)
            raise AssertionError(f"timed out waiting for {name} >= {at_least}:\n{log_path.read_text()}")

        def published() -> float:
            return sample(metrics_text(port), "hpad_camera_frames_published_total", camera="rtsp-1")

        def outage(begin, end, number: int) -> None:
            wait_for("hpad_camera_frames_published_total", published() + 10)  # frames flow
            begin()
            began = time.monotonic()
            wait_for("hpad_camera_stream_drops_total", number)  # the drop is seen (a stall: after the timeout)
            wait_for("hpad_camera_connect_failures_total", 2 * number)  # and backoffs follow
            time.sleep(max(0.0, 5.0 - (time.monotonic() - began)))
            end()
            outages.append(time.monotonic() - began)
            wait_for("hpad_camera_reconnects_total", number)

        outage(lambda: stream.publisher.send_signal(signal.SIGSTOP),
               lambda: stream.publisher.send_signal(signal.SIGCONT), 1)
        outage(stream.kill, stream.start, 2)
        text = wait_for("hpad_camera_frames_published_total", published() + 10)
        status, health = scrape(port, "/healthz")
        assert status == 200 and "camera rtsp-1: stream up" in health and "reconnects 2" in health
        camera.terminate()
        assert camera.wait(timeout=30) == 0
    finally:
        if stream.publisher is not None and stream.publisher.poll() is None:
            stream.publisher.send_signal(signal.SIGCONT)
        stop(camera)
        stream.stop()
    log = log_path.read_text()
    print("\n".join(line for line in log.splitlines() if "rtsp-1:" in line and not line.endswith("fps)")))
    drops, backoffs, resumed = DROP.findall(log), BACKOFF.findall(log), RESUMED.findall(log)
    assert len(drops) == 2 and len(resumed) == 2, log
    assert sum(int(failed) for _, failed, _, _, _ in resumed) == len(backoffs) >= 4
    assert max(float(delay) for _, _, delay in backoffs) <= 1.2 + 1e-9  # capped at 1 s (+20 % jitter)
    lost_total = 0
    for (downtime, _, lost, fps, _), really_down in zip(resumed, outages, strict=True):
        assert float(downtime) >= really_down - 0.5  # at least the time no frame could come
        assert float(fps) == 10 and int(lost) == round(10 * float(downtime)) - 1 and int(lost) >= 40
        lost_total += int(lost)
    assert sample(text, "hpad_camera_frames_lost_total", camera="rtsp-1") == lost_total
    assert sample(text, "hpad_camera_stream_drops_total", camera="rtsp-1") == 2
    count = int(re.search(r"camera rtsp-1: captured \d+, published (\d+)", log)[1])
    records = read_all(kafka_broker, topics.frames, expected=count, idle=2.0)
    assert len(records) == count >= 30  # acknowledged = on the topic, none missing
    assert len({headers_as_text(r.headers)[c.FRAME_ID] for r in records}) == count
    assert all(c.parse_frame_headers(r.headers, r.key).captured_at is not None for r in records)


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("HPAD_") and k != "OPENCV_FFMPEG_CAPTURE_OPTIONS"}
