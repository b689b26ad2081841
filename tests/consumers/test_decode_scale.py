"""Decoding at the scale the model needs, decoding JPEG batches on the scorer's device, full-size masks.

The scorer's device here is the CPU (torchvision decodes JPEGs there with libjpeg); on CUDA the same code
decodes with nvJPEG (tests/test_gpu.py).
"""

from __future__ import annotations

import base64
import threading
import time

import numpy as np
import pytest
import torch
from kafka.structs import TopicPartition

from consumers import contract as c
from consumers import events as ev
from consumers.decode import decode_frame, decode_jpeg_batch, jpeg_scale, scaled_size
from consumers.items import Batch, FrameItem, PipelineConfig
from consumers.metrics import WorkerMetrics
from consumers.offsets import OffsetBook
from consumers.pipeline import ScoreStage
from consumers.prompt_provider import StaticPromptProvider
from hpad.errors import FrameError
from hpad.masks import decode_mask_png
from hpad.scorer import Scorer, ScorerConfig
from tests.consumers.kafka_helpers import (
    encode,
    events_by_frame,
    good_frame,
    image,
    new_topics,
    publish,
    read_all,
)
from tests.consumers.kafka_helpers import settings as worker_settings


def meta(kind: str) -> c.FrameMeta:
    return c.FrameMeta("f", "cam", "widget", c.ContentType(kind), None)


