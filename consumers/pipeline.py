"""The worker's three-stage pipeline: decode (thread pool) -> score (one thread) -> output (one thread).

The main loop admits polled records (`admit`: header checks, size checks from the image header, decode
submitted to the pool) and dispatches batches. While the model scores batch N, the pool decodes batch N+1
(OpenCV releases the GIL) and the output thread builds, sends and flushes the events of batch N-1, so the
model never waits for decoding or for the broker.

Scoring (`ScoreStage`): one prompt snapshot per batch, frames grouped per category into sub-batches, each
scored by `hpad.tiled_scoring.score_frames` (a frame by its ROI/tile plan, made at admission from its headers,
the settings and its size; every tile of the sub-batch in one `hpad.scorer.Scorer.score_batch` call). Out-of-memory splits a sub-batch in halves; a single frame is retried
with backoff, then dead-lettered (never dropped).

Output (`consumers.output.OutputStage` + `consumers.delivery.Deliverer`): one event or dead letter per frame; flush; every
delivery checked. An event the broker refuses (too large, invalid) becomes a dead letter; transient failures
are re-sent with backoff; a dead letter the broker refuses stops the worker (`OutputDeliveryError`) and
nothing after it is committed. A frame is marked done in the `OffsetBook` only once its output is
acknowledged (or, with exactly-once, once its transaction, which also carries the offsets, is committed).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from consumers import contract as c
from consumers import events as ev
from consumers.decode import decode_frame, decode_jpeg_batch, inspect_frame
from consumers.delivery import Deliverer, OutputDeliveryError
from consumers.items import Batch, FrameItem, PipelineConfig
from consumers.metrics import WorkerMetrics
from consumers.normals import NormalsSampler
from consumers.offsets import OffsetBook
from consumers.output import OutputStage, refusal_handler, utc_now
from consumers.prompt_provider import PromptProvider, PromptSnapshot
from hpad.errors import FrameError
from hpad.prompts import PromptSet
from hpad.scorer import Scorer
from hpad.tiled_scoring import score_frames
from hpad.tiling import plan_tiles

log = logging.getLogger(__name__)


def _timed_decode(meta: c.FrameMeta, data: bytes, size: tuple[int, int],
                  target: tuple[int, int] | None = None) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    pixels = decode_frame(meta, data, size, target)
    return pixels, time.perf_counter() - start


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (GPU) or the CPU allocator's RuntimeError."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Pipeline:
    """Owns the decode pool, the scoring and output threads, and the in-flight batch count."""

    def __init__(self, config: PipelineConfig, scorer: Scorer, provider: PromptProvider, book: OffsetBook,
                 producer: KafkaProducer, producer_factory: Callable[[], KafkaProducer], metrics: WorkerMetrics,
                 model: ev.ModelInfo, consumer: KafkaConsumer | None = None,
                 sampler: NormalsSampler | None = None) -> None:
        self.config = config
        self.provider = provider
        self.book = book
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="hpad-decode")
        self.to_score: queue.Queue[Batch | None] = queue.Queue(maxsize=config.pipeline_depth)
        self.to_output: queue.Queue[Batch | None] = queue.Queue(maxsize=config.pipeline_depth)
        self._cond = threading.Condition()
        self._inflight = 0
        self._dispatched = 0
        self._scoring = False
        self.stopped = False
        self.completed = 0  # frames whose output is acknowledged (scored + dead-lettered)
        self.fatal: BaseException | None = None
        self.hard_stop = threading.Event()
        # the model's input size: JPEGs are decoded at the smallest DCT scale that still covers it
        self.model_size = scorer.backbone.image_size  # tile plans are made for it
        self.decode_target = self.model_size if config.decode_scale == "auto" else None
        self.score_stage = ScoreStage(config, scorer, metrics, self.hard_stop)
        self.deliverer = Deliverer(producer, producer_factory, metrics, self.hard_stop,
                                   refusal_handler(config, utc_now), config.retry_backoff_s,
                                   config.retry_backoff_max_s, config.flush_timeout_s)
        self.output_stage = OutputStage(config, self.deliverer, metrics, model, book, consumer, clock=utc_now,
                                        sampler=sampler)
        self._threads = [
            threading.Thread(target=self._score_loop, name="hpad-score", daemon=True),
            threading.Thread(target=self._output_loop, name="hpad-output", daemon=True),
        ]

    # ------------------------------------------------------------------------------ main-thread side
    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def admit(self, record: ConsumerRecord, tp: TopicPartition, epoch: int) -> FrameItem:
        """Cheap checks on the main thread; decoding goes to the pool at once."""
        item = FrameItem(record=record, tp=tp, epoch=epoch, received=time.monotonic())
        try:
            value = c.check_payload_size(record.value, self.config.limits)
            item.meta = c.parse_frame_headers(record.headers, record.key, self.config.default_category)
            if self.provider.get(item.meta.category) is None:
                raise FrameError("unknown_category", f"category {item.meta.category!r} is not served here "
                                 f"(categories: {', '.join(self.provider.categories())})")
            item.size = inspect_frame(item.meta, value, self.config.limits)
            item.plan = plan_tiles((item.size[1], item.size[0]), self.model_size, item.meta.tiling, item.meta.roi,
                                   self.config.tiling)
            # the smallest JPEG decode scale that keeps every tile at or above the model's input size
            target = None if self.decode_target is None else item.plan.decode_target(self.decode_target)
            if self.config.gpu_decode and item.meta.content_type.kind == "jpeg":
                item.encoded = value  # decoded with its batch on the scorer's device
            else:
                item.decoding = self.pool.submit(_timed_decode, item.meta, value, item.size, target)
        except FrameError as exc:
            item.fail(exc)
        except Exception as exc:  # a parser bug must cost one frame (dead-lettered), never the partition
            log.exception("unexpected error admitting %s[%d]@%d", tp.topic, tp.partition, record.offset)
            item.fail(FrameError("internal_error", f"{type(exc).__name__}: {exc}"))
        return item

    def has_room(self) -> bool:
        return not self.to_score.full()

    def idle(self) -> bool:
        """Nothing queued for or inside the scorer: a new batch would start at once."""
        with self._cond:
            return self.to_score.empty() and not self._scoring

    def wait_room(self, timeout_s: float) -> None:
        """Sleep until the scorer takes a batch (there is room to dispatch) or ``timeout_s`` passes."""
        with self._cond:
            if self.to_score.full() and self.fatal is None:
                self._cond.wait(timeout_s)

    def inflight(self) -> int:
        with self._cond:
            return self._inflight

    def dispatch(self, items: list[FrameItem]) -> None:
        with self._cond:
            self._inflight += 1
            self._dispatched += 1
            seq = self._dispatched
        self.to_score.put(Batch(items, seq))

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every dispatched batch is finished (or failed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._inflight > 0 and self.fatal is None and not self.hard_stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
            return self._inflight == 0

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the threads (call `wait_idle` first; with ``hard_stop`` set, unfinished work is abandoned)."""
        self.stopped = True
        deadline = time.monotonic() + timeout_s
        while self._threads[0].is_alive() and time.monotonic() < deadline:
            try:
                self.to_score.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        for thread in self._threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------ threads
    def _finish(self, batch: Batch, completed: int) -> None:
        with self._cond:
            self._inflight -= 1
            self.completed += completed
            self._cond.notify_all()

    def _score_loop(self) -> None:
        while (batch := self.to_score.get()) is not None:
            with self._cond:
                self._cond.notify_all()  # room for the next batch (see wait_room)
            if self.fatal is not None:
                self._finish(batch, 0)
                continue
            with self._cond:
                self._scoring = True
            try:
                self.score_stage.run(batch, self.provider.snapshot(), self.book)
            except BaseException as exc:  # recorded as fatal; the main loop stops and reports it
                log.exception("scoring stage failed")
                self._fail(exc)
                self._finish(batch, 0)
                continue
            finally:
                with self._cond:
                    self._scoring = False
            self.to_output.put(batch)
        self.to_output.put(None)

    def _output_loop(self) -> None:
        while (batch := self.to_output.get()) is not None:
            completed = 0
            if self.fatal is None:
                try:
                    completed = self.output_stage.run(batch)
                except BaseException as exc:  # recorded as fatal; the main loop stops and reports it
                    if not isinstance(exc, OutputDeliveryError):
                        log.exception("output stage failed")
                    self._fail(exc)
            self._finish(batch, completed)

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self.fatal is None:
                self.fatal = exc
            self._cond.notify_all()
        self.hard_stop.set()


