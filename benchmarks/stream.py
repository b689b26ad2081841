"""Benchmark the streaming service: bare `Scorer.score` vs end-to-end Kafka throughput, and latency at 50% load.

For each model (default: hpad-tiny fp32 and ViT-B-16-plus-240 bf16, both random weights), in one run:

1. bare: `Scorer.score` frames/s on decoded frames at batch B (median of repeats after a warm-up);
2. end-to-end max throughput: an embedded broker, a worker process (``hpad serve``, batch B), a camera
   publishing encoded frames as fast as it can and a reader of the events topic, all on this machine:
   frames/s = N / (last event read - first frame sent), after a warm-up;
3. latency at 50% load: the camera at half the measured end-to-end throughput; latency = event read -
   ``captured_at`` (p50 / p99).

Frames: the MVTec bottle test PNGs (900x900) from ../shared/data when present, else generated frames.
Writes benchmarks/results/stream.json (machine, settings, date, "random weights") and prints a markdown table.

Usage: python benchmarks/stream.py [--models hpad-tiny:fp32 ViT-B-16-plus-240:bf16] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request
from datetime import datetime
from itertools import cycle, islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from benchmarks.common import SHARED_DATA, machine, median, write_results
from consumers.broker import EmbeddedBroker, free_port
from consumers.camera import Camera
from consumers.demo import ManagedProcess
from hpad.backbone import WeightsSpec, load_backbone
from hpad.scorer import Scorer, ScorerConfig

PARTITIONS = 3
CATEGORY = "bottle"


def load_frames(limit: int, encoding: str = "png") -> tuple[list[tuple[bytes, str]], list[np.ndarray], str]:
    """(encoded bytes, content type) and the decoded RGB frames of the same images. ``encoding="jpeg"``
    re-encodes them as JPEG quality 95, what most industrial cameras send (decoding it is ~4x cheaper)."""
    folder = SHARED_DATA / "mvtec" / "bottle" / "test"
    paths = sorted(folder.rglob("*.png"))[:limit] if folder.is_dir() else []
    if paths:
        encoded = [(p.read_bytes(), "image/png") for p in paths]
        source = f"mvtec/bottle test PNGs, {len(paths)} distinct, 900x900"
    else:
        rng = np.random.default_rng(0)
        encoded = []
        for _ in range(16):
            picture = rng.integers(0, 256, (900, 900, 3), dtype=np.uint8)
            encoded.append((cv2.imencode(".png", picture)[1].tobytes(), "image/png"))
        source = "generated noise PNGs, 900x900"
    if encoding == "jpeg":
        encoded = [(cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
                                 [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(), "image/jpeg") for b, _ in encoded]
        source = source.replace("PNGs", "frames as JPEG q95")
    decoded = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
               for b, _ in encoded]
    return encoded, decoded, source


def bare_fps(model: str, precision: str, batch: int, frames: list[np.ndarray], repeats: int) -> dict:
    backbone = load_backbone(WeightsSpec(model=model, random_init=True), device="cpu", precision=precision)
    scorer = Scorer(backbone, config=ScorerConfig(max_batch=batch))
    prompts = scorer.zero_shot_prompts(CATEGORY)
    chunk = list(islice(cycle(frames), batch))
    scorer.score(chunk, prompts)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scorer.score(chunk, prompts)
        times.append(time.perf_counter() - start)
    return {"fps": batch / median(times), "seconds_per_batch": times}


class EventReader:
    """Reads the events topic on a thread; remembers when each frame's event arrived."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.arrivals: dict[str, tuple[float, dict]] = {}
        self._stop = threading.Event()
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20,
                                       max_partition_fetch_bytes=16 * 1024 * 1024)
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        self._consumer.assign(parts)
        self._consumer.seek_to_beginning(*parts)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for records in self._consumer.poll(timeout_ms=50).values():
                now = time.time()
                for record in records:
                    event = json.loads(record.value)
                    self.arrivals.setdefault(event["frame_id"], (now, event))

    def wait(self, frame_ids: list[str], timeout_s: float) -> float:
        """Block until every frame id has an event; returns the arrival time of the last one."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(f in self.arrivals for f in frame_ids):
                return max(self.arrivals[f][0] for f in frame_ids)
            time.sleep(0.01)
        missing = sum(f not in self.arrivals for f in frame_ids)
        raise TimeoutError(f"{missing} of {len(frame_ids)} events did not arrive in {timeout_s} s")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._consumer.close()


def scrape(port: int) -> dict[str, float]:
    """Stage duration sums and counts from the worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("hpad_stage_duration_seconds_sum", "hpad_stage_duration_seconds_count",
                            "hpad_batch_size_sum", "hpad_batch_size_count")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def worker_process(broker: EmbeddedBroker, model: str, precision: str, batch: int, port: int, log: Path,
                   extra_env: dict[str, str]) -> ManagedProcess:
    env = {
        "HF_HUB_OFFLINE": "1", "HPAD_BOOTSTRAP_SERVERS": broker.bootstrap, "HPAD_INPUT_TOPIC": "bench.frames",
        "HPAD_EVENTS_TOPIC": "bench.events", "HPAD_DLQ_TOPIC": "bench.dlq", "HPAD_GROUP_ID": "bench",
        "HPAD_MODEL": model, "HPAD_RANDOM_INIT": "true", "HPAD_DEVICE": "cpu", "HPAD_PRECISION": precision,
        "HPAD_CATEGORIES": CATEGORY, "HPAD_MAX_BATCH_SIZE": str(batch), "HPAD_METRICS_PORT": str(port),
        "HPAD_METRICS_HOST": "127.0.0.1", "HPAD_SESSION_TIMEOUT_MS": "6000", "HPAD_HEARTBEAT_INTERVAL_MS": "1000",
        "HPAD_LOG_LEVEL": "WARNING", **extra_env,
    }
    process = ManagedProcess("worker", [sys.executable, "-m", "hpad.cli", "serve"], env, log,
                             ready_url=f"http://127.0.0.1:{port}/readyz")
    return process.start()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def arrival_rate(reader: EventReader, frame_ids: list[str], skip: int) -> float:
    """Frames/s between the arrival of the ``skip``-th and the last event of ``frame_ids``."""
    times = sorted(reader.arrivals[f][0] for f in frame_ids)
    return (len(times) - skip) / (times[-1] - times[skip - 1])


