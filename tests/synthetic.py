"""Synthetic MVTec-AD-style test data: "product photos" with known object and defect masks, written to disk.

    rng = np.random.default_rng(0)
    image, object_mask = make_object_image(rng, (96, 96))
    bad, defect_mask = add_defect(rng, image, object_mask, kind="scratch")
    category_dir = write_mvtec_category(tmp_path, "widget", defect_types=("scratch", "hole"))

Every image of one call shows the same kind of object (same colours) at a jittered place with its own texture,
so normal images look alike and defects (dark scratches / blobs inside the object) stand out. Pure numpy + cv2,
fast: a default category is written in a few milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

__all__ = ["DEFECT_KINDS", "add_defect", "make_object_image", "write_mvtec_category"]

Box = tuple[int, int, int, int]  # (top, left, bottom, right), bottom/right exclusive

BACKGROUND_RGB = (70, 82, 96)
OBJECT_RGB = (205, 160, 70)
DEFECT_KINDS = ("scratch", "blob")
_PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled with bicubic interpolation."""
    h, w = shape
    grid = rng.uniform(-1.0, 1.0, (max(2, cells), max(2, cells))).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _default_box(rng: np.random.Generator, h: int, w: int) -> Box:
    bh, bw = int(h * rng.uniform(0.5, 0.65)), int(w * rng.uniform(0.5, 0.65))
    top = (h - bh) // 2 + int(rng.integers(-h // 12, h // 12 + 1))
    left = (w - bw) // 2 + int(rng.integers(-w // 12, w // 12 + 1))
    top, left = min(max(top, 0), h - bh), min(max(left, 0), w - bw)
    return top, left, top + bh, left + bw


