"""Datasets in the MVTec AD layout: find categories, list and validate their files, read images and masks.

A category folder looks like this (file names are free; masks pair with test images by stem)::

    <category>/train/good/*.png
    <category>/test/good/*.png
    <category>/test/<defect_type>/*.png
    <category>/ground_truth/<defect_type>/<stem>_mask.png   # single channel, 0/255, same size as the image

`load_category` checks the layout up front (without decoding any pixels) and raises `DataLayoutError` with the
offending path and what was expected, so a bad dataset fails before any model work starts. Images are read lazily
with `read_image` / `read_mask`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from hpad.errors import ConfigError, DataLayoutError

__all__ = [
    "IMAGE_SUFFIXES",
    "CategoryData",
    "Sample",
    "find_categories",
    "is_image_file",
    "load_category",
    "read_image",
    "read_mask",
    "sample_shots",
]

#: File suffixes treated as images (compared case-insensitively, so ``.PNG`` counts too).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

GOOD = "good"
MASK_SUFFIX = "_mask"
_MAX_CATEGORY_DEPTH = 2  # find_categories looks at root itself and folders 1 or 2 levels below it


@dataclass(frozen=True)
class Sample:
    """One test image: its defect type ("good" for normal), label (0 normal, 1 anomalous) and mask (None if good)."""

    path: Path
    defect_type: str
    label: int
    mask_path: Path | None


@dataclass(frozen=True)
class CategoryData:
    """The validated file lists of one category. `root` is the category folder itself."""

    root: Path
    name: str
    train: tuple[Path, ...]
    test: tuple[Sample, ...]

    @property
    def defect_types(self) -> tuple[str, ...]:
        """Defect types that have at least one test image, sorted; "good" excluded."""
        return tuple(sorted({s.defect_type for s in self.test if s.label == 1}))


# ---------------------------------------------------------------------------------------------------------------
# finding and listing


def is_image_file(path: Path) -> bool:
    """True for a visible regular file whose suffix is in IMAGE_SUFFIXES (any case)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (deterministic across file systems)."""
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
    )


def find_categories(root: Path | str) -> list[str]:
    """Categories under `root`: every folder that holds a ``test/`` folder, as a path relative to `root`.

    Same rule as ``/work/shared/data/check_layout.py``: `root` itself counts (it is returned as its own name), the
    search does not descend into a category, hidden folders are skipped. The search stops 2 levels below `root`
    (``root/<category>`` or ``root/<dataset>/<category>``). Sorted; names use "/" between levels.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    if (root / "test").is_dir():
        return [root.name]
    found: list[str] = []

    def walk(folder: Path, depth: int) -> None:
        for sub in _subdirs(folder):
            if (sub / "test").is_dir():
                found.append(sub.relative_to(root).as_posix())
            elif depth < _MAX_CATEGORY_DEPTH:
                walk(sub, depth + 1)

    walk(root, 1)
    return sorted(found)


def _resolve_category_dir(root: Path, category: str) -> Path:
    if not root.is_dir():
        raise DataLayoutError(
            f"dataset root {root} does not exist or is not a folder; pass the folder that holds "
            f"the category folder (e.g. the parent of '{category}/')"
        )
    direct = root / category
    if direct.is_dir():
        return direct
    if root.name == category and (root / "test").is_dir():
        return root
    found = find_categories(root)
    matches = [c for c in found if c.rsplit("/", 1)[-1] == category]
    if len(matches) == 1:
        return root / matches[0]
    if len(matches) > 1:
        raise DataLayoutError(
            f"category '{category}' is ambiguous under {root}: found {matches}; pass the "
            f"dataset folder that holds the one you mean as the root"
        )
    listing = ", ".join(found) if found else "none (no folder with a test/ subfolder)"
    raise DataLayoutError(
        f"category folder {direct} not found: expected {direct}/ with train/good/, test/ and "
        f"ground_truth/ subfolders (MVTec AD layout); categories found under {root}: {listing}"
    )


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header only; pixels are not decoded."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataLayoutError(
            f"cannot read image header of {path}: {exc}; expected a readable image file"
        ) from exc


def _find_mask(gt_dir: Path, image: Path) -> Path | None:
    """ground_truth/<defect>/<stem>_mask.png, or the same name with another image suffix; None if absent."""
    preferred = gt_dir / f"{image.stem}{MASK_SUFFIX}.png"
    if preferred.is_file():
        return preferred
    for suffix in IMAGE_SUFFIXES[1:]:
        for candidate in (
            gt_dir / f"{image.stem}{MASK_SUFFIX}{suffix}",
            gt_dir / f"{image.stem}{MASK_SUFFIX}{suffix.upper()}",
        ):
            if candidate.is_file():
                return candidate
    return None


