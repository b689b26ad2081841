"""Locality-Aware Attention (LAA) for the last ViT blocks of a CLIP image tower.

Chen et al. 2024: in CLIP's last blocks every patch token attends to the whole image, so the final patch
features no longer describe their own location and pixel maps come out blurred and displaced. LAA restricts
each patch token, in the last ``layers`` blocks, to the patches within Chebyshev distance ``radius`` on the
patch grid (radius 1 = 3x3 window, 2 = 5x5).

Decisions (documented because the paper leaves them open):

* The class token keeps global attention (its row of the mask is all open), so the image-level feature and
  score use the whole frame.
* Patch tokens do **not** attend to the class token in LAA blocks. The class token carries global
  information; letting patches read it would undo the locality after one block. With this choice the
  output of patch *i* after ``n`` LAA blocks depends only on LAA-stack inputs within ``n * radius`` patches.
* The restriction is a real attention mask inside the scaled dot-product attention of each block: it is
  exact, not a post-hoc filter. For open_clip's standard block (``nn.MultiheadAttention``) hpad runs the
  block's own weights through ``F.scaled_dot_product_attention`` with a boolean mask: passing a mask to
  ``nn.MultiheadAttention`` itself leaves its fused inference path and measured 12x slower per block in
  bf16 on CPU (665 ms vs 54 ms, ViT-B-16-plus-240, batch 8), while SDPA with a mask costs what it costs
  without one. Other block types get the additive (-inf) mask through their own forward.

Only the first ``len(blocks) - layers`` blocks run unmasked; the rest of the tower (``ln_pre``, ``ln_post``,
``proj``) is open_clip's own. Patch tokens are projected with ``visual.proj`` so they live in the same space
as the text embeddings.

Reference choices (issue 17; each an `LAAConfig` field, recorded in every prompt artifact):

* ``dual_path`` (default on): PromptAD (``x[0] = x_ori[0]``), AnomalyCLIP and CLIP Surgery run the late
  blocks twice from the shared input: the vanilla path gives CLIP's own class token (the image score), the
  LAA path gives the patch tokens (the pixel map). The class token then equals open_clip's to float
  rounding; cost: the LAA blocks run twice (4 of 12 blocks: about +33 % of the tower).
* ``kernel`` (default ``"vv"``): value-value attention softmax(V V^T / sqrt(d)) V on the LAA path (CLIP
  Surgery), under the same locality mask; ``"qk"`` is CLIP's own query-key attention (the paper's LAA).
  CLIP Surgery computes the new path's v-v attention from the *vanilla* path's tokens; hpad computes it from
  the LAA path's own tokens, because the vanilla tokens see the whole frame and would undo the locality
  guarantee above.
* ``patch_mlp`` (default off): whether the LAA path runs the block's MLP. CLIP Surgery, PromptAD and
  AnomalyCLIP skip it on the v-v path.

Artifacts from before these fields existed are read with `LEGACY_LAA` (single path, q-k, MLP on), which is
what they were learned with; a scorer running the new defaults refuses them naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from hpad.errors import ConfigError

KERNELS = ("qk", "vv")
LEGACY_LAA: dict[str, object] = {"dual_path": False, "kernel": "qk", "patch_mlp": True}
"""The values of the fields added in issue 17 that artifacts without them were learned with."""


@dataclass(frozen=True)
class LAAConfig:
    """Locality-Aware Attention settings. ``layers`` counts from the end of the tower."""

    enabled: bool = True
    layers: int = 4
    radius: int = 1
    dual_path: bool = True
    kernel: str = "vv"
    patch_mlp: bool = False

    def __post_init__(self) -> None:
        if self.layers < 0:
            raise ConfigError(f"LAA layers must be >= 0, got {self.layers}")
        if self.radius < 0:
            raise ConfigError(f"LAA radius must be >= 0, got {self.radius}")
        if self.kernel not in KERNELS:
            raise ConfigError(f"LAA kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")

    @classmethod
    def from_record(cls, record: dict[str, object]) -> LAAConfig:
        """An artifact's ``laa`` record; fields it lacks (older artifacts) take their `LEGACY_LAA` value."""
        known = {name: record[name] for name in ("enabled", "layers", "radius", *LEGACY_LAA) if name in record}
        return cls(**{**LEGACY_LAA, **known})  # type: ignore[arg-type]

    def active_layers(self, depth: int) -> int:
        """How many of ``depth`` blocks run with the locality mask."""
        if not self.enabled:
            return 0
        if self.layers > depth:
            raise ConfigError(f"LAA layers={self.layers} exceeds the {depth} blocks of this image tower")
        return self.layers

    def describe(self) -> dict[str, int | bool | str]:
        return {"enabled": self.enabled, "layers": self.layers, "radius": self.radius,
                "dual_path": self.dual_path, "kernel": self.kernel, "patch_mlp": self.patch_mlp}


