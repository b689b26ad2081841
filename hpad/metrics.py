"""Evaluation metrics for visual anomaly detection: AUROC, AUPRO and F1-max, at image and pixel level.

Names follow anomalib (`image_AUROC`, `pixel_AUROC`, `AUPRO`, `image_F1Max`, `pixel_F1Max`).
Everything here is pure numpy/scipy: no torch, no I/O. Convention: a higher score means "more
anomalous", label/mask 1 (True) means anomalous, and a sample is predicted anomalous when its
score is `>= threshold`.

* AUROC is the Mann-Whitney statistic P(score_pos > score_neg) + 0.5 P(score_pos == score_neg),
  which equals the exact trapezoid area under the ROC curve with tied scores grouped.
* AUPRO is the official MVTec AD evaluation (`compute_pro` + `trapezoid` of MVTec's
  `evaluate_experiment.py` / `pro_curve_util.py`): regions are the 8-connected components of each
  ground-truth mask; at every distinct threshold FPR is the fraction of normal pixels (of all images)
  scoring `>= threshold` and PRO is the mean over all regions (of all images) of the fraction of the
  region's pixels scoring `>= threshold`; (0, 0) and (1, 1) are added; the curve is integrated with
  the trapezoid rule up to `fpr_limit` (linearly interpolated at exactly `fpr_limit`) and divided by
  `fpr_limit`, so a perfect detector scores 1.0.
* F1-max is the best F1 over all thresholds of the exact precision-recall sweep.

Memory is O(P) for P pixels and nothing is O(thresholds x pixels): pixel scores are split once
into anomalous and normal copies (float32 unless the maps are float64), the normal scores are
sorted with `np.sort` and queried with `np.searchsorted`; only the anomalous pixels are argsorted.
The AUPRO curve is built only at the distinct anomalous-pixel scores: between two of them the
exact curve is a horizontal run (only normal pixels pass), so two vertices per distinct
anomalous score give the same area and the same interpolation at `fpr_limit` as the full sweep.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from hpad.errors import ConfigError

__all__ = [
    "EvalMetrics",
    "MaskStack",
    "PoolMetrics",
    "aupro",
    "compute_all",
    "f1_max",
    "f1_max_threshold",
    "image_auroc",
    "image_f1_max",
    "pixel_auroc",
    "pixel_f1_max",
]

MaskStack = np.ndarray | Sequence[np.ndarray]
"""Per-image 2-D arrays: a stacked [N, H, W] array or a sequence of [H_i, W_i] arrays."""

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # as MVTec's compute_pro
_CHUNK = 1 << 20  # searchsorted needles per call, bounds the int64 temporaries to 8 MiB


@dataclass(frozen=True)
class _Split:
    """Scores split by ground truth. `pos`/`neg`: 1-D scores of anomalous/normal samples (same dtype).

    For pixel AUPRO, `region_size[i]` is the size of the 8-connected region of pixel `pos[i]`
    and `n_regions` the number of regions over all images.
    """

    pos: np.ndarray
    neg: np.ndarray
    region_size: np.ndarray | None = None
    n_regions: int = 0


# --------------------------------------------------------------------------- validation / flattening


def _as_binary(values: np.ndarray, what: str) -> np.ndarray:
    """Bool view/copy of a label or mask array; every value must be bool or 0/1."""
    if values.dtype == np.bool_:
        return values
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise ConfigError(f"{what} must be bool or 0/1 numbers, got dtype {values.dtype}")
    bad = (values != 0) & (values != 1)
    if bad.any():
        example = values[bad].flat[0]
        raise ConfigError(
            f"{what} must contain only 0/1 (or bool), found {example!r}; binarise it (e.g. mask > 0)"
        )
    return values != 0


def _check_scores(values: np.ndarray, what: str) -> np.ndarray:
    """Return `values` unchanged after checking it is real-valued and finite."""
    if values.dtype == np.bool_ or np.issubdtype(values.dtype, np.integer):
        return values
    if not np.issubdtype(values.dtype, np.floating):
        raise ConfigError(f"{what} must be real numbers, got dtype {values.dtype}")
    if not np.isfinite(values).all():
        raise ConfigError(f"{what} contains NaN or infinite values; every score must be finite")
    return values


def _score_dtype(dtypes: Iterable[np.dtype]) -> np.dtype:
    """float32 unless an input needs float64 (float64 or 32/64-bit integer scores)."""
    return np.result_type(np.float32, *dtypes)


def _split_labels(labels: npt.ArrayLike, scores: npt.ArrayLike) -> _Split:
    """labels [N] 0/1, scores [N] -> fresh 1-D copies of the positive and negative scores."""
    lab = np.asarray(labels)
    sc = np.asarray(scores)
    if lab.ndim != 1 or sc.ndim != 1 or lab.shape != sc.shape:
        raise ConfigError(
            f"labels and scores must be 1-D of equal length, got shapes {lab.shape} and {sc.shape}"
        )
    is_pos = _as_binary(lab, "labels")
    sc = _check_scores(sc, "scores").astype(_score_dtype([sc.dtype]), copy=False)
    return _Split(pos=sc[is_pos], neg=sc[~is_pos])


def _pairs(masks: MaskStack, maps: MaskStack) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validated per-image (bool mask [H_i, W_i], anomaly map [H_i, W_i]) pairs."""
    if len(masks) != len(maps):
        raise ConfigError(f"got {len(masks)} masks but {len(maps)} anomaly maps; need one mask per map")
    if len(maps) == 0:
        raise ConfigError("no images given: masks and anomaly maps are empty")
    pairs = []
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        mask_arr, map_arr = np.asarray(mask), np.asarray(amap)
        if map_arr.ndim != 2:
            raise ConfigError(
                f"image {i}: anomaly map has shape {map_arr.shape}; expected a 2-D [H, W] array"
            )
        if mask_arr.shape != map_arr.shape:
            raise ConfigError(
                f"image {i}: mask shape {mask_arr.shape} != anomaly map shape {map_arr.shape}; "
                "resize the map to the mask resolution before evaluating"
            )
        pairs.append(
            (_as_binary(mask_arr, f"image {i}: mask"), _check_scores(map_arr, f"image {i}: anomaly map"))
        )
    return pairs


