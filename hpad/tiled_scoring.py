"""Tiled scoring on tensors: crop a frame's tiles, score every tile of a batch in one scorer call, blend the
tile maps into one map at the frame's full size (the plans come from `hpad.tiling`).

* `score_frames` is THE scoring call of the service (`consumers.pipeline`) and of prompt learning /
  calibration when their images are tiled (`training_views`): one policy, one function. Image score =
  maximum over the frame's tiles; a frame scored whole takes exactly `Scorer.score_batch`'s path.
* `blend_tile_maps`: each tile's [S, S] map resized to its box, a linear feather across overlaps
  (`axis_weights`), weight exactly 1 where one tile covers a pixel (so the blend equals that tile's map there,
  bit for bit), zero outside the ROI.

Everything runs on the maps' / pixels' device (crops are views; no host syncs until masks are copied back).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hpad.errors import ConfigError
from hpad.frames import check_frame
from hpad.masks import PackedMask
from hpad.prompts import PromptSet
from hpad.scorer import Scorer, frame_to_chw, pack_mask_bits, resize_maps
from hpad.tiling import Box, TilePlan, TilingPolicy, plan_tiles


def axis_weights(segments: Sequence[tuple[int, int]], device: torch.device | None = None) -> list[torch.Tensor]:
    """Feather weights of each segment [size_i]: ramping linearly across the part it shares with the previous
    and the next segment, exactly 1 where no other segment reaches."""
    out = []
    for i, (start, size) in enumerate(segments):
        pos = torch.arange(size, device=device, dtype=torch.float32) + 0.5  # pixel centres from the start
        weight = torch.ones(size, device=device)
        if i > 0 and (shared := segments[i - 1][0] + segments[i - 1][1] - start) > 0:
            weight = weight * (pos / shared).clamp(max=1.0)
        if i + 1 < len(segments) and (shared := start + size - segments[i + 1][0]) > 0:
            weight = weight * ((size - pos) / shared).clamp(max=1.0)
        out.append(weight)
    return out


def blend_tile_maps(tile_maps: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """tile_maps [T, S, S] (row-major, as `TilePlan.tiles`) -> [H, W] at the frame's size on their device:
    each map resized to its tile, weighted average where tiles overlap, zero outside the ROI."""
    if tile_maps.shape[0] != plan.n_tiles:
        raise ConfigError(f"got {tile_maps.shape[0]} tile maps for a plan of {plan.n_tiles} tiles")
    device = tile_maps.device
    roi = plan.roi
    tile_h, tile_w = plan.ys[0][1], plan.xs[0][1]
    out = torch.zeros(plan.size, device=device)
    if plan.n_tiles == 1:
        out[roi.y : roi.y + roi.h, roi.x : roi.x + roi.w] = resize_maps(tile_maps[:1].float(), (tile_h, tile_w))[0]
        return out
    wy, wx = axis_weights(plan.ys, device), axis_weights(plan.xs, device)
    acc = torch.zeros(roi.h, roi.w, device=device)
    total = torch.zeros(roi.h, roi.w, device=device)
    index = 0
    for (y, h), row_w in zip(plan.ys, wy, strict=True):
        for (x, w), col_w in zip(plan.xs, wx, strict=True):
            weight = row_w[:, None] * col_w[None, :]
            rows, cols = slice(y - roi.y, y - roi.y + h), slice(x - roi.x, x - roi.x + w)
            tile = resize_maps(tile_maps[index : index + 1].float(), (h, w))[0]  # one at a time: less memory
            acc[rows, cols] += tile * weight
            total[rows, cols] += weight
            index += 1
    out[roi.y : roi.y + roi.h, roi.x : roi.x + roi.w] = acc / total
    return out


# ----------------------------------------------------------------------------------------------- scoring


def _pixel_size(frame: np.ndarray | torch.Tensor) -> tuple[int, int]:
    if isinstance(frame, torch.Tensor):
        return int(frame.shape[1]), int(frame.shape[2])  # uint8 [3, H, W]
    return int(frame.shape[0]), int(frame.shape[1])


def crop_tiles(frame: np.ndarray | torch.Tensor, plan: TilePlan) -> list[np.ndarray | torch.Tensor]:
    """The tiles of ``frame`` (an array [H, W(, C)] or a uint8 [3, H, W] tensor, possibly decoded at a
    reduced scale of ``plan.size``) as views of its pixels, row-major."""
    pixel_size = _pixel_size(frame)
    crops: list[np.ndarray | torch.Tensor] = []
    for tile in plan.tiles:
        rows, cols = tile.scaled(plan.size, pixel_size)
        crops.append(frame[:, rows, cols] if isinstance(frame, torch.Tensor) else frame[rows, cols])
    return crops


@dataclass
class FrameScores:
    """A scored batch of frames, tiled or not: ``pred_score`` [B] on the host (max over each frame's tiles),
    ``maps`` one tensor a frame on the scorer's device (the model-size map of a frame scored whole, else the
    blended map at the frame's size), ``sizes`` each frame's (H, W), ``tiles`` tiles scored per frame,
    ``tile_scores`` each frame's tile scores [tiles], row-major (calibration builds frame-level scores from them)."""

    pred_score: np.ndarray
    maps: list[torch.Tensor]
    sizes: list[tuple[int, int]]
    tiles: list[int]
    tile_scores: list[np.ndarray]

    def anomaly_maps(self) -> list[np.ndarray]:
        """Float maps [H, W] in [0, 1] at each frame's size (on the host)."""
        return [resize_maps(m[None], size)[0].cpu().numpy() for m, size in zip(self.maps, self.sizes, strict=True)]

    def masks(self, indices: Sequence[int], threshold: float) -> dict[int, PackedMask]:
        """Binary masks (map >= threshold) of frames ``indices`` at their sizes, packed as 1-bit PNG rows;
        frames whose maps and sizes match are packed in one call on the device."""
        groups: dict[tuple[tuple[int, ...], tuple[int, int]], list[int]] = {}
        for index in indices:
            groups.setdefault((tuple(self.maps[index].shape), self.sizes[index]), []).append(index)
        out: dict[int, PackedMask] = {}
        for (_, size), chosen in groups.items():
            bits, counts = pack_mask_bits(torch.stack([self.maps[i] for i in chosen]), size, threshold)
            bits_host, counts_host = bits.cpu().numpy(), counts.cpu().numpy()
            for row, index in enumerate(chosen):
                out[index] = PackedMask(bits_host[row], width=size[1], height=size[0], count=int(counts_host[row]))
        return out


def score_frames(scorer: Scorer, frames: Sequence[np.ndarray | torch.Tensor], prompts: PromptSet | None = None,
                 sizes: Sequence[tuple[int, int]] | None = None,
                 plans: Sequence[TilePlan | None] | None = None) -> FrameScores:
    """Score frames as the service scores them: each frame by its plan (None = whole), every tile of the
    batch in one `Scorer.score_batch` call. ``sizes``: each frame's full (H, W) when its pixels were decoded
    at a reduced scale (default: the pixels' own size); plans are in those full-size pixels."""
    tensors = [frame_to_chw(f) if isinstance(f, torch.Tensor) else check_frame(f) for f in frames]
    own = [_pixel_size(t) for t in tensors]
    if sizes is not None and len(sizes) != len(tensors):
        raise ConfigError(f"got {len(sizes)} output sizes for {len(tensors)} frames")
    if plans is not None and len(plans) != len(tensors):
        raise ConfigError(f"got {len(plans)} tile plans for {len(tensors)} frames")
    out_sizes = [(int(s[0]), int(s[1])) for s in sizes] if sizes is not None else own
    chosen = [p if p is not None else TilePlan.whole(s) for p, s in zip(plans or [None] * len(tensors), out_sizes,
                                                                           strict=True)]
    for plan, size in zip(chosen, out_sizes, strict=True):
        if plan.size != size:
            raise ConfigError(f"tile plan for a {plan.size[1]}x{plan.size[0]} frame given a {size[1]}x{size[0]} one")
    crops: list[np.ndarray | torch.Tensor] = []
    spans: list[tuple[int, int]] = []
    for frame, plan in zip(tensors, chosen, strict=True):
        parts = [frame] if plan.is_whole else crop_tiles(frame, plan)
        spans.append((len(crops), len(crops) + len(parts)))
        crops.extend(parts)
    scored = scorer.score_batch(crops, prompts)
    scores = np.zeros(len(tensors), dtype=np.float32)
    maps: list[torch.Tensor] = []
    for index, ((start, end), plan) in enumerate(zip(spans, chosen, strict=True)):
        scores[index] = scored.pred_score[start:end].max()
        maps.append(scored.maps[start] if plan.is_whole else blend_tile_maps(scored.maps[start:end], plan))
    return FrameScores(scores, maps, out_sizes, [plan.n_tiles for plan in chosen],
                       [scored.pred_score[start:end] for start, end in spans])


def training_views(frames: Sequence[np.ndarray], model_size: tuple[int, int], policy: TilingPolicy,
                   masks: Sequence[np.ndarray] | None = None, roi: Box | None = None
                   ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Frames (and their pixel masks) cut as the service cuts them under ``policy``: the tiles of each frame
    (a small frame stays whole), so prompts, memory and thresholds are learned at the scale that is scored."""
    views: list[np.ndarray] = []
    view_masks: list[np.ndarray] | None = [] if masks is not None else None
    for index, frame in enumerate(frames):
        plan = plan_tiles(_pixel_size(frame), model_size, None, roi, policy)
        if plan.is_whole:
            views.append(frame)
            if view_masks is not None and masks is not None:
                view_masks.append(masks[index])
            continue
        views.extend(np.ascontiguousarray(c) for c in crop_tiles(frame, plan))
        if view_masks is not None and masks is not None:
            view_masks.extend(np.ascontiguousarray(c) for c in crop_tiles(masks[index], plan))
    return views, view_masks