def config_differences(recorded: dict[str, object], running: dict[str, object], prefix: str = "") -> list[str]:
    """``field: recorded X, running Y`` for every field whose values differ (nested dicts by dotted name)."""
    out: list[str] = []
    for name in sorted(set(recorded) | set(running)):
        a, b = recorded.get(name), running.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{name}.")
        elif a != b:
            out.append(f"{prefix}{name}: learned with {a!r}, this scorer runs {b!r}")
    return out


class ImageTokens(NamedTuple):
    """Image features. ``cls``: [B, D] projected class token; ``patches``: [B, Gh*Gw, D] projected patch tokens
    in row-major grid order; ``memory``: [B, Gh*Gw, F] the features the few-shot memory matches (each tapped
    block's patch tokens L2-normalised, concatenated, scaled by 1/sqrt(blocks), so a dot product is the mean
    cosine over the blocks), or None where the memory matches ``patches`` (no tapped blocks)."""

    cls: torch.Tensor
    patches: torch.Tensor
    memory: torch.Tensor | None = None


def locality_blocked(grid_h: int, grid_w: int, radius: int) -> torch.Tensor:
    """Boolean mask [1+Gh*Gw, 1+Gh*Gw]; True = query row may NOT attend to key column.

    Index 0 is the class token: its row is open (global), its column is closed to patches. Patch i sees
    patch j iff max(|dy|, |dx|) <= radius. A new tensor each call (from a cached host array).
    """
    return torch.from_numpy(_locality_blocked(grid_h, grid_w, radius).copy())


@lru_cache(maxsize=32)
def _locality_blocked(grid_h: int, grid_w: int, radius: int) -> np.ndarray:
    ys, xs = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    cheb = np.maximum(np.abs(ys[:, None] - ys[None, :]), np.abs(xs[:, None] - xs[None, :]))
    n = grid_h * grid_w
    blocked = np.ones((n + 1, n + 1), dtype=bool)
    blocked[0, :] = False  # class token attends globally
    blocked[1:, 1:] = cheb > radius  # patches: local window only (and never the class token)
    blocked.setflags(write=False)
    return blocked