def _split_pixels(masks: MaskStack, maps: MaskStack, *, regions: bool = False) -> _Split:
    """Flatten all images' pixels into anomalous/normal score arrays (preallocated, one copy).

    With `regions=True` also label each mask's 8-connected regions and record, per anomalous
    pixel, the size of its region.
    """
    pairs = _pairs(masks, maps)
    dtype = _score_dtype(amap.dtype for _, amap in pairs)
    counts = [int(np.count_nonzero(mask)) for mask, _ in pairs]
    n_pos = sum(counts)
    pos = np.empty(n_pos, dtype=dtype)
    neg = np.empty(sum(mask.size for mask, _ in pairs) - n_pos, dtype=dtype)
    sizes = np.empty(n_pos, dtype=np.int64) if regions else None
    n_regions = i_pos = i_neg = 0
    for (mask, amap), k in zip(pairs, counts, strict=True):
        pos[i_pos : i_pos + k] = amap[mask]
        neg[i_neg : i_neg + mask.size - k] = amap[~mask]
        if sizes is not None and k:
            labeled, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
            sizes[i_pos : i_pos + k] = np.bincount(labeled.ravel())[labeled[mask]]
            n_regions += n
        i_pos += k
        i_neg += mask.size - k
    return _Split(pos=pos, neg=neg, region_size=sizes, n_regions=n_regions)


def _require_both_classes(split: _Split, what: str) -> None:
    if split.pos.size == 0 or split.neg.size == 0:
        missing = "anomalous" if split.pos.size == 0 else "normal"
        raise ConfigError(
            f"{what} needs both normal and anomalous samples, but there are no {missing} ones "
            f"({split.pos.size} anomalous, {split.neg.size} normal)"
        )


# --------------------------------------------------------------------------- AUROC


