"""Scorer: a batch of frames of any size -> anomaly score per frame and anomaly map per pixel.

Pipeline (all batched tensor ops on the scorer's device, no PIL):

1. Preprocess: uint8 HxW / HxWx1 / HxWx3 / HxWx4 arrays -> float, grayscale replicated to RGB, resized (whole
   frame, no centre crop, so the map covers every pixel) to the model's input size with antialiased bilinear
   interpolation, normalised with the weights' mean/std. Frames of equal size are resized together.
2. Image tower with Locality-Aware Attention (`hpad.attention`) -> projected class token [B, D] and patch
   tokens [B, N, D].
3. Scores against the prompt set's (normal, anomalous) embedding pair: softmax over cosine similarity x
   CLIP's logit scale; the anomalous probability is the image score (class token) and the patch score.
4. Optional few-shot memory (WinCLIP+ / PromptAD style): each patch's distance to its nearest normal
   reference patch, (1 - cos) / 2, fused with the text map by `memory_weight`; the image score is fused
   with the maximum of the memory map the same way.
5. Patch map [Gh, Gw] -> bilinear to the model's input size -> Gaussian blur (``sigma`` px at that size) ->
   bilinear to each frame's own size.

Results are batch-invariant and deterministic (eval mode, no dropout, inference mode).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from hpad.attention import ImageTokens, LAAConfig, LocalityAwareEncoder
from hpad.backbone import Backbone
from hpad.errors import ConfigError, FrameError
from hpad.prompts import ANOMALOUS, PromptSet, zero_shot_prompt_set

MAX_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class ScorerConfig:
    """How frames are scored. ``sigma`` is in pixels at the model's input resolution (0 = no blur)."""

    laa: LAAConfig = field(default_factory=LAAConfig)
    sigma: float = 4.0
    memory_weight: float = 0.5
    max_batch: int = 32

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")
        if not 0.0 <= self.memory_weight <= 1.0:
            raise ConfigError(f"memory_weight must be in [0, 1], got {self.memory_weight}")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")


class ScoreResult(NamedTuple):
    """``pred_score``: [B] float32 in [0, 1]; ``anomaly_map``: B arrays [H_i, W_i] float32 in [0, 1]."""

    pred_score: np.ndarray
    anomaly_map: list[np.ndarray]


# ----------------------------------------------------------------------------------------------- pure math


