"""hpad.metrics: hand-worked values, cross-checks against sklearn and a brute-force AUPRO, errors, memory."""

from __future__ import annotations

import time
import tracemalloc
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import precision_recall_curve, roc_auc_score

from hpad.errors import ConfigError
from hpad.metrics import (
    aupro,
    compute_all,
    f1_max,
    f1_max_threshold,
    image_auroc,
    image_f1_max,
    pixel_auroc,
    pixel_f1_max,
)

# --------------------------------------------------------------------------- independent references


def _label_8connected(mask: np.ndarray) -> list[np.ndarray]:
    """Regions of a 2-D bool mask by breadth-first flood fill over the 8 neighbours (no scipy)."""
    seen = np.zeros(mask.shape, dtype=bool)
    regions = []
    h, w = mask.shape
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        region = np.zeros(mask.shape, dtype=bool)
        queue = deque([(r0, c0)])
        seen[r0, c0] = True
        while queue:
            r, c = queue.popleft()
            region[r, c] = True
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        regions.append(region)
    return regions


def _area_up_to(xs: list[float], ys: list[float], limit: float) -> float:
    """Trapezoid area of the polyline up to x = limit, segment by segment, cutting the straddling one."""
    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:], strict=True):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < limit:
            y_cut = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_cut) / 2
            break
        else:
            break
    return area


def _brute_force_aupro(masks: list[np.ndarray], maps: list[np.ndarray], limit: float) -> float:
    """Every distinct threshold, FPR and per-region overlap straight from boolean masks."""
    regions = [
        amap[region] for mask, amap in zip(masks, maps, strict=True) for region in _label_8connected(mask)
    ]
    normal = np.concatenate([amap[~mask] for mask, amap in zip(masks, maps, strict=True)])
    thresholds = np.unique(np.concatenate([amap.ravel() for amap in maps]))[::-1]
    xs, ys = [0.0], [0.0]
    for t in thresholds:
        xs.append(float(np.mean(normal >= t)))
        ys.append(float(np.mean([np.mean(region_scores >= t) for region_scores in regions])))
    xs.append(1.0)
    ys.append(1.0)
    return _area_up_to(xs, ys, limit) / limit


def _sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


# --------------------------------------------------------------------------- random inputs


