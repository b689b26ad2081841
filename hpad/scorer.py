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
   reference patch, (1 - cos) / 2, on the features of ``memory_blocks`` (PromptAD / PatchCore: intermediate
   blocks; empty = the projected patch tokens), fused with the text map by `memory_weight` under ``fusion``
   (`fuse`: ``harmonic`` is PromptAD's (the default: it kept the memory's signal best in
   benchmarks/ablation.py), ``normalized`` puts both on the scale of held-out normals first, ``linear`` is the
   old 50/50 sum of unlike scales); the image score is fused with the memory map's maximum.
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

from hpad.attention import (
    EncoderSpec,
    ImageTokens,
    LAAConfig,
    config_differences,
)
from hpad.backbone import MAX_LOGIT_SCALE, Backbone
from hpad.errors import ConfigError, FrameError
from hpad.frames import check_frame
from hpad.masks import PackedMask
from hpad.prompts import ANOMALOUS, PromptSet, zero_shot_prompt_set
from hpad.runtime import ImageEncoderRuntime, TorchEncoder

FUSIONS = ("harmonic", "normalized", "linear")


@dataclass(frozen=True)
class ScorerConfig:
    """How frames are scored. ``sigma`` is in pixels at the model's input resolution (0 = no blur).

    ``memory_blocks``: block numbers (from 1) whose patch tokens the few-shot memory matches; None = PromptAD's
    choice scaled to the tower (`hpad.attention.default_memory_blocks`: blocks 3 and 8 of 12); () = the final
    projected patch tokens (the old behaviour). ``memory_path``: read LAA blocks' taps from the LAA path
    (``"laa"``) or the vanilla path (``"vanilla"``, PromptAD). ``fusion``: see `fuse`. ``logit_scale``: the
    softmax temperature's inverse for the text scores; None = the model's own (CLIP caps it at 100).
    """

    laa: LAAConfig = field(default_factory=LAAConfig)
    sigma: float = 4.0
    memory_weight: float = 0.5
    max_batch: int = 32
    memory_blocks: tuple[int, ...] | None = None
    memory_path: str = "laa"
    fusion: str = "harmonic"
    logit_scale: float | None = None

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")
        if not 0.0 <= self.memory_weight <= 1.0:
            raise ConfigError(f"memory_weight must be in [0, 1], got {self.memory_weight}")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.logit_scale is not None and not 0 < self.logit_scale <= 1000:
            raise ConfigError(f"logit_scale must be in (0, 1000], got {self.logit_scale}")


LEGACY_METHOD: dict[str, object] = {"memory_blocks": [], "memory_path": "laa", "fusion": "linear",
                                    "memory_weight": 0.5, "logit_scale": None}
"""The scoring choices of artifacts written before they were recorded (``logit_scale`` None: the model's)."""

MEMORY_FIELDS = ("memory_blocks", "memory_path", "fusion", "memory_weight")


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


FusionScales = tuple[float, float, float, float]
"""(text image, memory image, text pixel, memory pixel): each branch's 0.99 quantile on held-out normals."""

UNIT_SCALES: FusionScales = (1.0, 1.0, 1.0, 1.0)


