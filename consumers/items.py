"""What flows through the worker's pipeline: one `FrameItem` per polled record, batches of them (`Batch`),
and the `PipelineConfig` the stages share (the decode/score stages in `consumers.pipeline`, output in
`consumers.output`, delivery in `consumers.delivery`).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from consumers import contract as c
from consumers import events as ev
from hpad.errors import FrameError
from hpad.masks import PackedMask
from hpad.tiling import TilePlan, TilingPolicy


@dataclass(eq=False)
class FrameItem:
    """One polled record on its way through the pipeline."""

    record: ConsumerRecord
    tp: TopicPartition
    epoch: int
    received: float  # time.monotonic() when poll returned it
    meta: c.FrameMeta | None = None
    size: tuple[int, int] | None = None  # (width, height) from the image header
    plan: TilePlan | None = None  # ROI and tiles (hpad.tiling), from the headers, the settings and the size
    error: FrameError | None = None
    decoding: Future | None = None
    encoded: bytes | None = None  # a JPEG left for the scorer's device to decode (gpu_decode)
    pixels: np.ndarray | torch.Tensor | None = None
    decode_s: float = 0.0
    infer_start: float = 0.0
    infer_s: float = 0.0
    scored: ev.Scored | None = None
    mask: PackedMask | None = None  # at the frame's full size, only when the mask policy wants it
    batch_id: str = ""

    @property
    def tiles(self) -> int:
        """Images this frame costs the model (its tiles; 1 when scored whole or refused): the batcher's unit."""
        return 1 if self.plan is None or self.error is not None else self.plan.n_tiles

    def fail(self, error: FrameError) -> None:
        self.error, self.pixels, self.encoded, self.mask = error, None, None, None

    @property
    def source(self) -> tuple[str, int, int]:
        return self.record.topic, self.record.partition, self.record.offset


@dataclass(eq=False)
class Batch:
    items: list[FrameItem]
    seq: int = 0
    created: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class PipelineConfig:
    """The parts of the settings the stages need (kept small so tests can build stages directly)."""

    events_topic: str
    dlq_topic: str
    worker_name: str
    limits: c.Limits
    default_category: str | None
    mask_policy: str
    max_request_size: int
    exactly_once: bool = False
    pipeline_depth: int = 2
    decode_threads: int = 2
    decode_scale: str = "auto"  # "auto": JPEG decoded at the smallest DCT scale >= the model's input size
    gpu_decode: bool = False  # JPEG decoded on the scorer's device (nvJPEG)
    tiling: TilingPolicy = field(default_factory=TilingPolicy)  # ROI/tiling defaults (HPAD_TILING, ...)
    oom_retries: int = 3
    retry_backoff_s: float = 0.2
    retry_backoff_max_s: float = 10.0
    flush_timeout_s: float = 30.0
