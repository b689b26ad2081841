"""Object-Attention Anomaly Generation Module (OAGM): synthetic anomalies on the object, with exact masks.

Chen et al. 2024 train prompts from k normal images only. With no real anomalies at training time, OAGM
synthesises them, and it puts them **on the object**: anomalies pasted on the background teach the prompts
nothing about the product. Every synthetic image comes with the exact mask of the pixels that were changed.

Two stages.

**1. Object region** (`object_masks`). The object is found from the frozen model's own features, backed by a
low-level cue:

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

**2. Generators** (`GENERATORS`), each ``(rng, image, region, params) -> (image, mask)``; sizes are relative
to the object size ``sqrt(region area)``, centres are drawn from the region's pixels (preferring pixels far
enough from its edge) and every footprint is intersected with the region:

* ``noise``       - Gaussian or uniform noise in an irregular blob.
* ``perlin``      - a Perlin-noise-shaped blob (DRAEM style) filled with a contrasting Perlin-modulated texture.
* ``cutpaste``    - a rectangle (or thin "scar") cut from elsewhere in the same image, flipped/rotated,
                    colour-jittered and pasted inside the object (CutPaste).
* ``color_shift`` - a colour/intensity shift with soft edges inside an irregular blob.
* ``scratch``     - a thin cubic Bezier curve of contrasting intensity.
* ``missing``     - a blob filled with the background colour (a missing piece), or a contrasting hole.

Visibility: every intensity change is chosen away from clipping (darken bright pixels, brighten dark ones) with
a magnitude of at least ``min_contrast`` grey levels, so grayscale and low-contrast images get visible defects.
Exact masks: the mask is the set of pixels whose value changed by more than ``tolerance`` in any channel;
pixels that changed by less are restored, so outside the mask the output equals the input bit for bit. It is
always inside the region. Everything is deterministic for a given ``numpy.random.Generator`` state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from hpad.errors import ConfigError
from hpad.frames import gray_or_rgb

if TYPE_CHECKING:
    from hpad.scorer import Scorer

__all__ = [
    "GENERATORS",
    "Cue",
    "DefectParams",
    "OAGMConfig",
    "ObjectRegion",
    "RegionParams",
    "SheetRow",
    "Synthetic",
    "block_cls_attention",
    "border_ring",
    "cls_attention",
    "color_shift",
    "colour_cue",
    "cutpaste",
    "feature_saliency",
    "fractal_noise",
    "fuse_saliency",
    "last_block_input",
    "missing_part",
    "model_saliency",
    "noise_patch",
    "object_masks",
    "object_region",
    "perlin_blob",
    "perlin_noise",
    "region_from_saliency",
    "reliability",
    "render_sheet",
    "scratch",
    "synthesize",
    "synthesize_many",
]

RING_FRACTION = 0.03  # border ring width, fraction of the short side (at the working resolution)
RegionKind = Literal["object", "full-frame"]
ModelSignal = Literal["features", "attention", "both"]


# ============================================================================================== configuration


@dataclass(frozen=True)
class RegionParams:
    """How the object region is found (see the module docstring)."""

    model_signal: ModelSignal = "features"
    use_colour: bool = True  # fuse the low-level colour cue
    work_size: int = 256  # max side (px) at which saliency maps are fused
    reliable_lo: float = 4.0  # border-referenced contrast below which a map gets weight 0 ...
    reliable_hi: float = 10.0  # ... and above which it gets weight 1
    min_evidence: float = 0.5  # total cue weight needed to call anything an object
    min_colour_contrast: float = 8.0  # Lab levels: a colour cue whose salient part is closer is flat
    max_object_fraction: float = 0.88  # larger objects -> texture-like -> full frame
    min_object_fraction: float = 0.01  # smaller components are dropped
    min_component_ratio: float = 0.15  # keep components >= this fraction of the largest one

    def __post_init__(self) -> None:
        if self.model_signal not in ("features", "attention", "both"):
            raise ConfigError(f"model_signal must be features, attention or both, got {self.model_signal!r}")
        if self.work_size < 16:
            raise ConfigError(f"work_size must be >= 16 px, got {self.work_size}")
        if not 0 < self.reliable_lo < self.reliable_hi:
            raise ConfigError(f"need 0 < reliable_lo < reliable_hi, got {self.reliable_lo}, {self.reliable_hi}")
        if not 0 < self.min_object_fraction < self.max_object_fraction <= 1:
            raise ConfigError("need 0 < min_object_fraction < max_object_fraction <= 1")
        if not 0 <= self.min_component_ratio <= 1:
            raise ConfigError(f"min_component_ratio must be in [0, 1], got {self.min_component_ratio}")


@dataclass(frozen=True)
class DefectParams:
    """Defect appearance. ``size_range`` is relative to the object size sqrt(region area)."""

    size_range: tuple[float, float] = (0.1, 0.4)
    min_contrast: float = 40.0  # grey levels every generator's change aims at (at least)
    tolerance: int = 2  # a pixel is "changed" when it moved by more than this in some channel

    def __post_init__(self) -> None:
        lo, hi = self.size_range
        if not 0 < lo <= hi <= 1.5:
            raise ConfigError(f"size_range must satisfy 0 < lo <= hi <= 1.5, got {self.size_range}")
        if not 0 < self.min_contrast <= 200:
            raise ConfigError(f"min_contrast must be in (0, 200], got {self.min_contrast}")
        if not 0 <= self.tolerance < self.min_contrast:
            raise ConfigError(f"tolerance must be in [0, min_contrast), got {self.tolerance}")


DEFAULT_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("noise", 1.0),
    ("perlin", 1.5),
    ("cutpaste", 1.5),
    ("color_shift", 1.0),
    ("scratch", 1.5),
    ("missing", 0.75),
)


@dataclass(frozen=True)
class OAGMConfig:
    """OAGM settings. ``on_object=False`` is the ``--no-oagm`` ablation: defects anywhere in the frame."""

    generators: tuple[tuple[str, float], ...] = DEFAULT_WEIGHTS  # (name, sampling weight)
    on_object: bool = True
    min_defects: int = 1
    max_defects: int = 2
    defect: DefectParams = field(default_factory=DefectParams)
    region: RegionParams = field(default_factory=RegionParams)
    max_tries: int = 6

    def __post_init__(self) -> None:
        if not self.generators:
            raise ConfigError("OAGM needs at least one generator")
        for name, weight in self.generators:
            if name not in GENERATORS:
                raise ConfigError(f"unknown OAGM generator {name!r}; choose from {', '.join(GENERATORS)}")
            if not (weight >= 0 and math.isfinite(weight)):
                raise ConfigError(f"generator weight must be finite and >= 0, got {name}={weight}")
        if sum(w for _, w in self.generators) <= 0:
            raise ConfigError("OAGM generator weights sum to 0")
        if not 1 <= self.min_defects <= self.max_defects:
            raise ConfigError(f"need 1 <= min_defects <= max_defects, got {self.min_defects}, {self.max_defects}")
        if self.max_tries < 1:
            raise ConfigError(f"max_tries must be >= 1, got {self.max_tries}")

    def describe(self) -> dict:
        """JSON-ready settings (for training reports and artifacts)."""
        data = asdict(self)
        data["generators"] = {name: weight for name, weight in self.generators}
        return data


@dataclass(frozen=True)
class ObjectRegion:
    """Where anomalies may go. ``mask``: bool [H, W] at the frame's size; ``score``: object contrast in [0, 1]."""

    mask: np.ndarray
    kind: RegionKind
    score: float
    reason: str = ""

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


