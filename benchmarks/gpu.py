"""GPU benchmark (one prepared script for a lent NVIDIA H200): scorer throughput, end-to-end, GPU utilisation.

Every model runs with RANDOM WEIGHTS (``WeightsSpec(random_init=True)``): speed does not depend on the weights'
values, scores carry no meaning. Sections, each with its own time budget under one global deadline (a section
or row that would start after its budget is skipped and listed under ``skipped``; the JSON is rewritten after
every section, so a run killed from outside still leaves what it measured):

1. ``scorer``: `hpad.scorer.Scorer.score_batch` (what the worker calls: scores copied to the host, maps left on
   the device, masks made later only for frames that need one) frames/s for ViT-B-16-plus-240 at batch
   1/8/32/64/128, bf16 and fp16, LAA on and off, on uint8 numpy frames at the model size (240x240x3:
   host->device copy, no resize) and at 900x900x3 (pinned copy, antialiased resize on the device), against open_clip's plain
   ``model.encode_image`` on already-resized, already-on-device normalised [B, 3, 240, 240] tensors, same
   process and precision, under ``torch.inference_mode``. Warm-up calls, then variants interleaved per repeat,
   each repeat timing enough calls for ``--min-repeat-s`` between ``torch.cuda.synchronize()`` calls; medians.
   ``ratio`` = Scorer.score_batch time / encode_image time. Goals: ratio <= 1.10 and >= 5000 frames/s at batch >= 64
   in bf16. ``torch.cuda.max_memory_allocated`` per row (peak of its warm-up).
2. ``e2e``: an embedded broker (tansu) on 127.0.0.1, an input topic of ``--partitions`` partitions holding a
   pre-published backlog of JPEG q90 900x900 frames (MVTec bottle test images when ../shared/data is present,
   else generated), N = 1, 2, 4 ``python -m hpad.cli serve`` worker processes in one consumer group (fresh
   group per N, so each run drains the same backlog), batch ``--e2e-batch``. A reader of the events topic
   stamps each event's arrival. ``drain`` = frames / (first event -> last event); ``steady`` = events that
   arrived after the group was stable (every worker assigned, all partitions owned, read off the workers'
   /metrics) / (stable -> last event). Frames in = events out is checked (missing, duplicates, dead letters).
   Then latency at ~50% of the measured throughput: latency = event read time - the frame's ``captured_at``.
3. GPU utilisation and memory: ``nvidia-smi --query-gpu=... -lms 500`` in the background for the whole run,
   summarised per window (each scorer batch, each end-to-end phase): mean / p50 utilisation, max memory used.
   Goal to report: GPU busy >= 80% end to end (steady drain).
4. ``compile`` (optional, only when time is left): ``torch.compile(model.encode_image)`` in a child process
   (killed at its budget), against eager ``encode_image`` in that same child.

``--quick`` runs the same functions with small numbers on CPU (hpad-tiny, fp32 and bf16, batches 1 and 8,
end-to-end with 1 and 2 workers and a 64-frame backlog; fp16 is skipped on CPU and nvidia-smi is replaced by a
stub that exercises the monitor's parsing) in about 2 minutes on 2 cores: a passing --quick run means the GPU
run will not fail on a Python error.

Usage: python3 benchmarks/gpu.py [--out benchmarks/results/gpu.json] [--quick] [--deadline SECONDS]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from itertools import cycle, islice
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from benchmarks.common import RESULTS, SHARED_DATA, machine, median, read_records
from consumers.broker import EmbeddedBroker, free_port
from consumers.camera import Camera
from consumers.demo import ManagedProcess
from hpad.attention import LAAConfig
from hpad.backbone import WeightsSpec, load_backbone, resolve_device
from hpad.scorer import Scorer, ScorerConfig

try:  # kafka-python >= 3 has a pluggable partitioner base class
    from kafka.partitioner import Partitioner as _PartitionerBase
except ImportError:  # pragma: no cover - older kafka-python calls partition(topic, key, metadata)
    _PartitionerBase = object  # type: ignore[assignment,misc]

CATEGORY = "bottle"
INPUT_TOPIC = "bench.frames"
REPO = Path(__file__).resolve().parents[1]
MiB = 2**20
GPU_QUERY = "timestamp,index,utilization.gpu,memory.used"


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class Plan:
    """Every number of one run; `full_plan` for the GPU, `quick_plan` for a CPU smoke run."""

    quick: bool
    device: str
    model: str
    precisions: list[str]
    batches: list[int]
    frame_side: int = 900
    warmup: int = 3
    repeats: int = 5
    min_repeat_s: float = 0.15
    max_iters: int = 200
    workers: list[int] = field(default_factory=lambda: [1, 2, 4])
    partitions: int = 8
    e2e_model: str = "ViT-B-16-plus-240"
    e2e_precision: str = "bf16"
    e2e_batch: int = 64
    e2e_frames: int = 6000
    e2e_max_frames: int = 12000
    drain_target_s: float = 12.0
    jpeg_quality: int = 90
    distinct_frames: int = 64
    latency_load: float = 0.5
    latency_s: float = 8.0
    latency_min_frames: int = 32
    startup_timeout_s: float = 150.0  # worker start -> first event
    stall_s: float = 30.0  # no new event for this long: the run stops waiting
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    decode_threads: int = 0  # 0 = cores // N
    torch_threads: int = 0  # 0 = cores // N on CPU, cores // (2N) on CUDA
    worker_env: dict[str, str] = field(default_factory=dict)  # extra HPAD_* settings for every worker
    deadline_s: float = 430.0  # new work starts only before this; clean-up fits in the 8 minutes
    scorer_budget_s: float = 160.0
    e2e_budget_s: float = 230.0
    compile: bool = True
    compile_backend: str = "inductor"
    compile_batch: int = 64
    compile_precision: str = "bf16"
    compile_budget_s: float = 110.0
    compile_min_s: float = 70.0


def full_plan(device: str) -> Plan:
    return Plan(quick=False, device=device, model="ViT-B-16-plus-240", precisions=["bf16", "fp16"],
                batches=[1, 8, 32, 64, 128])


def quick_plan(device: str) -> Plan:
    return Plan(quick=True, device=device, model="hpad-tiny", precisions=["fp32", "bf16", "fp16"], batches=[1, 8],
                warmup=1, repeats=3, min_repeat_s=0.02, max_iters=20, workers=[1, 2], partitions=4,
                e2e_model="hpad-tiny", e2e_precision="fp32", e2e_batch=8, e2e_frames=64, e2e_max_frames=1200,
                drain_target_s=1.5, distinct_frames=16, latency_s=2.0, latency_min_frames=16,
                startup_timeout_s=60.0, stall_s=15.0, deadline_s=150.0, scorer_budget_s=30.0, e2e_budget_s=85.0,
                compile_batch=8, compile_precision="fp32", compile_budget_s=45.0, compile_min_s=25.0)


# ------------------------------------------------------------------------------------------------ clock


class Budget:
    """A deadline: ``Budget(seconds)`` from now, or a section's share capped by its parent."""

    def __init__(self, seconds: float, parent: Budget | None = None) -> None:
        end = time.monotonic() + seconds
        self.end = min(end, parent.end) if parent is not None else end

    def left(self) -> float:
        return self.end - time.monotonic()

    def part(self, seconds: float) -> Budget:
        return Budget(seconds, self)


_SHIELD: dict[str, Any] = {"depth": 0, "pending": None}