def stream(model: str, precision: str, batch: int, encoded: list[tuple[bytes, str]], measure: int, warm: int,
           latency_frames: int, latency_s: float, log: Path, extra_env: dict[str, str]) -> dict:
    with EmbeddedBroker() as broker:
        broker.create_topic("bench.frames", PARTITIONS)
        broker.create_topic("bench.events", PARTITIONS)
        broker.create_topic("bench.dlq", 1)
        port = free_port()
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=32 * 1024 * 1024, linger_ms=2)
        camera = Camera(producer, "bench.frames", "bench", CATEGORY, cameras=6)
        # 1. drain: a backlog published before the worker starts (the camera is idle while it is scored)
        backlog = camera.stream(list(islice(cycle(encoded), warm + measure)))
        reader = EventReader(broker.bootstrap, "bench.events")
        worker = worker_process(broker, model, precision, batch, port, log, extra_env)
        pids = {"worker": worker.process.pid, "broker": broker.process.pid, "bench": os.getpid()}
        try:
            cpu_start = {name: cpu_seconds(pid) for name, pid in pids.items()}
            reader.wait([s.frame_id for s in backlog], timeout_s=1800)
            drain = arrival_rate(reader, [s.frame_id for s in backlog], warm)
            cpu_drain = {name: (cpu_seconds(pid) - cpu_start[name]) / len(backlog) for name, pid in pids.items()}
            # 2. live: the camera publishes as fast as it can while the worker scores
            before = scrape(port)
            start = time.time()
            sent = camera.stream(list(islice(cycle(encoded), measure)))
            end = reader.wait([s.frame_id for s in sent], timeout_s=1800)
            after = scrape(port)
            e2e = measure / (end - start)
            # 3. latency at half the live throughput
            rate = 0.5 * e2e
            count = max(latency_frames, int(rate * latency_s))
            sent = camera.stream(list(islice(cycle(encoded), count)), rate=rate)
            reader.wait([s.frame_id for s in sent], timeout_s=1800)
            latencies = []
            for frame in sent:
                arrived, event = reader.arrivals[frame.frame_id]
                captured = datetime.fromisoformat(event["captured_at"]).timestamp()
                latencies.append(1000 * (arrived - captured))
            sample = reader.arrivals[sent[0].frame_id][1]
        finally:
            reader.close()
            producer.close()
            code = worker.stop()
    stages = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    batches = stages.get("hpad_batch_size_count", 0.0)
    return {
        "e2e_fps": e2e, "drain_fps": drain, "measured_frames": measure, "warmup_frames": warm,
        "drain_cpu_seconds_per_frame": cpu_drain,
        "e2e_seconds": end - start, "latency_load_fps": rate, "latency_frames": count,
        "latency_ms_p50": float(np.percentile(latencies, 50)), "latency_ms_p99": float(np.percentile(latencies, 99)),
        "latency_ms_all": latencies, "mean_batch": stages.get("hpad_batch_size_sum", 0.0) / batches if batches else None,
        "worker_stage_seconds_live": stages, "worker_exit_code": code, "event_weights": sample["weights"],
        "event_random_weights": sample["random_weights"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["hpad-tiny:fp32", "ViT-B-16-plus-240:bf16"],
                        help="model:precision pairs")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny-frames", type=int, default=480, help="measured frames for small models")
    parser.add_argument("--vit-frames", type=int, default=64, help="measured frames for ViT-B models")
    parser.add_argument("--latency-seconds", type=float, default=15.0, help="length of the 50%%-load run")
    parser.add_argument("--name", default="stream")
    parser.add_argument("--encoding", choices=["png", "jpeg"], default="png", help="how the camera encodes frames")
    parser.add_argument("--worker-env", nargs="*", default=[], metavar="SETTING=VALUE",
                        help="extra worker settings, e.g. decode_threads=1 (become HPAD_DECODE_THREADS=1)")
    ns = parser.parse_args()
    encoded, decoded, source = load_frames(limit=32, encoding=ns.encoding)
    rows = []
    for spec in ns.models:
        model, precision = spec.split(":")
        small = model.startswith("hpad-")
        measure = ns.tiny_frames if small else ns.vit_frames
        warm = 4 * ns.batch if small else ns.batch
        bare = bare_fps(model, precision, ns.batch, decoded, ns.repeats if small else 3)
        print(f"{model} {precision}: bare Scorer.score {bare['fps']:.2f} frames/s at batch {ns.batch}", flush=True)
        log = Path(__file__).resolve().parent / "results" / f"stream-worker-{model}.log.tmp"
        log.parent.mkdir(parents=True, exist_ok=True)
        extra = {f"HPAD_{k.upper()}": v for k, v in (item.split("=", 1) for item in ns.worker_env)}
        e2e = stream(model, precision, ns.batch, encoded, measure, warm, latency_frames=16 if not small else 60,
                     latency_s=ns.latency_seconds, log=log, extra_env=extra)
        row = {"model": model, "precision": precision, "batch": ns.batch, "bare_fps": bare["fps"],
               "bare_seconds_per_batch": bare["seconds_per_batch"], **e2e, "ratio": e2e["e2e_fps"] / bare["fps"],
               "drain_ratio": e2e["drain_fps"] / bare["fps"],
               "weights": "random-init", "random_weights": True, "frames": source}
        print(f"{model} {precision}: end-to-end {e2e['e2e_fps']:.2f} frames/s (ratio {row['ratio']:.2f}), backlog "
              f"drain {e2e['drain_fps']:.2f} frames/s (ratio {row['drain_ratio']:.2f}); "
              f"latency at {e2e['latency_load_fps']:.2f} frames/s: p50 {e2e['latency_ms_p50']:.0f} ms, "
              f"p99 {e2e['latency_ms_p99']:.0f} ms", flush=True)
        rows.append(row)
    info = machine()
    payload = {"benchmark": "stream", "machine": info, "device": "cpu", "settings": vars(ns),
               "random_weights": True, "weights": "random-init", "frames": source, "results": rows,
               "notes": "one machine runs broker (tansu), worker, camera and event reader; end-to-end = camera "
                        "publish -> broker -> worker (decode, score, mask, produce, commit) -> event read"}
    lines = [
        f"Streaming benchmark, RANDOM WEIGHTS, {source}; {info['cpu']}, {info['cpu_count']} cores, "
        f"torch {info['torch']}, {info['date'][:10]}; broker, worker, camera and reader on the same machine",
        "",
        "| model | precision | batch | bare Scorer.score (frames/s) | end-to-end, camera live (frames/s) | ratio | "
        "backlog drain (frames/s) | ratio | load for latency (frames/s) | latency p50 (ms) | latency p99 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['bare_fps']:.2f} | {r['e2e_fps']:.2f} | "
          f"{r['ratio']:.2f} | {r['drain_fps']:.2f} | {r['drain_ratio']:.2f} | {r['latency_load_fps']:.2f} | "
          f"{r['latency_ms_p50']:.0f} | {r['latency_ms_p99']:.0f} |" for r in rows),
    ]
    write_results(ns.name, payload, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