def _random_masks(rng: np.random.Generator, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Rectangles and 1-pixel specks; image 0 also gets two blocks touching only at a corner (ONE region)."""
    masks = []
    for i, (h, w) in enumerate(shapes):
        mask = np.zeros((h, w), dtype=bool)
        for _ in range(rng.integers(0, 3)):
            r, c = rng.integers(0, h - 2), rng.integers(0, w - 2)
            mask[r : r + rng.integers(1, 6), c : c + rng.integers(1, 7)] = True
        mask[rng.integers(0, h, 2), rng.integers(0, w, 2)] = True
        if i == 0:
            mask[:] = False
            mask[2:5, 2:5] = True
            mask[5:8, 5:9] = True  # touches [2:5, 2:5] only diagonally at (4, 4)-(5, 5)
        masks.append(mask)
    return masks


def _random_maps(rng: np.random.Generator, masks: list[np.ndarray], levels: int | None) -> list[np.ndarray]:
    """Noise plus signal on the masks; `levels` quantises to that many values (many ties)."""
    maps = []
    for mask in masks:
        amap = rng.random(mask.shape) + 0.6 * mask * rng.random(mask.shape)
        maps.append(np.round(amap * levels) / levels if levels else amap)
    return maps


SHAPES = [(20, 24), (20, 24), (24, 20), (16, 16), (20, 24), (30, 12)]


# --------------------------------------------------------------------------- AUROC


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),  # every positive above every negative
        ([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9], 0.0),  # reversed
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),  # all ties: every pair counts 1/2
        # pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, 0.1) win, (0.8, 0.4) win -> 3/4
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        # (0.5, 0.5) tie 1/2, (0.5, 0.2) win, (0.9, 0.5) win, (0.9, 0.2) win -> 3.5/4
        ([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9], 0.875),
    ],
)
def test_image_auroc_hand_worked(labels: list[int], scores: list[float], expected: float) -> None:
    assert image_auroc(np.array(labels), np.array(scores)) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 5])
def test_image_auroc_matches_sklearn(seed: int, levels: int | None) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = rng.normal(size=500) + labels
    if levels:
        scores = np.round(scores * levels) / levels
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(-3, 3)), min_size=2, max_size=40).filter(
        lambda rows: len({label for label, _ in rows}) == 2
    )
)
def test_auroc_and_f1_match_sklearn_on_arbitrary_ties(rows: list[tuple[bool, int]]) -> None:
    labels = np.array([label for label, _ in rows])
    scores = np.array([score for _, score in rows], dtype=np.float64)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert f1_max(labels, scores) == pytest.approx(_sklearn_f1_max(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn_on_all_pixels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, SHAPES)
    maps = _random_maps(rng, masks, levels=8)
    labels = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


# --------------------------------------------------------------------------- F1-max


def test_f1_max_hand_worked() -> None:
    # labels [0, 0, 1, 1, 1], scores [0.1, 0.6, 0.4, 0.7, 0.9]; F1 = 2TP / (TP + FP + #pos):
    #   t=0.9: TP 1, FP 0 -> 2/4 = 0.5;  t=0.7: TP 2, FP 0 -> 4/5 = 0.8
    #   t=0.4: TP 3, FP 1 (0.6) -> 6/7 ~ 0.857 (best);  t=0.1 would add FP only -> 6/8
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.4, 0.7, 0.9])
    f1, threshold = f1_max_threshold(labels, scores)
    assert f1 == pytest.approx(6 / 7, abs=1e-15)
    assert threshold == 0.4
    assert image_f1_max(labels, scores) == f1_max(labels, scores) == f1


def test_f1_max_threshold_prefers_highest_of_equal_f1() -> None:
    # t=0.9: TP 1, FP 0 -> 2/(1+0+2) = 2/3;  t=0.5: TP 2, FP 2 -> 4/(2+2+2) = 2/3 (tie) -> keep 0.9
    f1, threshold = f1_max_threshold(np.array([1, 0, 0, 1]), np.array([0.9, 0.8, 0.7, 0.5]))
    assert (f1, threshold) == (pytest.approx(2 / 3), 0.9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 6])
def test_f1_max_matches_sklearn(seed: int, levels: int | None) -> None:
    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, 2, 400)
    scores = rng.normal(size=400) + 0.8 * labels
    if levels:
        scores = np.round(scores * levels) / levels
    f1, threshold = f1_max_threshold(labels, scores)
    assert f1 == pytest.approx(_sklearn_f1_max(labels, scores), abs=1e-12)
    predicted = scores >= threshold  # the threshold reproduces the F1 it reports
    tp = np.sum(predicted & (labels == 1))
    assert 2 * tp / (predicted.sum() + labels.sum()) == pytest.approx(f1, abs=1e-12)


def test_pixel_f1_max_matches_sklearn_on_all_pixels() -> None:
    rng = np.random.default_rng(7)
    masks = _random_masks(rng, SHAPES)
    maps = _random_maps(rng, masks, levels=10)
    labels = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    assert pixel_f1_max(masks, maps) == pytest.approx(_sklearn_f1_max(labels, scores), abs=1e-12)


# --------------------------------------------------------------------------- AUPRO


def _toy_two_regions() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two images, one region of 2 pixels each, 10 normal pixels in all.

    Each region pixel adds 1/(2 * 2) = 0.25 to PRO, each normal pixel 1/10 to FPR. Descending:
      0.9 A -> (0, .25);  0.8 B -> (0, .5);  0.7 N -> (.1, .5);  0.6 B -> (.1, .75);
      0.5 A and N tied -> (.2, 1.0) (one diagonal step);  0.4 N -> (.3, 1.0);  ...
    """
    mask_a = np.array([[1, 1, 0], [0, 0, 0]], dtype=bool)
    map_a = np.array([[0.9, 0.5, 0.7], [0.5, 0.2, 0.1]])
    mask_b = np.array([[0, 0, 0, 0], [0, 0, 1, 1]], dtype=np.uint8)
    map_b = np.array([[0.4, 0.3, 0.25, 0.15], [0.05, 0.0, 0.8, 0.6]])
    return [mask_a, mask_b], [map_a, map_b]


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        # (0,.5)->(.1,.5): 0.05; the diagonal (.1,.75)->(.2,1) is cut at .15 where PRO = .875:
        # 0.05 * (.75 + .875) / 2 = 0.040625; area 0.090625, normalised / 0.15
        (0.15, 0.090625 / 0.15),
        # 0.05 + full diagonal 0.1 * (.75 + 1) / 2 = 0.0875 + (.2,1)->(.3,1): 0.1 -> 0.2375, / 0.3
        (0.3, 0.2375 / 0.3),
        # only the horizontal (0,.5)->(.05,.5), limit inside it: 0.05 * 0.5 = 0.025, / 0.05 = 0.5
        (0.05, 0.5),
    ],
)
def test_aupro_hand_worked_two_regions(limit: float, expected: float) -> None:
    masks, maps = _toy_two_regions()
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)
    assert _brute_force_aupro([m.astype(bool) for m in masks], maps, limit) == pytest.approx(
        expected, abs=1e-12
    )