def install_sigterm() -> None:
    """SIGTERM (a timeout from outside) -> SystemExit, so every ``finally`` stops what it started; inside a
    `shielded` clean-up the signal waits until the clean-up is done."""
    def handler(signum: int, frame: object) -> None:
        if _SHIELD["depth"] > 0:
            _SHIELD["pending"] = signum
            return
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def shielded() -> Any:
    """Clean-up that a SIGTERM must not cut short (stopping processes, writing the report)."""
    _SHIELD["depth"] += 1
    try:
        yield
    finally:
        _SHIELD["depth"] -= 1
    if _SHIELD["depth"] == 0 and _SHIELD["pending"] is not None:
        signum, _SHIELD["pending"] = _SHIELD["pending"], None
        raise SystemExit(128 + signum)


# ------------------------------------------------------------------------------------------------ report


class Report:
    """The JSON payload, rewritten (with the markdown next to it) after every section."""

    def __init__(self, out: Path, plan: Plan, refresh: Callable[[], None] = lambda: None) -> None:
        self.refresh = refresh
        self.out = out
        self.md = out.with_suffix(".md")
        self.started = time.monotonic()
        self.payload: dict[str, Any] = {
            "benchmark": "gpu", "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "random_weights": True, "weights": "random-init (WeightsSpec(random_init=True)): scores carry no meaning",
            "quick": plan.quick, "argv": sys.argv, "plan": asdict(plan), "sections": {}, "skipped": [], "errors": [],
        }

    def skip(self, what: str, why: str) -> None:
        print(f"[skip] {what}: {why}", flush=True)
        self.payload["skipped"].append({"what": what, "why": why})

    def error(self, where: str, exc: BaseException) -> None:
        print(f"[error] {where}: {type(exc).__name__}: {exc}", flush=True)
        self.payload["errors"].append({"where": where, "error": f"{type(exc).__name__}: {exc}"[:2000]})

    def write(self, final: bool = False) -> None:
        self.refresh()  # GPU windows with the samples that arrived since
        self.payload["goals"] = goals(self.payload)
        self.payload["wall_s"] = round(time.monotonic() - self.started, 1)
        self.payload["complete"] = final
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.payload, indent=2, default=str) + "\n")
        self.md.write_text(render_markdown(self.payload) + "\n")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ facts


def command_output(argv: list[str], timeout_s: float = 20.0) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"failed: {exc}"
    return (done.stdout + done.stderr).strip()


def facts() -> dict[str, Any]:
    import kafka
    import open_clip

    info: dict[str, Any] = {**machine(), "platform": platform.platform(), "open_clip": open_clip.__version__,
                            "kafka_python": kafka.__version__, "numpy": np.__version__, "opencv": cv2.__version__,
                            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    info["nvidia_smi_L"] = command_output(["nvidia-smi", "-L"]) or "not available (no nvidia-smi)"
    info["nvidia_driver"] = command_output(["nvidia-smi", "--query-gpu=driver_version,name,memory.total",
                                            "--format=csv,noheader"]) or "not available"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}", "sm_count": props.multi_processor_count}
        info["cudnn"] = torch.backends.cudnn.version()
    return info


# ------------------------------------------------------------------------------------------------ GPU monitor