def locality_additive_mask(
    grid: tuple[int, int], radius: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Float mask [1+N, 1+N] to add to attention logits: 0 inside the window, -inf outside."""
    blocked = locality_blocked(grid[0], grid[1], radius).to(device)
    mask = torch.zeros(blocked.shape, dtype=dtype, device=device)
    return mask.masked_fill_(blocked, float("-inf"))


def _is_standard_block(block: torch.nn.Module) -> bool:
    return isinstance(getattr(block, "attn", None), torch.nn.MultiheadAttention) and not hasattr(block, "ln_1_kv")


def masked_block_forward(block: torch.nn.Module, x: torch.Tensor, allowed: torch.Tensor, kernel: str = "qk",
                         mlp: bool = True) -> torch.Tensor:
    """open_clip ``ResidualAttentionBlock.forward`` with SDPA under a mask (boolean True = may attend, or
    additive). x: [B, L, C] -> [B, L, C]. ``kernel="qk"`` with ``mlp`` is exactly the block's own forward with
    an additive mask; ``kernel="vv"`` uses the values as queries and keys (CLIP Surgery), ``mlp=False`` skips
    the MLP (the v-v path of CLIP Surgery / PromptAD / AnomalyCLIP)."""
    attn = block.attn
    h = block.ln_1(x)
    batch, length, width = h.shape
    heads = attn.num_heads
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # [B, L, 3C]
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, C/H]
    if kernel == "vv":
        q = k = v
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # [B, H, L, C/H]
    out = attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))
    x = x + block.ls_1(out)
    if not mlp:
        return x
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def default_memory_blocks(depth: int) -> tuple[int, ...]:
    """PromptAD's memory taps (outputs of blocks 3 and 8 of ViT-B's 12, numbered from 1) scaled to ``depth``."""
    return tuple(sorted({max(1, min(depth, round(b * depth / 12))) for b in (3, 8)}))


MEMORY_PATHS = ("laa", "vanilla")


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that decides what the image tower computes: the LAA settings and the memory taps. A scorer's
    `LocalityAwareEncoder` is ``spec.build(visual)``; an export (`hpad.export`) records the spec in its
    manifest and is served only by a scorer with the same one."""

    laa: LAAConfig = field(default_factory=LAAConfig)
    memory_blocks: tuple[int, ...] = ()  # block numbers from 1; () = the memory matches the projected patches
    memory_path: str = "laa"

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory_blocks", tuple(sorted({int(b) for b in self.memory_blocks})))
        if self.memory_path not in MEMORY_PATHS:
            raise ConfigError(f"memory path must be one of {', '.join(MEMORY_PATHS)}, got {self.memory_path!r}")

    @classmethod
    def for_visual(cls, visual: torch.nn.Module, laa: LAAConfig | None = None,
                   memory_blocks: tuple[int, ...] | None = None, memory_path: str = "laa") -> EncoderSpec:
        """The spec a `Scorer` with these options builds (``memory_blocks=None``: `default_memory_blocks`)."""
        depth = len(visual.transformer.resblocks)
        blocks = default_memory_blocks(depth) if memory_blocks is None else tuple(memory_blocks)
        return cls(laa or LAAConfig(), blocks, memory_path)

    @property
    def outputs(self) -> list[str]:
        """The `ImageTokens` fields this encoder fills (``memory`` only with tapped blocks)."""
        return [name for name in ImageTokens._fields if name != "memory" or self.memory_blocks]

    def build(self, visual: torch.nn.Module) -> LocalityAwareEncoder:
        return LocalityAwareEncoder(visual, self.laa, self.memory_blocks, self.memory_path)


