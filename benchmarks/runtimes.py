"""Benchmark the image-encoder runtimes: torch eager fp32 / bf16, ONNX Runtime fp32 / int8, OpenVINO fp32 /
bf16 / int8, on the image tower with LAA (what `hpad.runtime` runs), one batch of normalised pixels.

Usage: python benchmarks/runtimes.py [--model ViT-B-16-plus-240] [--batch 8] [--repeats 2] [--rounds 5] [--threads 2]
       [--export-dir DIR (reuse exports made by an earlier run)]

Every runtime is measured in its own subprocess (so each peak RSS is that runtime's own): import, load,
one warm-up batch, then ``--repeats`` timed batches; ``--rounds`` rounds go round-robin over the runtimes
(the machine is shared: load from other work then hits every runtime alike) and the median and the best of
all timed batches are reported, with the median CPU time (user + system, all threads) per batch.
Memory: ``peak RSS encoder`` is that process's peak holding only what the runtime needs to encode (torch:
the open_clip model as hpad loads it, image and text towers; exported runtimes: the exported tower, with torch
imported). ``serving`` is measured once more per runtime in a process built as a `hpad serve` scorer is
(`consumers.models.build_scorer`): for exported runtimes the fp32 torch model (text tower, export check), the
torch image tower released once the export matched (`hpad.runtime.release_torch_tower`), then the runtime;
its peak RSS and the resident memory after one batch.
Random weights (pretrained ones cannot be downloaded here): speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import current_rss_mib, machine, median, peak_rss_mib, write_results

CONFIGS = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
           ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")]
FORMAT_OF = {"onnxruntime": "onnx", "openvino": "openvino"}


def child(ns: argparse.Namespace) -> int:
    """One runtime in this process: prints one JSON line."""
    import numpy as np
    import torch

    torch.set_num_threads(ns.threads)
    start = time.perf_counter()
    if ns.kind == "torch":
        from hpad.attention import EncoderSpec, LAAConfig
        from hpad.backbone import WeightsSpec, load_backbone
        from hpad.runtime import TorchEncoder

        backbone = load_backbone(WeightsSpec(model=ns.model, random_init=True), device="cpu", precision=ns.precision)
        runtime = TorchEncoder(EncoderSpec.for_visual(backbone.model.visual, LAAConfig()).build(backbone.model.visual))
        size, dtype = backbone.image_size, backbone.dtype
    else:
        from hpad.export import read_manifest
        from hpad.runtime import RuntimeSpec, load_exported

        folder = Path(ns.model_dir)
        manifest = read_manifest(folder, FORMAT_OF[ns.kind])
        runtime = load_exported(RuntimeSpec(ns.kind, folder, ns.precision, ns.threads), manifest, folder)
        size, dtype = tuple(manifest.input_size), torch.float32
    load_s = time.perf_counter() - start
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((ns.batch, 3, *size), dtype=np.float32))
    pixels = pixels.to(dtype)
    times, cpu_times = [], []
    with torch.inference_mode():
        runtime(pixels)  # warm-up
        for _ in range(ns.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            runtime(pixels)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    print(json.dumps({"runtime": ns.kind, "precision": ns.precision, "batch": ns.batch, "threads": ns.threads,
                      "seconds": times, "cpu_seconds": cpu_times, "load_s": load_s,
                      "peak_rss_encoder_mib": peak_rss_mib()}), flush=True)
    return 0


def serve_child(ns: argparse.Namespace) -> int:
    """Memory of a `hpad serve` scorer on this runtime, built in the worker's order (`consumers.models`): the
    torch model (fp32 for exported runtimes), the runtime checked against it, the torch image tower released;
    then one batch. Prints one JSON line with the peak and the resident memory after the batch."""
    import numpy as np
    import torch

    from hpad.attention import EncoderSpec, LAAConfig
    from hpad.backbone import WeightsSpec, load_backbone
    from hpad.runtime import RuntimeSpec, load_runtime

    torch.set_num_threads(ns.threads)
    exported = ns.kind != "torch"
    backbone = load_backbone(WeightsSpec(model=ns.model, random_init=True), device="cpu",
                             precision="fp32" if exported else ns.precision)
    folder = Path(ns.model_dir) if exported else None
    runtime = load_runtime(RuntimeSpec(ns.kind, folder, ns.precision if exported else "fp32", ns.threads),
                           backbone, EncoderSpec.for_visual(backbone.model.visual, LAAConfig()), release_tower=exported)
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((ns.batch, 3, *backbone.image_size),
                                                                       dtype=np.float32)).to(backbone.dtype)
    with torch.inference_mode():
        runtime(pixels)
    print(json.dumps({"peak_rss_serve_mib": peak_rss_mib(), "rss_serve_mib": current_rss_mib()}), flush=True)
    return 0


def run_child(ns: argparse.Namespace, root: Path, kind: str, precision: str, mode: str = "--child") -> dict:
    cmd = [sys.executable, __file__, mode, kind, precision, "--model", ns.model, "--batch", str(ns.batch),
           "--repeats", str(ns.repeats), "--threads", str(ns.threads)]
    if kind != "torch":
        cmd += ["--model-dir", str(root / FORMAT_OF[kind])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{kind} {precision}: failed\n{done.stderr[-2000:]}", flush=True)
        return {"error": done.stderr[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(kind: str, precision: str, runs: list[dict], batch: int, error: str | None) -> dict:
    """Median and best batch time over every timed batch of every round; the largest peak RSS of the rounds."""
    if not runs:
        return {"runtime": kind, "precision": precision, "error": error or "no run"}
    seconds = [t for run in runs for t in run["seconds"]]
    cpu = [t for run in runs for t in run["cpu_seconds"]]
    return {
        "runtime": kind, "precision": precision, "batch": batch, "rounds": len(runs), "seconds": seconds,
        "ms_per_batch": 1000 * median(seconds), "ms_per_batch_best": 1000 * min(seconds),
        "frames_per_s": batch / median(seconds), "cpu_ms_per_batch": 1000 * median(cpu),
        "peak_rss_encoder_mib": max(run["peak_rss_encoder_mib"] for run in runs),
        "load_s": median([run["load_s"] for run in runs]),
    }


def export_all(model: str, out: Path) -> dict[str, dict]:
    """fp32 + int8 exports of ``model`` (random weights) for ONNX and OpenVINO, in a subprocess each."""
    made = {}
    for fmt in ("onnx", "openvino"):
        folder = out / fmt
        if not (folder / "hpad-encoder.json").is_file():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "hpad.cli", "export", "--format", fmt, "--out", str(folder),
                            "--model", model, "--random-init", "--device", "cpu", "--int8"], check=True)
            print(f"exported {fmt} in {time.perf_counter() - t0:.0f} s", flush=True)
        made[fmt] = json.loads((folder / "hpad-encoder.json").read_text())
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16-plus-240")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds over the runtimes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--export-dir", type=Path, help="reuse (or keep) the exports here")
    parser.add_argument("--only", nargs="*", help="runtime:precision pairs to run (default: all)")
    parser.add_argument("--name", default="runtimes")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-child", nargs=2, metavar=("KIND", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child or ns.serve_child:
        ns.kind, ns.precision = ns.child or ns.serve_child
        return child(ns) if ns.child else serve_child(ns)

    with tempfile.TemporaryDirectory(prefix="hpad-runtimes-") as tmp:
        root = ns.export_dir or Path(tmp)
        manifests = export_all(ns.model, root)
        configs = [c for c in CONFIGS if not ns.only or f"{c[0]}:{c[1]}" in ns.only]
        runs: dict[tuple[str, str], list[dict]] = {c: [] for c in configs}
        errors: dict[tuple[str, str], str] = {}
        for round_index in range(ns.rounds):  # round-robin, so load from other work hits every runtime alike
            for kind, precision in configs:
                row = run_child(ns, root, kind, precision)
                if "error" in row:
                    errors[(kind, precision)] = row["error"]
                    continue
                runs[(kind, precision)].append(row)
                print(f"round {round_index + 1}: {kind} {precision}: {1000 * median(row['seconds']):.0f} ms/batch, "
                      f"peak RSS {row['peak_rss_encoder_mib']:.0f} MiB", flush=True)
        serving = {}
        for kind, precision in configs:  # memory only: once per runtime
            serving[(kind, precision)] = run_child(ns, root, kind, precision, "--serve-child")
            print(f"serving {kind} {precision}: {serving[(kind, precision)]}", flush=True)
        rows = [{**summarise(kind, precision, runs[(kind, precision)], ns.batch, errors.get((kind, precision))),
                 **{k: v for k, v in serving[(kind, precision)].items() if k != "error"}}
                for kind, precision in configs]
    info = machine()
    base = next((r for r in rows if r["runtime"] == "torch" and r["precision"] == "bf16" and "error" not in r), None)
    for row in rows:
        if base and "error" not in row:
            row["speedup_vs_torch_bf16"] = base["ms_per_batch"] / row["ms_per_batch"]
            row["speedup_vs_torch_bf16_best"] = base["ms_per_batch_best"] / row["ms_per_batch_best"]
    payload = {"benchmark": "runtimes", "machine": info, "settings": {k: str(v) for k, v in vars(ns).items()},
               "results": rows, "parity_at_export": {k: m.get("parity") for k, m in manifests.items()},
               "random_weights": True}
    lines = [
        f"Image tower with LAA, {ns.model} (random weights), batch {ns.batch}, {ns.threads} threads, median of "
        f"{ns.repeats} batches x {ns.rounds} rounds (round-robin); {info['cpu']}, {info['cpu_count']} cores shared "
        f"with parallel work, torch {info['torch']}, {info['date'][:10]}",
        "",
        "| runtime | precision | ms/batch (median) | ms/batch (best) | frames/s | vs torch bf16 (median / best) | "
        "CPU ms/batch (median) | peak RSS encoder (MiB) | peak RSS serving (MiB) | RSS serving (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['runtime']} | {r['precision']} | failed | | | | | | | |")
            continue
        lines.append(f"| {r['runtime']} | {r['precision']} | {r['ms_per_batch']:.0f} | {r['ms_per_batch_best']:.0f} | "
                     f"{r['frames_per_s']:.2f} | "
                     f"{r.get('speedup_vs_torch_bf16', float('nan')):.2f}x / "
                     f"{r.get('speedup_vs_torch_bf16_best', float('nan')):.2f}x | {r['cpu_ms_per_batch']:.0f} | "
                     f"{r['peak_rss_encoder_mib']:.0f} | {r.get('peak_rss_serve_mib', float('nan')):.0f} | "
                     f"{r.get('rss_serve_mib', float('nan')):.0f} |")
    write_results(ns.name, payload, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
