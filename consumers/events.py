"""Output records: the scored event (JSON, schema version 1) and the dead letter of a refused frame.

Event fields are documented in ``README.md`` and pinned by
``consumers/schemas/event.schema.json``. Masks are binary PNGs at the frame's own size
(`hpad.masks.encode_packed_mask_png`), base64 in the JSON. A dead letter is the original record (key, value,
headers) plus ``hpad-*`` headers naming the reason; its layout is pinned by
``consumers/schemas/dead_letter_headers.schema.json``. Pure functions, no Kafka.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from consumers import contract as c
from hpad.masks import PackedMask, encode_packed_mask_png

EVENT_SCHEMA_VERSION = 1
MASK_ENCODING = "png-1bit-base64"
MAX_ERROR_MESSAGE_CHARS = 1000


@dataclass(frozen=True)
class ModelInfo:
    """What every event says about the model that scored it."""

    model: str
    weights: str  # pretrained tag, "sha256:<hex>" of a checkpoint, or "random-init"
    identity: str
    random_weights: bool
    device: str
    precision: str


@dataclass(frozen=True)
class Timings:
    """Per-frame stage times in milliseconds (infer is the time of the frame's whole sub-batch)."""

    queue: float
    decode: float
    infer: float
    total: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in vars(self).items()}


@dataclass(frozen=True)
class Scored:
    """The scorer's verdict for one frame under one prompt set."""

    score: float
    threshold: float
    pixel_threshold: float
    prompt_version: int
    prompt_source: str
    prompt_sha256: str


def wants_mask(policy: str, score: float, threshold: float) -> bool:
    """Whether an event carries a mask under ``policy`` (anomalous, always, never)."""
    return policy == "always" or (policy == "anomalous" and score >= threshold)


def packed_mask_field(mask: PackedMask, pixel_threshold: float) -> dict[str, Any]:
    """A binary mask at the frame's size (packed rows, see `hpad.masks.PackedMask`) -> the event's ``mask``."""
    return {
        "encoding": MASK_ENCODING,
        "width": int(mask.width),
        "height": int(mask.height),
        "pixel_threshold": float(pixel_threshold),
        "anomalous_pixels": int(mask.count),
        "data": base64.b64encode(encode_packed_mask_png(mask)).decode("ascii"),
    }


def mask_field(anomaly_map: np.ndarray, pixel_threshold: float) -> dict[str, Any]:
    """Binary mask (map >= pixel threshold) of a float map at the frame's size -> the event's ``mask``."""
    return packed_mask_field(PackedMask.from_bool(anomaly_map >= pixel_threshold), pixel_threshold)


def build_event(
    meta: c.FrameMeta,
    scored: Scored,
    model: ModelInfo,
    timings: Timings,
    scored_at: datetime,
    source: tuple[str, int, int],
    size: tuple[int, int],
    mask: dict[str, Any] | None,
    batch_id: str = "",
    tiles: int = 1,
) -> dict[str, Any]:
    """One event per frame. ``source`` = (topic, partition, offset); ``size`` = (width, height); ``tiles``:
    images the model scored for the frame (1 = scored whole, see `hpad.tiling`)."""
    score = float(scored.score)
    return {
        "schema_version": EVENT_SCHEMA_VERSION,
        "frame_id": meta.frame_id,
        "camera_id": meta.camera_id,
        "category": meta.category,
        "score": round(score, 6),
        "is_anomaly": bool(score >= scored.threshold),
        "threshold": float(scored.threshold),
        "prompt_version": int(scored.prompt_version),
        "prompt_source": scored.prompt_source,
        "prompt_sha256": scored.prompt_sha256,
        "model": model.model,
        "weights": model.weights,
        "model_identity": model.identity,
        "random_weights": model.random_weights,
        "device": model.device,
        "precision": model.precision,
        "width": int(size[0]),
        "height": int(size[1]),
        "captured_at": c.rfc3339(meta.captured_at) if meta.captured_at else None,
        "scored_at": c.rfc3339(scored_at),
        "batch_id": batch_id,
        "tiles": int(tiles),
        "timings_ms": timings.as_dict(),
        "source": {"topic": source[0], "partition": int(source[1]), "offset": int(source[2])},
        "mask": mask,
    }


def encode_event(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), allow_nan=False).encode("utf-8")


def dead_letter_headers(
    original: list[tuple[str, bytes]] | None,
    reason: str,
    message: str,
    source: tuple[str, int, int],
    original_timestamp_ms: int | None,
    dead_lettered_at: datetime,
    worker: str,
    value_truncated: bool = False,
) -> list[tuple[str, bytes]]:
    """Original headers (minus any earlier hpad-* error headers) + this worker's reason and provenance."""
    kept = [(k, v if v is not None else b"") for k, v in (original or []) if k.lower() not in c.DEAD_LETTER_HEADERS]
    added = {
        c.ERROR_CLASS: reason,
        c.ERROR_MESSAGE: message[:MAX_ERROR_MESSAGE_CHARS],
        c.ORIGINAL_TOPIC: source[0],
        c.ORIGINAL_PARTITION: str(source[1]),
        c.ORIGINAL_OFFSET: str(source[2]),
        c.ORIGINAL_TIMESTAMP: "" if original_timestamp_ms is None else str(original_timestamp_ms),
        c.DEAD_LETTERED_AT: c.rfc3339(dead_lettered_at),
        c.WORKER: worker,
    }
    if value_truncated:
        added[c.VALUE_TRUNCATED] = "true"
    return kept + [(k, v.encode("utf-8")) for k, v in added.items()]


def headers_as_text(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """Kafka headers -> {name: text} (undecodable bytes shown as \\x escapes), for schema checks and logs."""
    return {k: (v or b"").decode("utf-8", errors="backslashreplace") for k, v in headers or []}
