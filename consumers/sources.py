"""Where camera frames come from: RTSP, HTTP MJPEG, video files and V4L2 devices through OpenCV's
``VideoCapture``, and folders of images.

`classify_source` names a source's kind from its text (``rtsp://``, ``http(s)://``, ``/dev/videoN`` or a
device number, an existing folder, an existing file). `open_source` returns a `FrameSource`: ``read()``
gives the next `Captured` frame, or None when the stream ended or stalled (read timeout) or dropped; the
capture loop (consumers/capture.py) then reconnects live sources. Nothing here touches Kafka.

Stalls: OpenCV's FFmpeg backend gets ``CAP_PROP_OPEN_TIMEOUT_MSEC`` / ``CAP_PROP_READ_TIMEOUT_MSEC``; on a
stalled RTSP stream FFmpeg retries internally, so a read gives up after about three read timeouts.
RTSP transport (TCP or UDP) is FFmpeg's ``rtsp_transport`` option, set for the whole process through
``OPENCV_FFMPEG_CAPTURE_OPTIONS`` (`set_ffmpeg_capture_options`) before any capture opens.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

log = logging.getLogger("hpad.camera")
IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_DEVICE_RE = re.compile(r"^(/dev/video(?P<node>\d+)|(?P<index>\d+))$")
MAX_SANE_FPS = 240.0  # CAP_PROP_FPS above this is a time base (RTSP reports 90000 on a bad start), not a rate


class SourceKind(enum.Enum):
    RTSP = "rtsp"
    HTTP = "http"
    FILE = "file"
    DEVICE = "device"
    FOLDER = "folder"

    @property
    def live(self) -> bool:
        """Live sources are reconnected when they drop; files and folders end."""
        return self in (SourceKind.RTSP, SourceKind.HTTP, SourceKind.DEVICE)


def classify_source(source: str) -> SourceKind:
    """The kind of ``source``; ValueError (with what is accepted) when it is none of them."""
    text = source.strip()
    lower = text.lower()
    if lower.startswith(("rtsp://", "rtsps://")):
        return SourceKind.RTSP
    if lower.startswith(("http://", "https://")):
        return SourceKind.HTTP
    if _DEVICE_RE.match(text):
        return SourceKind.DEVICE
    path = Path(text).expanduser()
    if path.is_dir():
        return SourceKind.FOLDER
    if path.is_file():
        return SourceKind.FILE
    if "://" in text:
        raise ValueError(f"source {text!r}: only rtsp://, rtsps://, http:// and https:// URLs are supported")
    raise ValueError(f"source {text!r} is not an rtsp:// or http(s):// URL, /dev/videoN, nor an existing video "
                     f"file or folder")


@dataclass(frozen=True)
class Captured:
    """One frame read from a source: decoded BGR ``pixels`` [H, W, 3] or, from a folder, the file's ``encoded``
    bytes with their ``content_type``. ``stream_ms``: the stream's own timestamp (CAP_PROP_POS_MSEC) when it
    has one; ``wall``: Unix time when it was read."""

    pixels: np.ndarray | None
    encoded: bytes | None
    content_type: str | None
    stream_ms: float | None
    wall: float


class FrameSource(Protocol):
    kind: SourceKind

    def open(self) -> bool: ...
    def read(self) -> Captured | None: ...
    def nominal_fps(self) -> float | None: ...
    def close(self) -> None: ...


def set_ffmpeg_capture_options(rtsp_transport: str) -> None:
    """``OPENCV_FFMPEG_CAPTURE_OPTIONS=rtsp_transport;<tcp|udp>`` unless the operator set that variable."""
    if os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS"):
        log.info("OPENCV_FFMPEG_CAPTURE_OPTIONS is set (%s): HPAD_RTSP_TRANSPORT is not applied",
                 os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"])
        return
    os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = f"rtsp_transport;{rtsp_transport}"


class VideoSource:
    """RTSP, HTTP MJPEG, a video file or a V4L2 device through ``cv2.VideoCapture``."""

    def __init__(self, source: str, kind: SourceKind, open_timeout_ms: int = 10000,
                 read_timeout_ms: int = 5000) -> None:
        self.source, self.kind = source.strip(), kind
        self.open_timeout_ms, self.read_timeout_ms = open_timeout_ms, read_timeout_ms
        self.capture: cv2.VideoCapture | None = None

    def open(self) -> bool:
        self.close()
        if self.kind is SourceKind.DEVICE:
            match = _DEVICE_RE.match(self.source)
            index = int(match["node"] if match and match["node"] else self.source)
            capture = cv2.VideoCapture(index, cv2.CAP_V4L2)
        else:
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.open_timeout_ms,
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.read_timeout_ms]
            capture = cv2.VideoCapture(self.source, cv2.CAP_FFMPEG, params)
        if not capture.isOpened():
            capture.release()
            return False
        self.capture = capture
        return True

    def read(self) -> Captured | None:
        if self.capture is None:
            return None
        ok, pixels = self.capture.read()
        if not ok or pixels is None:
            return None
        position = float(self.capture.get(cv2.CAP_PROP_POS_MSEC))
        return Captured(pixels, None, None, position if position >= 0 else None, time.time())

    def nominal_fps(self) -> float | None:
        """The stream's frame rate (CAP_PROP_FPS) when it says one; None for HTTP MJPEG, whose demuxer reports a
        made-up 25 fps (the capture loop measures the rate instead)."""
        if self.capture is None or self.kind is SourceKind.HTTP:
            return None
        fps = float(self.capture.get(cv2.CAP_PROP_FPS))
        return fps if 0 < fps <= MAX_SANE_FPS else None

    def close(self) -> None:
        if self.capture is not None:
            self.capture.release()
            self.capture = None


def find_images(folder: Path) -> list[Path]:
    """Every PNG/JPEG below ``folder``, sorted by path (ValueError when there is none)."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no .png/.jpg/.jpeg images below {folder}")
    return paths


class FolderSource:
    """The images of a folder (recursive, sorted), sent as they are on disk; ``open`` starts again at the first."""

    kind = SourceKind.FOLDER

    def __init__(self, folder: Path, decode: bool = False) -> None:
        self.paths = find_images(folder)
        self.decode = decode  # the change gate needs pixels
        self.index = 0

    def open(self) -> bool:
        self.index = 0
        return True

    def read(self) -> Captured | None:
        if self.index >= len(self.paths):
            return None
        path = self.paths[self.index]
        self.index += 1
        data = path.read_bytes()
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if self.decode else None
        return Captured(pixels, data, IMAGE_SUFFIXES[path.suffix.lower()], None, time.time())

    def nominal_fps(self) -> float | None:
        return None

    def close(self) -> None:
        pass


def open_source(source: str, open_timeout_ms: int = 10000, read_timeout_ms: int = 5000,
                decode_folder: bool = False) -> FrameSource:
    """A `FrameSource` for ``source`` (not opened yet: call ``open``)."""
    kind = classify_source(source)
    if kind is SourceKind.FOLDER:
        return FolderSource(Path(source).expanduser(), decode=decode_folder)
    return VideoSource(source, kind, open_timeout_ms, read_timeout_ms)
