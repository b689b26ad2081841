"""Benchmark `Scorer.score`: frames/s at batch 1/8/32, LAA on vs off in the same run, peak RSS.

Usage: python benchmarks/scorer.py [--model ViT-B-16-plus-240] [--precision fp32 bf16] [--repeats 3]
Random weights (pretrained ones cannot be downloaded here): speed does not depend on the weights' values.
On/off runs are interleaved per repeat so machine noise hits both alike; medians are reported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    current_rss_mib,
    machine,
    median,
    peak_rss_mib,
    sample_frames,
    timed,
    write_results,
)
from hpad.attention import LAAConfig
from hpad.backbone import WeightsSpec, load_backbone
from hpad.scorer import Scorer, ScorerConfig


def run(model: str, precision: str, batches: list[int], repeats: int, device: str) -> list[dict]:
    backbone = load_backbone(WeightsSpec(model=model, random_init=True), device=device, precision=precision)
    frames, source = sample_frames(max(batches))
    rows = []
    scorers = {
        "on": Scorer.zero_shot(backbone, "bottle", ScorerConfig(laa=LAAConfig(enabled=True), max_batch=max(batches))),
        "off": Scorer.zero_shot(backbone, "bottle", ScorerConfig(laa=LAAConfig(enabled=False), max_batch=max(batches))),
    }
    for batch in batches:
        chunk = frames[:batch]
        for scorer in scorers.values():
            scorer.score(chunk)  # warm-up
        times: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(repeats):
            for name, scorer in scorers.items():
                times[name].append(timed(lambda s=scorer, c=chunk: s.score(c)))
        on, off = median(times["on"]), median(times["off"])
        rows.append({
            "model": model, "precision": precision, "device": str(backbone.device), "batch": batch,
            "laa_on_fps": batch / on, "laa_off_fps": batch / off, "laa_overhead": on / off - 1.0,
            "laa_on_seconds": times["on"], "laa_off_seconds": times["off"], "frames": source,
            "rss_mib_after": current_rss_mib(), "weights": "random-init",
        })
        print(f"{model} {precision} batch {batch}: LAA on {batch / on:.2f} fps, off {batch / off:.2f} fps "
              f"(overhead {100 * (on / off - 1):+.1f}%)", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-16-plus-240")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default="scorer")
    ns = parser.parse_args()
    rows = []
    for precision in ns.precision:
        rows += run(ns.model, precision, ns.batches, ns.repeats, ns.device)
    info = machine()
    payload = {"benchmark": "scorer", "machine": info, "settings": vars(ns), "results": rows,
               "peak_rss_mib": peak_rss_mib(), "random_weights": True}
    lines = [
        f"Scorer.score, {ns.model} (random weights), frames 900x900 resized in-batch; {info['cpu']}, "
        f"{info['torch_threads']} threads, torch {info['torch']}, {info['date'][:10]}",
        "",
        "| precision | batch | LAA on (frames/s) | LAA off (frames/s) | LAA overhead |",
        "|---|---|---|---|---|",
        *(f"| {r['precision']} | {r['batch']} | {r['laa_on_fps']:.2f} | {r['laa_off_fps']:.2f} | "
          f"{100 * r['laa_overhead']:+.1f}% |" for r in rows),
        "",
        f"peak RSS {payload['peak_rss_mib']:.0f} MiB (whole run, both precisions)",
    ]
    write_results(ns.name, payload, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
