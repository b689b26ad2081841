"""Cost of ``hpad console`` on the host: overlay rendering, the bounded join, the live snapshots, memory.

No Kafka and no HTTP (their cost is the client's, measured elsewhere): the console's own work per record,
in this process, one thread.

* **render**: `consumers.console.render.render_jpeg` of a 900x900 frame (JPEG q90 and PNG, as cameras send
  them) with an event mask (a blob of about 2 % of the pixels), to the thumbnail (200 px), page (720 px)
  and full size; median of ``--repeats`` calls after a warm-up.
* **join**: frames + events (half anomalous with masks) of ``--cameras`` cameras through `FrameStore`
  (``add_frame`` + ``add_event``), records per second; then ``snapshot`` of every camera and the JSON it
  becomes (what ``/api/stream`` sends when a camera changed).
* **memory**: resident set growth while the store fills to its bounds (default bounds: 32 frames and 12
  anomalies per camera), against the bytes the store counts.

Frames: the mvtec/bottle test images when ../shared/data (or ``--data``) is present, else generated ones.
Writes benchmarks/results/console.json and console.md.

Usage: python benchmarks/console.py [--cameras 16] [--records 4000] [--repeats 20] [--data DIR]
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks import common
from benchmarks.common import current_rss_mib, machine, median, sample_frames, write_results
from consumers.console.render import render_jpeg
from consumers.console.store import FrameEntry, FrameStore
from consumers.contract import Limits
from hpad.masks import encode_mask_png

SIZES = {"thumb": 200, "page": 720, "full": 16384}


def blob_mask(size: tuple[int, int], share: float = 0.02) -> np.ndarray:
    h, w = size
    mask = np.zeros(size, np.uint8)
    radius = int(np.sqrt(share * h * w / np.pi))
    cv2.circle(mask, (w // 2, h // 2), radius, 1, -1)
    return mask > 0


def event(frame_id: str, camera: str, anomalous: bool, mask_b64: str | None, size: tuple[int, int]) -> dict:
    return {"frame_id": frame_id, "camera_id": camera, "category": "bottle", "score": 0.9 if anomalous else 0.2,
            "threshold": 0.5, "is_anomaly": anomalous, "prompt_version": 1, "prompt_source": "tuned",
            "prompt_sha256": "ab" * 32, "captured_at": "2026-12-01T10:00:00.000Z", "scored_at": None,
            "width": size[1], "height": size[0],
            "mask": None if mask_b64 is None else {"encoding": "png-1bit-base64", "width": size[1],
                                                   "height": size[0], "pixel_threshold": 0.5,
                                                   "anomalous_pixels": 1, "data": mask_b64}}


def bench_render(frames: list[np.ndarray], repeats: int) -> list[dict[str, Any]]:
    rows = []
    image = frames[0]
    mask = blob_mask(image.shape[:2])
    mask_b64 = base64.b64encode(encode_mask_png(mask)).decode()
    ev = event("f", "cam", True, mask_b64, image.shape[:2])
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    for kind, ext, params in (("image/jpeg", ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]), ("image/png", ".png", [])):
        value = cv2.imencode(ext, bgr, params)[1].tobytes()
        for size, side in SIZES.items():
            render_jpeg(value, kind, ev, max_side=side, limits=Limits())  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = render_jpeg(value, kind, ev, max_side=side, limits=Limits())
                times.append(time.perf_counter() - start)
            rows.append({"content_type": kind, "frame_kib": round(len(value) / 1024, 1), "size": size,
                         "ms": round(median(times) * 1000, 2), "jpeg_kib": round(len(out) / 1024, 1)})
    return rows


def bench_join(frames: list[np.ndarray], cameras: int, records: int) -> dict[str, Any]:
    encoded = [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
               for f in frames[:8]]
    size = frames[0].shape[:2]
    mask_b64 = base64.b64encode(encode_mask_png(blob_mask(size))).decode()
    rss_before = current_rss_mib()
    store = FrameStore(frames_per_camera=32, anomalies_per_camera=12, timeline_points=300, max_cameras=64,
                       pending_events=1024, max_bytes=512 * 2**20)
    join_s = 0.0
    for i in range(records):
        camera = f"cam-{i % cameras}"
        anomalous = i % 2 == 0
        value = bytes(bytearray(encoded[i % len(encoded)]))  # its own bytes, as records from Kafka have
        entry = FrameEntry(f"{camera}-{i}", camera, "bottle", "image/jpeg", None, value)
        ev = event(f"{camera}-{i}", camera, anomalous, mask_b64 if anomalous else None, size)
        start = time.perf_counter()
        store.add_frame(entry)
        store.add_event(ev)
        join_s += time.perf_counter() - start
    start = time.perf_counter()
    snaps = store.snapshots(30.0)
    texts = [json.dumps(s, separators=(",", ":")) for s in snaps]
    snap_s = time.perf_counter() - start
    return {"cameras": cameras, "records": records, "join_per_s": round(2 * records / join_s),
            "snapshot_ms_per_camera": round(snap_s / len(snaps) * 1000, 3),
            "snapshot_json_kib": round(np.mean([len(t) for t in texts]) / 1024, 1),
            "frames_in_memory": len(store.index), "store_bytes_mib": round(store.bytes / 2**20, 1),
            "rss_growth_mib": round(current_rss_mib() - rss_before, 1), "drops": store.drops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cameras", type=int, default=16)
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--data", type=Path, default=None,
                        help="folder holding mvtec/bottle (default ../shared/data beside the checkout)")
    args = parser.parse_args()
    if args.data is not None:
        common.SHARED_DATA = args.data
    cv2.setNumThreads(1)
    frames, source = sample_frames(8)
    frames = [cv2.resize(f, (900, 900)) if f.shape[:2] != (900, 900) else f for f in frames]
    render = bench_render(frames, args.repeats)
    join = bench_join(frames, args.cameras, args.records)
    info = machine()
    payload = {"machine": info, "frames": source, "render": render, "join": join,
               "settings": {"cv2_threads": 1, "repeats": args.repeats}}
    lines = [f"hpad console host cost, one thread (cv2.setNumThreads(1)); {source}, 900x900; {info['cpu']}, "
             f"{info['cpu_count']} cores, {info['date'][:10]}; median of {args.repeats}", "",
             "| frame | frame KiB | rendered | ms | JPEG KiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['content_type']} | {r['frame_kib']} | {r['size']} | {r['ms']} | {r['jpeg_kib']} |" for r in render]
    j = join
    lines += ["", "| cameras | records | join (frames + events)/s | snapshot ms/camera | snapshot JSON KiB | "
              "frames held | frame MiB held | RSS growth MiB |", "|---|---|---|---|---|---|---|---|",
              f"| {j['cameras']} | {j['records']} | {j['join_per_s']} | {j['snapshot_ms_per_camera']} | "
              f"{j['snapshot_json_kib']} | {j['frames_in_memory']} | {j['store_bytes_mib']} | {j['rss_growth_mib']} |"]
    write_results("console", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