def parse_smi_line(line: str, arrived: float) -> tuple[float, int, float, float] | None:
    """``2026/12/01 10:11:12.345, 0, 87, 12345`` -> (unix time, gpu index, utilisation %, memory MiB)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 4:
        return None
    try:
        index, util, mem = int(parts[1]), float(parts[2]), float(parts[3])
    except ValueError:  # "[N/A]" or a header
        return None
    try:
        stamp = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
    except ValueError:
        stamp = arrived
    return stamp, index, util, mem


class GpuMonitor:
    """``nvidia-smi --query-gpu=... -lms 500`` in its own process group; samples summarised per time window.

    `summary` returns a dict that stays registered and is recomputed by `refresh` (before every report write and
    after `stop`), so a window's numbers include samples that arrived late (nvidia-smi's output through a pipe).
    """

    def __init__(self, command: list[str] | None = None, interval_ms: int = 500) -> None:
        self.fallback: list[str] | None = None
        if command is None and shutil.which("nvidia-smi") is not None:
            command = ["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits",
                       "-lms", str(interval_ms)]
            if shutil.which("stdbuf"):  # line-buffered through the pipe; plain nvidia-smi if stdbuf fails
                command, self.fallback = ["stdbuf", "-oL", *command], command
        self.command = command
        self.samples: list[tuple[float, int, float, float]] = []
        self.process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._windows: list[dict[str, Any]] = []
        self.status = "not available (no nvidia-smi)" if command is None else "not started"

    @property
    def available(self) -> bool:
        return self.process is not None

    def start(self, first_sample_s: float = 3.0) -> GpuMonitor:
        if self.command is None:
            return self
        for command in (self.command, self.fallback):
            if command is None:
                continue
            try:
                self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                text=True, bufsize=1, start_new_session=True)
            except OSError as exc:
                self.status = f"not available ({exc})"
                continue
            self.command = command
            self._thread = threading.Thread(target=self._read, args=(self.process,), daemon=True)
            self._thread.start()
            deadline = time.monotonic() + first_sample_s
            while not self.samples and self.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.samples:
                self.status = "running: " + " ".join(command)
                return self
            if self.process.poll() is None:
                self.status = f"running, no sample within {first_sample_s:.0f} s: " + " ".join(command)
                return self
            self.status = f"not available ({command[0]} exited with {self.process.returncode}, no sample)"
            self.process = None
        return self

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sample = parse_smi_line(line, time.time())
            if sample is not None:
                self.samples.append(sample)

    def stop(self) -> None:
        with shielded():
            if self.process is not None:
                stop_process_groups([self.process], timeout_s=3.0)
            if self._thread is not None:
                self._thread.join(timeout=3)
            self.refresh()

    def summary(self, start: float | None, end: float | None) -> dict[str, Any]:
        """Mean / p50 utilisation and max memory of the samples in [start, end] (unix times), per GPU."""
        window: dict[str, Any] = {"start": start, "end": end}
        self._windows.append(window)
        self._fill(window)
        return window

    def refresh(self) -> None:
        for window in self._windows:
            self._fill(window)

    def _fill(self, window: dict[str, Any]) -> None:
        start, end = window["start"], window["end"]
        for key in [k for k in window if k not in ("start", "end")]:
            del window[key]
        if not self.available:
            window["status"] = self.status
            return
        if start is None or end is None:
            window["status"] = "no window"
            return
        picked = [s for s in list(self.samples) if start <= s[0] <= end]
        if not picked:
            window["status"] = "no samples in window"
            return
        by_gpu: dict[int, list[tuple[float, int, float, float]]] = {}
        for sample in picked:
            by_gpu.setdefault(sample[1], []).append(sample)
        for index, rows in sorted(by_gpu.items()):
            util = [r[2] for r in rows]
            window[f"gpu{index}"] = {"util_mean": round(float(np.mean(util)), 1),
                                     "util_p50": round(float(np.percentile(util, 50)), 1),
                                     "mem_max_mib": max(r[3] for r in rows), "samples": len(rows)}


def monitor_selftest() -> dict[str, Any]:
    """Run the monitor against a stub printing nvidia-smi-like lines (CPU machines): exercises start/parse/summary."""
    stub = ("import time\nfor i in range(6):\n"
            "    t = time.strftime('%Y/%m/%d %H:%M:%S') + '.%03d' % (i * 100)\n"
            "    print(f'{t}, 0, {40 + i}, {1000 + i}', flush=True); time.sleep(0.15)\n"
            "print('[N/A], 0, [N/A], [N/A]', flush=True)\n")
    monitor = GpuMonitor(command=[sys.executable, "-c", "import sys; sys.exit(3)"])  # a failing first command
    monitor.fallback = [sys.executable, "-c", stub]  # ... is retried with the fallback, as stdbuf would be
    monitor.start()
    start = time.time() - 5
    time.sleep(1.2)
    monitor.stop()
    summary = monitor.summary(start, time.time() + 5)
    ok = summary.get("gpu0", {}).get("samples", 0) >= 1 and monitor.status.startswith("running")
    return {"ok": ok, "samples": len(monitor.samples), "summary": summary}


# ------------------------------------------------------------------------------------------------ device helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / MiB, 1)
    return None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_variants(variants: dict[str, Callable[[], object]], device: torch.device, plan: Plan,
                  budget: Budget) -> dict[str, dict[str, Any]]:
    """Warm each variant up (peak memory of its warm-up), calibrate calls per repeat, then time the variants
    interleaved per repeat (machine noise hits them alike); seconds per call of each repeat. A variant that
    raises is reported with its error and left out of the timing; the others still run."""
    stats: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for name, fn in variants.items():
            try:
                reset_peak(device)
                for _ in range(plan.warmup):
                    fn()
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                one = time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001 - one failing variant must not cost the whole section
                stats[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
                log(f"  {name} failed: {stats[name]['error'][:300]}")
                free_memory(device)
                continue
            iters = max(1, min(plan.max_iters, math.ceil(plan.min_repeat_s / max(one, 1e-6))))
            stats[name] = {"iters": iters, "seconds": [], "peak_mem_mib": peak_mib(device)}
        timed = {name: fn for name, fn in variants.items() if "error" not in stats[name]}
        for _ in range(plan.repeats):
            for name, fn in timed.items():
                iters = stats[name]["iters"]
                sync(device)
                start = time.perf_counter()
                for _ in range(iters):
                    fn()
                sync(device)
                stats[name]["seconds"].append((time.perf_counter() - start) / iters)
            if budget.left() < 0:
                break  # at least one repeat of every variant is kept
    for entry in stats.values():
        entry["median_s"] = median(entry["seconds"]) if entry.get("seconds") else None
    return stats


def normalised_pixels(backbone: Any, frames: Sequence[np.ndarray]) -> torch.Tensor:
    """Model-size uint8 HxWx3 frames -> normalised [B, 3, H, W] in the model's dtype on its device (what
    open_clip's encode_image takes; the same arithmetic as the scorer's preprocessing, done here)."""
    batch = torch.from_numpy(np.stack(frames)).to(backbone.device).permute(0, 3, 1, 2).float()
    mean = torch.tensor(backbone.mean, device=backbone.device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=backbone.device).view(1, 3, 1, 1)
    return ((batch / 255.0 - mean) / std).to(backbone.dtype).contiguous()


# ------------------------------------------------------------------------------------------------ frames


def bottle_paths() -> list[Path]:
    folder = SHARED_DATA / "mvtec" / "bottle" / "test"
    return sorted(folder.rglob("*.png")) if folder.is_dir() else []


def rgb_frames(count: int, side: int, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """``count`` uint8 RGB frames side x side: bottle test images (resized if needed) or generated noise."""
    paths = bottle_paths()
    frames: list[np.ndarray] = []
    if paths:
        for i in range(count):
            bgr = cv2.imread(str(paths[i % len(paths)]), cv2.IMREAD_COLOR)
            if bgr.shape[:2] != (side, side):
                bgr = cv2.resize(bgr, (side, side), interpolation=cv2.INTER_AREA)
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        return frames, f"mvtec/bottle test images, {min(count, len(paths))} distinct, {side}x{side}"
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(count)]
    return frames, f"generated noise frames, {side}x{side}"


def jpeg_frames(count: int, side: int, quality: int) -> tuple[list[tuple[bytes, str]], str]:
    """(JPEG bytes, content type) of ``count`` distinct frames, re-encoded at ``quality``."""
    frames, source = rgb_frames(count, side)
    encoded = []
    for rgb in frames:
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        encoded.append((data.tobytes(), "image/jpeg"))
    mean_kib = sum(len(b) for b, _ in encoded) / len(encoded) / 1024
    return encoded, f"{source}, re-encoded as JPEG q{quality} (mean {mean_kib:.0f} KiB)"


# ------------------------------------------------------------------------------------------------ 1. scorer


def scorer_section(plan: Plan, budget: Budget, monitor: GpuMonitor, report: Report) -> dict[str, Any]:
    device = resolve_device(plan.device)
    big, source = rgb_frames(max(plan.batches), plan.frame_side)
    section: dict[str, Any] = {"model": plan.model, "device": str(device), "frames": source, "rows": [],
                               "blocks": [], "weights": "random-init"}
    report.payload["sections"]["scorer"] = section
    for precision in plan.precisions:
        if precision == "fp16" and device.type != "cuda":
            report.skip(f"scorer {precision}", "fp16 is GPU-only (hpad refuses it on CPU)")
            continue
        if budget.left() < 10:
            report.skip(f"scorer {precision}", f"section budget spent ({budget.left():.0f} s left)")
            continue
        try:
            scorer_precision(plan, device, precision, big, budget, monitor, report, section)
        except Exception as exc:  # noqa: BLE001 - the next precision still runs
            report.error(f"scorer {precision}", exc)
        free_memory(device)
    return section


def scorer_precision(plan: Plan, device: torch.device, precision: str, big: list[np.ndarray], budget: Budget,
                     monitor: GpuMonitor, report: Report, section: dict[str, Any]) -> None:
    log(f"scorer: loading {plan.model} {precision} on {device} (random weights)")
    backbone = load_backbone(WeightsSpec(model=plan.model, random_init=True), device=str(device),
                             precision=precision)
    height, width = backbone.image_size
    small = [cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in big]
    prompts = {}
    for flag in (True, False):  # on the device once, as the worker's prompt provider keeps them
        scorer = Scorer(backbone, config=ScorerConfig(laa=LAAConfig(enabled=flag)))
        prompts[flag] = scorer.check_prompts(scorer.zero_shot_prompts(CATEGORY))
    pixels_all = normalised_pixels(backbone, small)
    for batch in plan.batches:
        if budget.left() < 3:
            report.skip(f"scorer {precision} batch {batch}", f"section budget spent ({budget.left():.0f} s left)")
            continue
        rows = scorer_rows(plan, device, backbone, backbone.model, precision, batch, pixels_all, small, big,
                           prompts, budget, monitor, section)
        section["rows"] += rows
        for row in rows:
            if row.get("error"):
                continue
            ratio = f", ratio {row['ratio']:.2f}" if row.get("ratio") is not None else ""
            log(f"scorer {precision} b{batch} {row['variant']}: {row['fps']:.1f} frames/s{ratio}")


def scorer_rows(plan: Plan, device: torch.device, backbone: Any, model: torch.nn.Module, precision: str, batch: int,
                pixels_all: torch.Tensor, small: list[np.ndarray], big: list[np.ndarray],
                prompts: dict[bool, Any], budget: Budget, monitor: GpuMonitor,
                section: dict[str, Any]) -> list[dict[str, Any]]:
    scorers = {flag: Scorer(backbone, config=ScorerConfig(laa=LAAConfig(enabled=flag), max_batch=batch))
               for flag in (True, False)}
    pixels = pixels_all[:batch].contiguous()
    frames = {"model": small[:batch], "big": big[:batch]}
    variants: dict[str, Callable[[], object]] = {"encode_image": lambda: model.encode_image(pixels)}
    for kind in ("model", "big"):
        for flag in (True, False):
            name = f"score {kind} laa={'on' if flag else 'off'}"
            variants[name] = lambda s=scorers[flag], f=frames[kind], p=prompts[flag]: s.score_batch(f, p)
    start = time.time()
    stats = time_variants(variants, device, plan, budget)
    end = time.time()
    section["blocks"].append({"precision": precision, "batch": batch, "start": start, "end": end,
                              "gpu": monitor.summary(start, end)})
    base = stats["encode_image"].get("median_s")
    sides = {"model": f"{small[0].shape[0]}x{small[0].shape[1]}", "big": f"{big[0].shape[0]}x{big[0].shape[1]}"}
    rows = []
    for name, entry in stats.items():
        seconds = entry.get("median_s")
        row: dict[str, Any] = {"precision": precision, "batch": batch, "variant": name,
                               "fps": batch / seconds if seconds else None, "median_s": seconds,
                               "seconds": entry.get("seconds"), "iters_per_repeat": entry.get("iters"),
                               "peak_mem_mib": entry.get("peak_mem_mib"), "error": entry.get("error"),
                               "encode_image_fps": batch / base if base else None}
        if name == "encode_image":
            row.update(frames=f"{pixels.shape[2]}x{pixels.shape[3]} tensor on {device}", laa=None, ratio=None)
        else:
            kind, laa = name.split()[1], name.endswith("on")
            row.update(frames=f"{sides[kind]}x3 uint8 numpy", laa=laa,
                       ratio=seconds / base if seconds and base else None)
        rows.append(row)
    return rows


def scorer_goals(section: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in section.get("rows", []) if r["variant"] != "encode_image" and r.get("ratio") is not None]
    model_rows = [r for r in rows if r["variant"].startswith("score model")]
    big_bf16 = [r for r in section.get("rows", []) if r["precision"] == "bf16" and r["batch"] >= 64
                and r.get("fps") is not None]
    fast = [r for r in big_bf16 if r["variant"].startswith("score model")]
    return {
        "ratio_within_1.10_model_size_frames": all(r["ratio"] <= 1.10 for r in model_rows) if model_rows else None,
        "worst_ratio_model_size_frames": max((r["ratio"] for r in model_rows), default=None),
        "worst_ratio_900_frames": max((r["ratio"] for r in rows if r["variant"].startswith("score big")),
                                      default=None),
        "fps_5000_bf16_batch_ge_64_model_size": all(r["fps"] >= 5000 for r in fast) if fast else None,
        "min_fps_bf16_batch_ge_64": {v: min((r["fps"] for r in big_bf16 if r["variant"] == v), default=None)
                                     for v in sorted({r["variant"] for r in big_bf16})},
    }


def util_mean(summary: Any) -> float | None:
    if isinstance(summary, dict):
        for key, value in summary.items():
            if key.startswith("gpu") and isinstance(value, dict):
                return float(value["util_mean"])
    return None


def goals(payload: dict[str, Any]) -> dict[str, Any]:
    """The brief's targets, read off what was measured (None: not measured)."""
    sections = payload.get("sections", {})
    out: dict[str, Any] = {"scorer": scorer_goals(sections.get("scorer", {}))}
    busy = {}
    for run in sections.get("e2e", {}).get("runs", []):
        util = util_mean(run.get("gpu_steady"))
        busy[f"N={run['workers']}"] = None if util is None else {"util_mean": util, "met": util >= 80.0}
    out["e2e_gpu_busy_80_steady"] = busy
    return out