def test_aupro_counts_diagonal_neighbours_as_one_region() -> None:
    # (0,0),(0,1) and (1,2) form ONE 8-connected region of 3 pixels (4-connectivity would see 2 + 1).
    # (1,2) scores 0.9: PRO = 1/3 while the 6 normal pixels (0.8 .. 0.3) take FPR from 0 to 1;
    # area up to 0.3 is 0.3 * 1/3, normalised: 1/3 (4-connectivity would give (1/2 * 0 + 1/2 * 1) = 0.5).
    mask = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=bool)
    amap = np.array([[0.05, 0.05, 0.8], [0.7, 0.6, 0.9], [0.5, 0.4, 0.3]])
    assert aupro([mask], [amap]) == pytest.approx(1 / 3, abs=1e-12)


def test_aupro_perfect_and_worst() -> None:
    masks, _ = _toy_two_regions()
    perfect = [m.astype(float) + 0.0 for m in masks]
    assert aupro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, [1.0 - m for m in perfect]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("levels", [None, 7])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed: int, levels: int | None, limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, SHAPES)
    maps = _random_maps(rng, masks, levels)
    assert len(_label_8connected(masks[0])) == 1  # the diagonal-touching pair of image 0
    expected = _brute_force_aupro(masks, maps, limit)
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


def test_pixel_metrics_accept_stacked_arrays_and_uint8_masks() -> None:
    rng = np.random.default_rng(11)
    masks = _random_masks(rng, [(20, 24)] * 5)
    maps = _random_maps(rng, masks, levels=9)
    stacked_masks, stacked_maps = np.stack(masks).astype(np.uint8), np.stack(maps)
    assert aupro(stacked_masks, stacked_maps) == aupro(masks, maps)
    assert pixel_auroc(stacked_masks, stacked_maps) == pixel_auroc(masks, maps)
    assert pixel_f1_max(stacked_masks, stacked_maps) == pixel_f1_max(masks, maps)


def test_maps_of_different_sizes_per_image() -> None:
    rng = np.random.default_rng(5)
    shapes = [(8, 8), (33, 17), (5, 40)]
    masks = _random_masks(rng, [(20, 24), *shapes])[1:]
    maps = _random_maps(rng, masks, levels=None)
    labels = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert aupro(masks, maps) == pytest.approx(_brute_force_aupro(masks, maps, 0.3), abs=1e-9)


def test_compute_all_keys() -> None:
    masks, maps = _toy_two_regions()
    labels, scores = np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1])
    everything = compute_all(labels, scores, masks, maps)
    assert set(everything) == {"image_AUROC", "pixel_AUROC", "AUPRO", "image_F1Max", "pixel_F1Max"}
    assert everything["AUPRO"] == pytest.approx(0.2375 / 0.3, abs=1e-12)
    assert everything["image_AUROC"] == everything["image_F1Max"] == 1.0
    assert set(compute_all(labels, scores)) == {"image_AUROC", "image_F1Max"}


# --------------------------------------------------------------------------- errors


