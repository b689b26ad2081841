"""Benchmark prompt learning: the per-step text-tower cost (what MPTS pays every step), `hpad train` wall time
and peak RSS for k = 1, 2, 4, and the `hpad eval` table with trained vs zero-shot prompts.

Usage: python benchmarks/train.py [--model ViT-B-16-plus-240] [--precision bf16] [--shots 1 2 4]
       [--categories mvtec/bottle magnetic_tile] [--skip-eval]
Random weights only (pretrained CLIP cannot be downloaded here): every number is labelled so. The quality
numbers show the pipeline runs end to end; they say nothing about what hpad achieves with real weights.
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

import torch

from benchmarks.common import SHARED_DATA, machine, median, write_results
from hpad.backbone import WeightsSpec, load_backbone
from hpad.mpts import TrainConfig, guidance_loss, project_conflicting, task_loss
from hpad.prompts import PromptLearner

RUNNER = (
    "import resource, sys, time, json\n"
    "from hpad.cli import main\n"
    "t = time.monotonic(); rc = main(sys.argv[1:])\n"
    "print(json.dumps({'rc': rc, 'wall': time.monotonic() - t,\n"
    "  'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), file=sys.stderr)\n"
)


def step_cost(model: str, precision: str, repeats: int) -> dict[str, float]:
    """Seconds per MPTS step (text forward + task and guidance gradients) with and without EOT truncation."""
    from hpad.attention import ImageTokens
    from hpad.mpts import Pool

    backbone = load_backbone(WeightsSpec(model=model, random_init=True), device="cpu", precision=precision)
    dim, grid, size = backbone.embed_dim, backbone.grid_size, backbone.image_size
    g = torch.Generator().manual_seed(0)
    batch = TrainConfig().batch_size
    pool = Pool(ImageTokens(torch.randn(batch, dim, generator=g), torch.randn(batch, grid[0] * grid[1], dim, generator=g)),
                torch.randint(0, 2, (batch,), generator=g), (torch.rand(batch, *size, generator=g) > 0.9).float(),
                ["x"] * batch)
    meta = torch.nn.functional.normalize(torch.randn(2, dim, generator=g), dim=-1)
    out: dict[str, float] = {}
    for truncate in (True, False):
        learner = PromptLearner(backbone.model, backbone.tokenizer, 8, "bottle", generator=g, truncate=truncate)
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            text = learner()
            loss, _ = task_loss(pool, text, 100.0, grid, size, 1.0, 2.0)
            guide = guidance_loss(pool, text, meta, 100.0)
            g_task, = torch.autograd.grad(loss, learner.ctx, retain_graph=True)
            g_meta, = torch.autograd.grad(guide, learner.ctx)
            project_conflicting(g_task, g_meta)
            if i:  # first step is warm-up
                times.append(time.perf_counter() - start)
        out["truncated" if truncate else "full_77_tokens"] = median(times)
        out[f"tokens_{'truncated' if truncate else 'full'}"] = int(learner.tokens.shape[1])
    out["speedup"] = out["full_77_tokens"] / out["truncated"]
    return out


def run_cli(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, check=False)
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    if stats["rc"] != 0:
        raise RuntimeError(f"hpad {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    stats["stdout"] = proc.stdout
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-16-plus-240")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--categories", nargs="+", default=["mvtec/bottle", "magnetic_tile"])
    parser.add_argument("--train-category", default="mvtec/bottle")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-eval", action="store_true")
    ns = parser.parse_args()
    if not SHARED_DATA.is_dir():
        print(f"{SHARED_DATA} is absent: this benchmark needs the shared MVTec-layout data", file=sys.stderr)
        return 1
    model_args = ["--model", ns.model, "--random-init", "--precision", ns.precision, "--device", "cpu"]
    steps = step_cost(ns.model, ns.precision, ns.repeats)
    print(f"MPTS step: {steps['truncated']:.3f} s truncated ({steps['tokens_truncated']} tokens) vs "
          f"{steps['full_77_tokens']:.3f} s full ({steps['tokens_full']}): {steps['speedup']:.1f}x", flush=True)
    work = Path(tempfile.mkdtemp(prefix="hpad-bench-train-"))
    train_rows, artifacts = [], {}
    for category in dict.fromkeys([ns.train_category, *ns.categories]):
        root, name = (SHARED_DATA / category).parent, Path(category).name
        for k in ns.shots if category == ns.train_category else [max(ns.shots)]:
            out = work / f"{name}-k{k}.safetensors"
            stats = run_cli(["train", "--data", str(root), "--category", name, "--shots", str(k), "--seed", "0",
                             "--out", str(out), *model_args])
            summary = json.loads(stats["stdout"])
            row = {"category": name, "k": k, "wall_seconds": stats["wall"], "peak_rss_mib": stats["peak_rss_mib"],
                   "epochs_run": summary["epochs_run"], "train_loop_seconds": summary["train_seconds"],
                   "val_image_auroc_before": summary["val_before"]["image_AUROC"],
                   "val_image_auroc_after": summary["val_after"]["image_AUROC"]}
            train_rows.append(row)
            artifacts[(name, k)] = out
            print(f"train {name} k={k}: {stats['wall']:.1f} s wall, {stats['peak_rss_mib']:.0f} MiB peak", flush=True)
    eval_rows = []
    if not ns.skip_eval:
        for category in ns.categories:
            root, name = (SHARED_DATA / category).parent, Path(category).name
            k = max(ns.shots)
            for label, extra in (("zero-shot", ["--shots", "0"]), (f"zero-shot + {k}-shot memory", ["--shots", str(k)]),
                                 (f"trained k={k}", ["--prompts", str(artifacts[(name, k)])])):
                out = work / f"eval-{name}-{label.replace(' ', '_').replace('=', '')}"
                stats = run_cli(["eval", "--data", str(root), "--category", name, *extra, "--out", str(out),
                                 "--overlays", "0", *model_args])
                metrics = json.loads((out / "metrics.json").read_text())
                eval_rows.append({"category": name, "prompts": label, **metrics["metrics"],
                                  "wall_seconds": stats["wall"], "n_test_images": metrics["n_test_images"]})
                print(f"eval {name} {label}: {metrics['metrics']}", flush=True)
    info = machine()
    payload = {"benchmark": "train", "machine": info, "settings": vars(ns), "random_weights": True,
               "mpts_step_seconds": steps, "train": train_rows, "eval": eval_rows}
    keys = ("image_AUROC", "pixel_AUROC", "AUPRO", "image_F1Max", "pixel_F1Max")
    lines = [
        f"Prompt learning, {ns.model} **random weights**, {ns.precision}, {info['cpu']}, "
        f"{info['torch_threads']} threads, {info['date'][:10]}",
        "",
        f"MPTS step (text tower fwd + task and guidance gradients, batch {TrainConfig().batch_size}): "
        f"{steps['truncated'] * 1000:.0f} ms with EOT truncation ({steps['tokens_truncated']} tokens) vs "
        f"{steps['full_77_tokens'] * 1000:.0f} ms over all {steps['tokens_full']} tokens: "
        f"{steps['speedup']:.1f}x faster",
        "",
        "| category | k | `hpad train` wall (s) | peak RSS (MiB) | epochs | val image AUROC before -> after |",
        "|---|---|---|---|---|---|",
        *(f"| {r['category']} | {r['k']} | {r['wall_seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['epochs_run']:.0f} | "
          f"{r['val_image_auroc_before']:.3f} -> {r['val_image_auroc_after']:.3f} |" for r in train_rows),
    ]
    if eval_rows:
        lines += ["", "| category | prompts | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys),
                  *(f"| {r['category']} | {r['prompts']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |"
                    for r in eval_rows),
                  "", "Random weights: these quality numbers only show the pipeline runs end to end."]
    write_results("train", payload, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
