"""OAGM configuration and results: `OAGMConfig`, `RegionParams`, `DefectParams`, `ObjectRegion`, `Synthetic`.

All frozen dataclasses, validated on construction (`ConfigError` names the bad field). `OAGMConfig.describe`
is what training reports and artifacts record.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from hpad.errors import ConfigError

RegionKind = Literal["object", "full-frame"]
ModelSignal = Literal["features", "attention", "both"]


@dataclass(frozen=True)
class RegionParams:
    """How the object region is found (see `hpad.oagm.region`)."""

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
        # imported here, not at the top: the generators module imports DefectParams from this one
        from hpad.oagm.generators import GENERATORS

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
