"""Model settings from plain values: the one mapping of the model flags / ``HPAD_*`` model settings onto
`WeightsSpec` and `ScorerConfig`, shared by the library commands (`hpad.commands`) and the services.

Callers pass plain values (parsed flags or settings fields); nothing here reads argv or the environment.
Light to import (torch and open_clip load only when a spec or config is built), so settings code may use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hpad.defaults import DEFAULT_MODEL, default_pretrained_tag

if TYPE_CHECKING:
    from hpad.backbone import WeightsSpec
    from hpad.scorer import ScorerConfig


def weights_spec(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    checkpoint: Path | None = None,
    random_init: bool = False,
    cache_dir: Path | None = None,
    allow_download: bool = False,
    seed: int = 0,
) -> WeightsSpec:
    """The weights to load; with no source chosen, the model's default pretrained tag (`hpad.defaults`)."""
    from hpad.backbone import WeightsSpec

    if pretrained is None and checkpoint is None and not random_init:
        pretrained = default_pretrained_tag(model)
    return WeightsSpec(model=model, pretrained=pretrained, checkpoint=checkpoint, random_init=random_init,
                       cache_dir=cache_dir, allow_download=allow_download, seed=seed)


def parse_memory_blocks(text: str | None) -> tuple[int, ...] | None:
    """``auto`` / empty / None -> None (PromptAD's blocks scaled to the tower), ``final`` -> () (the projected
    patch tokens), ``3,8`` -> (3, 8) (block numbers from 1)."""
    from hpad.errors import ConfigError

    if text is None or str(text).strip().lower() in ("", "auto"):
        return None
    if str(text).strip().lower() == "final":
        return ()
    try:
        blocks = tuple(int(part) for part in str(text).replace(" ", "").split(",") if part)
    except ValueError as exc:
        raise ConfigError(f"memory blocks must be 'auto', 'final' or block numbers like '3,8', got {text!r}") from exc
    if not blocks or min(blocks) < 1:
        raise ConfigError(f"memory blocks are numbered from 1, got {text!r}")
    return blocks


def scorer_config(laa: bool = True, laa_layers: int | None = None, laa_radius: int | None = None,
                  sigma: float | None = None, max_batch: int | None = None, *, dual_path: bool | None = None,
                  kernel: str | None = None, patch_mlp: bool | None = None,
                  memory_blocks: str | tuple[int, ...] | None = None, memory_path: str | None = None,
                  fusion: str | None = None, logit_scale: float | None = None,
                  memory_weight: float | None = None) -> ScorerConfig:
    """Scoring options: Locality-Aware Attention on/off, its depth, window radius, dual path, kernel and
    patch-path MLP, map smoothing, batch size, memory blocks / path, fusion, logit scale and memory weight;
    None keeps `LAAConfig` / `ScorerConfig`'s default (``logit_scale`` None: the model's own)."""
    from hpad.attention import LAAConfig
    from hpad.scorer import ScorerConfig

    laa_options = {"layers": laa_layers, "radius": laa_radius, "dual_path": dual_path, "kernel": kernel,
                   "patch_mlp": patch_mlp}
    blocks = memory_blocks if isinstance(memory_blocks, tuple) else parse_memory_blocks(memory_blocks)
    options = {"sigma": sigma, "max_batch": max_batch, "memory_path": memory_path, "fusion": fusion,
               "memory_weight": memory_weight}
    return ScorerConfig(laa=LAAConfig(enabled=laa, **{k: v for k, v in laa_options.items() if v is not None}),
                        memory_blocks=blocks, logit_scale=logit_scale,
                        **{k: v for k, v in options.items() if v is not None})
