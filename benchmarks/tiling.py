"""Tiled scoring: worker throughput and CPU per frame at 1, 5 and 12 megapixels, tiling on and off, and the
accuracy of tiled vs untiled scoring on small defects, in one run.

Throughput: one embedded broker (tansu, another process: its CPU is NOT counted) on 127.0.0.1. Per frame
size a backlog of JPEG frames (quality 90, the woven texture of ``tests/highres.py`` with three dark spots)
is published once; each case then drains it with a fresh group and fresh events / dead-letter topics, with
a `consumers.worker.Worker` running IN THIS PROCESS (``run(max_frames=N)``): poll, header checks, tile
plan, decode pool (JPEG DCT-scaled only as far as every tile stays at the model's size), batching by
tiles, `hpad.tiled_scoring.score_frames`, full-size masks (``HPAD_MASK_POLICY=always``, so every event
prices its full-size mask), event JSON, produce, commits. Measured per case: process CPU
(``time.process_time()``, every thread of this process) and wall time from the group join to the end of
``run()`` (the drain), frames/s = frames / drain wall; tiles per frame from the events.

Cases: {1, 5, 12} MP x tiling {off, auto}. ``auto`` runs with ``HPAD_TILE_MIN_PIXELS=0`` (every size tiled):
tiles at the model's input size, grown to fit ``HPAD_MAX_TILES`` (default 64).

Accuracy (``--accuracy-models``, default hpad-tiny and hpad-small): 4000x3000 frames, few-shot memory from one
normal frame cut like the test frames, pixel AUROC and AUPRO (`hpad.metrics`, every 4th pixel) of the blended
maps: untiled, auto (the service default policy with HPAD_TILE_MIN_PIXELS=0) and a 16x12 grid.

Model: ``--model`` (default hpad-small, 112 px input, 7x7 patches) with RANDOM weights (scores carry no meaning;
the nearest-neighbour memory path is what separates the spots), fp32, one torch thread. Writes
benchmarks/results/tiling.json and tiling.md.

Usage: python benchmarks/tiling.py [--model hpad-small] [--frames 1mp=24,5mp=8,12mp=4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np
import torch
from kafka import KafkaProducer

from benchmarks.common import machine, median, read_records, write_results
from benchmarks.host import TimedWorker
from consumers.broker import EmbeddedBroker
from consumers.camera import frame_headers
from consumers.models import model_info
from consumers.prompt_provider import StaticPromptProvider
from consumers.settings import WorkerSettings
from hpad.backbone import WeightsSpec, load_backbone
from hpad.metrics import aupro, pixel_auroc
from hpad.scorer import Scorer, ScorerConfig
from hpad.tiled_scoring import score_frames, training_views
from hpad.tiling import OFF, TileSpec, TilingPolicy, plan_tiles
from tests.highres import add_spots, woven_frame

SIZES = {"1mp": (864, 1152), "5mp": (1944, 2592), "12mp": (3000, 4000)}  # (height, width)
CATEGORY = "fabric"
PARTITIONS = 1
BATCH = 16  # HPAD_MAX_BATCH_SIZE: model images (tiles) per batch
JPEG_QUALITY = 90
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}
log = logging.getLogger("bench.tiling")


def jpeg_frames(size: tuple[int, int], distinct: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(distinct):
        frame, _ = add_spots(rng, woven_frame(rng, size), count=3, radius=max(6, size[1] // 200))
        ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        assert ok
        out.append(buf.tobytes())
    return out


def publish(bootstrap: str, topic: str, blobs: list[bytes], count: int) -> list[str]:
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=32 * 1024 * 1024, linger_ms=5)
    run, ids, futures = uuid.uuid4().hex[:8], [], []
    try:
        for index in range(count):
            frame_id = f"cam-1-{run}-{index:05d}"
            futures.append(producer.send(topic, key=b"cam-1", value=blobs[index % len(blobs)],
                                         headers=frame_headers(frame_id, "cam-1", CATEGORY, "image/jpeg")))
            ids.append(frame_id)
        producer.flush()
        for future in futures:
            future.get(timeout=60)
    finally:
        producer.close()
    return ids


def settings(bootstrap: str, topic: str, tag: str, model: str, tiling: str) -> WorkerSettings:
    return WorkerSettings(
        bootstrap_servers=bootstrap, input_topic=topic, events_topic=f"{tag}.events", dlq_topic=f"{tag}.dlq",
        group_id=f"{tag}.group", model=model, random_init=True, device="cpu", torch_threads=1, precision="fp32",
        categories=[CATEGORY], metrics_port=-1, max_batch_size=BATCH, mask_policy="always", tiling=tiling,
        tile_min_pixels=0, normals_topic=None, prompts_topic=None, log_level="WARNING", **FAST_GROUP,
    )


def run_case(broker: EmbeddedBroker, scorer: Scorer, label: str, topic: str, ids: list[str], tiling: str,
             model: str) -> dict[str, Any]:
    n = len(ids)
    tag = f"tiling-{label}-{uuid.uuid4().hex[:8]}"
    s = settings(broker.bootstrap, topic, tag, model, tiling)
    broker.create_topic(s.events_topic, PARTITIONS)
    broker.create_topic(s.dlq_topic, 1)
    provider = StaticPromptProvider({CATEGORY: scorer.check_prompts(scorer.prompts)})
    worker = TimedWorker(s, scorer, provider, model_info(scorer, s.precision))
    load0 = os.getloadavg()[0]
    wall0, cpu0 = time.monotonic(), time.process_time()
    result = worker.run(max_frames=n, timeout=1800, install_signals=False)
    wall1, cpu1 = time.monotonic(), time.process_time()
    if result.exit_code != 0 or result.completed != n:
        raise SystemExit(f"{label}: the worker ended with {result} after {n} frames")
    events = [json.loads(r.value) for r in read_records(broker.bootstrap, s.events_topic, PARTITIONS)]
    dead = read_records(broker.bootstrap, s.dlq_topic, 1, idle_s=0.5)
    if sorted(e["frame_id"] for e in events) != sorted(ids) or dead:
        raise SystemExit(f"{label}: {n} frames in, {len(events)} events and {len(dead)} dead letters out")
    drain_wall = wall1 - (worker.assigned_at or wall0)
    drain_cpu = cpu1 - (worker.assigned_cpu or cpu0)
    tiles = sorted({e["tiles"] for e in events})
    full_masks = all((e["mask"]["width"], e["mask"]["height"]) == (e["width"], e["height"]) for e in events)
    row = {"case": label, "tiling": tiling, "frames": n, "tiles_per_frame": tiles, "full_size_masks": full_masks,
           "drain_wall_s": drain_wall, "drain_fps": n / drain_wall, "cpu_ms_per_frame": 1000 * drain_cpu / n,
           "wall_s": wall1 - wall0, "loadavg_1m_start": load0, "loadavg_1m_end": os.getloadavg()[0]}
    print(f"  {label:<14} tiles {tiles}  {row['drain_fps']:6.2f} frames/s  {row['cpu_ms_per_frame']:8.1f} ms CPU/frame"
          f"  (load {load0:.1f})", flush=True)
    return row


def accuracy(scorer: Scorer, seed: int = 0) -> list[dict[str, Any]]:
    size, model_size = SIZES["12mp"], scorer.backbone.image_size
    rng = np.random.default_rng(seed)
    normal = woven_frame(rng, size)
    tests = [add_spots(rng, woven_frame(rng, size), count=3, radius=8) for _ in range(2)]
    truth = np.stack([mask[::4, ::4] for _, mask in tests])
    rows = []
    policies = {"off (whole frame)": OFF, "auto (default, HPAD_TILE_MIN_PIXELS=0)": TilingPolicy(min_pixels=0),
                "16x12 grid, no overlap": TilingPolicy(TileSpec("grid", 16, 12, 0.0), min_pixels=0, max_tiles=192)}
    for name, policy in policies.items():
        start = time.perf_counter()
        views, _ = training_views([normal], model_size, policy)
        prompts = scorer.prompts.with_memory(scorer.build_memory(views))
        plans = [plan_tiles(size, model_size, None, None, policy) for _ in tests]
        result = score_frames(scorer, [frame for frame, _ in tests], prompts, plans=plans)
        maps = np.stack([m[::4, ::4] for m in result.anomaly_maps()])
        rows.append({"tiling": name, "tiles": result.tiles[0], "grid": list(plans[0].grid),
                     "pixel_AUROC": pixel_auroc(truth, maps), "AUPRO": aupro(truth, maps),
                     "seconds": time.perf_counter() - start})
        print(f"  {name:<40} tiles {rows[-1]['tiles']:4d}  pixel_AUROC {rows[-1]['pixel_AUROC']:.4f}  "
              f"AUPRO {rows[-1]['AUPRO']:.4f}", flush=True)
    return rows


def table(rows: list[dict[str, Any]], acc: list[dict[str, Any]], info: dict[str, Any], ns: argparse.Namespace,
          model_size: tuple[int, int]) -> str:
    lines = [f"Tiled scoring, {info['date']}, {info['cpu']} ({info['cpu_count']} cores, shared with parallel work, "
             f"1-minute load average {min(r['loadavg_1m_start'] for r in rows):.1f}-"
             f"{max(r['loadavg_1m_end'] for r in rows):.1f} during the run), torch {info['torch']}, 1 thread.",
             f"Model {ns.model} ({model_size[0]} px input), RANDOM weights, fp32; worker in-process on tansu, "
             f"HPAD_MAX_BATCH_SIZE={BATCH} model images, HPAD_MASK_POLICY=always, JPEG q{JPEG_QUALITY}.", "",
             f"Medians of {ns.repeats} runs.", "",
             "| frame | tiling | tiles/frame | frames/s | worker CPU ms/frame |", "|---|---|---|---|---|"]
    for r in rows:
        size, tiling = r["case"].split("-", 1)
        h, w = SIZES[size]
        lines.append(f"| {w}x{h} ({h * w / 1e6:.1f} MP) | {tiling} | {', '.join(map(str, r['tiles_per_frame']))} | "
                     f"{r['drain_fps']:.2f} | {r['cpu_ms_per_frame_median']:.0f} |")
    lines += ["", "Small defects (three 16 px spots per frame) on two 4000x3000 frames, few-shot memory from one "
              "normal frame cut the same way; metrics on every 4th pixel:", "",
              "| model (random weights) | tiling | tiles | pixel AUROC | AUPRO |", "|---|---|---|---|---|"]
    for r in acc:
        lines.append(f"| {r['model']} | {r['tiling']} | {r['tiles']} ({r['grid'][0]}x{r['grid'][1]}) | "
                     f"{r['pixel_AUROC']:.4f} | {r['AUPRO']:.4f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hpad-small", help="hpad-small (default), hpad-tiny, ViT-B-16-plus-240...")
    parser.add_argument("--frames", default="1mp=24,5mp=8,12mp=4", help="backlog per frame size")
    parser.add_argument("--accuracy-models", default="hpad-tiny,hpad-small", help="models of the accuracy table")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every case (median reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 / 2 / 1 frames")
    parser.add_argument("--name", default="tiling")
    ns = parser.parse_args()
    counts = {k: int(v) for k, v in (part.split("=") for part in ns.frames.split(","))}
    if ns.quick:
        counts = {"1mp": 4, "5mp": 2, "12mp": 1}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    logging.getLogger("hpad.backbone").setLevel(logging.ERROR)  # RANDOM weights are stated in the output
    torch.set_num_threads(1)
    started = time.perf_counter()
    backbone = load_backbone(WeightsSpec(model=ns.model, random_init=True, seed=0), device="cpu")
    scorer = Scorer.zero_shot(backbone, CATEGORY, config=ScorerConfig(max_batch=BATCH))
    runs: dict[str, list[dict[str, Any]]] = {}
    with EmbeddedBroker() as broker:
        backlog = {}
        for size_name, count in counts.items():
            blobs = jpeg_frames(SIZES[size_name], min(count, 2), seed=len(backlog))
            topic = f"tiling-{size_name}-{uuid.uuid4().hex[:8]}.frames"
            broker.create_topic(topic, PARTITIONS)
            backlog[size_name] = (topic, publish(broker.bootstrap, topic, blobs, count))
            print(f"published {count} {size_name} JPEG frames ({np.mean([len(b) for b in blobs]) / 2**20:.1f} MiB)",
                  flush=True)
        print("warm-up (not reported)", flush=True)
        warm_topic = f"tiling-warm-{uuid.uuid4().hex[:8]}.frames"
        broker.create_topic(warm_topic, PARTITIONS)
        warm_ids = publish(broker.bootstrap, warm_topic, jpeg_frames(SIZES["1mp"], 1, seed=99), 2)
        run_case(broker, scorer, "warm-auto", warm_topic, warm_ids, "auto", ns.model)
        for _ in range(ns.repeats):
            for size_name, (topic, ids) in backlog.items():
                for tiling in ("off", "auto"):
                    label = f"{size_name}-{tiling}"
                    runs.setdefault(label, []).append(run_case(broker, scorer, label, topic, ids, tiling, ns.model))
    rows = []
    for reps in runs.values():
        row = sorted(reps, key=lambda r: r["drain_fps"])[len(reps) // 2]
        rows.append({**row, "drain_fps_runs": [r["drain_fps"] for r in reps],
                     "cpu_ms_per_frame_median": median([r["cpu_ms_per_frame"] for r in reps])})
    acc = []
    for model in ns.accuracy_models.split(","):
        print(f"accuracy (4000x3000, {model}, random weights)", flush=True)
        other = scorer if model == ns.model else Scorer.zero_shot(
            load_backbone(WeightsSpec(model=model, random_init=True, seed=0), device="cpu"), CATEGORY,
            config=ScorerConfig(max_batch=64))
        acc += [{"model": model, **row} for row in accuracy(other)]
    info = machine()
    payload = {"machine": info, "model": ns.model, "random_weights": True, "precision": "fp32",
               "max_batch_size": BATCH, "mask_policy": "always", "jpeg_quality": JPEG_QUALITY,
               "sizes": {k: list(v) for k, v in SIZES.items()}, "frames": counts, "repeats": ns.repeats,
               "rows": rows, "accuracy": acc, "seconds": time.perf_counter() - started,
               "note": "machine shared with parallel work; numbers vary 30-60% between runs"}
    write_results(ns.name, payload, table(rows, acc, info, ns, backbone.image_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