class ScoreStage:
    """Waits for a batch's decodes, then scores it per category with one prompt snapshot."""

    def __init__(self, config: PipelineConfig, scorer: Scorer, metrics: WorkerMetrics, stop: threading.Event) -> None:
        self.config, self.scorer, self.metrics, self.stop = config, scorer, metrics, stop

    def run(self, batch: Batch, snapshot: PromptSnapshot, book: OffsetBook) -> None:
        groups: dict[str, list[FrameItem]] = defaultdict(list)
        batch_id = f"{self.config.worker_name}#{batch.seq}"
        for item in batch.items:
            item.batch_id = batch_id
            self._collect(item)
        self._decode_on_device([item for item in batch.items if item.encoded is not None and item.error is None
                                and book.is_current(item.tp, item.epoch)])
        for item in batch.items:
            if item.error is None and book.is_current(item.tp, item.epoch):
                assert item.meta is not None
                groups[item.meta.category].append(item)
        scored = sum(item.tiles for items in groups.values() for item in items)
        if scored:
            self.metrics.batch_size.observe(scored)  # model images: tiles of tiled frames, frames scored whole
        for category, items in groups.items():
            prompts = snapshot.get(category)
            if prompts is None:
                for item in items:
                    item.fail(FrameError("unknown_category", f"category {category!r} has no prompt set"))
                continue
            start = time.perf_counter()
            for item in items:
                item.infer_start = time.monotonic()
                self.metrics.stage.labels(stage="queue").observe(item.infer_start - item.received)
            self.score(items, prompts)
            self.metrics.stage.labels(stage="infer").observe(time.perf_counter() - start)

    def _collect(self, item: FrameItem) -> None:
        if item.decoding is None:
            return
        try:
            item.pixels, item.decode_s = item.decoding.result()
        except FrameError as exc:
            item.fail(exc)
        except Exception as exc:  # a decoder bug must cost one frame (dead-lettered), never the partition
            log.exception("unexpected error decoding frame %s", item.meta.frame_id if item.meta else "?")
            item.fail(FrameError("internal_error", f"{type(exc).__name__}: {exc}"))
        item.decoding = None
        self.metrics.stage.labels(stage="decode").observe(item.decode_s)

    def _decode_on_device(self, items: list[FrameItem]) -> None:
        """JPEGs of the batch decoded together on the scorer's device (gpu_decode)."""
        if not items:
            return
        start = time.perf_counter()
        assert all(item.size is not None for item in items)
        try:
            decoded = decode_jpeg_batch([item.encoded for item in items], [item.size for item in items],
                                        self.scorer.backbone.device)
        except Exception as exc:  # a decoder bug must cost the frames (dead-lettered), never the partition
            log.exception("unexpected error decoding %d JPEGs on %s", len(items), self.scorer.backbone.device)
            decoded = [FrameError("internal_error", f"{type(exc).__name__}: {exc}")] * len(items)
        share = (time.perf_counter() - start) / len(items)
        for item, pixels in zip(items, decoded, strict=True):
            item.encoded, item.decode_s = None, share
            if isinstance(pixels, FrameError):
                item.fail(pixels)
            else:
                item.pixels = pixels
            self.metrics.stage.labels(stage="decode").observe(share)

    def score(self, items: list[FrameItem], prompts: PromptSet, attempt: int = 0) -> None:
        """Score ``items`` with ``prompts``; halve on out-of-memory; isolate frames the scorer refuses.

        Maps stay on the scorer's device; only the frames the mask policy wants get a full-size mask, made
        there and copied back as packed bits."""
        start = time.perf_counter()
        try:
            assert all(item.size is not None for item in items)
            sizes = [(item.size[1], item.size[0]) for item in items]  # the header's size, whatever the decode scale
            result = score_frames(self.scorer, [item.pixels for item in items], prompts, sizes,
                                  [item.plan for item in items])
            wanted = [index for index, score in enumerate(result.pred_score)
                      if ev.wants_mask(self.config.mask_policy, float(score), prompts.threshold)]
            masks = result.masks(wanted, prompts.pixel_threshold) if wanted else {}
        except FrameError as exc:
            self._refused(items, prompts, exc)
            return
        except (RuntimeError, MemoryError) as exc:
            if not (isinstance(exc, MemoryError) or is_out_of_memory(exc)):
                raise
            self._out_of_memory(items, prompts, attempt, exc)
            return
        elapsed = time.perf_counter() - start
        for index, (item, score) in enumerate(zip(items, result.pred_score, strict=True)):
            item.scored = ev.Scored(score=float(score), threshold=prompts.threshold,
                                    pixel_threshold=prompts.pixel_threshold, prompt_version=prompts.version,
                                    prompt_source=prompts.source, prompt_sha256=prompts.sha256)
            item.mask, item.infer_s, item.pixels = masks.get(index), elapsed, None

    def _refused(self, items: list[FrameItem], prompts: PromptSet, exc: FrameError) -> None:
        if len(items) == 1:
            items[0].fail(FrameError("bad_image", str(exc)))
            return
        half = len(items) // 2
        self.score(items[:half], prompts)
        self.score(items[half:], prompts)

    def _out_of_memory(self, items: list[FrameItem], prompts: PromptSet, attempt: int, exc: BaseException) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(items) > 1:
            self.metrics.retries.labels(kind="oom_split").inc()
            log.warning("out of memory scoring %d frames; splitting the batch (%s)", len(items), exc)
            half = len(items) // 2
            self.score(items[:half], prompts)
            self.score(items[half:], prompts)
            return
        if attempt >= self.config.oom_retries:
            items[0].fail(FrameError("out_of_memory", f"scoring ran out of memory {attempt + 1} times: {exc}"))
            return
        self.metrics.retries.labels(kind="oom_retry").inc()
        delay = min(self.config.retry_backoff_max_s, self.config.retry_backoff_s * 2**attempt)
        log.warning("out of memory scoring one frame; retry %d in %.1f s", attempt + 1, delay)
        self.stop.wait(delay)
        self.score(items, prompts, attempt + 1)