@dataclass(frozen=True)
class Synthetic:
    """A synthesised anomaly: ``image`` uint8 like the input, ``mask`` bool [H, W] of changed pixels."""

    image: np.ndarray
    mask: np.ndarray
    generator: str


# ============================================================================================== object region


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
    """Object region of each frame (any sizes, gray or RGB) from the frozen model + colour cue; see module doc."""
    params = (config or OAGMConfig()).region
    if len(frames) == 0:
        return []
    frames = [gray_or_rgb(f) for f in frames]
    maps = model_saliency(scorer, frames, params.model_signal)
    return [object_region(frame, sal, params) for frame, sal in zip(frames, maps, strict=True)]


# ============================================================================================== noise + shapes


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(rng: np.random.Generator, shape: tuple[int, int], res: tuple[int, int]) -> np.ndarray:
    """2-D gradient (Perlin) noise, float32 [H, W] in about [-1, 1]; ``res`` = (cells along H, cells along W).

    Vectorised: random unit gradients on a (res+1) lattice, dot products with the offsets to the 4 corners,
    quintic fade interpolation. Any H, W (not only multiples of res).
    """
    h, w = shape
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    angles = rng.uniform(0.0, 2.0 * np.pi, (ry + 1, rx + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    y = (np.arange(h) + 0.5) * (ry / h)
    x = (np.arange(w) + 0.5) * (rx / w)
    yi, xi = np.minimum(y.astype(int), ry - 1), np.minimum(x.astype(int), rx - 1)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]

    def corner(oy: int, ox: int) -> np.ndarray:
        iy, ix = (yi + oy)[:, None], (xi + ox)[None, :]
        return gy[iy, ix] * (yf - oy) + gx[iy, ix] * (xf - ox)

    u, v = _fade(xf), _fade(yf)
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return (np.sqrt(2.0) * (top * (1 - v) + bottom * v)).astype(np.float32)


def fractal_noise(
    rng: np.random.Generator, shape: tuple[int, int], res: tuple[int, int], octaves: int = 3
) -> np.ndarray:
    """Sum of Perlin octaves (frequency x2, amplitude x0.5), normalised to about [-1, 1]: float32 [H, W]."""
    total = np.zeros(shape, np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        scale = 2**octave
        total += amplitude * perlin_noise(rng, shape, (res[0] * scale, res[1] * scale))
        norm += amplitude
        amplitude *= 0.5
    return total / norm


Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (exclusive ends)


def _box(cy: int, cx: int, half_h: float, half_w: float, shape: tuple[int, int]) -> Box:
    h, w = shape
    y0, y1 = max(0, math.floor(cy - half_h)), min(h, math.ceil(cy + half_h) + 1)
    x0, x1 = max(0, math.floor(cx - half_w)), min(w, math.ceil(cx + half_w) + 1)
    return y0, y1, x0, x1


def _object_size(region: np.ndarray) -> float:
    return max(4.0, math.sqrt(float(region.sum())))


def _defect_size(rng: np.random.Generator, region: np.ndarray, params: DefectParams) -> float:
    lo, hi = params.size_range
    return max(3.0, _object_size(region) * float(rng.uniform(lo, hi)))


def _sample_centre(rng: np.random.Generator, region: np.ndarray, radius: float) -> tuple[int, int]:
    """A pixel of ``region``, preferably at least ``radius/2`` from its edge (never outside it)."""
    dist = cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    need = min(0.5 * radius, 0.6 * float(dist.max()))
    candidates = np.flatnonzero(dist >= need)
    if candidates.size == 0:
        candidates = np.flatnonzero(region)
    index = int(candidates[int(rng.integers(candidates.size))])
    return divmod(index, region.shape[1])


def _irregular_blob(rng: np.random.Generator, cy: int, cx: int, size: float, shape: tuple[int, int]) -> tuple[Box, np.ndarray]:
    """Irregular filled polygon (ellipse with a wobbly radius) around (cy, cx): box + bool footprint in it."""
    a = 0.5 * size * rng.uniform(0.6, 1.0)
    b = a * rng.uniform(0.35, 1.0)
    theta = rng.uniform(0.0, np.pi)
    angles = np.linspace(0.0, 2.0 * np.pi, 24, endpoint=False)
    wobble = np.ones_like(angles)
    for freq in (2, 3, 5):
        wobble += rng.uniform(0.0, 0.25 / freq * 2) * np.sin(freq * angles + rng.uniform(0, 2 * np.pi))
    ex, ey = a * np.cos(angles) * wobble, b * np.sin(angles) * wobble
    px = cx + ex * np.cos(theta) - ey * np.sin(theta)
    py = cy + ex * np.sin(theta) + ey * np.cos(theta)
    reach = float(max(np.abs(px - cx).max(), np.abs(py - cy).max())) + 1
    box = _box(cy, cx, reach, reach, shape)
    y0, _, x0, _ = box
    foot = np.zeros((box[1] - y0, box[3] - x0), np.uint8)
    pts = np.stack([px - x0, py - y0], axis=1)
    cv2.fillPoly(foot, [np.rint(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    foot[min(cy - y0, foot.shape[0] - 1), min(cx - x0, foot.shape[1] - 1)] = 1
    return box, foot.astype(bool)


# ============================================================================================== generator core


def _channels(image: np.ndarray) -> np.ndarray:
    return image[..., None] if image.ndim == 2 else image


def _local_mean(image: np.ndarray, box: Box, foot: np.ndarray) -> np.ndarray:
    """Mean colour [C] of the pixels of ``foot`` inside ``box`` (whole box when foot is empty)."""
    y0, y1, x0, x1 = box
    crop = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    sel = crop[foot] if foot.any() else crop.reshape(-1, crop.shape[-1])
    return sel.mean(axis=0)


def _away(rng: np.random.Generator, local: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Per-channel shift of magnitude in [lo, hi], signed away from clipping (darken bright, brighten dark)."""
    magnitude = rng.uniform(lo, hi, local.shape)
    return np.where(local > 127.5, -magnitude, magnitude).astype(np.float32)


def _finish(
    image: np.ndarray, box: Box, content: np.ndarray, alpha: np.ndarray, region: np.ndarray, tolerance: int
) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``content`` [h, w, C] (float, box-sized) into ``image`` with ``alpha`` [h, w] restricted to region.

    Returns (new image, exact mask): pixels changed by more than ``tolerance``; the others keep their input value.
    """
    y0, y1, x0, x1 = box
    src = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    alpha = (np.clip(alpha, 0.0, 1.0) * region[y0:y1, x0:x1]).astype(np.float32)[..., None]
    blended = np.clip(np.rint(src * (1.0 - alpha) + content.reshape(src.shape) * alpha), 0, 255)
    changed = (np.abs(blended - src) > tolerance).any(axis=-1)
    out = image.copy()
    out_c = _channels(out)
    out_c[y0:y1, x0:x1][changed] = blended[changed].astype(np.uint8)
    mask = np.zeros(region.shape, bool)
    mask[y0:y1, x0:x1] = changed
    return out, mask


def _restore(out: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Give a HxW / HxWx3 result the layout of the original frame (HxWx1, or HxWx4 with its alpha kept)."""
    if original.ndim == 3 and original.shape[2] == 1:
        return out[..., None]
    if original.ndim == 3 and original.shape[2] == 4:
        return np.dstack([out, original[..., 3]])
    return out


def _prepare(image: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = gray_or_rgb(image)
    region = np.asarray(region, bool)
    if region.shape != image.shape[:2]:
        raise ConfigError(f"region {region.shape} does not match image {image.shape[:2]}")
    if not region.any():
        region = np.ones(image.shape[:2], bool)
    return image, region


_GENERATOR_CONTRACT = """

    ``image``: uint8 HxW, HxWx1, HxWx3 or HxWx4; ``region``: bool [H, W] (empty = whole frame).
    Returns (uint8 image of the same shape, bool [H, W] mask of the pixels changed by more than
    ``params.tolerance``; non-empty, inside ``region``; the image equals the input outside it).
    """

GeneratorFn = Callable[[np.random.Generator, np.ndarray, np.ndarray, DefectParams], tuple[np.ndarray, np.ndarray]]


def _visible(func: GeneratorFn) -> GeneratorFn:
    """Validate inputs; retry a generator whose mask came out empty; last resort: a value-inverted blob."""

    def wrapper(rng: np.random.Generator, image: np.ndarray, region: np.ndarray,
                params: DefectParams | None = None) -> tuple[np.ndarray, np.ndarray]:
        params = params or DefectParams()
        original = image
        image, region = _prepare(image, region)
        for _ in range(4):
            out, mask = func(rng, image, region, params)
            if mask.any():
                return _restore(out, original), mask
        out, mask = _inverted_blob(rng, image, region, params)
        return _restore(out, original), mask

    wrapper.__name__ = wrapper.__qualname__ = func.__name__
    wrapper.__doc__ = (func.__doc__ or "") + _GENERATOR_CONTRACT
    return wrapper


def _inverted_blob(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, params: DefectParams
) -> tuple[np.ndarray, np.ndarray]:
    """Guaranteed-visible fallback: every pixel of a small blob moves by exactly 128 levels (v XOR 128)."""
    size = _defect_size(rng, region, params)
    cy, cx = _sample_centre(rng, region, size / 2)
    box, foot = _irregular_blob(rng, cy, cx, size, image.shape[:2])
    y0, y1, x0, x1 = box
    content = (_channels(image)[y0:y1, x0:x1] ^ np.uint8(128)).astype(np.float32)
    return _finish(image, box, content, foot.astype(np.float32), region, params.tolerance)


# ============================================================================================== generators


@_visible
def noise_patch(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, params: DefectParams
) -> tuple[np.ndarray, np.ndarray]:
    """Irregular blob of strong Gaussian noise (added) or uniform noise (replacing the pixels)."""
    size = _defect_size(rng, region, params)
    cy, cx = _sample_centre(rng, region, size / 2)
    box, foot = _irregular_blob(rng, cy, cx, size, image.shape[:2])
    y0, y1, x0, x1 = box
    src = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    shape = src.shape if rng.random() < 0.7 else (*src.shape[:2], 1)  # colour or luminance noise
    if rng.random() < 0.6:
        sigma = rng.uniform(params.min_contrast, 2.0 * params.min_contrast)
        content = src + rng.normal(0.0, sigma, shape).astype(np.float32)
    else:
        content = np.broadcast_to(rng.uniform(0.0, 255.0, shape), src.shape).astype(np.float32)
    return _finish(image, box, content, foot.astype(np.float32), region, params.tolerance)


@_visible
def perlin_blob(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, params: DefectParams
) -> tuple[np.ndarray, np.ndarray]:
    """Perlin-shaped blob (thresholded noise under a radial envelope) filled with a contrasting texture."""
    size = 1.3 * _defect_size(rng, region, params)
    cy, cx = _sample_centre(rng, region, size / 3)
    box = _box(cy, cx, size / 2, size / 2, image.shape[:2])
    y0, y1, x0, x1 = box
    bh, bw = y1 - y0, x1 - x0
    res = (int(rng.integers(2, 5)), int(rng.integers(2, 5)))
    noise = perlin_noise(rng, (bh, bw), res)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (size / 2) ** 2
    field_ = noise + 1.5 * np.clip(1.0 - r2, 0.0, 1.0)
    inside = r2 < 1.0
    coverage = rng.uniform(0.3, 0.6)
    threshold = np.quantile(field_[inside], 1.0 - coverage) if inside.any() else 0.0
    foot = (field_ > threshold) & inside
    foot[cy - y0, cx - x0] = True
    src = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    local = _local_mean(image, box, foot & region[y0:y1, x0:x1])
    beta = rng.uniform(0.6, 1.0)
    base = local + _away(rng, local, params.min_contrast / beta, 2.2 * params.min_contrast / beta)
    detail = fractal_noise(rng, (bh, bw), (int(rng.integers(2, 6)),) * 2)[..., None]
    content = base + rng.uniform(10.0, 30.0) * detail
    content = src * (1.0 - beta) + content * beta
    alpha = cv2.GaussianBlur(foot.astype(np.float32), (0, 0), max(0.5, size / 60))
    return _finish(image, box, content, np.maximum(alpha, foot), region, params.tolerance)


@_visible
def cutpaste(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, params: DefectParams
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: a rectangle or thin scar cut from the image (75 %: from the object), flipped/rotated, colour
    jittered and pasted on the object."""
    h, w = image.shape[:2]
    size = _defect_size(rng, region, params)
    if rng.random() < 0.7:  # rectangle, aspect ratio 0.3 .. 3.3
        ratio = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
        ph, pw = size * math.sqrt(ratio), size / math.sqrt(ratio)
    else:  # scar: long and thin
        ph, pw = size * rng.uniform(1.0, 1.6), max(2.0, size * rng.uniform(0.08, 0.2))
    ph, pw = int(min(h, max(2, round(ph)))), int(min(w, max(2, round(pw))))
    if rng.random() < 0.75 and not region.all():  # mostly cut from the object itself, else from anywhere
        sy, sx = _sample_centre(rng, region, 0.0)
        sy, sx = min(max(0, sy - ph // 2), h - ph), min(max(0, sx - pw // 2), w - pw)
    else:
        sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = _channels(image)[sy : sy + ph, sx : sx + pw].astype(np.float32)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1]
    if rng.random() < 0.5:  # a scar is pasted at a random angle
        patch = np.ascontiguousarray(np.rot90(patch))
        ph, pw = pw, ph
    gain, bias = rng.uniform(0.75, 1.25), rng.uniform(-20.0, 20.0)
    patch = patch.mean(axis=(0, 1)) + (patch - patch.mean(axis=(0, 1))) * gain + bias
    cy, cx = _sample_centre(rng, region, min(ph, pw) / 2)
    ty, tx = cy - ph // 2, cx - pw // 2
    y0, x0 = max(0, ty), max(0, tx)
    y1, x1 = min(h, ty + ph), min(w, tx + pw)
    box = (y0, y1, x0, x1)
    content = patch[y0 - ty : y1 - ty, x0 - tx : x1 - tx]
    src = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    sel = region[y0:y1, x0:x1]
    if sel.any() and float(np.abs(content - src)[sel].mean()) < params.min_contrast:
        # pasted texture too similar to the target: drop its mean offset, shift it away from clipping
        local = src[sel].mean(axis=0)
        offset = (content - src)[sel].mean(axis=0)
        content = content - offset + _away(rng, local, params.min_contrast, 1.5 * params.min_contrast)
    return _finish(image, box, content, np.ones(content.shape[:2], np.float32), region, params.tolerance)


@_visible
def color_shift(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, params: DefectParams
) -> tuple[np.ndarray, np.ndarray]:
    """Colour / intensity shift (plus a contrast change) with soft edges inside an irregular blob."""
    size = _defect_size(rng, region, params)
    cy, cx = _sample_centre(rng, region, size / 2)
    box, foot = _irregular_blob(rng, cy, cx, size, image.shape[:2])
    y0, y1, x0, x1 = box
    src = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    local = _local_mean(image, box, foot & region[y0:y1, x0:x1])
    shift = _away(rng, local, 0.3 * params.min_contrast, 2.0 * params.min_contrast)
    peak = int(np.argmax(np.abs(shift)))  # at least one channel moves by >= 1.25 x min_contrast
    shift[peak] = math.copysign(max(abs(float(shift[peak])), 1.25 * params.min_contrast), float(shift[peak]))
    if src.shape[-1] > 1 and rng.random() < 0.5:  # sometimes a pure luminance shift
        shift[:] = shift[peak]
    gain = rng.uniform(0.7, 1.3)
    content = local + (src - local) * gain + shift
    alpha = cv2.GaussianBlur(foot.astype(np.float32), (0, 0), max(0.5, size / 25))
    alpha = np.clip(alpha * 1.5, 0.0, 1.0)
    return _finish(image, box, content, alpha, region, params.tolerance)


def _bezier(p: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3]


@_visible
def scratch(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, params: DefectParams
) -> tuple[np.ndarray, np.ndarray]:
    """Thin cubic Bezier scratch of contrasting intensity (dark on bright surfaces, bright on dark ones)."""
    h, w = image.shape[:2]
    extent = _object_size(region)
    length = _defect_size(rng, region, params) * rng.uniform(1.2, 2.0)
    cy, cx = _sample_centre(rng, region, 0.0)
    angle = rng.uniform(0.0, np.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    start = np.array([cx, cy], float) - 0.5 * length * direction
    controls = [start + f * length * direction + rng.uniform(-0.25, 0.25) * length * normal for f in (1 / 3, 2 / 3)]
    points = _bezier(np.stack([start, *controls, start + length * direction]), 64)
    thickness = max(1, round(extent * rng.uniform(0.006, 0.018)))
    reach = length / 2 + 0.25 * length + thickness + 2
    box = _box(cy, cx, reach, reach, (h, w))
    y0, y1, x0, x1 = box
    foot = np.zeros((y1 - y0, x1 - x0), np.uint8)
    pts = np.rint((points - [x0, y0]) * 16).astype(np.int32)
    cv2.polylines(foot, [pts], False, 1, thickness=thickness, lineType=cv2.LINE_8, shift=4)
    foot = foot.astype(bool)
    src = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    local = _local_mean(image, box, foot & region[y0:y1, x0:x1])
    lum = float(local.mean())
    value = rng.uniform(0.0, 45.0) if lum > 127.5 else rng.uniform(210.0, 255.0)
    if abs(value - lum) < params.min_contrast:  # mid-grey surface: go to the far extreme
        value = 0.0 if lum > 127.5 else 255.0
    content = np.full_like(src, value) + rng.normal(0.0, 6.0, src.shape[:2])[..., None].astype(np.float32)
    return _finish(image, box, content, foot.astype(np.float32), region, params.tolerance)


@_visible
def missing_part(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, params: DefectParams
) -> tuple[np.ndarray, np.ndarray]:
    """A piece missing: blob filled with the background (colour + texture of pixels outside the region).

    On a full-frame region, or when background and object look alike, a contrasting hole instead.
    """
    size = _defect_size(rng, region, params)
    cy, cx = _sample_centre(rng, region, size / 2)
    box, foot = _irregular_blob(rng, cy, cx, size, image.shape[:2])
    y0, y1, x0, x1 = box
    src = _channels(image)[y0:y1, x0:x1].astype(np.float32)
    local = _local_mean(image, box, foot & region[y0:y1, x0:x1])
    outside = _channels(image)[~region]
    fill: np.ndarray | None = None
    noise_sd = 4.0
    if len(outside) >= 16:
        sample = outside[rng.integers(0, len(outside), min(len(outside), 4096))].astype(np.float32)
        background = np.median(sample, axis=0)
        if float(np.abs(background - local).max()) >= params.min_contrast:
            fill = background
            noise_sd = float(np.clip(sample.std(axis=0).mean(), 1.0, 12.0))
    if fill is None:
        fill = local + _away(rng, local, params.min_contrast, 2.5 * params.min_contrast)
    content = fill + rng.normal(0.0, noise_sd, src.shape).astype(np.float32)
    alpha = cv2.GaussianBlur(foot.astype(np.float32), (0, 0), max(0.5, size / 60))
    return _finish(image, box, content, np.maximum(alpha, foot), region, params.tolerance)


GENERATORS: dict[str, GeneratorFn] = {
    "noise": noise_patch,
    "perlin": perlin_blob,
    "cutpaste": cutpaste,
    "color_shift": color_shift,
    "scratch": scratch,
    "missing": missing_part,
}


# ============================================================================================== synthesis


def _region_array(region: ObjectRegion | np.ndarray) -> np.ndarray:
    return region.mask if isinstance(region, ObjectRegion) else np.asarray(region, bool)


def synthesize(
    rng: np.random.Generator, image: np.ndarray, region: ObjectRegion | np.ndarray, config: OAGMConfig | None = None
) -> Synthetic:
    """One synthetic anomaly on a normal image.

    ``image``: uint8 HxW, HxWx1, HxWx3 or HxWx4 (alpha kept unchanged); ``region``: bool [H, W] or ObjectRegion.
    Draws ``min_defects..max_defects`` generators by weight and applies them in turn, inside the region (or
    anywhere when ``config.on_object`` is False). Returns the image, the exact changed-pixel mask (non-empty)
    and the generator names joined with "+".
    """
    config = config or OAGMConfig()
    original = image
    image = gray_or_rgb(image)
    area = np.asarray(_region_array(region), bool)
    if area.shape != image.shape[:2]:
        raise ConfigError(f"region {area.shape} does not match image {image.shape[:2]}")
    if not config.on_object or not area.any():
        area = np.ones(image.shape[:2], bool)
    names = [n for n, _ in config.generators]
    weights = np.array([w for _, w in config.generators], float)
    weights /= weights.sum()
    tol = config.defect.tolerance
    for _ in range(config.max_tries):
        count = int(rng.integers(config.min_defects, config.max_defects + 1))
        chosen = [names[int(i)] for i in rng.choice(len(names), size=count, p=weights)]
        out = image
        for name in chosen:
            out, _ = GENERATORS[name](rng, out, area, config.defect)
        diff = np.abs(out.astype(np.int16) - image.astype(np.int16))
        mask = (diff > tol).any(axis=-1) if diff.ndim == 3 else diff > tol
        if mask.any():
            final = np.where(mask[..., None] if image.ndim == 3 else mask, out, image)
            return Synthetic(_restore(final.astype(np.uint8), original), mask, "+".join(chosen))
    out, mask = _inverted_blob(rng, image, area, config.defect)
    return Synthetic(_restore(out, original), mask, "inverted")


def synthesize_many(
    rng: np.random.Generator, images: Sequence[np.ndarray], regions: Sequence[ObjectRegion | np.ndarray],
    n: int, config: OAGMConfig | None = None,
) -> list[Synthetic]:
    """``n`` anomalies, cycling over the k normal images (image i % k with region i % k)."""
    if len(images) != len(regions):
        raise ConfigError(f"{len(images)} images but {len(regions)} regions")
    if n > 0 and not images:
        raise ConfigError("synthesize_many needs at least one normal image")
    return [synthesize(rng, images[i % len(images)], regions[i % len(images)], config) for i in range(n)]


# ============================================================================================== contact sheet


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