def _auroc(split: _Split, what: str) -> float:
    """Mann-Whitney AUROC with average ranks for ties. Sorts `split.pos`/`split.neg` in place."""
    _require_both_classes(split, what)
    split.pos.sort()
    split.neg.sort()
    # 2 * (#neg < s + 0.5 #neg == s) = #neg < s + #neg <= s, summed exactly in Python ints
    twice_wins = 0
    for start in range(0, split.pos.size, _CHUNK):
        chunk = split.pos[start : start + _CHUNK]
        twice_wins += int(np.searchsorted(split.neg, chunk, side="left").sum())
        twice_wins += int(np.searchsorted(split.neg, chunk, side="right").sum())
    return twice_wins / (2 * split.pos.size * split.neg.size)


def image_auroc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """ROC AUC of image scores. labels [N] 0/1 (1 = anomalous), scores [N] finite; ties count 1/2."""
    return _auroc(_split_labels(labels, scores), "image AUROC")


def pixel_auroc(masks: MaskStack, maps: MaskStack) -> float:
    """ROC AUC over all pixels of all images. masks/maps: [N, H, W] or N arrays [H_i, W_i]."""
    return _auroc(_split_pixels(masks, maps), "pixel AUROC")


# --------------------------------------------------------------------------- F1-max


def _f1_max(split: _Split, what: str) -> tuple[float, float]:
    """(best F1, its threshold) over the exact sweep. Sorts `split.pos`/`split.neg` in place.

    Only anomalous scores need checking: raising any other threshold up to the next anomalous score
    keeps every true positive and can only drop false positives.
    """
    if split.pos.size == 0:
        raise ConfigError(f"{what} needs at least one anomalous sample; F1 is undefined without positives")
    split.pos.sort()
    split.neg.sort()
    pos_desc, neg = split.pos[::-1], split.neg
    last_of_tie = np.flatnonzero(np.append(pos_desc[1:] != pos_desc[:-1], True))
    thresholds = pos_desc[last_of_tie]
    tp = last_of_tie + 1
    fp = neg.size - np.searchsorted(neg, thresholds, side="left")
    f1 = 2.0 * tp / (tp + fp + pos_desc.size)  # 2TP / (2TP + FP + FN)
    best = int(np.argmax(f1))  # first maximum = highest threshold among equals
    return float(f1[best]), float(thresholds[best])


def f1_max_threshold(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[float, float]:
    """(max F1, threshold) over all thresholds; `score >= threshold` is predicted anomalous.

    labels [N] 0/1, scores [N]. Among thresholds with equal F1 the highest is returned.
    """
    return _f1_max(_split_labels(labels, scores), "F1-max")


def f1_max(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Maximum F1 over all thresholds. labels [N] 0/1, scores [N]."""
    return f1_max_threshold(labels, scores)[0]


def image_f1_max(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """anomalib's image_F1Max: `f1_max` of image labels [N] and image scores [N]."""
    return f1_max(labels, scores)


def pixel_f1_max(masks: MaskStack, maps: MaskStack) -> float:
    """anomalib's pixel_F1Max: F1-max over all pixels. masks/maps: [N, H, W] or N arrays [H_i, W_i]."""
    return _f1_max(_split_pixels(masks, maps), "pixel F1-max")[0]


# --------------------------------------------------------------------------- AUPRO


def _pro_curve(split: _Split) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (fpr [K], pro [K]) of the exact PRO curve, K = 2 * (#distinct anomalous scores) + 3.

    For each distinct anomalous score p (descending): (FPR(> p), PRO(> p)) then (FPR(>= p), PRO(>= p));
    starts at (0, 0), ends with (1, PRO of all) and MVTec's (1, 1). Sorts `split.neg` in place.
    """
    assert split.region_size is not None
    order = np.argsort(split.pos)[::-1]
    pos_desc = split.pos[order]
    gains = np.reciprocal(split.region_size[order], dtype=np.float64)
    del order
    pro_cum = np.cumsum(gains, out=gains)
    last_of_tie = np.flatnonzero(np.append(pos_desc[1:] != pos_desc[:-1], True))
    thresholds = pos_desc[last_of_tie]
    del pos_desc
    pro_at = np.minimum(pro_cum[last_of_tie] / split.n_regions, 1.0)
    del pro_cum
    neg = split.neg
    neg.sort()
    fpr_at = (neg.size - np.searchsorted(neg, thresholds, side="left")) / neg.size
    fpr_above = (neg.size - np.searchsorted(neg, thresholds, side="right")) / neg.size
    fpr = np.empty(2 * thresholds.size + 3)
    pro = np.empty_like(fpr)
    fpr[0], pro[0] = 0.0, 0.0
    fpr[1:-2:2], pro[1:-2:2] = fpr_above, np.concatenate(([0.0], pro_at[:-1]))
    fpr[2:-2:2], pro[2:-2:2] = fpr_at, pro_at
    fpr[-2:], pro[-2:] = 1.0, (pro_at[-1], 1.0)
    return fpr, pro


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the polyline (x [K] non-decreasing, y [K]) over [x[0], x_max], as MVTec's `trapezoid`.

    If x_max is not a vertex, y is linearly interpolated at x_max between its neighbours.
    """
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))  # bisect.bisect(x, x_max)
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        correction = 0.5 * (y_interp + y0) * (x_max - x0)
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    return float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)) + correction)


