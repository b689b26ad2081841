"""Region of interest and tiled scoring: high-resolution frames scored as overlapping tiles at the model's size.

The scorer resizes whatever it is given to the model's input size (240 px for ViT-B-16-plus-240), so a
4000x3000 frame scored whole loses a few-millimetre defect below one ViT patch. Here a frame is scored as:

1. **ROI** (`Box`, pixels of the frame's full size): only the region of interest is scored; the map and the
   mask are still reported at the frame's full size, zero outside the ROI.
2. **Tile plan** (`plan_tiles`): the ROI is split into a grid of equal, overlapping tiles. ``auto``
   (default) tiles only regions above ``TilingPolicy.min_pixels``, with tiles at the model's input size
   (native resolution) or, when that would be more than ``max_tiles``, the smallest larger tiles that fit
   the cap; ``COLSxROWS`` asks for an explicit grid; ``off`` scores the ROI whole. Overlap is the fraction
   of a tile shared with its neighbour (0..0.9).
3. **Scoring** (`hpad.tiled_scoring`, tensors): the tiles of every frame of a batch go through ONE
   `hpad.scorer.Scorer.score_batch` call, so tiles fill batches like frames do. A frame's image score is
   the **maximum over its tiles**; tile maps are blended into one map at the frame's full size (a weighted
   average where tiles overlap, each tile's own map, bit for bit, where only one tile covers a pixel).

This module is the geometry only (pure Python, no tensors), so the header parser (`consumers.contract`)
and the camera validate ROI and tiling without importing torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from hpad.errors import ConfigError, FrameError

__all__ = ["MAX_OVERLAP", "MIN_TILE_SIDE", "OFF", "Box", "TilePlan", "TileSpec", "TilingPolicy", "auto_grid",
           "axis_tiles", "plan_tiles"]

MAX_OVERLAP = 0.9
MIN_TILE_SIDE = 8  # pixels of the full frame: a finer grid is refused (bad_tiling)
TileMode = Literal["auto", "off", "grid"]
_SPEC_RE = re.compile(r"^(auto|off|(\d{1,3})\s*x\s*(\d{1,3}))(?:\s*@\s*(\d*\.?\d+))?$", re.IGNORECASE)


@dataclass(frozen=True)
class Box:
    """A rectangle in pixels of the frame's full size: left ``x``, top ``y``, width ``w``, height ``h``."""

    x: int
    y: int
    w: int
    h: int

    def __post_init__(self) -> None:
        if self.x < 0 or self.y < 0 or self.w < 1 or self.h < 1:
            raise ConfigError(f"box {self.describe()} needs x, y >= 0 and w, h >= 1")

    @classmethod
    def full(cls, size: tuple[int, int]) -> Box:
        """The whole frame of ``size`` (height, width)."""
        return cls(0, 0, int(size[1]), int(size[0]))

    def describe(self) -> str:
        return f"{self.x},{self.y},{self.w},{self.h}"

    @property
    def area(self) -> int:
        return self.w * self.h

    def fits(self, size: tuple[int, int]) -> bool:
        """Inside a frame of ``size`` (height, width)."""
        return self.x + self.w <= size[1] and self.y + self.h <= size[0]

    def scaled(self, out_size: tuple[int, int], pixel_size: tuple[int, int]) -> tuple[slice, slice]:
        """(rows, cols) slices of this box in pixels decoded at ``pixel_size`` for a frame of ``out_size``
        (both (height, width); equal sizes give the box itself). Rounded outwards, at least one pixel."""
        fy, fx = pixel_size[0] / out_size[0], pixel_size[1] / out_size[1]
        y0, x0 = math.floor(self.y * fy), math.floor(self.x * fx)
        y1 = min(pixel_size[0], max(y0 + 1, math.ceil((self.y + self.h) * fy)))
        x1 = min(pixel_size[1], max(x0 + 1, math.ceil((self.x + self.w) * fx)))
        return slice(y0, y1), slice(x0, x1)


