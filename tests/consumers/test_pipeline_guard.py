"""An unexpected exception in the header parser or the decoder costs one frame (dead letter `internal_error`),
never the worker or the partition (defence in depth behind the fuzz tests of tests/reliability)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
from kafka import TopicPartition

from consumers import contract as c
from consumers import pipeline as pl
from consumers.camera import frame_headers
from consumers.items import Batch, PipelineConfig
from consumers.metrics import WorkerMetrics
from consumers.offsets import OffsetBook
from consumers.pipeline import Pipeline, ScoreStage
from consumers.prompt_provider import StaticPromptProvider
from hpad.scorer import Scorer, ScorerConfig
from tests.consumers.kafka_helpers import encode, image


def _pipeline(tiny_backbone) -> Pipeline:
    scorer = Scorer(tiny_backbone, config=ScorerConfig(max_batch=4))
    config = PipelineConfig(events_topic="e", dlq_topic="d", worker_name="w", limits=c.Limits(),
                            default_category=None, mask_policy="never", max_request_size=2**25)
    return Pipeline(config, scorer, StaticPromptProvider.build(scorer, ["widget"]), OffsetBook(), producer=None,
                    producer_factory=lambda: None, metrics=WorkerMetrics(), model=None)


def _record(offset: int, value: bytes):
    return SimpleNamespace(topic="f", partition=0, offset=offset, key=b"cam", value=value, timestamp=0,
                           headers=frame_headers(f"f{offset}", "cam", "widget", "image/png"))


def test_parser_and_decoder_bugs_become_internal_error_dead_letters(tiny_backbone, monkeypatch):
    pipe = _pipeline(tiny_backbone)
    tp = TopicPartition("f", 0)
    png = encode(image(np.random.default_rng(0), (32, 40)))
    real_parse = c.parse_frame_headers

    def broken_parse(headers, key, default=None):
        if dict(headers)["frame_id"] == b"f0":
            raise OverflowError("a parser bug")
        return real_parse(headers, key, default)

    monkeypatch.setattr(pl.c, "parse_frame_headers", broken_parse)
    bad_header = pipe.admit(_record(0, png), tp, pipe.book.track(tp, 0))
    assert bad_header.error is not None and bad_header.error.reason == "internal_error"
    assert "OverflowError" in str(bad_header.error)

    real_decode = pl.decode_frame

    def broken_decode(meta, data, size):
        raise ValueError("a decoder bug")

    monkeypatch.setattr(pl, "decode_frame", broken_decode)
    bad_decode = pipe.admit(_record(1, png), tp, pipe.book.track(tp, 1))
    monkeypatch.setattr(pl, "decode_frame", real_decode)
    good = pipe.admit(_record(2, png), tp, pipe.book.track(tp, 2))
    stage = ScoreStage(pipe.config, pipe.score_stage.scorer, pipe.metrics, threading.Event())
    stage.run(Batch([bad_header, bad_decode, good], 1), pipe.provider.snapshot(), pipe.book)
    assert bad_decode.error is not None and bad_decode.error.reason == "internal_error"
    assert good.error is None and good.scored is not None  # the frames around it are scored
    assert "internal_error" in c.REASONS
    pipe.pool.shutdown(wait=True)
