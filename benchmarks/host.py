"""Host cost of the worker: CPU milliseconds per frame with the model's own cost taken out.

One embedded broker (tansu, another process: its CPU is NOT counted) on 127.0.0.1 for the whole run. Per
encoding (900x900 JPEG quality 90, PNG) a backlog of N frames is published once to a 2-partition topic;
each case then drains it with a fresh group and fresh events / dead-letter topics, with a
`consumers.worker.Worker` running IN THIS PROCESS (main thread, ``run(max_frames=N)``): poll, header checks,
decode pool, batching, ScoreStage, OutputStage (event JSON, masks, produce, flush), commits. Measured per
case: process CPU (``time.process_time()``, every thread of this process) from the start of ``run()`` to
its end, and wall time; also the CPU of the scoring calls (``time.thread_time()`` deltas on the scoring
thread around ``Scorer.score_batch``, ``encode`` and ``preprocess``) and, sampled from
``/proc/self/task/*/schedstat``, the CPU of each worker thread.

Cases: {jpeg, png} x decode_scale {full (the old path: full-size decode), auto (the new path: JPEG decoded at
the smallest DCT scale >= the model's input size; PNG has no such shortcut, so for PNG both are the same
path)} x model {noop, tiny}:

* ``noop``: `Scorer.encode` replaced by a stand-in that returns fixed tokens of the right shapes at once:
  preprocess (uint8 -> tensor stacking, antialiased resize to the input size, normalisation) and the image
  tower are skipped; `Scorer.score_batch` still validates the frames, computes the scores and the
  smoothed model-size maps from the tokens, and masks are made for the frames the mask policy wants. So
  the CPU per frame is everything the host does around the model.
* ``tiny``: the real ``hpad-tiny`` model (random weights, 64 px input), for reference; "outside the model"
  there = total - CPU inside ``score_batch`` (or - inside ``encode``, which includes the resize).

Both modes score like the random ``hpad-tiny`` here: no frame is anomalous, so no event carries a mask; one
extra case (JPEG, auto, noop, every 10th frame anomalous with a mask) prices the masks.

Then the drift of the reduced decode: the bundled JPEG frames scored decoded full-size and decoded at the
reduced scale (``sizes=[(900, 900)]``, maps at full size) with the real hpad-tiny (random weights) and,
unless ``--no-vit``, ViT-B-16-plus-240 in bf16 (random weights) on a few frames.

Every case runs ``--repeats`` times (default 3, interleaved) and the median run is reported; a warm-up
(not reported) runs first. Writes benchmarks/results/host.json and host.md (about 2.5 minutes on 2 cores).

Usage: python benchmarks/host.py [--frames 600] [--quick] [--repeats 3] [--only jpeg-auto-noop] [--no-vit]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from benchmarks.common import SHARED_DATA, machine, median, write_results
from consumers import contract as c
from consumers.broker import EmbeddedBroker
from consumers.camera import frame_headers
from consumers.decode import decode_frame, jpeg_scale, scaled_size
from consumers.models import model_info
from consumers.prompt_provider import StaticPromptProvider
from consumers.settings import WorkerSettings
from consumers.worker import Worker
from hpad.attention import ImageTokens
from hpad.backbone import Backbone, WeightsSpec, load_backbone
from hpad.prompts import ANOMALOUS, PromptSet
from hpad.scorer import Scorer, ScorerConfig, frame_to_chw, resize_frames, to_device_batch

SIZE = (900, 900)  # (height, width) of every frame
CATEGORY = "bottle"
PARTITIONS = 2
CAMERAS = 4
BATCH = 32
JPEG_QUALITY = 90
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}  # as tests/consumers/kafka_helpers.py
NOOP_SKIPS = ("Scorer.encode replaced: preprocess (frame_to_chw stacking, antialiased resize to the input size, "
              "normalisation) and the image tower (LAA encoder) are skipped; it returns fixed projected tokens "
              "cls [B, D] and patches [B, N, D] on the scorer's device. Kept: score_batch's frame validation, "
              "the prompt-similarity scores, the smoothed model-size maps, the masks of frames the policy wants")
log = logging.getLogger("bench.host")


# ----------------------------------------------------------------------------------------------- frames


def synthetic_frame(rng: np.random.Generator) -> np.ndarray:
    """A 900x900 RGB picture with structure (not noise): lit background, a bottle-like ring, texture, a scratch."""
    h, w = SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h / 2 + rng.normal(0, 20), w / 2 + rng.normal(0, 20)
    radius = np.hypot(yy - cy, xx - cx)
    base = 60 + 120 * np.exp(-(radius / 420) ** 2)
    ring = 70 * np.exp(-((radius - 260) / 30) ** 2) + 40 * np.exp(-((radius - 120) / 15) ** 2)
    texture = cv2.GaussianBlur(rng.normal(0, 12, (h, w)).astype(np.float32), (0, 0), 3)
    gray = base + ring + texture
    picture = np.stack([gray * 0.9, gray * 0.8, gray * 0.6], axis=-1)
    if rng.random() < 0.5:  # a defect: a dark scratch
        p0 = tuple(int(v) for v in rng.integers(200, 700, 2))
        p1 = tuple(int(v) for v in rng.integers(200, 700, 2))
        picture = np.ascontiguousarray(picture)
        cv2.line(picture, p0, p1, (20, 20, 20), int(rng.integers(3, 9)))
    return np.clip(picture, 0, 255).astype(np.uint8)


def load_pictures(limit: int = 83) -> tuple[list[np.ndarray], str]:
    """RGB 900x900 pictures: the MVTec bottle test images when ../shared/data has them, else generated ones."""
    folder = SHARED_DATA / "mvtec" / "bottle" / "test"
    paths = sorted(folder.rglob("*.png"))[:limit] if folder.is_dir() else []
    pictures = []
    for path in paths:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            continue
        if bgr.shape[:2] != SIZE:
            bgr = cv2.resize(bgr, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_AREA)
        pictures.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if pictures:
        return pictures, f"mvtec/bottle test images, {len(pictures)} distinct, 900x900"
    rng = np.random.default_rng(0)
    return [synthetic_frame(rng) for _ in range(16)], "generated structured images (no shared data), 16 distinct, 900x900"


def encode(picture: np.ndarray, kind: str) -> bytes:
    bgr = cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)
    if kind == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    else:
        ok, buf = cv2.imencode(".png", bgr)
    assert ok
    return buf.tobytes()


CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


def publish_backlog(bootstrap: str, topic: str, encoded: list[bytes], kind: str, count: int) -> list[str]:
    """``count`` frames (cycling over ``encoded``) spread over the partitions; returns their frame ids."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=32 * 1024 * 1024, linger_ms=5,
                             batch_size=1024 * 1024)
    run = uuid.uuid4().hex[:8]
    ids, futures = [], []
    try:
        for index in range(count):
            camera = f"cam-{index % CAMERAS}"
            frame_id = f"{camera}-{run}-{index:06d}"
            headers = frame_headers(frame_id, camera, CATEGORY, CONTENT_TYPES[kind])
            futures.append(producer.send(topic, key=camera.encode(), value=encoded[index % len(encoded)],
                                         headers=headers, partition=index % PARTITIONS))
            ids.append(frame_id)
        producer.flush()
        for future in futures:
            future.get(timeout=60)
    finally:
        producer.close()
    return ids


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0) -> list:
    """Every record of ``topic`` until ``expected`` arrived (plus a short tail, to see duplicates), or timeout."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             max_partition_fetch_bytes=16 * 1024 * 1024)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        records: list = []
        deadline = time.monotonic() + timeout_s
        tail_until = None
        while time.monotonic() < deadline:
            for part in consumer.poll(timeout_ms=100).values():
                records += part
            if tail_until is None and len(records) >= expected:
                tail_until = time.monotonic() + 0.5
            if tail_until is not None and time.monotonic() >= tail_until:
                break
        return records
    finally:
        consumer.close()


# ----------------------------------------------------------------------------------------------- scorers


class TimedScorer(Scorer):
    """A Scorer that adds up the CPU time (of the calling thread) spent in score_batch, encode, preprocess."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu = {"score_batch": 0.0, "encode": 0.0, "preprocess": 0.0}
        self.calls = 0

    def reset(self) -> None:
        self.cpu = dict.fromkeys(self.cpu, 0.0)
        self.calls = 0

    def _timed(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.cpu[name] += time.thread_time() - start

    def score_batch(self, frames, prompts=None, sizes=None):  # type: ignore[override]
        self.calls += 1
        return self._timed("score_batch", super().score_batch, frames, prompts, sizes)

    def encode(self, frames):  # type: ignore[override]
        return self._timed("encode", super().encode, frames)

    def preprocess(self, frames):  # type: ignore[override]
        return self._timed("preprocess", super().preprocess, frames)


NOOP_INPUT, NOOP_PATCH = (240, 240), (16, 16)  # ViT-B-16-plus-240's input and patch size


class NoopScorer(TimedScorer):
    """The image tower and preprocess replaced by fixed tokens (see NOOP_SKIPS).

    Tokens point along (normal - anomalous) of the category's prompt pair, so a frame scores clearly normal
    (about 0.09 with the random hpad-tiny prompts); with ``anomalous_every`` k > 0, every k-th frame gets the
    opposite class token and a 3x3 block of anomalous patches, so it is anomalous and gets a mask."""

    def __init__(self, backbone: Backbone, prompts: PromptSet, anomalous_every: int = 0, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        text = prompts.text_features.float().to(backbone.device)
        anomalous = text[ANOMALOUS]
        normal = text[1 - ANOMALOUS]
        direction = torch.nn.functional.normalize(normal - anomalous, dim=0)
        gh, gw = backbone.grid_size
        self.anomalous_every = anomalous_every
        self._seen = 0
        self._normal_cls = direction.expand(self.config.max_batch, -1).contiguous()
        self._normal_patches = direction.expand(self.config.max_batch, gh * gw, -1).contiguous()
        block = torch.zeros(gh, gw, dtype=torch.bool)
        block[gh // 3 : gh // 3 + 3, gw // 3 : gw // 3 + 3] = True
        self._block = block.flatten().to(backbone.device)
        self._direction = direction

    def encode(self, frames):  # type: ignore[override]
        start = time.thread_time()
        b = len(frames)
        if b > self._normal_cls.shape[0]:
            raise AssertionError(f"noop scorer got {b} frames, more than max_batch {self._normal_cls.shape[0]}")
        cls, patches = self._normal_cls[:b], self._normal_patches[:b]
        if self.anomalous_every > 0:
            rows = [i for i in range(b) if (self._seen + i) % self.anomalous_every == 0]
            if rows:
                cls, patches = cls.clone(), patches.clone()
                cls[rows] = -self._direction
                for row in rows:
                    patches[row, self._block] = -self._direction
        self._seen += b
        self.cpu["encode"] += time.thread_time() - start
        return ImageTokens(cls=cls, patches=patches)


# ----------------------------------------------------------------------------------------------- per-thread CPU


def _thread_cpu_ns() -> dict[int, int]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                out[int(tid)] = int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def _thread_names() -> dict[int, str]:
    names = {}
    for thread in threading.enumerate():
        if thread.native_id is not None:
            names[thread.native_id] = thread.name
    return names


def _role(name: str) -> str:
    if name.startswith("hpad-decode"):
        return "decode pool"
    if name == "hpad-score":
        return "score thread"
    if name == "hpad-output":
        return "output thread"
    if name == "MainThread":
        return "main loop (poll, admit, commit)"
    if name.startswith("kafka-io-"):
        return "kafka IO threads (consumer + producer: fetch, CRC, record parsing, sends)"
    if name.endswith("-network-thread"):
        return "kafka producer sender thread"
    if "heartbeat" in name.lower():
        return "kafka heartbeat"
    if name.startswith("native:"):
        return "native threads (not Python's: OpenCV / torch pools)"
    return f"other python thread ({name})"


class ThreadSampler:
    """Samples every thread's on-CPU nanoseconds (schedstat) every ``interval`` s, so threads that end before
    the run does are still counted (to within one interval); the sampler's own CPU is reported apart."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self._started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _sample(self) -> None:
        cpu = _thread_cpu_ns()
        names = _thread_names()  # after the listing, so a thread that just started is known to threading
        for tid, ns in cpu.items():
            self.first.setdefault(tid, 0 if self._started else ns)  # threads born later start at 0
            self.last[tid] = ns
            if tid in names:
                self.names[tid] = names[tid]
            elif tid not in self.names:
                try:
                    comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
                except OSError:
                    comm = "?"
                self.names[tid] = f"native:{comm}"
        self._started = True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> ThreadSampler:
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        """CPU seconds per role since start."""
        self._stop.set()
        self._thread.join()
        self._sample()
        roles: dict[str, float] = {}
        for tid, ns in self.last.items():
            role = "benchmark sampler" if self.names.get(tid) == "bench-sampler" else _role(self.names.get(tid, "?"))
            roles[role] = roles.get(role, 0.0) + (ns - self.first.get(tid, 0)) / 1e9
        return roles


# ----------------------------------------------------------------------------------------------- one case


class TimedWorker(Worker):
    """Remembers when the first partitions were assigned (the group join is over)."""

    assigned_at: float | None = None
    assigned_cpu: float | None = None

    def assigned(self, assigned: set[TopicPartition]) -> None:
        if self.assigned_at is None and assigned:
            self.assigned_at, self.assigned_cpu = time.monotonic(), time.process_time()
        super().assigned(assigned)


@dataclass
class Case:
    encoding: str
    decode_scale: str
    model: str  # noop or tiny
    anomalous_every: int = 0
    label: str = field(init=False)

    def __post_init__(self) -> None:
        self.label = f"{self.encoding}-{self.decode_scale}-{self.model}"
        if self.anomalous_every:
            self.label += f"-masks{self.anomalous_every}"


def worker_settings(bootstrap: str, frames_topic: str, tag: str, decode_scale: str) -> WorkerSettings:
    return WorkerSettings(
        bootstrap_servers=bootstrap, input_topic=frames_topic, events_topic=f"{tag}.events",
        dlq_topic=f"{tag}.dlq", group_id=f"{tag}.group", model="hpad-tiny", random_init=True, device="cpu",
        torch_threads=1, precision="fp32", categories=[CATEGORY], metrics_port=-1, max_batch_size=BATCH,
        mask_policy="anomalous", decode_scale=decode_scale, normals_topic=None, prompts_topic=None,
        log_level="WARNING", **FAST_GROUP,
    )


def stage_sums(worker: Worker) -> dict[str, dict[str, float]]:
    registry = worker.metrics.registry
    out = {}
    for stage in ("decode", "queue", "infer", "encode", "produce", "commit"):
        total = registry.get_sample_value("hpad_stage_duration_seconds_sum", {"stage": stage}) or 0.0
        count = registry.get_sample_value("hpad_stage_duration_seconds_count", {"stage": stage}) or 0.0
        out[stage] = {"seconds": total, "count": count}
    return out


def run_case(broker: EmbeddedBroker, case: Case, frames_topic: str, frame_ids: list[str], backbone: Backbone,
             prompts: PromptSet, sample_threads: bool = True) -> dict[str, Any]:
    n = len(frame_ids)
    tag = f"host-{case.label}-{uuid.uuid4().hex[:8]}"
    settings = worker_settings(broker.bootstrap, frames_topic, tag, case.decode_scale)
    broker.create_topic(settings.events_topic, PARTITIONS)
    broker.create_topic(settings.dlq_topic, 1)
    config = ScorerConfig(max_batch=BATCH)
    if case.model == "noop":
        # the production model's input size (ViT-B-16-plus-240: 240 px, 15x15 patches), so JPEGs are decoded
        # at the scale a real deployment decodes them (1/2 for 900 px) and maps have its size
        served = replace(backbone, image_size=NOOP_INPUT, patch_size=NOOP_PATCH)
        scorer: TimedScorer = NoopScorer(served, prompts, anomalous_every=case.anomalous_every, config=config)
    else:
        scorer = TimedScorer(backbone, config=config)
    provider = StaticPromptProvider({CATEGORY: scorer.check_prompts(prompts)})
    worker = TimedWorker(settings, scorer, provider, model_info(scorer, settings.precision))
    sampler = ThreadSampler().start() if sample_threads else None
    wall0, cpu0 = time.monotonic(), time.process_time()
    result = worker.run(max_frames=n, timeout=600, install_signals=False)
    wall1, cpu1 = time.monotonic(), time.process_time()
    threads = sampler.stop() if sampler is not None else {}
    sampler_cpu = threads.pop("benchmark sampler", 0.0)
    if result.exit_code != 0 or result.completed != n:
        raise SystemExit(f"{case.label}: the worker ended with {result} after {n} frames were published")
    events = read_topic(broker.bootstrap, settings.events_topic, n)
    dead = read_topic(broker.bootstrap, settings.dlq_topic, 0, timeout_s=1.0)
    ids, masks, scores = [], 0, []
    for record in events:
        event = json.loads(record.value)
        ids.append(event["frame_id"])
        masks += event.get("mask") is not None
        scores.append(event["score"])
    duplicates = len(ids) - len(set(ids))
    if len(ids) != n or set(ids) != set(frame_ids) or duplicates or dead:
        raise SystemExit(f"{case.label}: {n} frames in, {len(ids)} events out ({len(set(ids))} distinct, "
                         f"{duplicates} duplicates, {len(set(frame_ids) - set(ids))} missing), "
                         f"{len(dead)} dead letters")
    cpu = cpu1 - cpu0 - sampler_cpu
    drain_wall = wall1 - (worker.assigned_at or wall0)
    drain_cpu = cpu1 - (worker.assigned_cpu or cpu0) - sampler_cpu
    inside = scorer.cpu
    row = {
        "case": case.label, "encoding": case.encoding, "decode_scale": case.decode_scale, "model": case.model,
        "noop_anomalous_every": case.anomalous_every, "frames": n, "events": len(ids), "duplicates": duplicates,
        "dead_letters": len(dead), "events_with_mask": masks, "score_min": min(scores), "score_max": max(scores),
        "cpu_s": cpu, "wall_s": wall1 - wall0, "cpu_ms_per_frame": 1000 * cpu / n,
        "drain_wall_s": drain_wall, "drain_cpu_ms_per_frame": 1000 * drain_cpu / n, "drain_fps": n / drain_wall,
        "join_and_start_cpu_s": cpu - drain_cpu,
        "scorer_calls": scorer.calls, "cpu_in_score_batch_s": inside["score_batch"],
        "cpu_in_encode_s": inside["encode"], "cpu_in_preprocess_s": inside["preprocess"],
        "cpu_ms_per_frame_outside_score_batch": 1000 * (cpu - inside["score_batch"]) / n,
        "cpu_ms_per_frame_outside_encode": 1000 * (cpu - inside["encode"]) / n,
        "thread_cpu_ms_per_frame": {k: 1000 * v / n for k, v in sorted(threads.items(), key=lambda kv: -kv[1])},
        "sampler_cpu_s_subtracted": sampler_cpu,
        "stage_wall_seconds": stage_sums(worker),
        "run_result": {"reason": result.reason, "drained": result.drained},
    }
    print(f"  {case.label:<28} {row['cpu_ms_per_frame']:6.2f} ms CPU/frame "
          f"(outside score_batch {row['cpu_ms_per_frame_outside_score_batch']:5.2f}), wall {row['wall_s']:5.1f} s, "
          f"drain {row['drain_fps']:6.1f} frames/s, masks {masks}", flush=True)
    return row


# ----------------------------------------------------------------------------------------------- drift


def frame_meta(kind: str) -> c.FrameMeta:
    headers = frame_headers("drift-0", "cam-0", CATEGORY, CONTENT_TYPES[kind])
    return c.parse_frame_headers(headers, b"cam-0", None)


def drift(model: str, precision: str, jpegs: list[bytes], batch: int, threads: int) -> dict[str, Any]:
    """Scores and full-size maps from full-size vs reduced-scale JPEG decoding, same scorer."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    backbone = load_backbone(WeightsSpec(model=model, random_init=True, seed=0), device="cpu", precision=precision)
    scorer = Scorer(backbone, config=ScorerConfig(max_batch=batch))
    prompts = scorer.zero_shot_prompts(CATEGORY)
    meta = frame_meta("jpeg")
    size = (SIZE[1], SIZE[0])
    target = backbone.image_size
    scale = jpeg_scale(size, target)
    score_diffs, map_max, map_sum, pixels, full_scores = [], 0.0, 0.0, 0, []
    p99s, input_max, input_sum, input_count = [], 0.0, 0.0, 0
    for at in range(0, len(jpegs), batch):
        chunk = jpegs[at : at + batch]
        full = [decode_frame(meta, data, size) for data in chunk]
        reduced = [decode_frame(meta, data, size, target) for data in chunk]
        # what the model sees: each frame resized to its input size (0..255), full-size vs reduced decode
        for f_full, f_red in zip(full, reduced, strict=True):
            x = resize_frames(to_device_batch([frame_to_chw(f_full)], backbone.device), target)
            y = resize_frames(to_device_batch([frame_to_chw(f_red)], backbone.device), target)
            d = (x - y).abs()
            input_max = max(input_max, float(d.max()))
            input_sum += float(d.sum())
            input_count += d.numel()
        a = scorer.score(full, prompts)
        b = scorer.score(reduced, prompts, sizes=[SIZE] * len(chunk))
        score_diffs += list(np.abs(a.pred_score - b.pred_score))
        full_scores += list(a.pred_score)
        for m_full, m_red in zip(a.anomaly_map, b.anomaly_map, strict=True):
            assert m_full.shape == m_red.shape == SIZE
            diff = np.abs(m_full - m_red)
            map_max = max(map_max, float(diff.max()))
            map_sum += float(diff.sum())
            pixels += diff.size
            p99s.append(float(np.percentile(diff, 99)))
    torch.set_num_threads(1)
    return {
        "model": model, "precision": precision, "weights": "random-init", "frames": len(jpegs),
        "input_size": list(target), "reduced_decode": f"1/{scale} ({'x'.join(map(str, scaled_size(size, scale)))})",
        "score_abs_diff_max": float(np.max(score_diffs)), "score_abs_diff_mean": float(np.mean(score_diffs)),
        "score_spread_std_full": float(np.std(full_scores)),
        "score_range_full": [float(np.min(full_scores)), float(np.max(full_scores))],
        "map_abs_diff_max": map_max, "map_abs_diff_mean": map_sum / pixels,
        "map_abs_diff_p99_max_over_frames": max(p99s),
        "score_diff_max_over_spread": float(np.max(score_diffs)) / max(float(np.std(full_scores)), 1e-12),
        "model_input_abs_diff_max_0_255": input_max, "model_input_abs_diff_mean_0_255": input_sum / input_count,
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------------- main


def table(rows: list[dict[str, Any]], drifts: list[dict[str, Any]], info: dict[str, Any], source: str,
          n: int, sizes: dict[str, float], repeats: int) -> str:
    by = {r["case"]: r for r in rows}
    lines = [
        f"Worker host CPU per frame, {n} frames of 900x900 drained from a backlog through the embedded broker "
        f"(tansu, another process, NOT counted); worker in-process, hpad-tiny RANDOM WEIGHTS, batch {BATCH}, "
        f"torch threads 1, decode threads 2; {source}; JPEG q{JPEG_QUALITY} ({sizes['jpeg'] / 1024:.0f} KiB), "
        f"PNG ({sizes['png'] / 1024:.0f} KiB); {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, "
        f"{info['date'][:10]}" + (f"; median of {repeats} runs" if repeats > 1 else ""),
        "",
        "noop = image tower and preprocess (resize) skipped, fixed tokens, at ViT-B-16-plus-240's input size (240 px: a 900 px JPEG decodes at 1/2); tiny = the real hpad-tiny (64 px). "
        "CPU = this process, all threads, whole `Worker.run` (group join and close included). "
        "PNG has no reduced decode: full and auto are the same path there.",
        "",
        "| frames | model | CPU ms/frame, old (full) | CPU ms/frame, new (auto) | new/old | outside score_batch, old | "
        "outside score_batch, new | wall s old / new | drain frames/s old / new | events (masks) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for encoding in ("jpeg", "png"):
        for model in ("noop", "tiny"):
            old, new = by.get(f"{encoding}-full-{model}"), by.get(f"{encoding}-auto-{model}")
            if old is None or new is None:
                continue
            lines.append(
                f"| {encoding.upper()} | {model} | {old['cpu_ms_per_frame']:.2f} | {new['cpu_ms_per_frame']:.2f} | "
                f"{new['cpu_ms_per_frame'] / old['cpu_ms_per_frame']:.2f} | "
                f"{old['cpu_ms_per_frame_outside_score_batch']:.2f} | "
                f"{new['cpu_ms_per_frame_outside_score_batch']:.2f} | {old['wall_s']:.1f} / {new['wall_s']:.1f} | "
                f"{old['drain_fps']:.0f} / {new['drain_fps']:.0f} | {old['events']} / {new['events']} "
                f"({old['events_with_mask']} / {new['events_with_mask']}) |")
    extra = [r for r in rows if r["noop_anomalous_every"]]
    for r in extra:
        base = by.get(f"{r['encoding']}-{r['decode_scale']}-noop")
        delta = f", +{r['cpu_ms_per_frame'] - base['cpu_ms_per_frame']:.2f} ms/frame vs no masks" if base else ""
        lines += ["", f"Masks: {r['case']} (every {r['noop_anomalous_every']}th frame anomalous, "
                  f"{r['events_with_mask']} of {r['events']} events with a 900x900 mask): "
                  f"{r['cpu_ms_per_frame']:.2f} ms CPU/frame{delta}."]
    tiny = [r for r in rows if r["model"] == "tiny"]
    if tiny:
        lines += ["", "tiny, CPU inside the scorer per frame: "
                  + "; ".join(f"{r['case']}: score_batch {1000 * r['cpu_in_score_batch_s'] / r['frames']:.2f} ms "
                              f"(preprocess {1000 * r['cpu_in_preprocess_s'] / r['frames']:.2f}, tower "
                              f"{1000 * (r['cpu_in_encode_s'] - r['cpu_in_preprocess_s']) / r['frames']:.2f})"
                              for r in tiny)]
    noop = by.get("jpeg-auto-noop")
    if noop and noop["thread_cpu_ms_per_frame"]:
        lines += ["", "Where the CPU goes, jpeg-auto-noop (ms/frame by thread): " + ", ".join(
            f"{k} {v:.2f}" for k, v in noop["thread_cpu_ms_per_frame"].items() if v >= 0.005)]
    if drifts:
        lines += ["", "Drift of the reduced JPEG decode vs full-size decode (same frames, same scorer, RANDOM "
                  "WEIGHTS; maps at 900x900):", "",
                  "| model | precision | frames | reduced decode | model input abs diff, mean / max (0..255) | "
                  "max abs score diff | mean abs score diff | score spread between frames (std) | "
                  "max abs map diff | mean abs map diff | worst frame p99 map diff |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for d in drifts:
            lines.append(f"| {d['model']} | {d['precision']} | {d['frames']} | {d['reduced_decode']} | "
                         f"{d['model_input_abs_diff_mean_0_255']:.2f} / {d['model_input_abs_diff_max_0_255']:.0f} | "
                         f"{d['score_abs_diff_max']:.2e} | {d['score_abs_diff_mean']:.2e} | "
                         f"{d['score_spread_std_full']:.2e} | {d['map_abs_diff_max']:.2e} | "
                         f"{d['map_abs_diff_mean']:.2e} | {d['map_abs_diff_p99_max_over_frames']:.2e} |")
        lines += ["", "With random weights the scores hardly differ between frames, so the score drift is shown "
                  "beside that spread; the model-input difference does not depend on the weights."]
    return "\n".join(lines)


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median CPU per frame (all runs are kept in the JSON)."""
    ordered = sorted(runs, key=lambda r: r["cpu_ms_per_frame"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["cpu_ms_per_frame_runs"] = [r["cpu_ms_per_frame"] for r in runs]
    row["cpu_ms_per_frame_median"] = median([r["cpu_ms_per_frame"] for r in runs])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=600, help="backlog per case")
    parser.add_argument("--quick", action="store_true", help="smoke run: 120 frames, fewer drift frames, no ViT")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every case (median reported)")
    parser.add_argument("--only", nargs="*", default=None, metavar="CASE",
                        help="run only these cases, e.g. jpeg-auto-noop (no drift, no results written)")
    parser.add_argument("--drift-frames", type=int, default=83, help="distinct JPEG frames for the hpad-tiny drift")
    parser.add_argument("--vit-frames", type=int, default=16, help="frames for the ViT-B-16-plus-240 drift")
    parser.add_argument("--no-vit", action="store_true", help="skip the ViT-B-16-plus-240 drift")
    parser.add_argument("--mask-every", type=int, default=10, help="the masks case: every k-th frame anomalous")
    parser.add_argument("--name", default="host")
    ns = parser.parse_args()
    if ns.quick:
        ns.frames, ns.drift_frames, ns.no_vit, ns.repeats = min(ns.frames, 120), min(ns.drift_frames, 16), True, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # kafka-python logs "Metadata refresh: failed Cancelled" at ERROR when a client closes mid-refresh
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    logging.getLogger("hpad.backbone").setLevel(logging.ERROR)  # "RANDOM weights" is stated in the output
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    pictures, source = load_pictures()
    encoded = {kind: [encode(p, kind) for p in pictures] for kind in ("jpeg", "png")}
    sizes = {kind: float(np.mean([len(b) for b in blobs])) for kind, blobs in encoded.items()}
    backbone = load_backbone(WeightsSpec(model="hpad-tiny", random_init=True, seed=0), device="cpu")
    prompts = Scorer(backbone).zero_shot_prompts(CATEGORY)

    cases = [Case(enc, scale, model) for enc in ("jpeg", "png") for model in ("noop", "tiny")
             for scale in ("full", "auto")]
    cases.insert(2, Case("jpeg", "auto", "noop", anomalous_every=ns.mask_every))
    if ns.only is not None:
        wanted = set(ns.only)
        cases = [case for case in cases if case.label in wanted]
        unknown = wanted - {case.label for case in cases}
        if unknown:
            raise SystemExit(f"unknown cases {sorted(unknown)}")
    runs: dict[str, list[dict[str, Any]]] = {}
    drifts: list[dict[str, Any]] = []
    with EmbeddedBroker() as broker:
        topics: dict[str, tuple[str, list[str]]] = {}
        for kind in sorted({case.encoding for case in cases}):
            topic = f"host-{kind}-{uuid.uuid4().hex[:8]}.frames"
            broker.create_topic(topic, PARTITIONS)
            start = time.perf_counter()
            topics[kind] = (topic, publish_backlog(broker.bootstrap, topic, encoded[kind], kind, ns.frames))
            print(f"published {ns.frames} {kind.upper()} frames ({sizes[kind] / 1024:.0f} KiB each) in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        # warm-up (not reported): imports, first calls of both models, both decoders, the event path
        print("warm-up (not reported)", flush=True)
        for kind, scale, model in (("jpeg", "auto", "tiny"), ("png", "full", "noop"), ("jpeg", "full", "noop")):
            topic = f"host-warm-{uuid.uuid4().hex[:8]}.frames"
            broker.create_topic(topic, PARTITIONS)
            ids = publish_backlog(broker.bootstrap, topic, encoded[kind][:8], kind, 2 * BATCH)
            warm = Case(kind, scale, model, anomalous_every=4 if model == "noop" else 0)
            run_case(broker, warm, topic, ids, backbone, prompts)
        print(f"cases ({ns.frames} frames each)", flush=True)
        for repeat in range(ns.repeats):
            if ns.repeats > 1:
                print(f" run {repeat + 1} of {ns.repeats}", flush=True)
            for case in cases:
                topic, ids = topics[case.encoding]
                runs.setdefault(case.label, []).append(run_case(broker, case, topic, ids, backbone, prompts))
    rows = [median_row(r) for r in runs.values()]
    if ns.only is not None:
        print(f"done in {time.perf_counter() - t_start:.0f} s (--only: nothing written)")
        return 0
    jpegs = encoded["jpeg"]
    print("drift of the reduced decode", flush=True)
    drifts.append(drift("hpad-tiny", "fp32", jpegs[: ns.drift_frames], batch=16, threads=2))
    if not ns.no_vit:
        drifts.append(drift("ViT-B-16-plus-240", "bf16", jpegs[: ns.vit_frames], batch=8, threads=2))
    for d in drifts:
        print(f"  {d['model']} {d['precision']}: |score diff| max {d['score_abs_diff_max']:.2e}, "
              f"|map diff| max {d['map_abs_diff_max']:.2e} ({d['seconds']:.0f} s)", flush=True)
    total_s = time.perf_counter() - t_start
    info = machine()
    payload = {
        "benchmark": "host", "machine": info, "device": "cpu", "date": info["date"], "total_seconds": total_s,
        "random_weights": True, "weights": "random-init", "frames_source": source,
        "encodings": {"jpeg": f"JPEG quality {JPEG_QUALITY} (OpenCV)", "png": "PNG (OpenCV default compression)"},
        "mean_encoded_bytes": sizes, "opencv_threads": cv2.getNumThreads(), "opencv": cv2.__version__, "frame_size": list(SIZE), "frames_per_case": ns.frames,
        "settings": {**vars(ns), "batch": BATCH, "partitions": PARTITIONS, "cameras": CAMERAS,
                     "worker": worker_settings("127.0.0.1:0", "frames", "tag", "auto").model_dump(
                         mode="json", exclude={"bootstrap_servers", "input_topic", "events_topic", "dlq_topic",
                                               "group_id", "decode_scale"})},
        "noop_model": NOOP_SKIPS,
        "tiny_model": "hpad-tiny (64 px input, 8x8 patches), random init seed 0, fp32, torch threads 1",
        "measurement": "process CPU (time.process_time(), all threads of this process) from the start of "
                       "Worker.run() to its end, minus the per-thread sampler's own CPU; includes the worker's "
                       "group join and close; the broker (tansu) is another process and is NOT counted. The "
                       "backlog of each encoding is published once; every case drains it with a fresh group "
                       "and fresh events/dead-letter topics, and every event is read back (N in = N out, no "
                       "duplicates, no dead letters). cpu_in_*: time.thread_time() on the scoring thread. "
                       "drain_*: from the first partition assignment to the end of run().",
        "png_note": "PNG has no reduced-scale decode: decode_scale full and auto run the same path for PNG",
        "results": rows, "all_runs": runs, "drift": drifts,
    }
    text = table(rows, drifts, info, source, ns.frames, sizes, ns.repeats)
    text += f"\n\nWhole run: {total_s:.0f} s."
    write_results(ns.name, payload, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
