"""OAGM stage 1: the object region of a frame, where synthetic anomalies may go (`object_masks`).

The object is found from the frozen model's own features, backed by a low-level cue:

* *Model saliency* (default ``model_signal="features"``, `feature_saliency`): the projected patch tokens
  (with LAA, so they describe their own location) against the background, taken to be the border patches
  minus the 25 % farthest from their mean (object parts touching the border). Saliency of a patch =
  ``1 - max cos(patch, background patch)`` (nearest reference, leave-one-out for the border patches
  themselves). The nearest-neighbour form, rather than the distance to the mean, keeps textures flat: every
  texture patch has a look-alike on the border, an object patch has none. ``model_signal="attention"`` uses
  the class token's attention to the patches in the last block (`cls_attention`: recomputed from the
  block's ``attn.in_proj_weight`` on the tokens entering it); ``"both"`` averages the two (min-max
  normalised). Features are the default: last-block class attention of pretrained CLIP ViTs concentrates
  on a few high-norm background tokens ("register" artefacts, Darcet et al. 2024), which would put
  anomalies on the background; with random weights it is flat (measured), while random features still
  separate an object from its background (random projections keep pixel differences apart).
* *Colour cue* (`colour_cue`): the CIE Lab distance (grayscale: intensity) of each lightly blurred pixel to
  the median colour of a border ring 3 % of the short side wide.

Fusion (`fuse_saliency`). Each cue is made border-relative, ``(map - m) / (q99(map) - m)`` clipped to
[0, 1], where ``m`` is the median of its border (the model map's outermost patches; the colour cue's pixel
ring), computed on the 75 % least salient border values so that an object touching the border does not
count as background. Its *reliability* is a border-referenced contrast-to-noise ratio
``(q95(map) - m) / (q90 - q10 of the same border values)``: how far the most salient 5 % of the frame stand
out from the border, in units of the border's own spread. It maps linearly to a weight in [0, 1] between
``reliable_lo`` (4) and ``reliable_hi`` (10); the colour cue also needs a lift of ``min_colour_contrast``
Lab levels. The fused map is the weight-averaged normalised map; when the weights sum to less than
``min_evidence`` (0.5) nothing stands out and the frame is flat. So a flat model signal hands over to the
colour cue, a flat colour cue (object and background of one colour) to the model, and agreeing weak cues add
up. Measured (random-init hpad-tiny / hpad-small): synthetic objects reach 30-130 (model) and 7-17 (colour),
MVTec bottle 4-13 (model) and ~990 (colour: white background), i.i.d. noise textures <= 3, magnetic_tile
(real grayscale surfaces, colour <= 5) a median of ~3 with a tail up to ~20 for the random model, so 9-19 %
of those tiles still get a small "object" from random weights. The thresholds err towards full frame: a
missed object only degrades OAGM to the ``--no-oagm`` baseline, a wrong object confines every anomaly to it.

Threshold and clean-up at the frame's own size: the fused map (computed at <= ``work_size`` px) is upsampled
bilinearly to the frame size, thresholded with Otsu, opened then closed with an elliptic kernel of ~3 % of the
short side, holes are filled, and connected components are kept when they are at least
``min_component_ratio`` of the largest and ``min_object_fraction`` of the frame.

Full-frame fallback (``kind="full-frame"``) for texture-like images: no reliable map, no component left,
or an object covering more than ``max_object_fraction`` (88 %) of the frame. Anomalies may then go anywhere.
``ObjectRegion.score`` is the fused map's mean inside the mask minus its mean outside (0 for a flat frame):
how clearly the object stands out, in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from hpad.errors import ConfigError
from hpad.frames import gray_or_rgb
from hpad.oagm.config import ModelSignal, OAGMConfig, ObjectRegion, RegionParams

if TYPE_CHECKING:
    from hpad.scorer import Scorer

RING_FRACTION = 0.03  # border ring width, fraction of the short side (at the working resolution)


def border_ring(shape: tuple[int, int], width: int) -> np.ndarray:
    """bool [H, W]: True on the outer ``width`` pixels (at least 1, at most half the short side)."""
    h, w = shape
    width = max(1, min(width, (min(h, w) + 1) // 2))
    ring = np.ones((h, w), bool)
    ring[width : h - width, width : w - width] = False
    return ring


def feature_saliency(patches: torch.Tensor, grid: tuple[int, int], reference: str = "nearest") -> np.ndarray:
    """Projected patch tokens [B, N, D] -> distance to the background: float32 [B, Gh, Gw] on the host.

    See `feature_saliency_tensor` (which stays on the tokens' device)."""
    return feature_saliency_tensor(patches, grid, reference).cpu().numpy().astype(np.float32)


def feature_saliency_tensor(patches: torch.Tensor, grid: tuple[int, int], reference: str = "nearest") -> torch.Tensor:
    """Projected patch tokens [B, N, D] -> distance to the background [B, Gh, Gw], on the tokens' device.

    Background = the border patches, without the 25 % farthest from their mean (object parts touching the
    border). ``reference="mean"``: ``1 - cos(patch, mean of those)``; ``"nearest"`` (default):
    ``1 - max cos(patch, any of those)``, which also keeps textures flat (every texture patch has a look-alike
    on the border, an object patch has none).
    """
    if reference not in ("nearest", "mean"):
        raise ConfigError(f"reference must be 'nearest' or 'mean', got {reference!r}")
    gh, gw = grid
    dev = patches.device
    feats = F.normalize(patches.float(), dim=-1).reshape(patches.shape[0], gh, gw, -1)
    b = feats.shape[0]
    flat = feats.reshape(b, gh * gw, -1)
    ring_index = torch.from_numpy(np.flatnonzero(border_ring((gh, gw), 1))).to(dev)  # [R] flat patch indices
    chosen = ring_index.expand(b, -1)  # [B, R]
    border = flat[:, ring_index]  # [B, R, D]
    proto = F.normalize(border.mean(dim=1), dim=-1)  # [B, D]
    if border.shape[1] >= 4:
        dist = 1.0 - torch.einsum("brd,bd->br", border, proto)
        keep = max(2, math.ceil(0.75 * border.shape[1]))
        nearest = dist.topk(keep, dim=1, largest=False).indices  # [B, keep]
        chosen = torch.gather(chosen, 1, nearest)
        border = torch.gather(border, 1, nearest[..., None].expand(-1, -1, border.shape[-1]))
        proto = F.normalize(border.mean(dim=1), dim=-1)
    if reference == "mean":
        sal = 1.0 - torch.einsum("bnd,bd->bn", flat, proto)
    else:
        sims = torch.einsum("bnd,brd->bnr", flat, border)  # [B, N, R]
        # leave one out: a reference patch is compared with the *other* references, not with itself
        rows = torch.arange(b, device=dev)[:, None]
        sims[rows, chosen, torch.arange(chosen.shape[1], device=dev)[None, :]] = -1.0
        sal = 1.0 - sims.amax(dim=-1)
    return sal.clamp_(min=0.0).reshape(b, gh, gw)


def last_block_input(scorer: Scorer, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised pixels [B, 3, S, S] -> tokens entering the tower's last block [B, 1+N, C].

    The scorer's own encoder runs the blocks before the last one (`LocalityAwareEncoder.run_blocks` with
    ``stop=-1``: the same per-block forward and LAA mask as scoring).
    """
    encoder = scorer.encoder
    return encoder.run_blocks(encoder.visual._embeds(pixels), stop=-1)


def block_cls_attention(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class-token attention to the patches in ``block`` for its input tokens x [B, 1+N, C] -> [B, N].

    Logits from ``attn.in_proj_weight``/``in_proj_bias`` on ``ln_1(x)``; softmax per head over all tokens,
    the class token's self-attention dropped, each head renormalised over the patches, then averaged.
    """
    attn = getattr(block, "attn", None)
    if not isinstance(attn, torch.nn.MultiheadAttention) or attn.in_proj_weight is None:
        raise ConfigError("class-token attention needs open_clip blocks with a packed nn.MultiheadAttention")
    h = block.ln_1(x)
    b, t, c = h.shape
    heads = attn.num_heads
    hd = c // heads
    q, k, _ = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q = q[:, :1].reshape(b, 1, heads, hd).transpose(1, 2)  # [B, heads, 1, hd]
    k = k.reshape(b, t, heads, hd).transpose(1, 2)  # [B, heads, T, hd]
    weights = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).float().softmax(dim=-1)[:, :, 0, 1:]  # [B, heads, N]
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return weights.mean(dim=1)