def test_single_class_labels_raise() -> None:
    with pytest.raises(ConfigError, match="no anomalous ones"):
        image_auroc(np.zeros(4), np.arange(4.0))
    with pytest.raises(ConfigError, match="no normal ones"):
        image_auroc(np.ones(4), np.arange(4.0))
    with pytest.raises(ConfigError, match="at least one anomalous"):
        f1_max(np.zeros(4), np.arange(4.0))
    with pytest.raises(ConfigError, match="no anomalous ones"):
        pixel_auroc([np.zeros((3, 3), bool)], [np.zeros((3, 3))])
    with pytest.raises(ConfigError, match="at least one anomalous region"):
        aupro([np.zeros((3, 3), bool)], [np.zeros((3, 3))])
    with pytest.raises(ConfigError, match="every mask is full"):
        aupro([np.ones((3, 3), bool)], [np.zeros((3, 3))])


def test_mismatched_shapes_raise_naming_the_image() -> None:
    with pytest.raises(ConfigError, match="equal length"):
        image_auroc(np.array([0, 1, 1]), np.array([0.1, 0.2]))
    masks = [np.zeros((4, 4), bool), np.ones((4, 5), bool)]
    maps = [np.zeros((4, 4)), np.zeros((5, 4))]
    with pytest.raises(ConfigError, match=r"image 1: mask shape \(4, 5\) != anomaly map shape \(5, 4\)"):
        aupro(masks, maps)
    with pytest.raises(ConfigError, match="2 masks but 1 anomaly maps"):
        pixel_auroc(masks, maps[:1])
    with pytest.raises(ConfigError, match="2-D"):
        pixel_f1_max([np.zeros(4, bool)], [np.zeros(4)])


def test_bad_values_raise() -> None:
    with pytest.raises(ConfigError, match="NaN or infinite"):
        image_auroc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ConfigError, match="only 0/1"):
        image_auroc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ConfigError, match=r"image 0: mask must contain only 0/1.*mask > 0"):
        pixel_auroc([np.array([[0, 255]], np.uint8)], [np.zeros((1, 2))])
    with pytest.raises(ConfigError, match="image 0: anomaly map contains NaN"):
        aupro([np.array([[0, 1]], bool)], [np.array([[np.inf, 0.0]])])
    masks, maps = _toy_two_regions()
    for limit in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="fpr_limit"):
            aupro(masks, maps, fpr_limit=limit)
    with pytest.raises(ConfigError, match="both masks and anomaly maps"):
        compute_all(np.array([0, 1]), np.array([0.1, 0.2]), masks=masks)


# --------------------------------------------------------------------------- memory


def test_pixel_metrics_memory_is_linear_in_pixels() -> None:
    # 100 images of 900 x 900 = 81M pixels. The inputs (float32 maps 324 MB, bool masks 81 MB) exist
    # before tracing starts. Expected working set: one float32 copy of every score (4 B/px, 324 MB) plus
    # ~30 B per anomalous pixel (~7 % here) for the argsort and region weights: ~0.5 GB. The bound of
    # 12 B/px (~0.97 GB) fails on any float64 copy plus int64 sort index of all pixels (16 B/px, 1.3 GB),
    # let alone a thresholds x pixels matrix (81 MB per threshold even as bool).
    rng = np.random.default_rng(0)
    n, side = 100, 900
    masks = np.zeros((n, side, side), dtype=bool)
    maps = np.empty((n, side, side), dtype=np.float32)
    for i in range(n):
        for _ in range(3):
            r, c, h, w = rng.integers(0, side - 200, 2).tolist() + rng.integers(10, 200, 2).tolist()
            masks[i, r : r + h, c : c + w] = True
        maps[i] = rng.random((side, side), dtype=np.float32)
    maps += masks * np.float32(0.3)
    bound = 12 * masks.size

    tracemalloc.start()
    try:
        start = time.perf_counter()
        pro = aupro(masks, maps)
        _, peak_aupro = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        auc = pixel_auroc(masks, maps)
        _, peak_auroc = tracemalloc.get_traced_memory()
        elapsed = time.perf_counter() - start
    finally:
        tracemalloc.stop()
    print(
        f"\nAUPRO {pro:.4f} peak {peak_aupro / 2**20:.0f} MiB; pixel AUROC {auc:.4f} peak "
        f"{peak_auroc / 2**20:.0f} MiB; {elapsed:.1f} s for {masks.size / 1e6:.0f}M pixels"
    )
    assert 0.0 < pro < 1.0 and 0.5 < auc < 1.0
    assert peak_aupro < bound
    assert peak_auroc < bound
