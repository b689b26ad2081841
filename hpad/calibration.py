"""Decision-threshold calibration from validation normals and (synthetic) anomalies.

Rules (the one used is stored in the prompt artifact):

* ``f1`` (default): the image threshold that maximises F1 on the validation set (held-out normals vs
  OAGM anomalies); the pixel threshold likewise maximises pixel F1 over the validation masks.
* ``quantile``: the image threshold is the ``normal_quantile`` quantile of the validation normals' scores
  (bounds the false-alarm rate on normals, ignores the anomalies); the pixel threshold is the same
  quantile of the normal images' pixel scores.

The normals' quantile is recorded either way, so operators can see how far the F1 threshold sits from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hpad.errors import ConfigError
from hpad.metrics import f1_max_threshold


@dataclass(frozen=True)
class Calibration:
    """Thresholds and what they achieve on the validation set (F1-max under anomalib's names)."""

    threshold: float
    pixel_threshold: float
    image_F1Max: float
    pixel_F1Max: float
    normal_quantile_threshold: float
    normal_false_alarm_rate: float
    anomaly_recall: float
    n_normal: int
    n_anomalous: int

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def calibrate_thresholds(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    rule: str = "f1",
    normal_quantile: float = 0.99,
) -> Calibration:
    """labels/scores [N]; masks/maps [N, H, W] -> thresholds and what they achieve on this set."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.all() or not labels.any():
        raise ConfigError("calibration needs both normal and anomalous validation samples")
    normal_scores = scores[~labels]
    normal_pixels = maps[~labels].reshape(-1)
    image_q = float(np.quantile(normal_scores, normal_quantile))
    pixel_q = float(np.quantile(normal_pixels, normal_quantile))
    image_f1, image_thr = f1_max_threshold(labels.astype(np.int64), scores)
    pixel_f1, pixel_thr = f1_max_threshold(masks.reshape(-1).astype(np.int64), maps.reshape(-1))
    if rule == "f1":
        threshold, pixel_threshold = image_thr, pixel_thr
    elif rule == "quantile":
        threshold, pixel_threshold = image_q, pixel_q
    else:
        raise ConfigError(f"unknown threshold rule {rule!r}: use f1 or quantile")
    predicted = scores >= threshold
    return Calibration(
        threshold=float(threshold),
        pixel_threshold=float(pixel_threshold),
        image_F1Max=float(image_f1),
        pixel_F1Max=float(pixel_f1),
        normal_quantile_threshold=image_q,
        normal_false_alarm_rate=float(predicted[~labels].mean()),
        anomaly_recall=float(predicted[labels].mean()),
        n_normal=int((~labels).sum()),
        n_anomalous=int(labels.sum()),
    )


def lower_threshold_for_defects(threshold: float, defect_scores: np.ndarray, max_drop: float) -> float:
    """Operator-confirmed defects may only lower the image threshold (fewer false negatives), and by at most
    ``max_drop``: the lowest confirmed defect's score when it falls below ``threshold`` (so it is caught,
    ``score >= threshold``), but never below ``threshold - max_drop``. Never raises the threshold."""
    scores = np.asarray(defect_scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if max_drop <= 0 or scores.size == 0:
        return float(threshold)
    missed = scores[scores < threshold]
    if missed.size == 0:
        return float(threshold)
    return float(max(threshold - max_drop, missed.min()))


def tiled_frame_scores(normal_tiles: list[np.ndarray], anomalous_tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame-level (labels [N], scores [N]) as the service scores tiled frames, the maximum over a frame's tiles:
    each held-out normal frame (its tile scores, ``normal_tiles``) once as it is, and each anomalous tile score
    once inside a normal frame (cycling through the frames), replacing one of that frame's tiles."""
    if not normal_tiles or len(anomalous_tiles) == 0:
        raise ConfigError("frame-level calibration needs normal frames and anomalous tiles")
    normal = [float(np.max(t)) for t in normal_tiles]
    anomalous = []
    for i, score in enumerate(np.asarray(anomalous_tiles, dtype=np.float64)):
        tiles = np.asarray(normal_tiles[i % len(normal_tiles)], dtype=np.float64)
        rest = np.delete(tiles, i % len(tiles))
        anomalous.append(max(float(score), float(rest.max()) if rest.size else -np.inf))
    labels = np.array([0] * len(normal) + [1] * len(anomalous))
    return labels, np.array(normal + anomalous)


def recalibrate_image(calibration: Calibration, labels: np.ndarray, scores: np.ndarray, rule: str = "f1",
                      normal_quantile: float = 0.99) -> Calibration:
    """``calibration`` with its image threshold (and what it achieves) taken from frame-level ``labels`` /
    ``scores`` instead (the pixel threshold is kept)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    image_q = float(np.quantile(scores[~labels], normal_quantile))
    image_f1, image_thr = f1_max_threshold(labels.astype(np.int64), scores)
    threshold = image_thr if rule == "f1" else image_q
    predicted = scores >= threshold
    return Calibration(
        threshold=float(threshold), pixel_threshold=calibration.pixel_threshold, image_F1Max=float(image_f1),
        pixel_F1Max=calibration.pixel_F1Max, normal_quantile_threshold=image_q,
        normal_false_alarm_rate=float(predicted[~labels].mean()), anomaly_recall=float(predicted[labels].mean()),
        n_normal=int((~labels).sum()), n_anomalous=int(labels.sum()),
    )