def load_category(root: Path | str, category: str) -> CategoryData:
    """List and validate one category; raise DataLayoutError naming the path and the expectation on any problem.

    `root` may be the folder that holds ``<category>/`` (``data/mvtec`` + ``bottle``), a folder above it where
    the category is found by `find_categories` (``data`` + ``bottle`` finds ``data/mvtec/bottle``), or the category
    folder itself. Checks: train/good exists and has images; test/ exists and has images; every defect image has
    ``ground_truth/<defect>/<stem>_mask.png`` of the same width and height (read from the headers only).
    Files are sorted by name; test samples list test/good first, then defect types in sorted order.
    """
    root = Path(root)
    cat_dir = _resolve_category_dir(root, category)

    train_dir = cat_dir / "train" / GOOD
    if not train_dir.is_dir():
        raise DataLayoutError(
            f"{train_dir} not found: expected a train/good/ folder with normal images in category {cat_dir}"
        )
    train = tuple(_list_images(train_dir))
    if not train:
        raise DataLayoutError(
            f"{train_dir} holds no image: expected normal training images ({', '.join(IMAGE_SUFFIXES)})"
        )

    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise DataLayoutError(
            f"{test_dir} not found: expected test/good/ and test/<defect_type>/ folders in category {cat_dir}"
        )
    type_dirs = _subdirs(test_dir)
    type_dirs.sort(key=lambda p: (p.name != GOOD, p.name))  # good first, then defect types by name

    gt_root = cat_dir / "ground_truth"
    test: list[Sample] = []
    for type_dir in type_dirs:
        defect_type = type_dir.name
        images = _list_images(type_dir)
        if defect_type == GOOD:
            test.extend(Sample(path=p, defect_type=GOOD, label=0, mask_path=None) for p in images)
            continue
        gt_dir = gt_root / defect_type
        for image in images:
            mask = _find_mask(gt_dir, image)
            if mask is None:
                expected = gt_dir / f"{image.stem}{MASK_SUFFIX}.png"
                raise DataLayoutError(
                    f"no mask for defect image {image}: expected {expected} "
                    f"(single-channel, 0/255, same size as the image)"
                )
            image_size, mask_size = _image_size(image), _image_size(mask)
            if image_size != mask_size:
                raise DataLayoutError(
                    f"mask {mask} is {mask_size[0]}x{mask_size[1]} (WxH) but its image {image} "
                    f"is {image_size[0]}x{image_size[1]}: expected the same size"
                )
            test.append(Sample(path=image, defect_type=defect_type, label=1, mask_path=mask))
    if not test:
        raise DataLayoutError(
            f"{test_dir} holds no test image: expected images in test/good/ and/or "
            f"test/<defect_type>/ ({', '.join(IMAGE_SUFFIXES)})"
        )
    return CategoryData(root=cat_dir, name=cat_dir.name, train=train, test=tuple(test))


# ---------------------------------------------------------------------------------------------------------------
# reading pixels


def _decode(path: Path | str) -> np.ndarray:
    """Raw cv2 decode (IMREAD_UNCHANGED: native bit depth, channel count, BGR order); DataLayoutError if unreadable."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataLayoutError(f"cannot read image file {path}: {exc}") from exc
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None or image.size == 0:
        raise DataLayoutError(
            f"cannot decode image file {path}: expected a valid "
            f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} image"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return image


def _to_uint8(image: np.ndarray, path: Path | str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        # 65535 -> 255 and v*257 -> v exactly (the usual 8->16-bit expansion), rounded to nearest
        return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    raise DataLayoutError(
        f"image {path} has unsupported pixel type {image.dtype}: expected 8- or 16-bit integers"
    )


def read_image(path: Path | str) -> np.ndarray:
    """Decode an image to uint8: [H, W, 3] RGB for colour files, [H, W] for single-channel grayscale files.

    16-bit images are scaled to 8 bits, alpha is dropped, palette images come out as RGB (grayscale files with an
    alpha channel also come out as RGB). Raises DataLayoutError naming the path if the file cannot be decoded.
    """
    image = _to_uint8(_decode(path), path)
    if image.ndim == 2:
        return image
    channels = image.shape[2]
    if channels == 2:  # gray + alpha (cv2 normally expands it to BGRA, kept for other decoders)
        return np.ascontiguousarray(image[:, :, 0])
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise DataLayoutError(
        f"image {path} has {channels} channels: expected 1 (gray), 3 (colour) or 4 (with alpha)"
    )


def read_mask(path: Path | str | None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool [H, W] (any nonzero pixel, in any channel, is anomalous).

    `path=None` (a normal image) gives an all-False array of `shape`. With both given, a mask whose size differs
    from `shape` raises DataLayoutError.
    """
    if path is None:
        if shape is None:
            raise ConfigError("read_mask needs a shape when path is None (a normal image has no mask file)")
        return np.zeros(tuple(shape), dtype=bool)
    raw = _decode(path)
    mask = raw != 0 if raw.ndim == 2 else (raw[:, :, :3] != 0).any(axis=2)
    if shape is not None and mask.shape != tuple(shape):
        raise DataLayoutError(
            f"mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
            f"{shape[1]}x{shape[0]}: expected the same size"
        )
    return mask


# ---------------------------------------------------------------------------------------------------------------
# few-shot selection


def sample_shots(paths: Sequence[Path | str], k: int, seed: int) -> list[Path]:
    """Pick `k` distinct paths with ``numpy.random.default_rng(seed)``.

    The result depends only on the set of paths, `k` and `seed` (the input is de-duplicated and sorted first).
    It is a prefix of a seeded permutation, so for one seed the k-shot set is contained in every larger-k set.
    Raises ConfigError if k < 1 or k exceeds the number of distinct paths.
    """
    pool = sorted({Path(p) for p in paths}, key=os.fspath)
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ConfigError(f"number of shots must be an integer, got {k!r}")
    if k < 1:
        raise ConfigError(f"number of shots must be at least 1, got {k}")
    if k > len(pool):
        raise ConfigError(
            f"asked for {k} shots but only {len(pool)} distinct normal images are available; "
            f"use k <= {len(pool)} or add images to train/good"
        )
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order[:k]]
