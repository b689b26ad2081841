"""One camera's capture settings (`CameraSpec`) and the cameras file (YAML) that lists many.

A cameras file lets one ``hpad camera`` process serve many cameras, one capture thread each::

    defaults:              # optional: applied to every camera that does not set the field itself
      category: bottle
      fps: 5
    cameras:
      - id: line-1
        source: rtsp://10.0.0.21:554/stream1
        roi: [400, 300, 3200, 2400]      # or "400,300,3200,2400": x, y, width, height in pixels
        tiling: 4x3@0.25
      - id: line-2
        source: /data/line2.mp4
        loop: true
        change_threshold: 2.5

Everything is checked when the process starts (pydantic); an error names the file, the camera and the field,
e.g. ``cameras.yaml: camera 'line-2' field 'roi': ...``. ROI and tiling are not applied by the camera: they
travel with every frame as the headers `ROI_HEADER` (``x,y,w,h``) and `TILING_HEADER` (``auto`` | ``off`` |
``COLSxROWS[@OVERLAP]``) and the scorer applies them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from consumers.sources import SourceKind, classify_source, find_images
from hpad.errors import ConfigError

# frame headers the camera adds for the scorer (parsed by the scorer's side of the contract)
ROI_HEADER = "roi"
TILING_HEADER = "tiling"

Clock = Literal["auto", "stream", "wall"]
_ID_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,256}$")
_TILING_RE = re.compile(r"^(?P<cols>\d+)x(?P<rows>\d+)(?:@(?P<overlap>\d*\.?\d+))?$")
MAX_TILES_PER_SIDE = 64
MAX_OVERLAP = 0.9


def parse_roi(value: object) -> tuple[int, int, int, int]:
    """``"x,y,w,h"`` or ``[x, y, w, h]`` -> ints; x, y >= 0 and w, h >= 1 (pixels of the published frame)."""
    parts: Sequence[Any]
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        raise ValueError(f"must be 'x,y,w,h' or a list [x, y, w, h], not {type(value).__name__}")
    if len(parts) != 4:
        raise ValueError(f"must have 4 integers x,y,w,h; got {len(parts)} values")
    numbers = []
    for part in parts:
        if isinstance(part, bool) or not (isinstance(part, int) or (isinstance(part, str) and part.isdigit())):
            raise ValueError(f"must be non-negative integers x,y,w,h; {part!r} is not")
        numbers.append(int(part))
    x, y, w, h = numbers
    if w < 1 or h < 1:
        raise ValueError(f"width and height must be at least 1 pixel; got w={w}, h={h}")
    return x, y, w, h


def check_tiling(value: str) -> str:
    """``auto`` | ``off`` | ``COLSxROWS`` with an optional ``@OVERLAP`` (fraction 0..0.9), e.g. ``4x3@0.25``."""
    text = value.strip().lower()
    if text in ("auto", "off"):
        return text
    match = _TILING_RE.match(text)
    if match is None:
        raise ValueError(f"must be 'auto', 'off' or COLSxROWS[@OVERLAP] such as '4x3' or '4x3@0.25'; got {value!r}")
    cols, rows = int(match["cols"]), int(match["rows"])
    if not (1 <= cols <= MAX_TILES_PER_SIDE and 1 <= rows <= MAX_TILES_PER_SIDE):
        raise ValueError(f"columns and rows must be 1-{MAX_TILES_PER_SIDE}; got {cols}x{rows}")
    if match["overlap"] is not None and not 0 <= float(match["overlap"]) <= MAX_OVERLAP:
        raise ValueError(f"overlap must be a fraction from 0 to {MAX_OVERLAP}; got {match['overlap']}")
    return text


class CameraSpec(BaseModel):
    """What one capture thread reads, how it thins the stream and what it sends with every frame."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="camera id: the record key and the camera_id header (1-256 characters)")
    source: str = Field(description="rtsp://..., http(s)://... (MJPEG), a video file, /dev/videoN or a folder")
    category: str = Field("object", min_length=1, max_length=128, description="category header of its frames")
    fps: float | None = Field(
        None, gt=0, le=1000, description="most frames per second published (streams, files); for a folder: "
        "the pace; unset = every frame (folders: as fast as the broker takes them)")
    every_n: int = Field(1, ge=1, le=100000, description="keep only every n-th captured frame")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of published frames (decoded sources)")
    change_threshold: float | None = Field(
        None, ge=0, le=255, description="publish only when the mean absolute difference of a 64-px-wide grey "
        "thumbnail to the last published frame exceeds this (grey levels 0-255); unset = off")
    roi: tuple[int, int, int, int] | None = Field(None, description="region of interest x,y,w,h (header `roi`)")
    tiling: str | None = Field(None, description="auto, off or COLSxROWS[@OVERLAP] (header `tiling`)")
    loop: bool = Field(False, description="files and folders: start again at the end")
    realtime: bool = Field(True, description="video files: read at the file's own frame rate, like a camera")
    clock: Clock = Field("auto", description="captured_at from the stream's timestamps (stream), the wall clock "
                         "(wall) or auto: stream for RTSP and paced files, wall for the rest")

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _ID_RE.match(value):
            raise ValueError("must be 1-256 characters without control characters")
        return value

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        if classify_source(value) is SourceKind.FOLDER:
            find_images(Path(value).expanduser())  # ValueError when it holds no image
        return value

    @field_validator("roi", mode="before")
    @classmethod
    def _parse_roi(cls, value: object) -> object:
        return None if value is None else parse_roi(value)

    @field_validator("tiling")
    @classmethod
    def _check_tiling(cls, value: str | None) -> str | None:
        return None if value is None else check_tiling(value)

    @field_validator("loop")
    @classmethod
    def _check_loop(cls, value: bool, info: ValidationInfo) -> bool:
        source = info.data.get("source")
        if value and source is not None and classify_source(source) not in (SourceKind.FILE, SourceKind.FOLDER):
            raise ValueError("loop is for video files and folders only")
        return value

    @property
    def kind(self) -> SourceKind:
        return classify_source(self.source)

    def stream_clock(self) -> bool:
        """True when captured_at comes from the stream's timestamps (see `clock`)."""
        if self.clock != "auto":
            return self.clock == "stream"
        return self.kind is SourceKind.RTSP or (self.kind is SourceKind.FILE and self.realtime)

    def extra_headers(self) -> list[tuple[str, bytes]]:
        """The `ROI_HEADER` / `TILING_HEADER` headers of this camera's frames (none when unset)."""
        headers = []
        if self.roi is not None:
            headers.append((ROI_HEADER, ",".join(str(v) for v in self.roi).encode()))
        if self.tiling is not None:
            headers.append((TILING_HEADER, self.tiling.encode()))
        return headers


class CamerasFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    defaults: dict[str, Any] = Field(default_factory=dict)
    cameras: list[dict[str, Any]] = Field(min_length=1)


def _field_name(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc) or "camera"


def camera_specs(entries: Sequence[dict[str, Any]], defaults: dict[str, Any] | None = None,
                 where: str = "cameras") -> list[CameraSpec]:
    """Validate camera entries (defaults filled in); ConfigError naming ``where``, the camera and the field."""
    specs, problems, seen = [], [], set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"{where}: camera #{index + 1} must be a mapping of fields, not {type(entry).__name__}")
            continue
        name = str(entry.get("id", f"#{index + 1}"))
        try:
            spec = CameraSpec(**{**(defaults or {}), **entry})
        except ValidationError as exc:
            for error in exc.errors():
                message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
                message = message.removeprefix("Value error, ")
                field = f" field {_field_name(error['loc'])!r}" if error["loc"] else ""
                problems.append(f"{where}: camera {name!r}{field}: {message}")
            continue
        if spec.id in seen:
            problems.append(f"{where}: camera {spec.id!r} field 'id': the id is used by another camera")
        seen.add(spec.id)
        specs.append(spec)
    if problems:
        raise ConfigError("; ".join(problems))
    return specs


def load_cameras_file(path: Path) -> list[CameraSpec]:
    """Read and validate a cameras file (YAML); every problem in one ConfigError."""
    import yaml

    name = path.name
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read cameras file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{name}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: must be a mapping with a 'cameras' list (and optional 'defaults')")
    try:
        document = CamerasFile(**data)
    except ValidationError as exc:
        problems = [f"{name}: {'unknown key' if e['type'] == 'extra_forbidden' else 'key'} "
                    f"{_field_name(e['loc'])!r}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("; ".join(problems)) from None
    unknown = set(document.defaults) - set(CameraSpec.model_fields) | ({"id", "source"} & set(document.defaults))
    if unknown:
        raise ConfigError(f"{name}: defaults may not set {sorted(unknown)} (fields: everything but id and source)")
    return camera_specs(document.cameras, document.defaults, where=name)