def make_object_image(
    rng: np.random.Generator,
    size: tuple[int, int] = (96, 96),
    *,
    grayscale: bool = False,
    object_box: Box | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A textured background with one shaded, textured ellipse inscribed in `object_box`.

    `size` is (H, W); `object_box` is (top, left, bottom, right) in pixels, random near the centre if None.
    Returns (uint8 [H, W, 3] RGB, or [H, W] if `grayscale`; bool [H, W] object mask).
    """
    h, w = size
    if h < 8 or w < 8:
        raise ValueError(f"size must be at least 8x8, got {size}")
    top, left, bottom, right = object_box if object_box is not None else _default_box(rng, h, w)
    if not (0 <= top < bottom <= h and 0 <= left < right <= w):
        raise ValueError(f"object_box {object_box} does not fit in an image of size {size}")

    fine = rng.normal(0.0, 1.0, (h, w)).astype(np.float32)
    background = (
        np.asarray(BACKGROUND_RGB, np.float32)
        + (12.0 * _smooth_noise(rng, (h, w), 4) + 3.0 * fine)[..., None]
    )

    drawn = np.zeros((h, w), np.uint8)
    # sub-pixel centre/axes (4 fractional bits) so the ellipse touches, but stays inside, the box
    centre = (round((left + right - 1) / 2 * 16), round((top + bottom - 1) / 2 * 16))
    axes = (round(max(0.5, (right - left - 1) / 2) * 16), round(max(0.5, (bottom - top - 1) / 2) * 16))
    cv2.ellipse(drawn, centre, axes, 0.0, 0.0, 360.0, 255, thickness=-1, lineType=cv2.LINE_8, shift=4)
    object_mask = drawn > 0

    # shading from top-left to bottom-right plus a mottled surface texture
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    shade = 1.0 - 0.25 * ((yy - top) / max(1, bottom - top) + (xx - left) / max(1, right - left)) / 2.0
    texture = 8.0 * _smooth_noise(rng, (h, w), 10) + 4.0 * fine
    foreground = np.asarray(OBJECT_RGB, np.float32) * shade[..., None] + texture[..., None]

    image = np.where(object_mask[..., None], foreground, background)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if grayscale:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return image, object_mask


def add_defect(
    rng: np.random.Generator,
    image: np.ndarray,
    object_mask: np.ndarray,
    *,
    kind: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint a dark scratch (thick line) or blob strictly inside the object; `kind` random among DEFECT_KINDS if None.

    Returns (a new image, same shape/dtype; bool [H, W] defect mask, non-empty and a subset of `object_mask`).
    """
    if kind is None:
        kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
    if kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {DEFECT_KINDS}")
    object_mask = np.asarray(object_mask, bool)
    if not object_mask.any():
        raise ValueError("object_mask is empty: nowhere to put a defect")
    h, w = object_mask.shape
    ys, xs = np.nonzero(object_mask)
    extent = max(4, min(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))

    # centre well inside the object so most of the defect lands on it
    radius = max(1, extent // 6)
    inner = cv2.erode(object_mask.astype(np.uint8), np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)) > 0
    candidates = np.argwhere(inner if inner.any() else object_mask)
    cy, cx = (int(v) for v in candidates[int(rng.integers(len(candidates)))])

    drawn = np.zeros((h, w), np.uint8)
    if kind == "scratch":
        angle = rng.uniform(0.0, np.pi)
        half = extent * rng.uniform(0.18, 0.3)
        dx, dy = half * np.cos(angle), half * np.sin(angle)
        thickness = max(2, extent // 20)
        cv2.line(drawn, (round(cx - dx), round(cy - dy)), (round(cx + dx), round(cy + dy)), 255, thickness)
    else:
        axes = (max(2, int(extent * rng.uniform(0.07, 0.14))), max(2, int(extent * rng.uniform(0.07, 0.14))))
        cv2.ellipse(
            drawn, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0.0, 360.0, 255, thickness=-1
        )
    defect_mask = (drawn > 0) & object_mask
    defect_mask[cy, cx] = True  # never empty, even for a one-pixel object

    out = image.copy()
    dark = rng.normal(28.0, 6.0, int(defect_mask.sum()))
    values = np.clip(np.rint(dark), 0, 255).astype(np.uint8)
    out[defect_mask] = values[:, None] if out.ndim == 3 else values
    return out, defect_mask


def _kind_for(defect_type: str) -> str:
    return "scratch" if any(word in defect_type for word in ("scratch", "crack", "line", "cut")) else "blob"


def _random_size(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    return (max(32, int(h * rng.uniform(0.7, 1.3))), max(32, int(w * rng.uniform(0.7, 1.3))))


def _write_png(path: Path, image: np.ndarray) -> None:
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, buf = cv2.imencode(".png", pixels, _PNG_FAST)
    if not ok:  # pragma: no cover
        raise RuntimeError(f"PNG encoding failed for {path}")
    path.write_bytes(buf.tobytes())


def write_mvtec_category(
    root: Path,
    category: str,
    *,
    n_train: int = 6,
    n_test_good: int = 4,
    n_test_defect: int = 4,
    defect_types: Sequence[str] = ("scratch",),
    size: tuple[int, int] = (96, 96),
    grayscale: bool = False,
    varying_sizes: bool = False,
    seed: int = 0,
) -> Path:
    """Write a category in the exact MVTec AD layout under ``root/category`` and return that folder.

    ``train/good/000.png ...``, ``test/good/000.png ...``, ``test/<type>/000.png ...`` (`n_test_defect` per
    type) and ``ground_truth/<type>/000_mask.png ...`` (single channel, 0/255), plus a LICENSE.txt. Types whose
    name contains scratch/crack/line/cut get scratches, the others dark blobs. `size` is (H, W);
    `varying_sizes` gives each image its own size (0.7-1.3x `size`, like magnetic_tile). Deterministic in `seed`.
    """
    rng = np.random.default_rng(seed)
    cat_dir = Path(root) / category

    for folder in (
        "train/good",
        "test/good",
        *(f"test/{t}" for t in defect_types),
        *(f"ground_truth/{t}" for t in defect_types),
    ):
        (cat_dir / folder).mkdir(parents=True, exist_ok=True)

    def next_size() -> tuple[int, int]:
        return _random_size(rng, size) if varying_sizes else size

    for i in range(n_train):
        image, _ = make_object_image(rng, next_size(), grayscale=grayscale)
        _write_png(cat_dir / "train" / "good" / f"{i:03d}.png", image)
    for i in range(n_test_good):
        image, _ = make_object_image(rng, next_size(), grayscale=grayscale)
        _write_png(cat_dir / "test" / "good" / f"{i:03d}.png", image)
    for defect_type in defect_types:
        for i in range(n_test_defect):
            image, object_mask = make_object_image(rng, next_size(), grayscale=grayscale)
            image, defect_mask = add_defect(rng, image, object_mask, kind=_kind_for(defect_type))
            _write_png(cat_dir / "test" / defect_type / f"{i:03d}.png", image)
            _write_png(
                cat_dir / "ground_truth" / defect_type / f"{i:03d}_mask.png",
                defect_mask.astype(np.uint8) * 255,
            )
    (cat_dir / "LICENSE.txt").write_text(
        "Synthetic test data generated by tests/synthetic.py (public domain).\n"
    )
    return cat_dir