@dataclass(frozen=True)
class TileSpec:
    """What a frame (header ``tiling``) or the service (``HPAD_TILING``) asks for: ``auto``, ``off``, or an
    explicit ``grid`` of ``cols`` x ``rows``; ``overlap`` None = the policy's default."""

    mode: TileMode = "auto"
    cols: int = 0
    rows: int = 0
    overlap: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "off", "grid"):
            raise ConfigError(f"tiling mode {self.mode!r} must be auto, off or COLSxROWS")
        if self.mode == "grid" and (self.cols < 1 or self.rows < 1):
            raise ConfigError(f"a tile grid needs cols and rows >= 1, got {self.cols}x{self.rows}")
        if self.mode != "grid" and (self.cols or self.rows):
            raise ConfigError(f"tiling {self.mode} takes no grid")
        if self.overlap is not None and not 0.0 <= self.overlap <= MAX_OVERLAP:
            raise ConfigError(f"tile overlap must be within 0..{MAX_OVERLAP}, got {self.overlap}")

    @classmethod
    def parse(cls, text: str) -> TileSpec:
        """``auto`` | ``off`` | ``COLSxROWS``, optionally ``@OVERLAP`` (``4x3@0.25``, ``auto@0.1``); ConfigError
        saying what is wrong otherwise."""
        match = _SPEC_RE.match(text.strip())
        if match is None:
            raise ConfigError(f"tiling {text[:64]!r} is not auto, off or COLSxROWS[@OVERLAP] (e.g. 4x3@0.25)")
        word, cols, rows, overlap_text = match.groups()
        overlap = None if overlap_text is None else float(overlap_text)
        mode = word.lower() if cols is None else "grid"
        if mode == "off" and overlap is not None:
            raise ConfigError(f"tiling {text[:64]!r}: 'off' takes no overlap")
        try:
            return cls(mode, int(cols or 0), int(rows or 0), overlap)  # type: ignore[arg-type]
        except ConfigError as exc:
            raise ConfigError(f"tiling {text[:64]!r}: {exc}") from None

    @property
    def tiles(self) -> int:
        """Tiles of an explicit grid (0 for auto/off)."""
        return self.cols * self.rows

    def describe(self) -> str:
        text = f"{self.cols}x{self.rows}" if self.mode == "grid" else self.mode
        return text if self.overlap is None else f"{text}@{self.overlap:g}"


@dataclass(frozen=True)
class TilingPolicy:
    """The service's defaults: ``default`` spec for frames that say nothing; ``overlap`` when a spec has
    none; ``auto`` tiles only regions of more than ``min_pixels``; at most ``max_tiles`` tiles a frame."""

    default: TileSpec = TileSpec("auto")
    overlap: float = 0.25
    min_pixels: int = 2_000_000
    max_tiles: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap <= MAX_OVERLAP:
            raise ConfigError(f"tile overlap must be within 0..{MAX_OVERLAP}, got {self.overlap}")
        if self.min_pixels < 0 or self.max_tiles < 1:
            raise ConfigError(f"min_pixels must be >= 0 and max_tiles >= 1, got {self.min_pixels}, {self.max_tiles}")
        if self.default.tiles > self.max_tiles:
            raise ConfigError(f"default tiling {self.default.describe()} has more than max_tiles={self.max_tiles}")


OFF = TilingPolicy(TileSpec("off"))


@dataclass(frozen=True)
class TilePlan:
    """How one frame of ``size`` (height, width) is scored: ``roi``, and the grid of tiles inside it.
    ``xs``/``ys``: (start, length) of the grid's columns and rows in frame pixels; tiles are row-major."""

    size: tuple[int, int]
    roi: Box
    xs: tuple[tuple[int, int], ...]
    ys: tuple[tuple[int, int], ...]

    @classmethod
    def whole(cls, size: tuple[int, int]) -> TilePlan:
        box = Box.full(size)
        return cls((int(size[0]), int(size[1])), box, ((0, box.w),), ((0, box.h),))

    @property
    def tiles(self) -> list[Box]:
        return [Box(x, y, w, h) for y, h in self.ys for x, w in self.xs]

    @property
    def n_tiles(self) -> int:
        return len(self.xs) * len(self.ys)

    @property
    def grid(self) -> tuple[int, int]:
        """(cols, rows)."""
        return len(self.xs), len(self.ys)

    @property
    def is_whole(self) -> bool:
        """One tile covering the whole frame: scored exactly as `Scorer.score_batch` scores a frame."""
        return self.n_tiles == 1 and self.roi == Box.full(self.size)

    def decode_target(self, model_size: tuple[int, int]) -> tuple[int, int]:
        """The smallest (height, width) the whole frame may be decoded at so that every tile still covers
        the model's input size (`consumers.decode.jpeg_scale` picks the DCT scale from it)."""
        tile_h, tile_w = self.ys[0][1], self.xs[0][1]
        return (math.ceil(model_size[0] * self.size[0] / tile_h), math.ceil(model_size[1] * self.size[1] / tile_w))


