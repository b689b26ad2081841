"""Training facade: train a prompt set from k normals and build its prompt artifact, one way for every caller.

`hpad train` (`hpad.commands`) and the tuner (`tuner.job`) both go through here:

* `train` - OAGM + MPTS (`hpad.mpts.train_prompts`): learned context, few-shot memory and decision thresholds
  calibrated on the validation pool; the result carries typed metrics (`hpad.mpts.TrainMetrics`).
* `build_artifact` - the artifact bytes with one manifest schema. Fields written here: ``k``, ``seed``,
  ``n_ctx``, ``class_name``, ``object_regions``, ``calibration`` (``{"rule"}``) and ``training``:

  ``{"config": TrainConfig.describe(), "metrics": TrainMetrics.to_json(), "history_tail": last 3 epochs}``

  with metric keys spelt as anomalib spells them (``image_AUROC``, ``pixel_AUROC``, ``image_F1Max``, ...).
  Callers add their own fields (``shots`` paths for `hpad train`; ``gate``, ``tuned_by`` and
  ``warm_start_from`` for the tuner) through ``extra``; they cannot replace the fields above.

High-resolution data (`hpad.tiling`): given the service's ``tiling`` policy, `train` cuts every frame the way
the service cuts it (`hpad.tiled_scoring.training_views`), so the pools, the few-shot memory and the pixel
threshold see tiles at the scale the service scores them; the image threshold is then calibrated on
frame-level scores, the maximum over each held-out frame's tiles (`score_frames`, the service's own call),
with the validation anomalies each placed in one tile of a normal frame (`hpad.calibration.tiled_frame_scores`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from hpad.artifact import build_artifact_bytes
from hpad.calibration import recalibrate_image, tiled_frame_scores
from hpad.errors import ConfigError
from hpad.mpts import Pool, TrainConfig, TrainResult, build_pool, object_masks, score_pool, train_prompts
from hpad.scorer import Scorer
from hpad.tiled_scoring import score_frames, training_views
from hpad.tiling import TilingPolicy, plan_tiles

HISTORY_TAIL = 3


def train(scorer: Scorer, normals: Sequence[np.ndarray], category: str, config: TrainConfig,
          init_ctx: torch.Tensor | None = None, val_normals: Sequence[np.ndarray] = (),
          progress: Callable[[int, dict[str, float]], None] | None = None,
          tiling: TilingPolicy | None = None) -> TrainResult:
    """Learn and calibrate a prompt set for a category from k normals (`hpad.mpts.train_prompts`); with the
    service's ``tiling`` policy, on the frames' tiles when the policy tiles them (see the module's doc)."""
    size = scorer.backbone.image_size
    views = training_views(normals, size, tiling)[0] if tiling is not None else list(normals)
    if len(views) == len(normals):  # nothing tiled: the frames are scored whole, as they are here
        return train_prompts(scorer, normals, category, config, init_ctx, val_normals, progress)
    val_views = training_views(val_normals, size, tiling)[0] if val_normals else []
    result = train_prompts(scorer, views, category, config, init_ctx, val_views, progress)
    held_out = list(val_normals) or list(normals)
    anomalies = _anomalous_tile_scores(scorer, views, result, config)
    plans = [plan_tiles(f.shape[:2], size, None, None, tiling) for f in held_out]
    scored = score_frames(scorer, held_out, result.prompts, plans=plans)
    labels, scores = tiled_frame_scores(scored.tile_scores, anomalies)
    calibration = recalibrate_image(result.metrics.calibration, labels, scores, config.threshold_rule,
                                    config.normal_quantile)
    result.prompts = replace(result.prompts, threshold=calibration.threshold)
    result.metrics = replace(result.metrics, calibration=calibration)
    return result


def _anomalous_tile_scores(scorer: Scorer, views: Sequence[np.ndarray], result: TrainResult,
                           config: TrainConfig) -> np.ndarray:
    """Scores of fresh OAGM anomalies made from the tile views (the validation pool's recipe), as served."""
    rng = np.random.default_rng(config.seed + 2_000_003)
    pool: Pool = build_pool(scorer, rng, views, result.regions or object_masks(scorer, views, config.oagm), 0,
                            config.val_anomalies, config.oagm)
    return score_pool(scorer, pool, result.prompts)[0]


def training_manifest(result: TrainResult) -> dict[str, Any]:
    """The ``training`` section of an artifact's manifest."""
    return {"config": result.config.describe(), "metrics": result.metrics.to_json(),
            "history_tail": result.history[-HISTORY_TAIL:]}


def artifact_manifest(result: TrainResult, k: int) -> dict[str, Any]:
    """The manifest fields every trained artifact carries (beyond those `build_artifact_bytes` writes)."""
    config = result.config
    return {
        "k": int(k),
        "seed": config.seed,
        "n_ctx": config.n_ctx,
        "class_name": result.prompts.category if config.class_name is None else config.class_name,
        "training": training_manifest(result),
        "object_regions": [region.kind for region in result.regions],
        "calibration": {"rule": config.threshold_rule},
    }


def build_artifact(result: TrainResult, *, k: int, image_size: tuple[int, int], version: int = 1,
                   extra: dict[str, Any] | None = None) -> bytes:
    """The prompt artifact of a training run: prompts, learned context and the manifest above plus ``extra``."""
    manifest = artifact_manifest(result, k)
    clash = sorted(set(extra or {}) & set(manifest))
    if clash:
        raise ConfigError(f"extra manifest fields {clash} would replace the training fields")
    return build_artifact_bytes(result.prompts, version=version, ctx=result.ctx, image_size=image_size,
                                extra={**manifest, **(extra or {})})