@torch.inference_mode()
def cls_attention(scorer: Scorer, frames: Sequence[np.ndarray]) -> np.ndarray:
    """Class-token -> patch attention of the tower's last block, mean over heads: float32 [B, Gh, Gw].

    The class token's row of the LAA mask is open, so its attention is global with or without LAA.
    """
    last = scorer.encoder.visual.transformer.resblocks[-1]
    gh, gw = scorer.encoder.grid
    out: list[np.ndarray] = []
    step = scorer.config.max_batch
    for start in range(0, len(frames), step):
        x = last_block_input(scorer, scorer.preprocess(frames[start : start + step]))
        out.append(block_cls_attention(last, x).reshape(-1, gh, gw).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def colour_cue(image: np.ndarray, ring_width: int) -> np.ndarray:
    """uint8 HxW or HxWx3 -> float32 [H, W]: Lab distance of each (blurred) pixel to the border's median colour."""
    image = gray_or_rgb(image)
    h, w = image.shape[:2]
    sigma = max(0.6, min(h, w) / 96.0)
    if image.ndim == 2:
        lab = image.astype(np.float32)[..., None]
    else:
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    lab = cv2.GaussianBlur(lab, (0, 0), sigma).reshape(h, w, -1)
    ring = border_ring((h, w), ring_width)
    reference = np.median(lab[ring], axis=0)
    return np.sqrt(((lab - reference) ** 2).sum(axis=-1)).astype(np.float32)


def _border_stats(sal: np.ndarray, ring: np.ndarray) -> tuple[float, float, float, float]:
    """(border median, border spread q90-q10, frame q95, frame q99) of a saliency map."""
    border = np.sort(sal[ring], axis=None)
    border = border[: max(1, math.ceil(0.75 * border.size))]  # drop object pixels touching the border
    med = float(np.median(border))
    spread = float(np.quantile(border, 0.9) - np.quantile(border, 0.1))
    q95, q99 = (float(v) for v in np.quantile(sal, [0.95, 0.99]))
    return med, spread, q95, q99


def reliability(sal: np.ndarray, ring: np.ndarray, floor: float = 0.0) -> float:
    """Border-referenced contrast: ``(q95 - median(ring)) / (q90(ring) - q10(ring))``; 0 if q95 - median <= floor."""
    med, spread, q95, q99 = _border_stats(sal, ring)
    lift = q95 - med
    if lift <= floor or q99 <= med:
        return 0.0
    scale = max(spread, 1e-3 * max(abs(q99), 1e-6), 1e-12)
    return float(lift / scale)


def _normalise(sal: np.ndarray, ring: np.ndarray) -> np.ndarray:
    med, _, _, q99 = _border_stats(sal, ring)
    if q99 <= med:
        return np.zeros_like(sal, dtype=np.float32)
    return np.clip((sal - med) / (q99 - med), 0.0, 1.0).astype(np.float32)


class Cue(NamedTuple):
    """One saliency map for `fuse_saliency`: ``map`` [h, w] at its own resolution, its border ``ring`` (bool, same
    shape) and a ``floor``: the map is flat when its salient part rises less than this above the border."""

    map: np.ndarray
    ring: np.ndarray
    floor: float = 0.0


def fuse_saliency(
    cues: dict[str, Cue], shape: tuple[int, int], params: RegionParams
) -> tuple[np.ndarray, dict[str, float]]:
    """Reliability-weighted mean of border-normalised maps, resized (bilinear) to ``shape``: [H, W] in [0, 1].

    Returns the fused map and each cue's weight. The map is all zero when the weights sum to less than
    ``params.min_evidence`` (nothing stands out reliably from the border).
    """
    h, w = shape
    fused = np.zeros((h, w), np.float32)
    weights: dict[str, float] = {}
    for name, cue in cues.items():
        r = reliability(cue.map, cue.ring, cue.floor)
        weight = float(np.clip((r - params.reliable_lo) / (params.reliable_hi - params.reliable_lo), 0.0, 1.0))
        weights[name] = weight
        if weight > 0:
            norm = _normalise(cue.map.astype(np.float32), cue.ring)
            if norm.shape != (h, w):
                norm = cv2.resize(norm, (w, h), interpolation=cv2.INTER_LINEAR)
            fused += weight * norm
    total = sum(weights.values())
    if total < params.min_evidence:
        return np.zeros((h, w), np.float32), weights
    return fused / total, weights


def _odd(n: float) -> int:
    n = max(3, round(n))
    return n if n % 2 else n + 1


def region_from_saliency(fused: np.ndarray, frame_shape: tuple[int, int], params: RegionParams) -> ObjectRegion:
    """Fused map [h, w] in [0, 1] (any size) -> ObjectRegion at ``frame_shape`` (H, W).

    Bilinear upsampling to the frame, Otsu, open + close, hole filling, component filtering, full-frame fallback.
    """
    h, w = frame_shape
    full = np.ones((h, w), bool)
    if not fused.any():
        return ObjectRegion(full, "full-frame", 0.0, "flat saliency: no object stands out from the border")
    sal = fused if fused.shape == (h, w) else cv2.resize(fused, (w, h), interpolation=cv2.INTER_LINEAR)
    sal8 = np.clip(np.rint(sal * 255.0), 0, 255).astype(np.uint8)
    _, binary = cv2.threshold(sal8, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(0.03 * min(h, w)),) * 2)
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, kernel)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    binary = ndimage.binary_fill_holes(binary.astype(bool)).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    mask = np.zeros((h, w), bool)
    if count > 1:
        floor = max(params.min_object_fraction * h * w, params.min_component_ratio * float(areas.max()))
        keep = np.flatnonzero(areas >= floor) + 1
        mask = np.isin(labels, keep)
    fraction = float(mask.mean())
    contrast = float(sal[mask].mean() - sal[~mask].mean()) if 0 < fraction < 1 else 0.0
    contrast = float(np.clip(contrast, 0.0, 1.0))
    if fraction < params.min_object_fraction:
        return ObjectRegion(full, "full-frame", contrast, "no object component above the minimum area")
    if fraction > params.max_object_fraction:
        return ObjectRegion(
            full, "full-frame", contrast, f"texture-like: salient area covers {fraction:.0%} of the frame"
        )
    return ObjectRegion(mask, "object", contrast, f"object covers {fraction:.0%} of the frame")


