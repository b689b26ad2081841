"""OAGM contact sheet (`render_sheet`): image | object region | synthetic anomaly | exact mask, one row each.

What ``hpad oagm`` writes so that a person can check the regions and the anomalies at a glance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from hpad.errors import ConfigError
from hpad.frames import gray_or_rgb
from hpad.oagm.config import ObjectRegion, Synthetic


@dataclass(frozen=True)
class SheetRow:
    """One row of `render_sheet`: the normal image, its object region and one synthetic anomaly of it."""

    image: np.ndarray
    region: ObjectRegion
    synthetic: Synthetic
    title: str = ""


def _rgb(image: np.ndarray) -> np.ndarray:
    image = gray_or_rgb(image)
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image


def _fit(image: np.ndarray, cell: int, interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """Letterbox an RGB image into a cell x cell square (dark grey padding)."""
    h, w = image.shape[:2]
    scale = cell / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(image, size, interpolation=interpolation)
    out = np.full((cell, cell, 3), 40, np.uint8)
    oy, ox = (cell - size[1]) // 2, (cell - size[0]) // 2
    out[oy : oy + size[1], ox : ox + size[0]] = small
    return out


def _overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    rgb = _rgb(image).astype(np.float32)
    tint = np.asarray(colour, np.float32)
    rgb[mask] = 0.55 * rgb[mask] + 0.45 * tint
    out = rgb.astype(np.uint8)
    edge = mask.astype(np.uint8) - cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8))
    edge = cv2.dilate(edge, np.ones((max(1, min(mask.shape) // 150),) * 2, np.uint8)) > 0
    out[edge] = colour
    return out


def _label(cell: np.ndarray, lines: Sequence[str], band: int) -> np.ndarray:
    out = np.full((cell.shape[0] + band, cell.shape[1], 3), 20, np.uint8)
    out[band:] = cell
    scale = 0.4
    for i, text in enumerate(lines):
        cv2.putText(out, text, (4, 14 + 15 * i), cv2.FONT_HERSHEY_SIMPLEX, scale, (235, 235, 235), 1, cv2.LINE_AA)
    return out


def render_sheet(rows: Sequence[SheetRow], cell: int = 224, title: str = "") -> np.ndarray:
    """Contact sheet, uint8 RGB: one row per `SheetRow` with 4 cells of ``cell`` px plus a 36 px label band:

    image | object mask overlay (kind, coverage, score) | synthetic anomaly | its exact mask (white).
    An optional ``title`` band (e.g. the random-weights warning) goes on top. Shape:
    ``(len(rows) * (cell + 36) + (24 if title else 0), 4 * cell + 3 * 4, 3)``.
    """
    if not rows:
        raise ConfigError("render_sheet needs at least one row")
    band, gap = 36, 4
    lines_out: list[np.ndarray] = []
    for row in rows:
        region, syn = row.region, row.synthetic
        cells = [
            _label(_fit(_rgb(row.image), cell), [row.title or "normal", f"{row.image.shape[1]}x{row.image.shape[0]}"], band),
            _label(_fit(_overlay(row.image, region.mask, (0, 200, 255)), cell),
                   [f"region: {region.kind}", f"cover {region.fraction:.0%}  score {region.score:.2f}"], band),
            _label(_fit(_rgb(syn.image), cell), ["synthetic", syn.generator], band),
            _label(_fit(np.repeat(syn.mask[..., None].astype(np.uint8) * 255, 3, axis=2), cell, cv2.INTER_NEAREST),
                   ["mask", f"{int(syn.mask.sum())} px, {syn.mask.mean():.1%}"], band),
        ]
        spacer = np.full((cell + band, gap, 3), 255, np.uint8)
        line = cells[0]
        for part in cells[1:]:
            line = np.concatenate([line, spacer, part], axis=1)
        lines_out.append(line)
    sheet = np.concatenate(lines_out, axis=0)
    if title:
        head = np.full((24, sheet.shape[1], 3), 60, np.uint8)
        cv2.putText(head, title, (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 220, 120), 1, cv2.LINE_AA)
        sheet = np.concatenate([head, sheet], axis=0)
    return sheet