def fuse(text: torch.Tensor, memory: torch.Tensor, weight: float, fusion: str, text_scale: float = 1.0,
         memory_scale: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """Fuse a text score and a memory distance of the same shape into one score in [0, 1].

    * ``normalized``: each branch divided by its scale on held-out normals (`FusionScales`), weighted sum
      ``f``, squashed by ``f / (1 + f)`` (monotone; 0.5 = a normal's 0.99 quantile on both branches).
    * ``harmonic``: weighted harmonic mean ``1 / ((1 - w) / text + w / memory)`` (PromptAD fuses the two maps
      with the harmonic mean; ``weight`` 0.5 is exactly that mean).
    * ``linear``: ``(1 - w) * text + w * memory`` on their own, unlike scales (hpad before issue 17).
    """
    w = float(weight)
    if fusion == "linear":
        return (1.0 - w) * text + w * memory
    if fusion == "harmonic":
        return 1.0 / ((1.0 - w) / text.clamp_min(eps) + w / memory.clamp_min(eps))
    if fusion == "normalized":
        f = (1.0 - w) * text / max(text_scale, eps) + w * memory / max(memory_scale, eps)
        return f / (1.0 + f)
    raise ConfigError(f"unknown fusion {fusion!r}: use one of {', '.join(FUSIONS)}")


def normal_scale(values: torch.Tensor | np.ndarray, quantile: float = 0.99) -> float:
    """A branch's scale on held-out normals: the ``quantile`` of its values (at least 1e-6)."""
    array = np.asarray(values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else values)
    return max(float(np.quantile(array.reshape(-1), quantile)), 1e-6) if array.size else 1.0


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


def patch_maps(patch_scores: torch.Tensor, grid: tuple[int, int], model_size: tuple[int, int],
               sigma: float) -> torch.Tensor:
    """patch_scores [B, N] -> smoothed maps [B, S, S] at model resolution (on the scores' device)."""
    maps = patch_scores.float().reshape(-1, 1, grid[0], grid[1])
    maps = F.interpolate(maps, size=model_size, mode="bilinear", align_corners=False)
    return gaussian_blur(maps, sigma)[:, 0]


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """maps [B, S, S] -> [B, H, W] in [0, 1] (bilinear; unchanged when already at ``size``)."""
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return maps.clamp(0.0, 1.0)


def maps_to_frames(maps: torch.Tensor, frame_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """maps [B, S, S] on any device -> B float32 arrays at each frame's (H, W); one copy per distinct size."""
    out: list[np.ndarray | None] = [None] * len(frame_sizes)
    for size, indices in _groups(frame_sizes).items():
        host = resize_maps(maps[indices], size).cpu().numpy()
        for row, index in enumerate(indices):
            out[index] = host[row]
    return out  # type: ignore[return-value]


def patch_maps_to_frames(
    patch_scores: torch.Tensor, grid: tuple[int, int], model_size: tuple[int, int], sigma: float,
    frame_sizes: Sequence[tuple[int, int]],
) -> list[np.ndarray]:
    """patch_scores [B, N] -> B maps at each frame's (H, W), smoothed at model resolution."""
    return maps_to_frames(patch_maps(patch_scores, grid, model_size, sigma), frame_sizes)


def pack_mask_bits(maps: torch.Tensor, size: tuple[int, int], threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """maps [B, S, S] -> binary masks (map at ``size`` >= threshold) packed 8 pixels a byte, most significant
    bit first, each row padded to whole bytes (the row layout of a 1-bit PNG): ([B, H, ceil(W/8)] uint8,
    [B] int64 anomalous-pixel counts). Runs on the maps' device, so only the bits cross to the host."""
    binary = resize_maps(maps, size) >= threshold  # [B, H, W]
    counts = binary.sum(dim=(1, 2))
    if binary.device.type == "cpu":  # numpy's packbits: the same bytes, 20x faster than the tensor ops here
        return torch.from_numpy(np.packbits(binary.numpy(), axis=-1)), counts
    return pack_bits(binary), counts


def pack_bits(binary: torch.Tensor) -> torch.Tensor:
    """bool [..., W] -> uint8 [..., ceil(W/8)], most significant bit first (``np.packbits`` on any device)."""
    pad = (-binary.shape[-1]) % 8
    if pad:
        binary = F.pad(binary, (0, pad))
    weights = (1 << torch.arange(7, -1, -1, device=binary.device)).to(torch.uint8)  # 128 ... 1, made on the device
    groups = binary.reshape(*binary.shape[:-1], -1, 8).to(torch.uint8)  # [..., W/8, 8]
    return (groups * weights).sum(dim=-1, dtype=torch.uint8)


def concat_tokens(parts: Sequence[ImageTokens]) -> ImageTokens:
    """Concatenate token batches along the batch axis (``memory`` kept when every part has it)."""
    if len(parts) == 1:
        return parts[0]
    memory = None if any(p.memory is None for p in parts) else torch.cat([p.memory for p in parts])
    return ImageTokens(torch.cat([p.cls for p in parts]), torch.cat([p.patches for p in parts]), memory)


def _groups(sizes: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], list[int]]:
    """Indices of equal sizes, in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(index)
    return groups


def frame_to_chw(frame: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 HxW / HxWx1 / HxWx3 / HxWx4 array -> uint8 tensor [3, H, W] (grayscale replicated, alpha dropped),
    a view of the array's memory. A uint8 [3, H, W] tensor (e.g. decoded on the GPU) passes through."""
    if isinstance(frame, torch.Tensor):
        if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[0] != 3 or min(frame.shape[1:]) < 1:
            raise FrameError("bad_image", f"expected a uint8 [3, H, W] tensor, got {frame.dtype} {tuple(frame.shape)}")
        return frame
    frame = check_frame(frame)
    if frame.ndim == 2:
        frame = frame[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor[:3]


def to_device_batch(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Equal-size uint8 [3, H, W] frames -> one uint8 [B, 3, H, W] batch on ``device``.

    For an accelerator the frames are stacked channels-last (a plain copy of each array) into pinned host
    memory and copied without blocking, so the copy overlaps the device's work; the layout change to
    [B, 3, H, W] is a view on the device. Frames already on ``device`` are stacked there.
    """
    if device.type == "cpu" or all(t.device == device for t in tensors):
        return torch.stack([t.to(device) for t in tensors])
    hwc = [t.permute(1, 2, 0) for t in tensors]  # the array's own layout: contiguous for RGB input
    staged = torch.empty((len(hwc), *hwc[0].shape), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    torch.stack(hwc, out=staged)
    return staged.to(device, non_blocking=True).permute(0, 3, 1, 2)


def resize_frames(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, S, S] in 0..255, antialiased bilinear (whole frame, no crop).

    On the CPU the resize runs on uint8, as PIL does (about 15x faster than on float there); PyTorch has no
    CUDA kernel for antialiased resampling of integers, so on any other device it runs in float32 (values
    then differ from the CPU's by the CPU's rounding to integers, at most 0.5 of 255).
    """
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch.float()
    if batch.device.type == "cpu":
        return F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False).float()
    return F.interpolate(batch.float(), size=size, mode="bilinear", antialias=True, align_corners=False)


class ScoreTensors(NamedTuple):
    """One scored batch, still on the scorer's device. ``pred_score`` [B] float32 in [0, 1]; ``maps``
    [B, S, S] float32 smoothed anomaly maps at the model's input size (not yet resized to the frames)."""

    pred_score: torch.Tensor
    maps: torch.Tensor


@dataclass
class ScoredBatch:
    """What the service keeps of a scored batch: scores on the host, maps on the device until needed.

    ``sizes``: each frame's output (H, W). Full-size maps and masks are made only for the frames that need
    them (`anomaly_maps`, `masks`), on the device, so a GPU copies back bits instead of float maps.
    """

    pred_score: np.ndarray
    maps: torch.Tensor
    sizes: list[tuple[int, int]]

    def anomaly_maps(self) -> list[np.ndarray]:
        return maps_to_frames(self.maps, self.sizes)

    def masks(self, indices: Sequence[int], threshold: float) -> dict[int, PackedMask]:
        """Binary masks (map >= threshold) of frames ``indices`` at their sizes, packed as 1-bit PNG rows."""
        out: dict[int, PackedMask] = {}
        for size, group in _groups([self.sizes[i] for i in indices]).items():
            chosen = [indices[j] for j in group]
            bits, counts = pack_mask_bits(self.maps[chosen], size, threshold)
            bits_host, counts_host = bits.cpu().numpy(), counts.cpu().numpy()
            for row, index in enumerate(chosen):
                out[index] = PackedMask(bits_host[row], width=size[1], height=size[0], count=int(counts_host[row]))
        return out


# ----------------------------------------------------------------------------------------------- scorer


def encoder_spec(backbone: Backbone, config: ScorerConfig) -> EncoderSpec:
    """What the image tower of a `Scorer` with ``config`` computes (LAA and memory taps): the spec an exported
    runtime must have been made for (`hpad.export`)."""
    return EncoderSpec.for_visual(backbone.model.visual, config.laa, config.memory_blocks, config.memory_path)


class Scorer:
    """Frozen CLIP + LAA. Thread-compatible: one scoring call at a time per instance."""

    def __init__(self, backbone: Backbone, prompts: PromptSet | None = None, config: ScorerConfig | None = None,
                 runtime: ImageEncoderRuntime | None = None):
        self.backbone = backbone
        self.config = config or ScorerConfig()
        visual = backbone.model.visual
        self.encoder_spec = encoder_spec(backbone, self.config)
        self.memory_blocks = self.encoder_spec.memory_blocks
        self.encoder = self.encoder_spec.build(visual)
        # what runs the image tower in `encode` (`hpad.runtime`): torch eager unless an exported one is given
        self.runtime: ImageEncoderRuntime = runtime if runtime is not None else TorchEncoder(self.encoder)
        self.memory_dim = (len(self.memory_blocks) * int(visual.transformer.width) if self.memory_blocks
                           else int(backbone.embed_dim))
        self.model_logit_scale = min(float(backbone.logit_scale), MAX_LOGIT_SCALE)
        scale = self.config.logit_scale
        self.logit_scale = self.model_logit_scale if scale is None else float(scale)
        dev = backbone.device
        self._mean = torch.tensor(backbone.mean, device=dev).view(1, 3, 1, 1)
        self._std = torch.tensor(backbone.std, device=dev).view(1, 3, 1, 1)
        self._device_copy: tuple[PromptSet, PromptSet] | None = None  # last host set moved to the device
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
        problems = self.method_differences(prompts)
        if problems:
            raise ConfigError(
                f"prompt set {prompts.label()} was learned under other method choices (LAA, memory, fusion, "
                f"logit scale): {'; '.join(problems)}. "
                "Run the scorer with the same options (or retrain the prompts under these)"
            )
        if prompts.memory is not None and prompts.memory.shape[-1] != self.memory_dim:
            raise ConfigError(
                f"prompt set {prompts.label()} has few-shot memory features of size {prompts.memory.shape[-1]}, "
                f"but this scorer matches {self.memory_dim} (memory_blocks {list(self.memory_blocks)}); use the "
                "memory blocks it was made with"
            )
        if prompts.text_features.device == self.backbone.device and (
            prompts.memory is None or prompts.memory.device == self.backbone.device
        ):
            return prompts
        cached = self._device_copy
        if cached is not None and cached[0] is prompts:  # the same host set, batch after batch
            return cached[1]
        moved = prompts.to(self.backbone.device)
        self._device_copy = (prompts, moved)
        return moved

    def method_record(self) -> dict[str, object]:
        """Every choice that changes what scores mean, as artifacts record it (``method`` in the manifest)."""
        return {"laa": self.config.laa.describe(), "memory_blocks": list(self.memory_blocks),
                "memory_path": self.config.memory_path, "fusion": self.config.fusion,
                "memory_weight": self.config.memory_weight, "logit_scale": self.logit_scale}

    def method_differences(self, prompts: PromptSet) -> list[str]:
        """The recorded choices of ``prompts`` that differ from this scorer's, each naming its field. The
        memory and fusion fields count only for a set with a few-shot memory; a set that records nothing
        (zero-shot) fits any scorer."""
        running = self.method_record()
        if prompts.method is not None:
            recorded = dict(prompts.method)
        elif prompts.laa is not None:
            recorded = {"laa": prompts.laa.describe()}
        else:
            return []
        if recorded.get("logit_scale", "absent") is None:  # the model's own temperature
            recorded["logit_scale"] = self.model_logit_scale
        keys = set(recorded) & set(running)
        if prompts.memory is None:
            keys -= set(MEMORY_FIELDS)
        if not self.memory_blocks and "memory_path" in keys and not recorded.get("memory_blocks"):
            keys.discard("memory_path")  # no tapped blocks: the path is moot
        return config_differences({k: recorded[k] for k in keys}, {k: running[k] for k in keys})

    # -------------------------------------------------------------------------------- stages
    def preprocess(self, frames: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Frames (arrays, or uint8 [3, H, W] tensors from `frame_to_chw`) -> normalised [B, 3, S, S]."""
        size = self.backbone.image_size
        dev = self.backbone.device
        tensors = [frame_to_chw(f) for f in frames]
        # equal sizes batch together; frames already on the device (decoded there) apart from host arrays
        groups = _groups([(*t.shape[1:], t.device.type) for t in tensors])
        parts = [resize_frames(to_device_batch([tensors[i] for i in idx], dev), size) for idx in groups.values()]
        if len(parts) == 1:
            out = parts[0]
        else:
            out = torch.empty((len(tensors), 3, *size), device=dev, dtype=torch.float32)
            for indices, part in zip(groups.values(), parts, strict=True):
                out[indices] = part
        return ((out / 255.0 - self._mean) / self._std).to(self.backbone.dtype)

    @torch.inference_mode()
    def encode(self, frames: Sequence[np.ndarray | torch.Tensor]) -> ImageTokens:
        """Frames -> tokens (float32): cls [B, D], patches [B, N, D], memory features [B, N, F] (or None),
        run by ``self.runtime`` (torch eager, ONNX Runtime or OpenVINO). Chunked by ``max_batch``."""
        parts: list[ImageTokens] = []
        for start in range(0, len(frames), self.config.max_batch):
            tokens = self.runtime(self.preprocess(frames[start : start + self.config.max_batch]))
            parts.append(ImageTokens(*(None if value is None else value.float() for value in tokens)))
        return concat_tokens(parts)

    def memory_features(self, tokens: ImageTokens) -> torch.Tensor:
        """The features the few-shot memory matches: [B, N, F]."""
        if not self.memory_blocks:
            return tokens.patches
        if tokens.memory is None:
            raise ConfigError(f"this scorer's memory matches blocks {list(self.memory_blocks)}, but the image "
                              "tokens carry no memory features (an encoder that does not fill ImageTokens.memory)")
        return tokens.memory

    def memory_bank(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """k normal reference frames -> per-image normalised memory features [k, N, F] (on cpu)."""
        if not frames:
            raise ConfigError("few-shot memory needs at least one normal reference image")
        return F.normalize(self.memory_features(self.encode(frames)), dim=-1).cpu()

    def build_memory(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """k normal reference frames -> few-shot memory [k*N, F] of normalised patch features (on cpu)."""
        bank = self.memory_bank(frames)
        return bank.reshape(-1, bank.shape[-1])

    @torch.inference_mode()
    def memory_with_scales(self, frames: Sequence[np.ndarray],
                           prompts: PromptSet) -> tuple[torch.Tensor, FusionScales | None]:
        """k normal reference frames -> (memory [k*N, F], `FusionScales`) for ``prompts``: each shot is scored
        against the other shots' memory (leave-one-out), so the scales come from normals the memory does
        not hold. With one shot no such normal exists: the scales are None (unit scales)."""
        tokens = self.encode(frames)
        bank = F.normalize(self.memory_features(tokens), dim=-1)  # [k, N, F]
        memory = bank.reshape(-1, bank.shape[-1]).cpu()
        if len(frames) < 2:
            return memory, None
        distance = torch.stack([
            memory_distance(bank[i : i + 1], bank[[j for j in range(len(frames)) if j != i]].reshape(-1, bank.shape[-1]))[0]
            for i in range(len(frames))])
        text = prompts.text_features.to(self.backbone.device)
        image = anomaly_probability(tokens.cls, text, self.logit_scale)
        patch = anomaly_probability(tokens.patches, text, self.logit_scale)
        return memory, (normal_scale(image), normal_scale(distance.amax(dim=1)), normal_scale(patch),
                        normal_scale(distance))

    @torch.inference_mode()
    def branch_scores(self, tokens: ImageTokens, prompts: PromptSet,
                      memory: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(text image score [B], text patch scores [B, N], memory distances [B, N] or None) before fusion;
        ``memory`` overrides the set's own (leave-one-out calibration)."""
        text = prompts.text_features
        image_score = anomaly_probability(tokens.cls, text, self.logit_scale)  # [B]
        patch_score = anomaly_probability(tokens.patches, text, self.logit_scale)  # [B, N]
        bank = prompts.memory if memory is None else memory
        distance = None if bank is None else memory_distance(self.memory_features(tokens), bank.to(text.device))
        return image_score, patch_score, distance

    def fused_scores(self, image_score: torch.Tensor, patch_score: torch.Tensor, distance: torch.Tensor | None,
                     scales: FusionScales | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Branch scores -> (image scores [B], patch scores [B, N]) as the service fuses them."""
        w = self.config.memory_weight
        if distance is None or w <= 0:
            return image_score, patch_score
        s = scales or UNIT_SCALES
        fusion = self.config.fusion
        return (fuse(image_score, distance.amax(dim=1), w, fusion, s[0], s[1]),
                fuse(patch_score, distance, w, fusion, s[2], s[3]))

    @torch.inference_mode()
    def score_tensors(self, tokens: ImageTokens, prompts: PromptSet) -> ScoreTensors:
        """Projected tokens of a batch -> scores and model-size maps on the device (no host sync)."""
        image_score, patch_score = self.fused_scores(*self.branch_scores(tokens, prompts), prompts.fusion_scales)
        maps = patch_maps(patch_score, self.backbone.grid_size, self.backbone.image_size, self.config.sigma)
        return ScoreTensors(pred_score=image_score.clamp(0.0, 1.0), maps=maps)

    def score_tokens(
        self, tokens: ImageTokens, frame_sizes: Sequence[tuple[int, int]], prompts: PromptSet
    ) -> ScoreResult:
        """Projected tokens of a batch -> ScoreResult at each frame's size."""
        scored = self.score_tensors(tokens, prompts)
        return ScoreResult(pred_score=scored.pred_score.cpu().numpy().astype(np.float32),
                           anomaly_map=maps_to_frames(scored.maps, frame_sizes))

    # -------------------------------------------------------------------------------- public entry points
    def score_batch(self, frames: Sequence[np.ndarray | torch.Tensor], prompts: PromptSet | None = None,
                    sizes: Sequence[tuple[int, int]] | None = None) -> ScoredBatch:
        """Score frames (any sizes); maps stay on the device. ``sizes``: each frame's output (H, W), e.g. the
        full size of a frame decoded at reduced scale (default: the frame's own size)."""
        active = prompts if prompts is not None else self.prompts
        if active is None:
            raise ConfigError("no prompt set: pass prompts= or build the scorer with Scorer.zero_shot(...)")
        active = self.check_prompts(active)
        tensors = [frame_to_chw(frame) for frame in frames]  # validates every frame before any work
        own = [(int(t.shape[1]), int(t.shape[2])) for t in tensors]
        if sizes is not None and len(sizes) != len(tensors):
            raise ConfigError(f"got {len(sizes)} output sizes for {len(tensors)} frames")
        out_sizes = [tuple(int(v) for v in s) for s in sizes] if sizes is not None else own
        if not tensors:
            return ScoredBatch(np.zeros(0, dtype=np.float32), torch.zeros(0, *self.backbone.image_size), [])
        scored = self.score_tensors(self.encode(tensors), active)
        return ScoredBatch(scored.pred_score.cpu().numpy().astype(np.float32), scored.maps, out_sizes)

    def score(self, frames: Sequence[np.ndarray | torch.Tensor], prompts: PromptSet | None = None,
              sizes: Sequence[tuple[int, int]] | None = None) -> ScoreResult:
        """Score a batch of uint8 frames (any sizes) with ``prompts`` (default: the scorer's own set)."""
        scored = self.score_batch(frames, prompts, sizes)
        return ScoreResult(pred_score=scored.pred_score, anomaly_map=scored.anomaly_maps())
