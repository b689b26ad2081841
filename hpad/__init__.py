"""hpad: human-free prompted anomaly detection with CLIP (library; no Kafka, no settings, no environment)."""

from hpad.errors import (
    ArtifactError,
    ConfigError,
    DataLayoutError,
    FrameError,
    HpadError,
    WeightsNotFoundError,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "ConfigError",
    "DataLayoutError",
    "FrameError",
    "HpadError",
    "WeightsNotFoundError",
    "__version__",
]
