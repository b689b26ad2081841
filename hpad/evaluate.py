"""Evaluation harness: score an MVTec-layout category and measure it the way the field does.

`run_evaluation` scores every test image (batched), then computes image AUROC, pixel AUROC, AUPRO (FPR up
to 0.3) and F1-max (image and pixel), overall and per defect type (that type's images against all good
ones, as the MVTec AD protocol does). `write_report` writes ``metrics.json``, ``metrics.md`` and overlay PNGs
(image | ground truth | predicted map) of the worst-scored images. Every output names the model and weights;
random weights are labelled as such.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from hpad.data import CategoryData, Sample, read_image, read_mask
from hpad.metrics import EvalMetrics, compute_all
from hpad.prompts import PromptSet
from hpad.scorer import Scorer

METRIC_KEYS = ("image_AUROC", "pixel_AUROC", "AUPRO", "image_F1Max", "pixel_F1Max")


@dataclass
class EvalReport:
    category: str
    metrics: EvalMetrics
    per_defect: dict[str, EvalMetrics]
    samples: list[Sample]
    scores: np.ndarray
    maps: list[np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "metrics": self.metrics.to_json(),
            "per_defect_type": {name: metrics.to_json() for name, metrics in self.per_defect.items()},
            **self.info,
            "images": [
                {"path": str(s.path), "defect_type": s.defect_type, "label": s.label, "pred_score": float(v)}
                for s, v in zip(self.samples, self.scores, strict=True)
            ],
        }


def _masks_for(samples: Sequence[Sample], maps: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [read_mask(s.mask_path, m.shape) for s, m in zip(samples, maps, strict=True)]


def metric_table(samples: Sequence[Sample], scores: np.ndarray, maps: Sequence[np.ndarray],
                 masks: Sequence[np.ndarray]) -> tuple[EvalMetrics, dict[str, EvalMetrics]]:
    labels = np.array([s.label for s in samples])
    overall = EvalMetrics(**compute_all(labels, scores, masks, maps))
    per_defect: dict[str, EvalMetrics] = {}
    good = [i for i, s in enumerate(samples) if s.label == 0]
    for defect in sorted({s.defect_type for s in samples if s.label == 1}):
        idx = good + [i for i, s in enumerate(samples) if s.defect_type == defect]
        per_defect[defect] = EvalMetrics(**compute_all(
            labels[idx], scores[idx], [masks[i] for i in idx], [maps[i] for i in idx]
        ))
    return overall, per_defect


def run_evaluation(
    scorer: Scorer,
    data: CategoryData,
    prompts: PromptSet,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Score every test image of ``data`` with ``prompts`` and compute the metrics."""
    samples = list(data.test)
    scores: list[float] = []
    maps: list[np.ndarray] = []
    infer_seconds = 0.0
    started = time.monotonic()
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        frames = [read_image(s.path) for s in batch]
        tick = time.monotonic()
        result = scorer.score(frames, prompts)
        infer_seconds += time.monotonic() - tick
        scores.extend(float(v) for v in result.pred_score)
        maps.extend(result.anomaly_map)
        if progress is not None:
            progress(len(batch))
    score_array = np.asarray(scores, dtype=np.float64)
    masks = _masks_for(samples, maps)
    metric_start = time.monotonic()
    overall, per_defect = metric_table(samples, score_array, maps, masks)
    backbone = scorer.backbone
    info = {
        "model": backbone.model_name,
        "weights": backbone.weights_id,
        "random_weights": backbone.random_weights,
        "weights_label": backbone.weights_label,
        "prompts": prompts.label(),
        "prompt_source": prompts.source,
        "few_shot_memory": prompts.memory is not None,
        "laa": scorer.config.laa.describe(),
        "method": scorer.method_record(),
        "device": str(backbone.device),
        "precision": str(backbone.dtype).replace("torch.", ""),
        "n_test_images": len(samples),
        "timings_seconds": {
            "total": time.monotonic() - started,
            "inference": infer_seconds,
            "inference_per_image": infer_seconds / max(1, len(samples)),
            "metrics": time.monotonic() - metric_start,
        },
    }
    return EvalReport(data.name, overall, per_defect, samples, score_array, maps, info)


def markdown_table(report: EvalReport) -> str:
    header = "| defect type | " + " | ".join(METRIC_KEYS) + " |"
    rule = "|---|" + "---|" * len(METRIC_KEYS)

    def row(name: str, metrics: EvalMetrics) -> str:
        values = metrics.to_json()
        cells = [f"{values[k]:.4f}" if k in values else "-" for k in METRIC_KEYS]
        return f"| {name} | " + " | ".join(cells) + " |"

    lines = [
        f"# {report.category}: {report.info.get('model')} / {report.info.get('weights_label')}",
        "",
        f"prompts: {report.info.get('prompts')}; LAA {report.info.get('laa')}; "
        f"few-shot memory: {report.info.get('few_shot_memory')}",
        "",
        header,
        rule,
        row("**all**", report.metrics),
        *(row(name, values) for name, values in report.per_defect.items()),
    ]
    if report.info.get("random_weights"):
        lines += ["", "**Random weights**: these numbers show that the pipeline runs; they say nothing about "
                      "detection quality."]
    return "\n".join(lines) + "\n"


def overlay(image: np.ndarray, mask: np.ndarray, amap: np.ndarray, height: int = 256) -> np.ndarray:
    """image | ground truth | predicted map (jet colour map blended on the image), one row, BGR uint8."""
    rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    bgr = cv2.cvtColor(rgb[:, :, :3], cv2.COLOR_RGB2BGR)
    gt = np.repeat((mask.astype(np.uint8) * 255)[:, :, None], 3, axis=2)
    heat = cv2.applyColorMap((np.clip(amap, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blend = cv2.addWeighted(bgr, 0.5, heat, 0.5, 0)
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    return np.hstack([cv2.resize(p, (width, height), interpolation=cv2.INTER_AREA) for p in (bgr, gt, blend)])


def worst_indices(samples: Sequence[Sample], scores: np.ndarray, count: int) -> list[int]:
    """The highest-scored normals and the lowest-scored anomalies, alternating, ``count`` in all."""
    normals = sorted((i for i, s in enumerate(samples) if s.label == 0), key=lambda i: -scores[i])
    anomalies = sorted((i for i, s in enumerate(samples) if s.label == 1), key=lambda i: scores[i])
    picked: list[int] = []
    for pair in zip(normals + [None] * len(anomalies), anomalies + [None] * len(normals), strict=False):
        picked += [i for i in pair if i is not None]
    return picked[:count]


def write_report(report: EvalReport, out_dir: Path, n_overlays: int = 8) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "metrics.json", "markdown": out_dir / "metrics.md"}
    paths["json"].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(report))
    overlay_dir = out_dir / "overlays"
    overlay_dir.mkdir(exist_ok=True)
    for rank, i in enumerate(worst_indices(report.samples, report.scores, n_overlays)):
        sample = report.samples[i]
        image = read_image(sample.path)
        mask = read_mask(sample.mask_path, image.shape[:2])
        name = f"{rank:02d}_{sample.defect_type}_{sample.path.stem}_score{report.scores[i]:.3f}.png"
        cv2.imwrite(str(overlay_dir / name), overlay(image, mask, report.maps[i]))
    paths["overlays"] = overlay_dir
    return paths