@pytest.mark.parametrize(("size", "target", "scale"), [
    ((900, 900), (240, 240), 2),  # 450 >= 240, 225 < 240
    ((960, 960), (240, 240), 4),  # exactly 240 at 1/4
    ((961, 959), (240, 240), 4),  # libjpeg rounds up: 241 x 240
    ((1920, 1080), (240, 240), 4),  # the short side decides: 1080 / 8 = 135 < 240
    ((4000, 3000), (240, 240), 8),
    ((1920, 1080), (240, 480), 4),  # (height, width) target: 1920 / 4 = 480 wide
    ((1920, 1080), (240, 481), 2),
    ((239, 800), (240, 240), 1),  # already smaller than the model: full size
    ((900, 900), None, 1),  # decode_scale=full
])
def test_jpeg_scale_is_the_largest_that_covers_the_model(size, target, scale):
    assert jpeg_scale(size, target) == scale
    if target is not None and scale > 1:
        width, height = scaled_size(size, scale)
        assert width >= target[1] and height >= target[0]
        assert -(-size[0] // (2 * scale)) < target[1] or -(-size[1] // (2 * scale)) < target[0] or scale == 8


def test_jpeg_is_decoded_reduced_png_at_full_size():
    rng = np.random.default_rng(0)
    picture = image(rng, (161, 203))  # odd sides: scaled sizes round up
    jpeg = decode_frame(meta("jpeg"), encode(picture, ".jpg"), (203, 161), target=(40, 40))
    assert jpeg.shape == (41, 51, 3)  # 1/4: ceil(161 / 4), ceil(203 / 4)
    full = decode_frame(meta("jpeg"), encode(picture, ".jpg"), (203, 161))
    assert full.shape == (161, 203, 3)
    # the reduced decode is the full one, smaller: close to an area-average of it
    import cv2

    reference = cv2.resize(full, (51, 41), interpolation=cv2.INTER_AREA).astype(np.float32)
    assert np.abs(jpeg.astype(np.float32) - reference).mean() < 12
    png = decode_frame(meta("png"), encode(picture, ".png"), (203, 161), target=(40, 40))
    assert png.shape == (161, 203, 3) and np.array_equal(png, picture)


def test_reduced_decode_still_checks_the_header_size():
    data = encode(image(np.random.default_rng(1), (160, 200)), ".jpg")
    with pytest.raises(FrameError, match=r"at 1/4 scale but the header says 200x161") as err:
        decode_frame(meta("jpeg"), data, (200, 161), target=(40, 40))
    assert err.value.reason == "undecodable"


def test_device_batch_decode_isolates_a_corrupt_jpeg():
    rng = np.random.default_rng(2)
    pictures = [image(rng, (40, 56)), image(rng, (32, 32))]
    good = [encode(p, ".jpg") for p in pictures]
    corrupt = good[0][:200] + b"\x00" * 50
    decoded = decode_jpeg_batch([good[0], corrupt, good[1], good[1]], [(56, 40), (56, 40), (32, 32), (33, 32)],
                                torch.device("cpu"))
    assert isinstance(decoded[0], torch.Tensor) and decoded[0].dtype == torch.uint8
    assert tuple(decoded[0].shape) == (3, 40, 56) and tuple(decoded[2].shape) == (3, 32, 32)
    cpu = decode_frame(meta("jpeg"), good[0], (56, 40))
    assert np.abs(decoded[0].permute(1, 2, 0).numpy().astype(int) - cpu.astype(int)).max() <= 2  # both libjpeg
    assert isinstance(decoded[1], FrameError) and decoded[1].reason == "undecodable"
    assert isinstance(decoded[3], FrameError) and "header says 33x32" in str(decoded[3])


def _stage_items(book: OffsetBook, frames: list[tuple[bytes, str, tuple[int, int]]]) -> list[FrameItem]:
    tp = TopicPartition("f", 0)
    items = []
    for index, (data, kind, size) in enumerate(frames):
        item = FrameItem(record=None, tp=tp, epoch=book.track(tp, index), received=time.monotonic(),
                         meta=c.FrameMeta(f"f{index}", "cam", "widget", c.ContentType(kind), None), size=size)
        item.encoded = data
        items.append(item)
    return items


def test_score_stage_decodes_jpegs_on_the_device_and_masks_at_full_size(tiny_backbone):
    """gpu_decode path on the CPU: JPEGs decoded with the batch, a corrupt one dead-lettered alone, every
    scored frame's mask at its header's full size."""
    scorer = Scorer(tiny_backbone, config=ScorerConfig(max_batch=8))
    provider = StaticPromptProvider.build(scorer, ["widget"])
    config = PipelineConfig(events_topic="e", dlq_topic="d", worker_name="w", limits=c.Limits(),
                            default_category=None, mask_policy="always", max_request_size=2**25, gpu_decode=True)
    stage = ScoreStage(config, scorer, WorkerMetrics(), threading.Event())
    rng = np.random.default_rng(3)
    good = encode(image(rng, (150, 130)), ".jpg")
    book = OffsetBook()
    items = _stage_items(book, [(good, "jpeg", (130, 150)), (good[:100], "jpeg", (130, 150)),
                                (encode(image(rng, (70, 90)), ".jpg"), "jpeg", (90, 70))])
    stage.run(Batch(items), provider.snapshot(), book)
    assert [i.error.reason if i.error else "ok" for i in items] == ["ok", "undecodable", "ok"]
    assert (items[0].mask.width, items[0].mask.height) == (130, 150)
    assert (items[2].mask.width, items[2].mask.height) == (90, 70)
    assert all(i.encoded is None and i.pixels is None for i in items)
    # the same frame decoded on the host, at full size, scores the same (both are libjpeg)
    reference = scorer.score([decode_frame(meta("jpeg"), good, (130, 150))], provider.get("widget"))
    assert abs(items[0].scored.score - float(reference.pred_score[0])) < 1e-3
    expected = reference.anomaly_map[0] >= provider.get("widget").pixel_threshold
    assert np.mean(items[0].mask.unpack() != expected) < 0.01
    field = ev.packed_mask_field(items[0].mask, 0.5)
    assert decode_mask_png(base64.b64decode(field["data"])).shape == (150, 130)
    assert field["anomalous_pixels"] == int(items[0].mask.unpack().sum())


@pytest.mark.kafka
@pytest.mark.parametrize("decode_scale", ["auto", "full"])
def test_worker_reports_full_size_for_reduced_jpegs(kafka_broker, make_worker, decode_scale):
    """JPEG frames 4x the model's size: decoded at 1/4 (auto) or full size; events and masks carry the
    frame's own size either way, and both ways give one event per frame."""
    topics = new_topics(kafka_broker, partitions=1)
    rng = np.random.default_rng(4)
    frames = [good_frame(rng, size=(260, 300), ext=".jpg") for _ in range(6)]
    publish(kafka_broker, topics.frames, frames)
    s = worker_settings(kafka_broker, topics, mask_policy="always", decode_scale=decode_scale)
    worker = make_worker(s)
    result = worker.run(max_frames=len(frames), timeout=60, install_signals=False)
    assert result.exit_code == 0 and result.completed == len(frames)
    assert worker.pipeline.decode_target == ((64, 64) if decode_scale == "auto" else None)
    events = events_by_frame(read_all(kafka_broker, topics.events, expected=len(frames)))
    assert set(events) == {f.frame_id for f in frames}
    for (event,) in events.values():
        assert (event["width"], event["height"]) == (300, 260)
        assert (event["mask"]["width"], event["mask"]["height"]) == (300, 260)
        assert decode_mask_png(base64.b64decode(event["mask"]["data"])).shape == (260, 300)
        assert event["timings_ms"]["decode"] >= 0
