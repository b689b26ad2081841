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
"""

from __future__ import annotations

from typing import Any

from hpad.artifact import build_artifact_bytes
from hpad.errors import ConfigError
from hpad.mpts import TrainResult, train_prompts

HISTORY_TAIL = 3


train = train_prompts
"""Learn and calibrate a prompt set for a category from k normals: `hpad.mpts.train_prompts`."""


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