# ----------------------------------------------------------------------------------------------- planning


def axis_tiles(length: int, n: int, overlap: float) -> tuple[tuple[int, int], ...]:
    """Split ``length`` pixels into ``n`` equal segments sharing about ``overlap`` of a segment with each
    neighbour: ((start, size), ...), the first at 0, the last ending at ``length``."""
    if n < 1 or length < 1:
        raise ConfigError(f"cannot split {length} pixels into {n} tiles")
    if n == 1:
        return ((0, length),)
    size = min(length, math.ceil(length / (n - (n - 1) * overlap)))
    return tuple((round(i * (length - size) / (n - 1)), size) for i in range(n))


def _count(length: int, tile: float, overlap: float) -> int:
    """Fewest tiles of at most ``tile`` pixels that cover ``length`` with ``overlap``."""
    return max(1, math.ceil((length / tile - overlap) / (1.0 - overlap) - 1e-9))


def auto_grid(roi: tuple[int, int], model_size: tuple[int, int], overlap: float, max_tiles: int) -> tuple[int, int]:
    """(cols, rows) for a region of ``roi`` (height, width): tiles at the model's input size, or the
    smallest larger tiles (same scale on both axes) that keep cols x rows <= ``max_tiles``."""
    scale = 1.0
    while True:
        cols = _count(roi[1], model_size[1] * scale, overlap)
        rows = _count(roi[0], model_size[0] * scale, overlap)
        if cols * rows <= max_tiles:
            return cols, rows
        scale *= 1.05


def plan_tiles(size: tuple[int, int], model_size: tuple[int, int], spec: TileSpec | None = None,
               roi: Box | None = None, policy: TilingPolicy = OFF) -> TilePlan:
    """The plan of a frame of ``size`` (height, width): ``roi`` (default: the whole frame) and ``spec``
    (default: the policy's). Raises ``FrameError`` ``roi_outside_frame`` or ``bad_tiling``."""
    size = (int(size[0]), int(size[1]))
    region = roi if roi is not None else Box.full(size)
    if not region.fits(size):
        raise FrameError("roi_outside_frame", f"roi {region.describe()} (x,y,w,h) reaches beyond the "
                         f"{size[1]}x{size[0]} frame")
    spec = spec if spec is not None else policy.default
    overlap = policy.overlap if spec.overlap is None else spec.overlap
    if spec.mode == "grid":
        if spec.tiles > policy.max_tiles:
            raise FrameError("bad_tiling", f"tiling {spec.describe()} asks for {spec.tiles} tiles, over the "
                             f"limit of {policy.max_tiles}")
        cols, rows = spec.cols, spec.rows
    elif spec.mode == "auto" and region.area > policy.min_pixels:
        cols, rows = auto_grid((region.h, region.w), model_size, overlap, policy.max_tiles)
    else:
        cols, rows = 1, 1
    if region.w // cols < MIN_TILE_SIDE or region.h // rows < MIN_TILE_SIDE:
        raise FrameError("bad_tiling", f"tiling {spec.describe()} cuts the {region.w}x{region.h} region into "
                         f"tiles under {MIN_TILE_SIDE} pixels")
    xs = tuple((region.x + s, n) for s, n in axis_tiles(region.w, cols, overlap))
    ys = tuple((region.y + s, n) for s, n in axis_tiles(region.h, rows, overlap))
    return TilePlan(size, region, xs, ys)