def aupro(masks: MaskStack, maps: MaskStack, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to `fpr_limit` (official MVTec AD AUPRO, 1.0 = perfect).

    masks: [N, H, W] or N arrays [H_i, W_i] of bool/0-1; maps: anomaly maps of the same shapes.
    Regions are 8-connected components per image. Time O(P log P), memory O(P) for P pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ConfigError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    split = _split_pixels(masks, maps, regions=True)
    if split.n_regions == 0:
        raise ConfigError("AUPRO needs at least one anomalous region, but every mask is empty")
    if split.neg.size == 0:
        raise ConfigError(
            "AUPRO needs normal pixels to measure the false-positive rate, but every mask is full"
        )
    fpr, pro = _pro_curve(split)
    return _trapezoid(fpr, pro, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------- all at once


def compute_all(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    masks: MaskStack | None = None,
    maps: MaskStack | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """anomalib-named metrics: image_AUROC, image_F1Max and, when masks and maps are given,
    pixel_AUROC, AUPRO (up to `fpr_limit`) and pixel_F1Max.

    labels/scores: [N]; masks/maps: [N, H, W] or N arrays [H_i, W_i].
    """
    if (masks is None) != (maps is None):
        raise ConfigError("give both masks and anomaly maps for pixel metrics, or neither")
    result = {"image_AUROC": image_auroc(labels, scores), "image_F1Max": image_f1_max(labels, scores)}
    if masks is not None and maps is not None:
        result["pixel_AUROC"] = pixel_auroc(masks, maps)
        result["AUPRO"] = aupro(masks, maps, fpr_limit)
        result["pixel_F1Max"] = pixel_f1_max(masks, maps)
    return result


# --------------------------------------------------------------------------- typed results


def _present(values: dict[str, float | None]) -> dict[str, float]:
    return {key: value for key, value in values.items() if value is not None}


@dataclass(frozen=True)
class EvalMetrics:
    """The evaluation metrics of `compute_all` (pixel ones None without masks); JSON keys are the field names."""

    image_AUROC: float
    image_F1Max: float
    pixel_AUROC: float | None = None
    AUPRO: float | None = None
    pixel_F1Max: float | None = None

    def to_json(self) -> dict[str, float]:
        return _present(asdict(self))


@dataclass(frozen=True)
class PoolMetrics:
    """Image and pixel AUROC of a prompt set on an encoded pool (training validation, the tuner's gate), and
    the task loss where one was computed; JSON keys are the field names, absent ones left out."""

    image_AUROC: float
    pixel_AUROC: float | None = None
    loss: float | None = None

    def to_json(self) -> dict[str, float]:
        return _present(asdict(self))