def _work_frame(frame: np.ndarray, work_size: int) -> np.ndarray:
    h, w = frame.shape[:2]
    scale = min(1.0, work_size / max(h, w))
    if scale >= 1.0:
        return frame
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def object_region(frame: np.ndarray, model_map: np.ndarray | None, params: RegionParams) -> ObjectRegion:
    """One frame + its model saliency on the patch grid [Gh, Gw] (or None) -> ObjectRegion at the frame's size.

    The model map's border statistics use its outermost patches; the colour cue's a pixel ring 3 % of the short
    side wide at the working resolution.
    """
    frame = gray_or_rgb(frame)
    small = _work_frame(frame, params.work_size)
    sh, sw = small.shape[:2]
    cues: dict[str, Cue] = {}
    if model_map is not None:
        cues["model"] = Cue(model_map.astype(np.float32), border_ring(model_map.shape, 1))
    if params.use_colour:
        ring_width = max(2, round(RING_FRACTION * min(sh, sw)))
        cues["colour"] = Cue(colour_cue(small, ring_width), border_ring((sh, sw), ring_width),
                             params.min_colour_contrast)
    if not cues:
        raise ConfigError("object region needs a model map or the colour cue (use_colour=True)")
    fused, weights = fuse_saliency(cues, (sh, sw), params)
    region = region_from_saliency(fused, frame.shape[:2], params)
    used = ", ".join(f"{k}={v:.2f}" for k, v in weights.items())
    return ObjectRegion(region.mask, region.kind, region.score, f"{region.reason} (weights {used})")