def anomaly_probability(features: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """features [..., D], text_features [2, D] (normalised) -> P(anomalous) [...] via softmax over the pair."""
    logits = logit_scale * F.normalize(features.float(), dim=-1) @ text_features.float().T  # [..., 2]
    return logits.softmax(dim=-1)[..., ANOMALOUS]


def memory_distance(patches: torch.Tensor, memory: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """patches [B, N, D], memory [M, D] (both normalised) -> (1 - max cos) / 2 in [0, 1]: [B, N]."""
    flat = F.normalize(patches.float(), dim=-1).reshape(-1, patches.shape[-1])
    best = torch.empty(flat.shape[0], device=flat.device)
    mem = memory.float()
    for start in range(0, flat.shape[0], chunk):
        best[start : start + chunk] = (flat[start : start + chunk] @ mem.T).amax(dim=1)
    return ((1.0 - best) / 2.0).clamp_(0.0, 1.0).reshape(patches.shape[:2])


def gaussian_kernel1d(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding. maps: [B, 1, H, W] float32."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, maps.device)
    pad = kernel.numel() // 2
    if pad >= min(maps.shape[-2:]):  # reflect padding needs pad < size
        pad = min(maps.shape[-2:]) - 1
        kernel = gaussian_kernel1d(pad / 3.0, maps.device)
    out = F.conv2d(F.pad(maps, (pad, pad, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, pad, pad), mode="reflect"), kernel.view(1, 1, -1, 1))


def patch_maps_to_frames(
    patch_scores: torch.Tensor, grid: tuple[int, int], model_size: tuple[int, int], sigma: float,
    frame_sizes: Sequence[tuple[int, int]],
) -> list[np.ndarray]:
    """patch_scores [B, N] -> B maps at each frame's (H, W), smoothed at model resolution."""
    maps = patch_scores.float().reshape(-1, 1, grid[0], grid[1])
    maps = F.interpolate(maps, size=model_size, mode="bilinear", align_corners=False)
    maps = gaussian_blur(maps, sigma)
    out: list[np.ndarray] = []
    for index, size in enumerate(frame_sizes):
        one = maps[index : index + 1]
        if tuple(size) != tuple(model_size):
            one = F.interpolate(one, size=tuple(size), mode="bilinear", align_corners=False)
        out.append(one[0, 0].clamp_(0.0, 1.0).cpu().numpy())
    return out


def frame_to_chw(frame: np.ndarray) -> torch.Tensor:
    """uint8 HxW / HxWx1 / HxWx3 / HxWx4 -> uint8 tensor [3, H, W] (grayscale replicated, alpha dropped)."""
    if not isinstance(frame, np.ndarray):
        raise FrameError("bad_image", f"expected a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise FrameError("bad_image", f"expected uint8 pixels, got {frame.dtype}")
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[2] not in (1, 3, 4) or min(frame.shape[:2]) < 1:
        raise FrameError("bad_image", f"expected HxW, HxWx1, HxWx3 or HxWx4 pixels, got shape {frame.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor[:3]


# ----------------------------------------------------------------------------------------------- scorer


class Scorer:
    """Frozen CLIP + LAA. Thread-compatible: one scoring call at a time per instance."""

    def __init__(self, backbone: Backbone, prompts: PromptSet | None = None, config: ScorerConfig | None = None):
        self.backbone = backbone
        self.config = config or ScorerConfig()
        self.encoder = LocalityAwareEncoder(backbone.model.visual, self.config.laa)
        scale = float(backbone.model.logit_scale.exp().float().clamp(max=MAX_LOGIT_SCALE))
        self.logit_scale = scale
        dev = backbone.device
        self._mean = torch.tensor(backbone.mean, device=dev).view(1, 3, 1, 1)
        self._std = torch.tensor(backbone.std, device=dev).view(1, 3, 1, 1)
        self.prompts = self.check_prompts(prompts) if prompts is not None else None

    # -------------------------------------------------------------------------------- construction helpers
    @classmethod
    def zero_shot(
        cls, backbone: Backbone, category: str = "object", config: ScorerConfig | None = None,
        object_name: str | None = None,
    ) -> Scorer:
        prompts = zero_shot_prompt_set(backbone.model, backbone.tokenizer, category, backbone.identity, object_name)
        return cls(backbone, prompts, config)

    def zero_shot_prompts(self, category: str, object_name: str | None = None) -> PromptSet:
        backbone = self.backbone
        return zero_shot_prompt_set(backbone.model, backbone.tokenizer, category, backbone.identity, object_name)

    def check_prompts(self, prompts: PromptSet) -> PromptSet:
        """Refuse a prompt set made for another model or LAA setting; move it to this scorer's device."""
        if prompts.embed_dim != self.backbone.embed_dim:
            raise ConfigError(
                f"prompt set {prompts.label()} has embedding size {prompts.embed_dim}, but model "
                f"{self.backbone.identity} has {self.backbone.embed_dim}"
            )
        if prompts.model_identity and prompts.model_identity != self.backbone.identity:
            raise ConfigError(
                f"prompt set {prompts.label()} was made for {prompts.model_identity}, "
                f"not for this scorer's {self.backbone.identity}"
            )
        if prompts.laa is not None and prompts.laa != self.config.laa:
            raise ConfigError(
                f"prompt set {prompts.label()} was learned with LAA {prompts.laa.describe()}, but this scorer "
                f"runs LAA {self.config.laa.describe()}; use the same LAA settings"
            )
        if prompts.text_features.device == self.backbone.device and (
            prompts.memory is None or prompts.memory.device == self.backbone.device
        ):
            return prompts
        return prompts.to(self.backbone.device)

    # -------------------------------------------------------------------------------- stages
    def preprocess(self, frames: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Frames (arrays, or uint8 [3, H, W] tensors from `frame_to_chw`) -> normalised [B, 3, S, S]."""
        size = self.backbone.image_size
        dev = self.backbone.device
        out = torch.empty((len(frames), 3, *size), device=dev, dtype=torch.float32)
        groups: dict[tuple[int, int], list[int]] = {}
        tensors = [f if isinstance(f, torch.Tensor) else frame_to_chw(f) for f in frames]
        for index, tensor in enumerate(tensors):
            groups.setdefault(tuple(tensor.shape[1:]), []).append(index)
        for hw, indices in groups.items():
            batch = torch.stack([tensors[i] for i in indices]).to(dev, non_blocking=True)
            if hw != tuple(size):
                # antialiased bilinear on uint8 (as PIL resizes): ~15x faster than on float on CPU
                batch = F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)
            out[indices] = batch.float()
        out = (out / 255.0 - self._mean) / self._std
        return out.to(self.backbone.dtype)

    @torch.inference_mode()
    def encode(self, frames: Sequence[np.ndarray | torch.Tensor]) -> ImageTokens:
        """Frames -> projected tokens (float32): cls [B, D], patches [B, N, D]. Chunked by ``max_batch``."""
        cls_parts, patch_parts = [], []
        for start in range(0, len(frames), self.config.max_batch):
            tokens = self.encoder(self.preprocess(frames[start : start + self.config.max_batch]))
            cls_parts.append(tokens.cls.float())
            patch_parts.append(tokens.patches.float())
        return ImageTokens(cls=torch.cat(cls_parts), patches=torch.cat(patch_parts))

    def build_memory(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """k normal reference frames -> few-shot memory [k*N, D] of normalised patch features (on cpu)."""
        if not frames:
            raise ConfigError("few-shot memory needs at least one normal reference image")
        patches = self.encode(frames).patches
        return F.normalize(patches.reshape(-1, patches.shape[-1]), dim=-1).cpu()

    @torch.inference_mode()
    def score_tokens(
        self, tokens: ImageTokens, frame_sizes: Sequence[tuple[int, int]], prompts: PromptSet
    ) -> ScoreResult:
        """Projected tokens of a batch -> ScoreResult at each frame's size."""
        text = prompts.text_features
        image_score = anomaly_probability(tokens.cls, text, self.logit_scale)  # [B]
        patch_score = anomaly_probability(tokens.patches, text, self.logit_scale)  # [B, N]
        if prompts.memory is not None and self.config.memory_weight > 0:
            w = self.config.memory_weight
            distance = memory_distance(tokens.patches, prompts.memory)
            patch_score = (1.0 - w) * patch_score + w * distance
            image_score = (1.0 - w) * image_score + w * distance.amax(dim=1)
        maps = patch_maps_to_frames(
            patch_score, self.backbone.grid_size, self.backbone.image_size, self.config.sigma, frame_sizes
        )
        return ScoreResult(pred_score=image_score.clamp(0.0, 1.0).cpu().numpy().astype(np.float32), anomaly_map=maps)

    # -------------------------------------------------------------------------------- public entry point
    def score(self, frames: Sequence[np.ndarray], prompts: PromptSet | None = None) -> ScoreResult:
        """Score a batch of uint8 frames (any sizes) with ``prompts`` (default: the scorer's own set)."""
        active = prompts if prompts is not None else self.prompts
        if active is None:
            raise ConfigError("no prompt set: pass prompts= or build the scorer with Scorer.zero_shot(...)")
        active = self.check_prompts(active)
        if len(frames) == 0:
            return ScoreResult(pred_score=np.zeros(0, dtype=np.float32), anomaly_map=[])
        tensors = [frame_to_chw(frame) for frame in frames]  # validates every frame before any work
        sizes = [(int(t.shape[1]), int(t.shape[2])) for t in tensors]
        return self.score_tokens(self.encode(tensors), sizes, active)
