"""Real video sources for the camera tests: MP4 clips written with OpenCV's VideoWriter, an RTSP stream
(Debian's ffmpeg publishing into the ``rtsp-server-perl`` relay, both on 127.0.0.1) and an HTTP MJPEG stream
(ffmpeg's ``mpjpeg`` muxer listening on 127.0.0.1). Every process started here is stopped by `stop`."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np

from consumers.broker import free_port

FFMPEG = shutil.which("ffmpeg")
RTSP_RELAY = shutil.which("rtsp-server-perl")


def write_clip(path: Path, frames: int = 40, fps: float = 20.0, size: tuple[int, int] = (160, 120),
               scenes: int = 1, moving: bool = False) -> Path:
    """An MP4 (mp4v) of ``frames`` frames: ``scenes`` blocks of equal length, each a flat grey level with a
    little noise (identical to the eye inside a block, far apart between blocks); ``moving`` adds a disc that
    moves every frame (for live streams)."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    rng = np.random.default_rng(0)
    per_scene = max(1, frames // scenes)
    for i in range(frames):
        level = 40 + 50 * (min(i // per_scene, scenes - 1))
        picture = np.full((height, width, 3), level, np.uint8) + rng.integers(0, 3, (height, width, 3), np.uint8)
        if moving:
            cv2.circle(picture, ((7 * i) % width, height // 2), height // 6, (230, 230, 230), -1)
        writer.write(picture)
    writer.release()
    return path


def stop(process: subprocess.Popen | None, timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL; waits so nothing is left behind."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


class RtspStream:
    """``rtsp://127.0.0.1:PORT/cam``: ffmpeg (-re, looping ``clip``, libx264) publishing into rtsp-server-perl.

    The relay speaks RTP over UDP only (readers need ``rtsp_transport=udp``) and refuses a second publisher on
    a mount whose publisher vanished, so `kill` stops both and `start` starts both again: to a reader that is
    a camera that rebooted."""

    def __init__(self, clip: Path, log_dir: Path) -> None:
        self.clip, self.log_dir = clip, log_dir
        self.client_port, self.source_port = free_port(), free_port()
        self.rtp_port = random.randrange(20000, 40000, 2)
        self.relay: subprocess.Popen | None = None
        self.publisher: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.client_port}/cam"

    def start(self) -> RtspStream:
        self.starts += 1
        log = self.log_dir / f"rtsp-{self.starts}.log"
        with open(log, "wb") as out:
            self.relay = subprocess.Popen(
                [RTSP_RELAY, "--client_listen_address", "127.0.0.1", "--source_listen_address", "127.0.0.1",
                 "-c", str(self.client_port), "-s", str(self.source_port), "--rtp_start_port", str(self.rtp_port),
                 "-l", "2"], stdout=out, stderr=subprocess.STDOUT)
            wait_port(self.source_port)
            wait_port(self.client_port)
            self.publisher = subprocess.Popen(
                [FFMPEG, "-hide_banner", "-loglevel", "warning", "-re", "-stream_loop", "-1", "-i", str(self.clip),
                 "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "10", "-f", "rtsp",
                 f"rtsp://127.0.0.1:{self.source_port}/cam"], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        return self

    def kill(self) -> None:
        for process in (self.publisher, self.relay):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=5)

    def stop(self) -> None:
        stop(self.publisher)
        stop(self.relay)


class MjpegStream:
    """``http://127.0.0.1:PORT/cam``: ffmpeg serving ``clip`` (looped, -re) as multipart JPEG to one client."""

    def __init__(self, clip: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/cam"
        with open(log_path, "wb") as out:
            self.process = subprocess.Popen(
                [FFMPEG, "-hide_banner", "-loglevel", "warning", "-re", "-stream_loop", "-1", "-i", str(clip),
                 "-c:v", "mjpeg", "-q:v", "5", "-f", "mpjpeg", "-listen", "1", self.url],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # no port probe: ffmpeg serves exactly one client, and a probe would be it (the camera retries instead)

    def stop(self) -> None:
        stop(self.process)