# ------------------------------------------------------------------------------------------------ 2. end-to-end


class CameraPartitioner(_PartitionerBase):
    """Camera id ``<name>-<i>`` -> partition (i - 1) mod P: every partition gets the same share of frames."""

    @staticmethod
    def _pick(key: bytes | None, partitions: Sequence[int]) -> int:
        ordered = sorted(partitions)
        if not key:
            return ordered[0]
        try:
            index = int(key.rsplit(b"-", 1)[-1]) - 1
        except ValueError:
            index = sum(key)
        return ordered[index % len(ordered)]

    def partition(self, topic: str, *args: Any) -> int:
        if len(args) == 5:  # kafka-python 3: key, serialized_key, value, serialized_value, cluster
            key, cluster = args[1], args[4]
        else:  # older: serialized_key, metadata
            key, cluster = args[0], args[-1]
        return self._pick(key, cluster.partitions_for_topic(topic))

    def __call__(self, key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
        return self._pick(key, all_partitions)


class EventReader:
    """Reads an events topic on a thread from the beginning; stamps each frame's first event on arrival."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.arrivals: dict[str, float] = {}
        self.captured: dict[str, float] = {}
        self.masks = 0
        self.anomalies = 0
        self.duplicates = 0
        self.records = 0
        self.devices: set[str] = set()
        self.random_weights: set[bool] = set()
        self._stop = threading.Event()
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20,
                                       max_partition_fetch_bytes=16 * MiB, fetch_max_bytes=64 * MiB)
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning(*tps)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for records in self._consumer.poll(timeout_ms=50).values():
                    now = time.time()
                    for record in records:
                        self._add(json.loads(record.value), now)
        except Exception as exc:  # noqa: BLE001 - reported by wait()
            self.error = exc

    def _add(self, event: dict[str, Any], now: float) -> None:
        self.records += 1
        frame_id = event["frame_id"]
        if frame_id in self.arrivals:
            self.duplicates += 1
            return
        self.arrivals[frame_id] = now
        if event.get("captured_at"):
            self.captured[frame_id] = datetime.fromisoformat(event["captured_at"].replace("Z", "+00:00")).timestamp()
        self.masks += event.get("mask") is not None
        self.anomalies += bool(event.get("is_anomaly"))
        self.devices.add(str(event.get("device")))
        self.random_weights.add(bool(event.get("random_weights")))

    def wait(self, frame_ids: Sequence[str], deadline: float, alive: Callable[[], bool], first_timeout_s: float,
             stall_s: float) -> str:
        """Until every id has an event: "complete"; else "deadline" (monotonic ``deadline`` passed), "no worker
        alive", "no event" (none of them within ``first_timeout_s``) or "stalled" (none new for ``stall_s``)."""
        started = time.monotonic()
        pending = [f for f in frame_ids if f not in self.arrivals]
        seen, progress = len(frame_ids) - len(pending), started
        while pending:
            if self.error is not None:
                raise RuntimeError(f"event reader failed: {self.error}") from self.error
            now = time.monotonic()
            if now > deadline:
                return "deadline"
            if not alive():
                return "no worker alive"
            if seen == 0 and now - started > first_timeout_s:
                return "no event"
            if seen > 0 and now - progress > stall_s:
                return "stalled"
            time.sleep(0.02)
            pending = [f for f in pending if f not in self.arrivals]
            if len(frame_ids) - len(pending) > seen:
                seen, progress = len(frame_ids) - len(pending), time.monotonic()
        return "complete"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._consumer.close()


def scrape(port: int, timeout_s: float = 2.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as response:
        return response.read().decode()


def metric_values(text: str, prefixes: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(tuple(prefixes)):
            name, value = line.rsplit(" ", 1)
            out[name] = out.get(name, 0.0) + float(value)
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc); None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


class GroupWatcher:
    """Scrapes every worker's /metrics a few times a second: when the group is stable (each worker assigned,
    every partition owned), plus CPU samples of the machine and of the processes."""

    def __init__(self, ports: list[int], partitions: int, pids: dict[str, int], interval_s: float = 0.25) -> None:
        self.ports, self.partitions, self.pids, self.interval_s = ports, partitions, pids, interval_s
        self.stable_at: float | None = None
        self.changes_after_stable = 0
        self.last_assigned: list[int] = []
        self.samples: list[tuple[float, tuple[int, int], dict[str, float | None]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> GroupWatcher:
        self._thread.start()
        return self

    def _assigned(self, port: int) -> int:
        try:
            values = metric_values(scrape(port, timeout_s=1.0), ["hpad_assigned_partitions "])
        except (OSError, ValueError):
            return 0
        return int(values.get("hpad_assigned_partitions", 0))

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            assigned = [self._assigned(port) for port in self.ports]
            stable = all(a > 0 for a in assigned) and sum(assigned) == self.partitions
            if self.stable_at is None and stable:
                self.stable_at = now
            elif self.stable_at is not None and assigned != self.last_assigned:
                self.changes_after_stable += 1
            self.last_assigned = assigned
            self.samples.append((now, cpu_jiffies(), {n: cpu_seconds(p) for n, p in self.pids.items()}))
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def cpu(self, start: float | None, end: float | None, frames: int) -> dict[str, Any] | None:
        """Machine CPU busy fraction and each process's CPU ms per frame between the samples nearest start/end."""
        if start is None or end is None or len(self.samples) < 2:
            return None
        samples = list(self.samples)
        first = next((s for s in reversed(samples) if s[0] <= start), samples[0])  # the window's brackets
        last = next((s for s in samples if s[0] >= end), samples[-1])
        if last[0] <= first[0]:
            return None
        busy = (last[1][0] - first[1][0]) / max(1, last[1][1] - first[1][1])
        per_frame = {}
        for name in self.pids:
            a, b = first[2].get(name), last[2].get(name)
            per_frame[name] = None if a is None or b is None or frames <= 0 else round(1000 * (b - a) / frames, 2)
        return {"machine_busy": round(busy, 3), "cores": os.cpu_count(), "window_s": round(last[0] - first[0], 2),
                "cpu_ms_per_frame": per_frame}


def stop_process_groups(processes: Sequence[subprocess.Popen], timeout_s: float = 15.0) -> list[int | None]:
    """SIGTERM every process's group, wait for all, SIGKILL the groups still there; exit codes."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # also any child left in the group
        if process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
    return [process.returncode for process in processes]


def worker_env(plan: Plan, bootstrap: str, tag: str, group: str, index: int, workers: int, port: int,
               device: torch.device) -> dict[str, str]:
    cores = os.cpu_count() or 2
    decode = plan.decode_threads or max(1, cores // workers)
    threads = plan.torch_threads or max(1, cores // workers // (2 if device.type == "cuda" else 1))
    return {
        "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",  # hpad importable from any working directory:
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "HPAD_BOOTSTRAP_SERVERS": bootstrap, "HPAD_INPUT_TOPIC": INPUT_TOPIC,
        "HPAD_EVENTS_TOPIC": f"bench.events.{tag}", "HPAD_DLQ_TOPIC": f"bench.dlq.{tag}",
        "HPAD_GROUP_ID": group, "HPAD_CLIENT_ID": f"bench-{tag}-{index}",
        "HPAD_PROMPTS_TOPIC": "", "HPAD_NORMALS_TOPIC": "",
        "HPAD_MODEL": plan.e2e_model, "HPAD_RANDOM_INIT": "true", "HPAD_DEVICE": device.type,
        "HPAD_PRECISION": plan.e2e_precision, "HPAD_CATEGORIES": CATEGORY,
        "HPAD_MAX_BATCH_SIZE": str(plan.e2e_batch), "HPAD_DECODE_THREADS": str(decode),
        "HPAD_TORCH_THREADS": str(threads), "HPAD_METRICS_PORT": str(port), "HPAD_METRICS_HOST": "127.0.0.1",
        "HPAD_SESSION_TIMEOUT_MS": str(plan.session_timeout_ms),
        "HPAD_HEARTBEAT_INTERVAL_MS": str(plan.heartbeat_interval_ms), "HPAD_SHUTDOWN_TIMEOUT_MS": "5000",
        "HPAD_LOG_LEVEL": "WARNING", **plan.worker_env,
    }


def log_tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def latencies_ms(reader: EventReader, frame_ids: Sequence[str]) -> list[float]:
    return [1000 * (reader.arrivals[f] - reader.captured[f]) for f in frame_ids
            if f in reader.arrivals and f in reader.captured]


def stage_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean per observation of each worker stage (ms; decode/queue per frame, the others per batch) and the mean
    batch size, between two summed scrapes. Keys like ``hpad_stage_duration_seconds_sum{stage="infer"}``."""
    out = {}
    for key, total in after.items():
        name, _, labels = key.partition("{")
        if not name.endswith("_sum"):
            continue
        count_key = name[:-4] + "_count" + ("{" + labels if labels else "")
        count = after.get(count_key, 0.0) - before.get(count_key, 0.0)
        if count <= 0:
            continue
        if name.startswith("hpad_batch_size"):
            out["mean_batch"] = round((total - before.get(key, 0.0)) / count, 2)
        else:
            stage = labels.split('"')[1] if '"' in labels else name
            out[f"{stage}_ms"] = round(1000 * (total - before.get(key, 0.0)) / count, 3)
    return out


def scrape_all(ports: Sequence[int]) -> dict[str, float]:
    total: dict[str, float] = {}
    for port in ports:
        try:
            values = metric_values(scrape(port), ["hpad_stage_duration_seconds_sum", "hpad_stage_duration_seconds_count",
                                                  "hpad_batch_size_sum", "hpad_batch_size_count"])
        except (OSError, ValueError):
            continue
        for name, value in values.items():
            total[name] = total.get(name, 0.0) + value
    return total


def e2e_run(plan: Plan, broker: EmbeddedBroker, camera: Camera, encoded: list[tuple[bytes, str]],
            expected: list[str], workers: int, budget: Budget, monitor: GpuMonitor, device: torch.device,
            logs: Path, report: Report, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """N workers drain ``expected`` (already in the input topic), then a latency run; returns (row, new ids).
    The row is appended to ``rows`` at once, so an interrupted run still reports what it measured."""
    tag = f"n{workers}"
    broker.create_topic(f"bench.events.{tag}", plan.partitions)
    broker.create_topic(f"bench.dlq.{tag}", 1)
    reader = EventReader(broker.bootstrap, f"bench.events.{tag}", plan.partitions)
    row: dict[str, Any] = {"workers": workers, "batch": plan.e2e_batch, "model": plan.e2e_model,
                           "precision": plan.e2e_precision, "device": device.type, "backlog_frames": len(expected)}
    rows.append(row)
    procs: list[ManagedProcess] = []
    ports = [free_port() for _ in range(workers)]
    watcher: GroupWatcher | None = None
    sent_ids: list[str] = []
    group = f"bench-{tag}-{os.urandom(3).hex()}"  # one group per run: its workers share the partitions
    try:
        started = time.time()
        for index, port in enumerate(ports):
            env = worker_env(plan, broker.bootstrap, tag, group, index, workers, port, device)
            row.setdefault("worker_env", {k: v for k, v in env.items() if k not in ("HPAD_METRICS_PORT",
                                                                                   "HPAD_CLIENT_ID")})
            procs.append(ManagedProcess(f"worker-{tag}-{index}", [sys.executable, "-m", "hpad.cli", "serve"], env,
                                        logs / f"worker-{tag}-{index}.log").start())
        pids = {f"worker{i}": p.process.pid for i, p in enumerate(procs) if p.process is not None}
        pids.update(bench=os.getpid(), **({"broker": broker.process.pid} if broker.process else {}))
        watcher = GroupWatcher(ports, plan.partitions, pids).start()

        def alive() -> bool:
            return any(p.alive() for p in procs)

        # drain: workers start on a pre-published backlog; keep time for the latency run
        reserve = plan.latency_s + 10 if budget.left() > 3 * (plan.latency_s + 10) else 0.0
        status = reader.wait(expected, time.monotonic() + max(1.0, budget.left() - reserve), alive,
                             first_timeout_s=plan.startup_timeout_s, stall_s=plan.stall_s)
        complete = status == "complete"
        drained_at = time.time()
        counters = scrape_all(ports)
        got = [reader.arrivals[f] for f in expected if f in reader.arrivals]
        first, last = (min(got), max(got)) if got else (None, None)
        stable = watcher.stable_at
        after_stable = sum(1 for t in got if stable is not None and t >= stable)
        steady = after_stable / (last - stable) if stable and last and last > stable and after_stable >= 2 else None
        drain = (len(got) - 1) / (last - first) if got and last > first else None
        row.update({
            "complete": complete, "drain_status": status, "frames_in": len(expected), "events_out": len(got),
            "missing": len(expected) - len(got), "duplicate_events": reader.duplicates,
            "startup_to_first_event_s": round(first - started, 2) if first else None,
            "startup_to_stable_s": round(stable - started, 2) if stable else None,
            "drain_s": round(last - first, 3) if got else None, "drain_fps": drain,
            "steady_frames": after_stable, "steady_s": round(last - stable, 3) if stable and last else None,
            "steady_fps": steady, "rebalances_after_stable": watcher.changes_after_stable,
            "events_with_mask": reader.masks, "anomalous_events": reader.anomalies,
            "event_devices": sorted(reader.devices), "event_random_weights": sorted(reader.random_weights),
            "worker_stages_drain": stage_means({}, counters),
            "gpu_drain": monitor.summary(first, last), "gpu_steady": monitor.summary(stable, last),
            "gpu_startup": monitor.summary(started, first),
        })
        time.sleep(1.5 * watcher.interval_s)  # one CPU sample after the last event
        row["cpu_steady"] = watcher.cpu(stable, last, after_stable)
        row["cpu_drain"] = watcher.cpu(first, last, len(got))
        log(f"e2e N={workers}: {len(got)}/{len(expected)} events, drain {fmt(drain)} frames/s, steady "
            f"{fmt(steady)} frames/s ({after_stable} frames after the group was stable), "
            f"GPU {gpu_text(row['gpu_steady'])}")
        # latency at ~50% of the measured throughput, same workers, live camera
        rate = plan.latency_load * (steady or drain or 0.0)
        count = max(plan.latency_min_frames, int(rate * plan.latency_s))
        if not complete or rate <= 0:
            report.skip(f"e2e N={workers} latency", "the drain did not complete" if not complete else "no rate")
        elif budget.left() < count / rate + 8:
            report.skip(f"e2e N={workers} latency", f"time budget ({budget.left():.0f} s left)")
        else:
            lat_start = time.time()
            sent = camera.stream(list(islice(cycle(encoded), count)), rate=rate)
            sent_ids = [s.frame_id for s in sent]
            published_at = time.time()
            lat_status = reader.wait(sent_ids, time.monotonic() + max(2.0, min(budget.left() - 2, 60.0)), alive,
                                     first_timeout_s=plan.stall_s, stall_s=plan.stall_s)
            lat = latencies_ms(reader, sent_ids)
            row.update({
                "latency_status": lat_status, "latency_load_fps": rate,
                "latency_published_fps": len(sent_ids) / max(1e-6, published_at - lat_start),
                "latency_frames": len(sent_ids), "latency_events": len(lat),
                "latency_ms_p50": float(np.percentile(lat, 50)) if lat else None,
                "latency_ms_p99": float(np.percentile(lat, 99)) if lat else None,
                "latency_ms_max": float(max(lat)) if lat else None,
                "gpu_latency": monitor.summary(lat_start, time.time()),
                "worker_stages_latency": stage_means(counters, scrape_all(ports)),
            })
            log(f"e2e N={workers}: latency at {rate:.1f} frames/s: p50 {fmt(row['latency_ms_p50'])} ms, "
                f"p99 {fmt(row['latency_ms_p99'])} ms ({len(lat)}/{len(sent_ids)} events)")
        row["window"] = {"started": started, "drained": drained_at, "first_event": first, "last_event": last,
                         "stable": stable}
    except Exception as exc:  # noqa: BLE001 - keep what this run measured; the next N still runs
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        report.error(f"e2e N={workers}", exc)
    finally:
        with shielded():
            if watcher is not None:
                watcher.stop()
            codes = stop_process_groups([p.process for p in procs if p.process is not None])
            reader.close()
            row["worker_exit_codes"] = codes
            row["worker_log_tails"] = {p.name: log_tail(p.log_path) for p in procs if p.log_path is not None
                                       and (any(c not in (0, None) for c in codes) or not row.get("complete")
                                            or row.get("error"))}
    with shielded(), contextlib.suppress(Exception):  # a consumer cut short would outlive the broker
        row["dead_letters"] = len(read_records(broker.bootstrap, f"bench.dlq.{tag}", 1, idle_s=0.5))
    return row, sent_ids


def e2e_section(plan: Plan, budget: Budget, monitor: GpuMonitor, report: Report) -> dict[str, Any]:
    device = resolve_device(plan.device)
    encoded, source = jpeg_frames(plan.distinct_frames, plan.frame_side, plan.jpeg_quality)
    section: dict[str, Any] = {"frames": source, "partitions": plan.partitions, "runs": [],
                               "weights": "random-init", "notes": (
                                   "one machine runs broker (tansu, memory storage), workers, publisher and "
                                   "event reader; prompts and normals topics off (HPAD_PROMPTS_TOPIC= and "
                                   "HPAD_NORMALS_TOPIC= empty); masks per the default policy (anomalous)")}
    report.payload["sections"]["e2e"] = section
    logs = Path(tempfile.mkdtemp(prefix="hpad-gpu-bench-"))
    broker = EmbeddedBroker(log_path=logs / "broker.log")
    producer: KafkaProducer | None = None
    try:
        broker.start()
        broker.create_topic(INPUT_TOPIC, plan.partitions)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=32 * MiB, linger_ms=5,
                                 batch_size=1 * MiB, partitioner=CameraPartitioner())
        camera = Camera(producer, INPUT_TOPIC, "bench", CATEGORY, cameras=plan.partitions)
        expected: list[str] = []
        per_worker_fps: float | None = None
        for position, workers in enumerate(plan.workers):
            runs_left = len(plan.workers) - position
            if budget.left() < 20:
                report.skip(f"e2e N={workers}", f"section budget spent ({budget.left():.0f} s left)")
                continue
            run_budget = budget.part(budget.left() / runs_left)
            target = plan.e2e_frames
            if per_worker_fps:  # enough backlog for about drain_target_s at the expected rate
                target = max(target, int(per_worker_fps * workers * plan.drain_target_s))
            extra = max(0, min(target, plan.e2e_max_frames) - len(expected))
            if extra:
                start = time.perf_counter()
                sent = camera.stream(list(islice(cycle(encoded), extra)))
                seconds = time.perf_counter() - start
                expected += [s.frame_id for s in sent]
                section.setdefault("published", []).append(
                    {"before_run": workers, "frames": extra, "seconds": round(seconds, 2),
                     "fps": round(extra / seconds, 1),
                     "per_partition": np.bincount([s.partition for s in sent],
                                                  minlength=plan.partitions).tolist()})
                log(f"e2e: published {extra} frames in {seconds:.1f} s (backlog {len(expected)})")
            log(f"e2e N={workers}: starting {workers} worker(s) ({run_budget.left():.0f} s budget)")
            row, new_ids = e2e_run(plan, broker, camera, encoded, expected, workers, run_budget, monitor,
                                   device, logs, report, section["runs"])
            if not row.get("complete") and not row.get("error"):
                report.error(f"e2e N={workers}", RuntimeError(
                    f"drain {row.get('drain_status')}: {row.get('events_out')}/{row.get('frames_in')} events"))
            expected += new_ids  # the next group drains these too
            fps = row.get("steady_fps") or row.get("drain_fps")
            if fps:
                per_worker_fps = fps / workers
            report.write()
    finally:
        with shielded():
            if producer is not None:
                producer.close(timeout=5)
            broker.stop()
            shutil.rmtree(logs, ignore_errors=True)
    return section


# ------------------------------------------------------------------------------------------------ 4. compile


def compile_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a child process: eager vs ``torch.compile``d ``encode_image`` on one batch (same process)."""
    plan = Plan(**spec["plan"])
    device = resolve_device(plan.device)
    backbone = load_backbone(WeightsSpec(model=plan.model, random_init=True), device=str(device),
                             precision=plan.compile_precision)
    height, width = backbone.image_size
    frames, _ = rgb_frames(plan.compile_batch, plan.frame_side)
    pixels = normalised_pixels(backbone, [cv2.resize(f, (width, height)) for f in frames])
    model = backbone.model
    compiled = torch.compile(model.encode_image, backend=plan.compile_backend)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(pixels)
    sync(device)
    compile_s = time.perf_counter() - start
    stats = time_variants({"eager": lambda: model.encode_image(pixels), "compiled": lambda: compiled(pixels)},
                          device, plan, Budget(60))
    eager, fast = stats["eager"]["median_s"], stats["compiled"]["median_s"]
    return {"model": plan.model, "precision": plan.compile_precision, "batch": plan.compile_batch,
            "backend": plan.compile_backend, "device": str(device), "compile_s": round(compile_s, 1),
            "eager_fps": plan.compile_batch / eager, "compiled_fps": plan.compile_batch / fast,
            "speedup": eager / fast, "seconds": {k: v["seconds"] for k, v in stats.items()}}


def compile_section(plan: Plan, budget: Budget, monitor: GpuMonitor, report: Report) -> dict[str, Any]:
    section: dict[str, Any] = {"optional": True, "what": "torch.compile(model.encode_image) vs eager, one batch, "
                               "in a child process killed at its budget"}
    report.payload["sections"]["compile"] = section
    if not hasattr(torch, "compile"):
        report.skip("compile", "torch.compile is not available")
        return section
    device = resolve_device(plan.device)
    if plan.compile_precision == "fp16" and device.type != "cuda":
        report.skip("compile", "fp16 is GPU-only")
        return section
    spec = json.dumps({"plan": asdict(plan)})
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--compile-child", spec],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    start = time.time()
    try:
        output, _ = process.communicate(timeout=max(5.0, budget.left()))
    except subprocess.TimeoutExpired:
        stop_process_groups([process], timeout_s=5)
        output = process.stdout.read() if process.stdout else ""
        report.skip("compile", f"did not finish within its budget ({time.time() - start:.0f} s)")
        section["log_tail"] = (output or "")[-1500:]
        return section
    finally:
        with shielded():
            stop_process_groups([process], timeout_s=2)
    section["gpu"] = monitor.summary(start, time.time())
    lines = [line for line in output.splitlines() if line.startswith("COMPILE_RESULT ")]
    if process.returncode != 0 or not lines:  # optional: a failure is reported, not counted as an error
        section["log_tail"] = output[-3000:]
        report.skip("compile", f"optional row failed (child exit {process.returncode}); see log_tail")
        return section
    section.update(json.loads(lines[-1].split(" ", 1)[1]))
    log(f"compile: {section['compiled_fps']:.1f} frames/s compiled vs {section['eager_fps']:.1f} eager "
        f"(x{section['speedup']:.2f}, compile {section['compile_s']} s)")
    return section


# ------------------------------------------------------------------------------------------------ markdown


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def gpu_text(summary: Any) -> str:
    if not isinstance(summary, dict):
        return str(summary) if summary else "-"
    gpus = [v for k, v in summary.items() if k.startswith("gpu") and isinstance(v, dict)]
    if gpus:
        first = gpus[0]
        return f"{first['util_mean']:.0f}% mean / {first['util_p50']:.0f}% p50, max {first['mem_max_mib']:.0f} MiB"
    return str(summary.get("status", "-"))


def busy_text(run: str, goal: dict[str, Any] | None) -> str:
    if goal is None:
        return f"{run}: not measured"
    return f"{run}: {'met' if goal['met'] else 'not met'} ({goal['util_mean']:.0f}% mean)"


def render_markdown(payload: dict[str, Any]) -> str:
    m = payload.get("machine", {})
    sections = payload.get("sections", {})
    gpu = m.get("gpu", {}).get("name") or m.get("cuda") or "no GPU"
    lines = [
        f"# hpad GPU benchmark{' (--quick, CPU smoke run)' if payload.get('quick') else ''}",
        "",
        f"RANDOM WEIGHTS (random-init; speed only, scores carry no meaning). {payload.get('date', '')[:19]}; "
        f"{gpu}; {m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores; torch {m.get('torch', '?')} "
        f"(CUDA {m.get('torch_cuda')}), open_clip {m.get('open_clip', '?')}, Python {m.get('python', '?')}; "
        f"wall {payload.get('wall_s', '?')} s{'' if payload.get('complete') else ' (partial)'}"
        f"{'; INTERRUPTED: ' + payload['interrupted'] if payload.get('interrupted') else ''}.",
    ]
    scorer = sections.get("scorer")
    if scorer and scorer.get("rows"):
        lines += ["", f"## 1. Scorer.score_batch vs encode_image: {scorer['model']} on {scorer['device']}, "
                  f"frames: {scorer['frames']}", "",
                  "| precision | batch | what | frames | frames/s | encode_image frames/s | ratio (time) | "
                  "peak alloc (MiB) |", "|---|---|---|---|---|---|---|---|"]
        for r in scorer["rows"]:
            what = "encode_image" if r["variant"] == "encode_image" else f"Scorer.score_batch, LAA {'on' if r['laa'] else 'off'}"
            speed = fmt(r["fps"]) if r.get("fps") is not None else f"error: {(r.get('error') or '?')[:80]}"
            lines.append(f"| {r['precision']} | {r['batch']} | {what} | {r['frames']} | {speed} | "
                         f"{fmt(r['encode_image_fps'])} | {fmt(r['ratio'], 2)} | {fmt(r['peak_mem_mib'])} |")
        goals = payload.get("goals", {}).get("scorer", {})
        lines += ["", f"Goals: ratio <= 1.10 on model-size frames: {goals.get('ratio_within_1.10_model_size_frames')} "
                  f"(worst {fmt(goals.get('worst_ratio_model_size_frames'), 2)}; 900x900 worst "
                  f"{fmt(goals.get('worst_ratio_900_frames'), 2)}); >= 5000 frames/s at batch >= 64 bf16: "
                  f"{goals.get('fps_5000_bf16_batch_ge_64_model_size')}."]
        lines += ["", "| precision | batch | GPU during the block |", "|---|---|---|",
                  *(f"| {b['precision']} | {b['batch']} | {gpu_text(b['gpu'])} |" for b in scorer["blocks"])]
    e2e = sections.get("e2e")
    if e2e and e2e.get("runs"):
        lines += ["", f"## 2. End-to-end through the broker ({e2e['partitions']} partitions), frames: {e2e['frames']}",
                  "", "| workers | batch | model | status | in | out | missing | dup | DLQ | drain (frames/s) | "
                  "steady (frames/s) | GPU steady | CPU busy steady | latency load (frames/s) | p50 (ms) | p99 (ms) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e["runs"]:
            cpu = r.get("cpu_steady") or {}
            lines.append(
                f"| {r['workers']} | {r['batch']} | {r['model']} {r['precision']} {r['device']} | "
                f"{'error' if r.get('error') else r.get('drain_status')} | {r.get('frames_in')} | {r.get('events_out')} | {r.get('missing')} | {r.get('duplicate_events')} | "
                f"{fmt(r.get('dead_letters'))} | {fmt(r.get('drain_fps'))} | {fmt(r.get('steady_fps'))} | "
                f"{gpu_text(r.get('gpu_steady'))} | {fmt(cpu.get('machine_busy'), 2)} | "
                f"{fmt(r.get('latency_load_fps'))} | {fmt(r.get('latency_ms_p50'), 0)} | "
                f"{fmt(r.get('latency_ms_p99'), 0)} |")
        lines += ["", "drain = backlog frames / (first -> last event); steady = events after the group was stable "
                  "/ (stable -> last event); latency = event read - captured_at at the given load."]
    windows = []
    for name in ("scorer", "e2e", "compile"):
        if isinstance(sections.get(name), dict) and "gpu" in sections[name]:
            windows.append((f"section {name} (whole)", sections[name]["gpu"]))
    for r in (e2e or {}).get("runs", []):
        for phase in ("startup", "drain", "steady", "latency"):
            if f"gpu_{phase}" in r:
                windows.append((f"e2e N={r['workers']} {phase}", r[f"gpu_{phase}"]))
    if windows:
        busy = payload.get("goals", {}).get("e2e_gpu_busy_80_steady", {})
        lines += ["", "## 3. GPU utilisation (nvidia-smi, 500 ms samples) and memory used", "",
                  "| window | utilisation mean / p50, max memory used |", "|---|---|",
                  *(f"| {what} | {gpu_text(summary)} |" for what, summary in windows),
                  "", "Goal GPU busy >= 80% end to end (steady drain): "
                  + (", ".join(busy_text(k, v) for k, v in busy.items()) or "not measured") + "."]
    comp = sections.get("compile")
    if comp and comp.get("compiled_fps"):
        lines += ["", f"## Optional: torch.compile ({comp['backend']}), {comp['model']} {comp['precision']} batch "
                  f"{comp['batch']} on {comp['device']}: {comp['compiled_fps']:.1f} frames/s vs eager "
                  f"{comp['eager_fps']:.1f} (x{comp['speedup']:.2f}; compile {comp['compile_s']} s)"]
    lines += ["", f"GPU monitor: {payload.get('gpu_monitor', '-')}"]
    if payload.get("gpu_monitor_selftest"):
        lines.append(f"GPU monitor self-test (stub nvidia-smi): ok={payload['gpu_monitor_selftest']['ok']}")
    if payload.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{s['what']} ({s['why']})" for s in payload["skipped"])]
    if payload.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{e['where']}: {e['error'][:200]}" for e in payload["errors"])]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def build_plan(ns: argparse.Namespace) -> Plan:
    plan = quick_plan(ns.device) if ns.quick else full_plan(ns.device)
    for name in ("deadline_s", "model", "precisions", "batches", "workers", "e2e_model", "e2e_precision", "e2e_frames",
                 "e2e_batch", "decode_threads", "torch_threads"):
        value = getattr(ns, name)
        if value is not None:
            setattr(plan, name, value)
    if ns.no_compile:
        plan.compile = False
    for item in ns.worker_env:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--worker-env takes SETTING=VALUE, got {item!r}")
        plan.worker_env[f"HPAD_{key.strip().upper()}"] = value
    return plan


def run_section(name: str, fn: Callable[..., dict[str, Any]], plan: Plan, budget: Budget, monitor: GpuMonitor,
                report: Report) -> None:
    start = time.time()
    log(f"section {name}: {budget.left():.0f} s budget")
    try:
        section = fn(plan, budget, monitor, report)
    except Exception as exc:  # noqa: BLE001 - later sections still run; the error is in the JSON
        report.error(f"section {name}", exc)
        section = report.payload["sections"].setdefault(name, {})
    end = time.time()
    section.update(started=start, ended=end, seconds=round(end - start, 1), gpu=monitor.summary(start, end))
    report.write()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json", help="JSON path (markdown next to it)")
    parser.add_argument("--quick", action="store_true", help="small CPU smoke run of every code path (~2 min)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cpu")
    parser.add_argument("--deadline", dest="deadline_s", type=float, help="global time budget in seconds")
    parser.add_argument("--model", help="scorer-section model (default ViT-B-16-plus-240; --quick hpad-tiny)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--e2e-model", help="end-to-end model (default ViT-B-16-plus-240; --quick hpad-tiny)")
    parser.add_argument("--e2e-precision", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--workers", type=int, nargs="+")
    parser.add_argument("--e2e-frames", type=int, help="backlog frames before the first end-to-end run")
    parser.add_argument("--e2e-batch", type=int)
    parser.add_argument("--decode-threads", type=int, help="per worker (default: cores / N)")
    parser.add_argument("--torch-threads", type=int, help="per worker (default: cores / N, halved on CUDA)")
    parser.add_argument("--worker-env", nargs="*", default=[], metavar="SETTING=VALUE",
                        help="extra worker settings, e.g. gpu_decode=true (becomes HPAD_GPU_DECODE=true)")
    parser.add_argument("--no-compile", action="store_true", help="skip the optional torch.compile row")
    parser.add_argument("--compile-child", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.compile_child:
        print("COMPILE_RESULT " + json.dumps(compile_child(json.loads(ns.compile_child))), flush=True)
        return 0
    install_sigterm()
    plan = build_plan(ns)
    if not plan.quick and resolve_device(plan.device).type != "cuda":
        print("warning: no CUDA device; the full plan on a CPU will mostly be skipped by its budgets "
              "(use --quick here)", flush=True)
    clock = Budget(plan.deadline_s)
    monitor = GpuMonitor()
    report = Report(ns.out, plan, refresh=monitor.refresh)
    log(f"hpad GPU benchmark{' --quick' if plan.quick else ''}: deadline {plan.deadline_s:.0f} s, "
        f"out {ns.out} (RANDOM WEIGHTS)")
    report.payload["machine"] = facts()
    interrupted = False
    try:
        monitor.start()
        report.payload["gpu_monitor"] = monitor.status
        if not monitor.available and plan.quick:
            report.payload["gpu_monitor_selftest"] = monitor_selftest()
        run_section("scorer", scorer_section, plan, clock.part(plan.scorer_budget_s), monitor, report)
        if clock.left() > 30:
            run_section("e2e", e2e_section, plan, clock.part(plan.e2e_budget_s), monitor, report)
        else:
            report.skip("e2e", f"global deadline ({clock.left():.0f} s left)")
        if not plan.compile:
            report.skip("compile", "--no-compile")
        elif clock.left() < plan.compile_min_s:
            report.skip("compile", f"optional; only {clock.left():.0f} s left (needs {plan.compile_min_s:.0f})")
        else:
            run_section("compile", compile_section, plan, clock.part(plan.compile_budget_s), monitor, report)
    except BaseException as exc:  # SIGTERM (SystemExit) or Ctrl-C: keep what was measured, say so
        interrupted = True
        report.payload["interrupted"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        with shielded():
            monitor.stop()
            report.payload["gpu_samples"] = len(monitor.samples)
            report.write(final=not interrupted)
    print(render_markdown(report.payload))
    print(f"\nwrote {report.out} and {report.md} in {report.payload['wall_s']} s", flush=True)
    return 1 if report.payload["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
