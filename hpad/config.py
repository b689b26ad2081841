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


def scorer_config(laa: bool = True, laa_layers: int | None = None, laa_radius: int | None = None,
                  sigma: float | None = None, max_batch: int | None = None) -> ScorerConfig:
    """Scoring options: Locality-Aware Attention on/off, its depth and window radius, map smoothing and batch
    size; None keeps `LAAConfig` / `ScorerConfig`'s default."""
    from hpad.attention import LAAConfig
    from hpad.scorer import ScorerConfig

    laa_options = {"layers": laa_layers, "radius": laa_radius}
    options = {"sigma": sigma, "max_batch": max_batch}
    return ScorerConfig(laa=LAAConfig(enabled=laa, **{k: v for k, v in laa_options.items() if v is not None}),
                        **{k: v for k, v in options.items() if v is not None})
