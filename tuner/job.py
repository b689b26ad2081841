"""One tuning run for one category: split fresh normals, re-run OAGM + MPTS warm-started from the current
prompts, and decide through the validation gate whether the candidate may be published.

Splits (disjoint, newest frames favoured for training):

* ``train`` - the newest ``shots`` normals (verified ones first): the k shots of the method and the few-shot
  memory.
* ``early-stop`` - normals MPTS validates on for early stopping and threshold calibration.
* ``gate`` - normals never seen by training, plus fresh OAGM anomalies from a seed training never uses,
  synthesised on those gate normals (never on the shots: the shots are the few-shot memory, and an anomaly
  made on a memory image matches it exactly everywhere but the defect), plus any labelled anomalies
  operators provide. Both the current prompts and the candidate are scored on this
  pool exactly as the service scores (few-shot memory included).
* ``defects`` - frames operators confirmed as real defects (``hpad console`` feedback, `tuner.feedback`):
  scored beside the gate's anomalies at image level (they carry no pixel mask, so pixel AUROC stays on the
  OAGM and labelled masks), and they may lower the candidate's threshold by at most
  ``max_threshold_drop`` so that they are caught (`hpad.calibration.lower_threshold_for_defects`).

With the scorers' tiling policy (``TuneConfig.tiling``, the same HPAD_TILING settings), high-resolution normals
are cut into the tiles the scorers score (`hpad.tiled_scoring.training_views`) for training, memory and the
gate, and the image threshold is calibrated on frame-level (max over tiles) scores (`hpad.training.train`).

The gate (`gate`) publishes only when every number is finite and the candidate's gate score (mean of image
and pixel AUROC, or image AUROC alone when no pixel labels exist) is not worse than the current version's
by more than ``margin``. Both scores are recorded either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from hpad.artifact import PromptArtifact
from hpad.calibration import lower_threshold_for_defects
from hpad.errors import ConfigError
from hpad.metrics import PoolMetrics, image_auroc, pixel_auroc
from hpad.mpts import (
    Pool,
    TrainConfig,
    TrainResult,
    build_pool,
    concat_pools,
    evaluate_as_served,
    mask_to_model,
    pool_on_device,
    score_pool,
)
from hpad.oagm import object_masks
from hpad.prompts import PromptSet
from hpad.scorer import Scorer
from hpad.tiled_scoring import training_views
from hpad.tiling import TilingPolicy
from hpad.training import build_artifact, train


@dataclass(frozen=True)
class TuneConfig:
    shots: int = 4
    min_normals: int = 8
    gate_normals: int = 16
    gate_anomalies: int = 32
    margin: float = 0.02
    train: TrainConfig = field(default_factory=TrainConfig)
    max_threshold_drop: float = 0.05  # confirmed defects lower the threshold by at most this
    tiling: TilingPolicy | None = None  # the scorers' policy: large normals are cut into their tiles

    def __post_init__(self) -> None:
        if self.shots < 1 or self.gate_normals < 1 or self.gate_anomalies < 1:
            raise ConfigError("tuning needs shots, gate_normals and gate_anomalies >= 1")
        if self.min_normals < self.shots + 2:
            raise ConfigError(f"min_normals ({self.min_normals}) must leave held-out normals beyond shots ({self.shots})")
        if not 0 <= self.margin < 1:
            raise ConfigError(f"gate margin must be in [0, 1), got {self.margin}")


@dataclass(frozen=True)
class GateDecision:
    publish: bool
    reason: str
    current: PoolMetrics
    candidate: PoolMetrics

    def to_json(self) -> dict[str, object]:
        return {"current": self.current.to_json(), "candidate": self.candidate.to_json(), "reason": self.reason}


@dataclass
class TuneOutcome:
    result: TrainResult
    decision: GateDecision
    splits: dict[str, int]
    feedback: dict[str, object] = field(default_factory=dict)


def gate_score(metrics: PoolMetrics) -> float:
    values = [metrics.image_AUROC] + ([metrics.pixel_AUROC] if metrics.pixel_AUROC is not None else [])
    return float(np.mean(values))


def gate(current: PoolMetrics, candidate: PoolMetrics, margin: float) -> GateDecision:
    """Publish iff the candidate is finite and not worse than the current version by more than ``margin``."""
    if not all(math.isfinite(v) for v in candidate.to_json().values()):
        return GateDecision(False, "candidate metrics are not finite", current, candidate)
    cand, cur = gate_score(candidate), gate_score(current)
    if not math.isfinite(cur):
        return GateDecision(True, "current version has no finite score; candidate accepted", current, candidate)
    if cand + margin < cur:
        return GateDecision(False, f"candidate {cand:.4f} is worse than current {cur:.4f} by more than {margin}",
                            current, candidate)
    return GateDecision(True, f"candidate {cand:.4f} vs current {cur:.4f} (margin {margin})", current, candidate)


def split_normals(n: int, shots: int, gate_normals: int) -> dict[str, list[int]]:
    """Indices into newest-first normals: train = first ``shots``; then the gate and early-stop sets alternate
    so both see the whole time range; the gate gets at most ``gate_normals``."""
    if n < shots + 2:
        raise ConfigError(f"need at least {shots + 2} normals to tune (have {n})")
    rest = list(range(shots, n))
    gate_idx = rest[0::2][:gate_normals]
    early = [i for i in rest if i not in set(gate_idx)]
    return {"train": list(range(shots)), "gate": gate_idx, "early_stop": early}


def _with_labelled(pool: Pool, labelled: Pool | None) -> Pool:
    if labelled is None or len(labelled) == 0:
        return pool
    return concat_pools([pool, labelled])


def encode_labelled(scorer: Scorer, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> Pool:
    """Operator-labelled anomalies (with pixel masks) as a pool for the gate."""
    size = scorer.backbone.image_size
    resized = [mask_to_model(m.astype(bool), size) for m in masks]
    return pool_on_device(scorer, images, torch.ones(len(images), dtype=torch.long), torch.stack(resized),
                          ["labelled"] * len(images))


def tune_category(
    scorer: Scorer,
    category: str,
    normals: Sequence[np.ndarray],
    current: PromptSet,
    config: TuneConfig,
    current_artifact: PromptArtifact | None = None,
    labelled: Pool | None = None,
    seed: int = 0,
    defects: Sequence[np.ndarray] = (),
) -> TuneOutcome:
    """Train a candidate from ``normals`` (newest first) and judge it against ``current`` on the gate pool
    (plus operator-confirmed ``defects``, image level)."""
    splits = split_normals(len(normals), config.shots, config.gate_normals)
    train_frames = [normals[i] for i in splits["train"]]
    early = [normals[i] for i in splits["early_stop"]]
    gate_frames = [normals[i] for i in splits["gate"]]
    init_ctx = None  # warm start only from a context of the same length
    ctx = current_artifact.ctx if current_artifact is not None else None
    if ctx is not None and ctx.shape[1] == config.train.n_ctx:
        init_ctx = ctx
    train_config = replace(config.train, seed=seed)
    result = train(scorer, train_frames, category, train_config, init_ctx=init_ctx, val_normals=early,
                   tiling=config.tiling)
    if config.tiling is not None:  # the gate scores what the scorers score: tiles of large frames
        gate_frames = training_views(gate_frames, scorer.backbone.image_size, config.tiling)[0]
    rng = np.random.default_rng(seed + 7_919)
    regions = object_masks(scorer, gate_frames, train_config.oagm)
    gate_pool = build_pool(scorer, rng, gate_frames, regions, 0, config.gate_anomalies, train_config.oagm,
                           extra_normals=gate_frames, sources=[-1] * len(gate_frames),
                           orientation=train_config.orientation)
    gate_pool = _with_labelled(gate_pool, labelled)
    feedback: dict[str, object] = {}
    if defects:
        defect_pool = encode_defects(scorer, defects)
        before = float(result.prompts.threshold)
        defect_scores, _ = score_pool(scorer, defect_pool, result.prompts)
        lowered = lower_threshold_for_defects(before, defect_scores, config.max_threshold_drop)
        result.prompts = replace(result.prompts, threshold=lowered)
        candidate_metrics = evaluate_with_defects(scorer, gate_pool, defect_pool, result.prompts)
        current_metrics = evaluate_with_defects(scorer, gate_pool, defect_pool, current)
        feedback = {"defects": len(defects), "threshold_calibrated": before, "threshold": lowered,
                    "max_threshold_drop": config.max_threshold_drop,
                    "defect_recall": float(np.mean(defect_scores >= lowered))}
    else:
        candidate_metrics = evaluate_as_served(scorer, gate_pool, result.prompts)
        current_metrics = evaluate_as_served(scorer, gate_pool, current)
    decision = gate(current_metrics, candidate_metrics, config.margin)
    counts = {name: len(idx) for name, idx in splits.items()}
    counts["gate_anomalies"] = config.gate_anomalies + (len(labelled) if labelled is not None else 0) + len(defects)
    if defects:
        counts["real_defects"] = len(defects)
    return TuneOutcome(result, decision, counts, feedback)


def encode_defects(scorer: Scorer, images: Sequence[np.ndarray]) -> Pool:
    """Operator-confirmed defects as an anomalous pool without pixel labels (all-zero masks, never used)."""
    size = scorer.backbone.image_size
    return pool_on_device(scorer, images, torch.ones(len(images), dtype=torch.long),
                          torch.zeros(len(images), *size), ["operator"] * len(images))


def evaluate_with_defects(scorer: Scorer, pool: Pool, defects: Pool, prompts: PromptSet) -> PoolMetrics:
    """The gate's metrics with confirmed defects beside the pool's anomalies: image AUROC over both,
    pixel AUROC over the pool's masks only (defects have none)."""
    scores, maps = score_pool(scorer, pool, prompts)
    defect_scores, _ = score_pool(scorer, defects, prompts)
    labels = np.concatenate([pool.labels.cpu().numpy(), defects.labels.cpu().numpy()])
    return PoolMetrics(image_AUROC=image_auroc(labels, np.concatenate([scores, defect_scores])),
                       pixel_AUROC=pixel_auroc(pool.masks.cpu().numpy() > 0.5, maps))


def candidate_artifact(outcome: TuneOutcome, *, k: int, image_size: tuple[int, int], warm_start_from: int) -> bytes:
    """The candidate's prompt artifact (`hpad.training` manifest) with the gate's record and the warm start."""
    gate_record = {**outcome.decision.to_json(), "splits": outcome.splits}
    if outcome.feedback:
        gate_record["feedback"] = outcome.feedback
    return build_artifact(outcome.result, k=k, image_size=image_size,
                          extra={"gate": gate_record, "tuned_by": "hpad tune", "warm_start_from": warm_start_from})
