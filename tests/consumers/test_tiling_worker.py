"""ROI and tiling in the service: the `roi` / `tiling` headers, the worker's settings, the batcher counting
tiles, and a worker on a real broker turning large frames into one event each with its tile count and a
full-size mask (bad headers into dead letters with their reasons)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from pydantic import ValidationError

from consumers import contract as c
from consumers.batching import BatchFormer
from consumers.camera import frame_headers
from consumers.events import headers_as_text
from consumers.settings import WorkerSettings
from hpad.errors import FrameError
from hpad.masks import decode_mask_png
from hpad.tiling import Box, TileSpec
from tests.consumers.kafka_helpers import Frame, encode, events_by_frame, image

SCHEMAS = Path(c.__file__).parent / "schemas"


def _headers(**extra: str) -> list[tuple[str, bytes]]:
    base = {"content-type": "image/png", "frame_id": "f-1", "camera_id": "cam-1", "category": "widget", **extra}
    return [(k, v.encode()) for k, v in base.items()]


# ------------------------------------------------------------------------------------------ contract


@pytest.mark.parametrize(("text", "spec"), [
    ("auto", TileSpec("auto")), ("OFF", TileSpec("off")), ("4x3", TileSpec("grid", 4, 3)),
    ("4x3@0.25", TileSpec("grid", 4, 3, 0.25)), ("12 X 9 @ .5", TileSpec("grid", 12, 9, 0.5)),
    ("auto@0", TileSpec("auto", overlap=0.0)), ("1x1@0.9", TileSpec("grid", 1, 1, 0.9)),
])
def test_tiling_header_parses(text, spec):
    meta = c.parse_frame_headers(_headers(tiling=text), None)
    assert meta.tiling == spec


@pytest.mark.parametrize(("text", "why"), [
    ("banana", "not auto, off or COLSxROWS"), ("0x3", "cols and rows >= 1"), ("4x3@0.95", "within 0..0.9"),
    ("off@0.2", "takes no overlap"), ("4x", "not auto"), ("4x3@", "not auto"), ("-1x2", "not auto"),
    ("1000x1", "not auto"),
])
def test_bad_tiling_header_is_invalid_header(text, why):
    with pytest.raises(FrameError, match=why) as err:
        c.parse_frame_headers(_headers(tiling=text), None)
    assert err.value.reason == "invalid_header"


def test_roi_header_parses_and_bad_ones_are_refused():
    assert c.parse_frame_headers(_headers(roi="10, 20,300,200"), None).roi == Box(10, 20, 300, 200)
    assert c.parse_frame_headers(_headers(), None).roi is None and c.parse_frame_headers(_headers(), None).tiling is None
    for bad, why in [("1,2,3", "x,y,w,h"), ("1,2,0,5", "empty box"), ("-1,0,5,5", "x,y,w,h"), ("a,b,c,d", "x,y,w,h"),
                     ("1.5,2,3,4", "x,y,w,h"), ("1,2,3,4,5", "x,y,w,h")]:
        with pytest.raises(FrameError, match=why) as err:
            c.parse_frame_headers(_headers(roi=bad), None)
        assert err.value.reason == "invalid_header", bad


def test_schema_accepts_what_the_parser_accepts():
    schema = json.loads((SCHEMAS / "frame_headers.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    base = {"content-type": "image/png", "frame_id": "f"}
    for good in ("auto", "off", "4x3", "4x3@0.25", "AUTO@.1"):
        c.parse_tiling(good)
        validator.validate({**base, "tiling": good})
    for bad in ("banana", "off@0.2", "4x"):
        assert not validator.is_valid({**base, "tiling": bad})
    validator.validate({**base, "roi": "0,0,10,10"})
    assert not validator.is_valid({**base, "roi": "0,0,10"})
    assert {"roi_outside_frame", "bad_tiling"} <= set(c.REASONS)


# ------------------------------------------------------------------------------------------ settings, batcher


def test_worker_tiling_settings(clean_hpad_env, monkeypatch):
    monkeypatch.setenv("HPAD_TILING", "3x2@0.1")
    monkeypatch.setenv("HPAD_MAX_TILES", "16")
    policy = WorkerSettings().tiling_policy
    assert policy.default == TileSpec("grid", 3, 2, 0.1) and policy.max_tiles == 16
    assert WorkerSettings().tiling == "3x2@0.1"
    default = WorkerSettings(tiling="auto").tiling_policy
    assert default.default == TileSpec("auto") and default.min_pixels == 2_000_000
    with pytest.raises(ValidationError, match="not auto, off or COLSxROWS"):
        WorkerSettings(tiling="everything")
    with pytest.raises(ValidationError, match="HPAD_MAX_TILES"):
        WorkerSettings(tiling="5x5", max_tiles=16)
    with pytest.raises(ValidationError):
        WorkerSettings(tile_overlap=0.95)


@dataclass
class Item:
    received: float
    tiles: int


def test_batcher_counts_tiles_and_never_splits_a_frame():
    batch: BatchFormer[Item] = BatchFormer(8, 20, clock=lambda: 0.0, weight=lambda item: item.tiles)
    batch.add([Item(0.0, 3), Item(0.0, 3)])
    assert not batch.full() and batch.poll_limit() == 2
    batch.add([Item(0.0, 12), Item(0.0, 1)])
    assert batch.full() and batch.poll_limit() == 1
    assert [i.tiles for i in batch.take()] == [3, 3]  # the 12-tile frame would overflow: it waits
    assert [i.tiles for i in batch.take()] == [12]  # heavier than a batch: a batch of its own
    assert [i.tiles for i in batch.take()] == [1]
    plain: BatchFormer[Item] = BatchFormer(2, 20, clock=lambda: 0.0)  # without weights: frames, as before
    plain.add([Item(0.0, 50)] * 3)
    assert len(plain.take()) == 2 and len(plain) == 1


# ------------------------------------------------------------------------------------------ worker on a broker


def _frame(rng: np.random.Generator, frame_id: str, size: tuple[int, int], ext: str = ".jpg",
           **extra: str) -> Frame:
    content = "image/jpeg" if ext == ".jpg" else "image/png"
    headers = frame_headers(frame_id, "cam-t", "widget", content) + [(k, v.encode()) for k, v in extra.items()]
    return Frame(encode(image(rng, size), ext), headers, b"cam-t")


@pytest.mark.kafka
def test_worker_scores_large_frames_as_tiles_and_dead_letters_bad_headers(kafka, make_worker):
    topics = kafka.new_topics(partitions=1)
    rng = np.random.default_rng(14)
    good = {
        "grid": _frame(rng, "t-grid", (900, 1200), tiling="4x3@0.2"),  # decoded at 1/4: tiles stay >= 64 px
        "auto": _frame(rng, "t-auto", (720, 960)),  # over HPAD_TILE_MIN_PIXELS: auto tiles
        "roi": _frame(rng, "t-roi", (600, 800), roi="100,50,400,300", tiling="2x2"),
        "small": _frame(rng, "t-small", (64, 80), ".png"),  # under the threshold: scored whole
    }
    bad = {
        "invalid_header": [_frame(rng, "b-roi", (64, 80), roi="1,2,3"),
                           _frame(rng, "b-tiling", (64, 80), tiling="banana")],
        "bad_tiling": [_frame(rng, "b-many", (600, 800), tiling="9x9"),  # 81 tiles > HPAD_MAX_TILES=24
                       _frame(rng, "b-fine", (64, 80), tiling="20x1")],  # 4-pixel tiles
        "roi_outside_frame": [_frame(rng, "b-out", (64, 80), roi="40,0,50,10")],
    }
    kafka.publish(topics.frames, list(good.values()) + [f for frames in bad.values() for f in frames])
    s = kafka.settings(topics, mask_policy="always", tile_min_pixels=500_000, max_tiles=24, max_batch_size=8)
    worker = make_worker(s)
    total = len(good) + sum(len(v) for v in bad.values())
    result = worker.run(max_frames=total, timeout=90, install_signals=False)
    assert result.exit_code == 0 and result.completed == total

    events = events_by_frame(kafka.read_all(topics.events, expected=len(good)))
    assert set(events) == {f.frame_id for f in good.values()} and all(len(v) == 1 for v in events.values())
    validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "event.schema.json").read_text()))
    for event in (e for (e,) in events.values()):
        validator.validate(event)
        mask = decode_mask_png(base64.b64decode(event["mask"]["data"]))
        assert mask.shape == (event["height"], event["width"])  # full size, whatever was scored
    (grid,), (auto,), (roi,), (small,) = (events[good[k].frame_id] for k in ("grid", "auto", "roi", "small"))
    assert grid["tiles"] == 12 and (grid["width"], grid["height"]) == (1200, 900)
    assert 1 < auto["tiles"] <= 24 and (auto["width"], auto["height"]) == (960, 720)
    assert roi["tiles"] == 4 and small["tiles"] == 1
    roi_mask = decode_mask_png(base64.b64decode(roi["mask"]["data"]))
    outside = np.ones((600, 800), bool)
    outside[50:350, 100:500] = False
    assert not roi_mask[outside].any()  # zero outside the ROI

    letters = kafka.read_all(topics.dlq, expected=total - len(good))
    by_id = {headers_as_text(r.headers)["frame_id"]: headers_as_text(r.headers) for r in letters}
    assert len(letters) == total - len(good)
    for reason, frames in bad.items():
        for frame in frames:
            assert by_id[frame.frame_id][c.ERROR_CLASS] == reason, by_id[frame.frame_id][c.ERROR_MESSAGE]
    assert "over the limit of 24" in by_id["b-many"][c.ERROR_MESSAGE]
    assert "beyond the 80x64 frame" in by_id["b-out"][c.ERROR_MESSAGE]
