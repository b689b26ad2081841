"""Benchmark a prompt hot-swap on a saturated line: throughput before vs after, and the gap at the swap.

One process: embedded broker, a scoring `Worker` (thread) following the prompts topic, a producer that keeps
the frames topic about ``--backlog`` frames ahead of the worker (so the worker is never idle), and the
registry. Version 1 (learned-looking prompts with a k=4 few-shot memory) is published before the worker
starts; after ``--warmup`` + ``--window`` seconds version 2 (same structure, other values) is published.
From the events read back (``scored_at``, ``prompt_version``, ``batch_id``):

* frames/s in the ``--window`` seconds before the first v2 event and in the ``--window`` seconds after it;
* the longest gap between consecutive events within 2 s of the swap, against the batch time (median gap
  between the last events of consecutive batches elsewhere in the run). Goal: the gap stays under one batch
  time, i.e. the swap never stalls the line.

Random weights (the swap's cost does not depend on what the prompts mean). Writes
benchmarks/results/swap.{json,md} with machine and settings.

Usage: python benchmarks/swap.py [--model hpad-small] [--precision bf16] [--batch 8] [--window 10]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from kafka import KafkaConsumer, KafkaProducer

from benchmarks.common import machine, read_records, sample_frames, write_results
from consumers.app import build_provider
from consumers.broker import EmbeddedBroker
from consumers.camera import frame_headers
from consumers.metrics import WorkerMetrics
from consumers.models import build_scorer, model_info
from consumers.settings import WorkerSettings, producer_kwargs, prompts_consumer_kwargs
from consumers.worker import Worker
from hpad.artifact import build_artifact_bytes, read_artifact
from hpad.scorer import Scorer
from tuner.registry import PromptRegistry

CATEGORY = "bottle"


def artifact(scorer: Scorer, seed: int, memory_frames: list) -> object:
    """A learned-looking artifact: random unit text features, few-shot memory of ``memory_frames``."""
    g = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(2, scorer.backbone.embed_dim, generator=g), dim=-1)
    prompts = replace(scorer.zero_shot_prompts(CATEGORY), text_features=features, source="learned",
                      model_identity=scorer.backbone.identity, laa=scorer.config.laa)
    prompts = prompts.with_memory(scorer.build_memory(memory_frames))
    return read_artifact(build_artifact_bytes(prompts, version=1))


def analyse(events: list[dict], window: float) -> dict:
    for e in events:
        e["t"] = datetime.fromisoformat(e["scored_at"]).timestamp()
    events.sort(key=lambda e: e["t"])
    swap_t = min(e["t"] for e in events if e["prompt_version"] == 2)
    before = [e for e in events if swap_t - window <= e["t"] < swap_t]
    after = [e for e in events if swap_t <= e["t"] < swap_t + window]
    batch_end: dict[str, float] = {}
    for e in events:
        batch_end[e["batch_id"]] = max(batch_end.get(e["batch_id"], 0.0), e["t"])
    ends = sorted(batch_end.values())
    batch_gaps = [b - a for a, b in itertools.pairwise(ends)]
    times = [e["t"] for e in events]
    gaps = [(b - a, a) for a, b in itertools.pairwise(times)]
    near = [g for g, a in gaps if abs(a - swap_t) <= 2.0]
    # the same statistic in 4 s windows away from the swap: what the line shows without one
    start, stop = times[0] + 2.0, times[-1] - 2.0
    baseline = []
    center = start + 2.0
    while center + 2.0 <= stop:
        if abs(center - swap_t) > 4.0:
            window_gaps = [g for g, a in gaps if abs(a - center) <= 2.0]
            if window_gaps:
                baseline.append(max(window_gaps))
        center += 4.0
    versions_by_batch: dict[str, set[int]] = {}
    for e in events:
        versions_by_batch.setdefault(e["batch_id"], set()).add(e["prompt_version"])
    return {
        "events": len(events),
        "frames_per_s_before": len(before) / window,
        "frames_per_s_after": len(after) / window,
        "after_over_before": (len(after) / max(1, len(before))),
        "batch_time_s_median": statistics.median(batch_gaps),
        "batch_time_s_p95": sorted(batch_gaps)[int(0.95 * (len(batch_gaps) - 1))],
        "max_gap_around_swap_s": max(near),
        "max_gap_4s_windows_without_swap_s": {"median": statistics.median(baseline), "max": max(baseline),
                                              "windows": len(baseline)},
        "mixed_batches": sum(1 for v in versions_by_batch.values() if len(v) > 1),
        "versions": {str(v): sum(1 for e in events if e["prompt_version"] == v) for v in (1, 2)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hpad-small")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=float, default=10.0, help="seconds measured before and after the swap")
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--backlog", type=int, default=48, help="frames kept queued ahead of the worker")
    ns = parser.parse_args()
    frames, source = sample_frames(24)
    import cv2

    encoded = [cv2.imencode(".png", cv2.cvtColor(f, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()
               for f in frames]
    with EmbeddedBroker() as broker:
        for topic, parts in (("frames", 3), ("events", 3), ("dlq", 1), ("prompts", 1)):
            broker.create_topic(f"bench.{topic}", parts)
        s = WorkerSettings(bootstrap_servers=broker.bootstrap, input_topic="bench.frames", events_topic="bench.events",
                           dlq_topic="bench.dlq", prompts_topic="bench.prompts", normals_topic=None,
                           group_id="bench-swap", model=ns.model, random_init=True, device="cpu",
                           precision=ns.precision, categories=[CATEGORY], max_batch_size=ns.batch, metrics_port=-1,
                           session_timeout_ms=6000, heartbeat_interval_ms=1000, mask_policy="anomalous")
        scorer = build_scorer(s, ns.batch)
        registry = PromptRegistry(s.prompts_topic, lambda: KafkaConsumer(**prompts_consumer_kwargs(s)),
                                  lambda: KafkaProducer(**producer_kwargs(s)), expected_identity=scorer.backbone.identity)
        registry.publish(artifact(scorer, 1, frames[:4]))
        v2 = artifact(scorer, 2, frames[4:8])
        metrics = WorkerMetrics()
        worker = Worker(s, scorer, build_provider(s, scorer, metrics), model_info(scorer, s.precision), metrics)
        thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
        thread.start()
        stop, sent = threading.Event(), [0]

        def feed() -> None:
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=32 * 1024 * 1024,
                                     linger_ms=2)
            while not stop.is_set():
                done = worker.pipeline.completed if worker.pipeline is not None else 0
                if sent[0] - done >= ns.backlog:
                    time.sleep(0.005)
                    continue
                i = sent[0]
                producer.send("bench.frames", key=f"cam-{i % 3}".encode(), value=encoded[i % len(encoded)],
                              headers=frame_headers(f"f-{i:07d}", f"cam-{i % 3}", CATEGORY, "image/png"))
                sent[0] += 1
            producer.flush()
            producer.close()

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        time.sleep(ns.warmup + ns.window)
        t_publish = time.time()
        registry.publish(v2)
        time.sleep(ns.window + 2.0)
        stop.set()
        feeder.join(timeout=30)
        worker.request_stop()
        thread.join(timeout=120)
        events = [json.loads(r.value) for r in read_records(broker.bootstrap, s.events_topic, 3)]
    result = analyse(events, ns.window)
    result["publish_to_first_v2_event_s"] = min(datetime.fromisoformat(e["scored_at"]).timestamp()
                                                 for e in events if e["prompt_version"] == 2) - t_publish
    payload = {"machine": machine(), "settings": vars(ns) | {"frames": source, "weights": "random-init"},
               "results": result}
    r = result
    table = "\n".join([
        f"Prompt hot-swap on a saturated line ({ns.model} {ns.precision}, RANDOM weights, batch {ns.batch}, "
        f"{payload['machine']['cpu']}, {payload['machine']['cpu_count']} cores, {payload['machine']['date'][:10]})",
        "",
        "| frames/s before | frames/s after | after/before | batch time p50 (p95) | longest gap at swap | "
        "longest gap, 4 s windows without swap (median / max) | publish -> first v2 event | mixed batches |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['frames_per_s_before']:.1f} | {r['frames_per_s_after']:.1f} | {r['after_over_before']:.2f} | "
        f"{1000 * r['batch_time_s_median']:.0f} ms ({1000 * r['batch_time_s_p95']:.0f} ms) | "
        f"{1000 * r['max_gap_around_swap_s']:.0f} ms | "
        f"{1000 * r['max_gap_4s_windows_without_swap_s']['median']:.0f} / "
        f"{1000 * r['max_gap_4s_windows_without_swap_s']['max']:.0f} ms | {r['publish_to_first_v2_event_s']:.2f} s | "
        f"{r['mixed_batches']} |",
    ])
    write_results("swap", payload, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