class LocalityAwareEncoder(torch.nn.Module):
    """Runs an open_clip ``VisionTransformer`` with LAA in its last blocks; ``forward`` returns `ImageTokens`.

    Holds no weights of its own (``visual`` is the frozen tower); the mask for the tower's grid is built once
    and reused. ``memory_blocks``: block numbers (from 1) whose patch tokens feed the few-shot memory (empty:
    the memory matches the projected patch tokens); ``memory_path``: which path they are read from in LAA
    blocks under the dual path (``"laa"``: local tokens; ``"vanilla"``: the class-token path, as PromptAD).
    """

    def __init__(self, visual: torch.nn.Module, config: LAAConfig, memory_blocks: tuple[int, ...] = (),
                 memory_path: str = "laa") -> None:
        super().__init__()
        transformer = getattr(visual, "transformer", None)
        if transformer is None or not hasattr(transformer, "resblocks"):
            raise ConfigError("LAA needs an open_clip VisionTransformer (a ViT image tower)")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ConfigError("LAA needs a ViT that pools its class token (pool_type 'tok', no attentional pool)")
        if not getattr(transformer, "batch_first", True):
            raise ConfigError("LAA expects a batch-first transformer (open_clip >= 2.26.1)")
        self.visual = visual
        self.config = config
        self.grid = tuple(visual.grid_size)
        depth = len(transformer.resblocks)
        self.first_masked = depth - config.active_layers(depth)
        self.dual = config.dual_path and self.first_masked < depth
        bad = [b for b in memory_blocks if not 1 <= b <= depth]
        if bad:
            raise ConfigError(f"memory blocks {bad} are outside the tower's blocks 1..{depth}")
        if memory_path not in MEMORY_PATHS:
            raise ConfigError(f"memory path must be one of {', '.join(MEMORY_PATHS)}, got {memory_path!r}")
        self.memory_blocks = tuple(sorted(set(memory_blocks)))
        self.memory_path = memory_path
        nonstandard = [i for i in range(self.first_masked, depth) if not _is_standard_block(transformer.resblocks[i])]
        if nonstandard and (config.kernel != "qk" or not config.patch_mlp):
            raise ConfigError("LAA kernel 'vv' and patch_mlp=False need open_clip's standard blocks "
                              "(nn.MultiheadAttention); use kernel='qk', patch_mlp=True")
        self._mask: torch.Tensor | None = None
        self._allowed: torch.Tensor | None = None

    def _attn_mask(self, like: torch.Tensor) -> torch.Tensor:
        """Additive float mask (0 / -inf) in ``like``'s dtype and device."""
        if self._mask is None or self._mask.dtype != like.dtype or self._mask.device != like.device:
            self._mask = locality_additive_mask(self.grid, self.config.radius, like.dtype, like.device)
        return self._mask

    def _allowed_mask(self, like: torch.Tensor) -> torch.Tensor:
        """SDPA mask on ``like``'s device. CPU: boolean (True = may attend). Elsewhere: additive (0 / -inf) in
        ``like``'s dtype, rows padded to a multiple of 16 elements (a view of the first 1+N columns), the
        layout CUDA's memory-efficient attention kernel takes as it is (a boolean or unaligned mask is
        converted and padded again in every block of every batch)."""
        mask = self._allowed
        if mask is None or mask.device != like.device or (like.device.type != "cpu" and mask.dtype != like.dtype):
            blocked = locality_blocked(self.grid[0], self.grid[1], self.config.radius).to(like.device)
            if like.device.type == "cpu":
                mask = ~blocked
            else:
                length = blocked.shape[-1]
                storage = torch.zeros(length, -(-length // 16) * 16, dtype=like.dtype, device=like.device)
                mask = storage[:, :length].masked_fill_(blocked, float("-inf"))
            self._allowed = mask
        return mask

    def block_forward(self, index: int, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One transformer block of the patch (LAA) path; LAA-masked, with the configured kernel and MLP
        choice, when ``index`` is among the last ``layers`` blocks."""
        if index < self.first_masked:
            return block(x)
        if _is_standard_block(block):
            return masked_block_forward(block, x, self._allowed_mask(x), self.config.kernel, self.config.patch_mlp)
        return block(x, attn_mask=self._attn_mask(x))

    def cls_block_forward(self, index: int, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One block of the class-token path: open_clip's own block under the dual path, else `block_forward`."""
        return block(x) if self.dual else self.block_forward(index, block, x)

    def run_blocks(self, x: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        """Class-token path over embedded tokens x: [B, 1+N, C] -> [B, 1+N, C] (the single path without
        ``dual_path``; open_clip's own blocks with it).

        ``stop`` runs only the blocks before it (slice semantics: ``stop=-1`` = all but the last block, the
        tokens entering the last one); None runs them all.
        """
        blocks = self.visual.transformer.resblocks
        for index in range(len(blocks))[:stop]:
            x = self.cls_block_forward(index, blocks[index], x)
        return x

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens after the last block [B, 1+N, C] -> (projected class token [B, D], patches [B, N, D])."""
        visual = self.visual
        pooled, tokens = visual._pool(x)  # [B, C], [B, N, C]
        if getattr(visual, "final_ln_after_pool", False):
            tokens = visual.ln_post(tokens)  # _pool normalised only the pooled token
        if visual.proj is not None:
            pooled = pooled @ visual.proj
            tokens = tokens @ visual.proj
        return pooled, tokens

    def forward(self, pixels: torch.Tensor) -> ImageTokens:
        """pixels: [B, 3, H, W] normalised -> ImageTokens (projected, not L2-normalised)."""
        visual = self.visual
        blocks = visual.transformer.resblocks
        x = visual._embeds(pixels)  # [B, 1+N, C]
        taps: list[torch.Tensor] = []
        want = set(self.memory_blocks)
        for index in range(self.first_masked):
            x = blocks[index](x)
            if index + 1 in want:
                taps.append(x[:, 1:])
        if self.dual:
            x_ori = x
            for index in range(self.first_masked, len(blocks)):
                x_ori = blocks[index](x_ori)
                x = self.block_forward(index, blocks[index], x)
                if index + 1 in want:
                    taps.append((x if self.memory_path == "laa" else x_ori)[:, 1:])
            pooled, _ = self._project(x_ori)  # CLIP's own class token
            _, tokens = self._project(x)
        else:
            for index in range(self.first_masked, len(blocks)):
                x = self.block_forward(index, blocks[index], x)
                if index + 1 in want:
                    taps.append(x[:, 1:])
            pooled, tokens = self._project(x)
        memory = None
        if taps:
            scale = 1.0 / math.sqrt(len(taps))
            memory = torch.cat([F.normalize(t.float(), dim=-1) * scale for t in taps], dim=-1)
        return ImageTokens(cls=pooled, patches=tokens, memory=memory)