def _minmax(maps: np.ndarray) -> np.ndarray:
    lo = maps.reshape(len(maps), -1).min(axis=1)[:, None, None]
    hi = maps.reshape(len(maps), -1).max(axis=1)[:, None, None]
    return (maps - lo) / np.maximum(hi - lo, 1e-12)


def model_saliency(scorer: Scorer, frames: Sequence[np.ndarray], signal: ModelSignal = "features") -> np.ndarray:
    """The frozen model's object saliency on the patch grid: float32 [B, Gh, Gw] (``signal`` as in RegionParams)."""
    grid = scorer.backbone.grid_size
    parts: list[np.ndarray] = []
    if signal in ("features", "both"):
        parts.append(feature_saliency(scorer.encode(frames).patches, grid))
    if signal in ("attention", "both"):
        parts.append(cls_attention(scorer, frames))
    if len(parts) == 1:
        return parts[0]
    return (0.5 * (_minmax(parts[0]) + _minmax(parts[1]))).astype(np.float32)


def object_masks(scorer: Scorer, frames: Sequence[np.ndarray], config: OAGMConfig | None = None) -> list[ObjectRegion]:
    """Object region of each frame (any sizes, gray or RGB) from the frozen model + colour cue; see the module doc."""
    params = (config or OAGMConfig()).region
    if len(frames) == 0:
        return []
    frames = [gray_or_rgb(f) for f in frames]
    maps = model_saliency(scorer, frames, params.model_signal)
    return [object_region(frame, sal, params) for frame, sal in zip(frames, maps, strict=True)]
