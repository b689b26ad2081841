"""Soak: a long stream through `hpad serve` with the real tuner swapping prompts every few minutes.

Embedded broker; `hpad serve` and `hpad tune` as real processes (hpad-tiny, random weights); a camera thread
at ``--rate`` frames/s for ``--frames`` frames (generated 96x128 PNGs), with one poison frame (rotating kinds)
every ``--poison-every`` frames; operator-verified normals up front so the tuner has material, then the
scorer's own samples. The tuner re-tunes every ``--swap-every`` seconds (HPAD_INTERVAL_S, HPAD_MIN_GAP_S).

Recorded every ``--sample-s`` seconds: RSS and open file descriptors of the worker and the tuner
(/proc/<pid>). At the end every output is read back and checked: frames lost (sent, neither event nor dead
letter; goal 0), duplicates (by frame_id; allowed only after a crash, none expected), dead letters (goal:
exactly the injected poison count), prompt versions seen and swaps per partition (never backwards).

Writes benchmarks/results/soak.{json,md}. Usage: python benchmarks/soak.py [--frames 20000] [--rate 60]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

import cv2
import numpy as np
from kafka import KafkaProducer

from benchmarks.common import machine, read_records, write_results
from consumers.broker import EmbeddedBroker, free_port
from consumers.camera import frame_headers
from consumers.demo import ManagedProcess, poison_frames

CATEGORY = "bottle"
PARTITIONS = 3


def proc_stats(pid: int) -> tuple[float, int]:
    """(RSS MiB, open fds) of a live process."""
    with open(f"/proc/{pid}/statm") as fh:
        rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def frames_pool(n: int = 32) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        picture = np.full((96, 128, 3), 40, np.uint8) + rng.integers(0, 10, (96, 128, 3), dtype=np.uint8)
        cv2.circle(picture, (64 + i % 5, 48), 30, (200, 190, 170), 8)
        out.append(cv2.imencode(".png", picture)[1].tobytes())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=60.0)
    parser.add_argument("--swap-every", type=float, default=90.0, help="tuner interval, seconds")
    parser.add_argument("--poison-every", type=int, default=500)
    parser.add_argument("--sample-s", type=float, default=10.0)
    ns = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hpad-soak-"))
    pool = frames_pool()
    poison = poison_frames()
    with EmbeddedBroker(log_path=workdir / "tansu.log") as broker:
        topics = {"frames": "soak.frames", "events": "soak.events", "dlq": "soak.dlq", "normals": "soak.normals",
                  "prompts": "soak.prompts"}
        for name, parts in (("frames", PARTITIONS), ("events", PARTITIONS), ("dlq", 1), ("normals", 1),
                            ("prompts", 1)):
            broker.create_topic(topics[name], parts)
        common = {"HF_HUB_OFFLINE": "1", "HPAD_BOOTSTRAP_SERVERS": broker.bootstrap, "HPAD_MODEL": "hpad-tiny",
                  "HPAD_RANDOM_INIT": "true", "HPAD_DEVICE": "cpu", "HPAD_CATEGORIES": CATEGORY,
                  "HPAD_PROMPTS_TOPIC": topics["prompts"], "HPAD_NORMALS_TOPIC": topics["normals"],
                  "HPAD_SESSION_TIMEOUT_MS": "6000", "HPAD_HEARTBEAT_INTERVAL_MS": "1000", "HPAD_TORCH_THREADS": "1",
                  "HPAD_METRICS_HOST": "127.0.0.1"}
        worker_port, tuner_port = free_port(), free_port()
        worker = ManagedProcess("worker", [sys.executable, "-m", "hpad.cli", "serve"], {
            **common, "HPAD_INPUT_TOPIC": topics["frames"], "HPAD_EVENTS_TOPIC": topics["events"],
            "HPAD_DLQ_TOPIC": topics["dlq"], "HPAD_GROUP_ID": "soak", "HPAD_MAX_BATCH_SIZE": "16",
            "HPAD_METRICS_PORT": str(worker_port), "HPAD_NORMALS_MARGIN": "0", "HPAD_NORMALS_PER_MINUTE": "20",
        }, workdir / "worker.log", ready_url=f"http://127.0.0.1:{worker_port}/readyz")
        tuner = ManagedProcess("tuner", [sys.executable, "-m", "hpad.cli", "tune"], {
            **common, "HPAD_GROUP_ID": "soak-tuner", "HPAD_RESERVOIR_DIR": str(workdir / "reservoir"),
            "HPAD_METRICS_PORT": str(tuner_port), "HPAD_SHOTS": "2", "HPAD_MIN_NORMALS": "6",
            "HPAD_GATE_NORMALS": "3", "HPAD_GATE_ANOMALIES": "8", "HPAD_EPOCHS": "3", "HPAD_STEPS_PER_EPOCH": "4",
            "HPAD_BATCH_SIZE": "8", "HPAD_N_CTX": "4", "HPAD_MARGIN": "0.5", "HPAD_INTERVAL_S": str(ns.swap_every),
            "HPAD_NEW_SAMPLES": "0", "HPAD_MIN_GAP_S": str(ns.swap_every),
        }, workdir / "tuner.log", ready_url=f"http://127.0.0.1:{tuner_port}/healthz")
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
        for i in range(8):  # operator-verified normals: material for the first tuning run
            producer.send(topics["normals"], key=b"operator", value=pool[i],
                          headers=[*frame_headers(f"verified-{i}", "operator", CATEGORY, "image/png"),
                                   ("verified", b"true")])
        producer.flush()
        samples: list[dict] = []
        sent_ids: list[str] = []
        injected: list[str] = []
        try:
            worker.start()
            tuner.start()
            start = time.monotonic()
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(ns.sample_s):
                    row = {"t_s": round(time.monotonic() - start, 1), "sent": len(sent_ids)}
                    for p in (worker, tuner):
                        if p.alive():
                            row[f"{p.name}_rss_mib"], row[f"{p.name}_fds"] = proc_stats(p.process.pid)
                    samples.append(row)
                    print(json.dumps(row), flush=True)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            for i in range(ns.frames):
                delay = start + i / ns.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if i and i % ns.poison_every == 0:
                    _label, value, headers = poison[(i // ns.poison_every) % len(poison)]
                    headers = [(k, f"poison-{i}".encode()) if k == "frame_id" else (k, v) for k, v in headers]
                    producer.send(topics["frames"], key=b"cam-poison", value=value, headers=headers)
                    injected.append(f"poison-{i}")
                frame_id = f"soak-{i:07d}"
                producer.send(topics["frames"], key=f"cam-{i % 6}".encode(), value=pool[i % len(pool)],
                              headers=frame_headers(frame_id, f"cam-{i % 6}", CATEGORY, "image/png"))
                sent_ids.append(frame_id)
                if not worker.alive():
                    raise RuntimeError(f"worker died; see {worker.log_path}")
            producer.flush()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # until the worker's committed lag is 0
                time.sleep(2)
                Path(worker.log_path).read_text(errors="replace")[-2000:]
                try:
                    import urllib.request

                    with urllib.request.urlopen(f"http://127.0.0.1:{worker_port}/metrics", timeout=2) as r:
                        metrics = r.read().decode()
                    done = sum(float(line.split()[-1]) for line in metrics.splitlines()
                               if line.startswith("hpad_frames_total{") and 'outcome="abandoned"' not in line)
                except OSError:
                    done = 0
                if done >= len(sent_ids) + len(injected):
                    break
            stop.set()
            elapsed = time.monotonic() - start
        finally:
            producer.close()
            codes = {p.name: p.stop() for p in (tuner, worker)}
        events = read_records(broker.bootstrap, topics["events"], PARTITIONS, idle_s=3.0)
        dead = read_records(broker.bootstrap, topics["dlq"], 1, idle_s=3.0)
    parsed = [json.loads(r.value) for r in events]
    event_ids = [e["frame_id"] for e in parsed]
    dead_ids = [dict(r.headers).get("frame_id", b"").decode() for r in dead]
    seen = set(event_ids) | set(dead_ids)
    lost = [f for f in sent_ids + injected if f not in seen]
    duplicates = len(event_ids) - len(set(event_ids)) + len(dead_ids) - len(set(dead_ids))
    backwards = 0
    by_partition: dict[int, list[tuple[int, int]]] = {}
    for e in parsed:
        by_partition.setdefault(e["source"]["partition"], []).append((e["source"]["offset"], e["prompt_version"]))
    swaps = 0
    for rows in by_partition.values():
        versions = [v for _, v in sorted(rows)]
        backwards += sum(1 for a, b in itertools.pairwise(versions) if b < a)
        swaps = max(swaps, sum(1 for a, b in itertools.pairwise(versions) if b > a))
    warm = [s for s in samples if s["t_s"] >= 60] or samples
    result = {
        "frames_sent": len(sent_ids), "poison_injected": len(injected), "events": len(parsed),
        "dead_letters": len(dead), "lost": len(lost), "duplicates": duplicates, "versions_backwards": backwards,
        "prompt_versions_seen": sorted({e["prompt_version"] for e in parsed}), "swaps_per_partition": swaps,
        "seconds": round(elapsed, 1), "exit_codes": codes,
        "worker_rss_mib": {"after_warmup_first": warm[0].get("worker_rss_mib"), "last": samples[-1].get("worker_rss_mib"),
                           "max": max(s.get("worker_rss_mib", 0) for s in samples)},
        "worker_fds": {"after_warmup_first": warm[0].get("worker_fds"), "last": samples[-1].get("worker_fds"),
                       "max": max(s.get("worker_fds", 0) for s in samples)},
        "tuner_rss_mib": {"after_warmup_first": warm[0].get("tuner_rss_mib"), "last": samples[-1].get("tuner_rss_mib")},
        "tuner_fds": {"after_warmup_first": warm[0].get("tuner_fds"), "last": samples[-1].get("tuner_fds")},
        "lost_ids": lost[:20],
    }
    payload = {"machine": machine(), "settings": vars(ns) | {"model": "hpad-tiny", "weights": "random-init"},
               "results": result, "samples": samples}
    r = result
    table = "\n".join([
        f"Soak ({r['frames_sent']} frames at {ns.rate:.0f}/s, hpad-tiny RANDOM weights, tuner every "
        f"{ns.swap_every:.0f} s, {payload['machine']['cpu']}, {payload['machine']['cpu_count']} cores, "
        f"{payload['machine']['date'][:10]})",
        "",
        "| in (frames + poison) | events | dead letters | lost | duplicates | versions seen | swaps/partition | "
        "worker RSS MiB (1 min -> end) | worker fds (1 min -> end) | tuner RSS MiB (1 min -> end) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['frames_sent']} + {r['poison_injected']} | {r['events']} | {r['dead_letters']} | {r['lost']} | "
        f"{r['duplicates']} | {r['prompt_versions_seen']} | {r['swaps_per_partition']} | "
        f"{r['worker_rss_mib']['after_warmup_first']:.0f} -> {r['worker_rss_mib']['last']:.0f} | "
        f"{r['worker_fds']['after_warmup_first']} -> {r['worker_fds']['last']} | "
        f"{r['tuner_rss_mib']['after_warmup_first']:.0f} -> {r['tuner_rss_mib']['last']:.0f} |",
    ])
    write_results("soak", payload, table)
    return 0 if not lost and r["versions_backwards"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
