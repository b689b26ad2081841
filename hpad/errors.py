"""One root error type for everything hpad refuses, so callers can catch `HpadError` and show its message.

Every message says what was wrong and what to do about it.
"""

from __future__ import annotations


class HpadError(Exception):
    """Root of every error hpad raises on purpose."""


class ConfigError(HpadError):
    """A setting or flag is missing, out of range or inconsistent."""


class WeightsNotFoundError(HpadError):
    """CLIP weights for the requested model are not available locally (and downloads are off or failed)."""


class DataLayoutError(HpadError):
    """A dataset folder does not follow the MVTec AD layout."""


class ArtifactError(HpadError):
    """A prompt artifact is corrupt, tampered with, or does not match the model that loads it.

    ``reason``: ``invalid`` (unreadable, corrupt, tampered, out of limits), ``wrong_model``, ``wrong_laa``,
    ``wrong_category`` - a stable code for metrics.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class FrameError(HpadError):
    """An input frame cannot be scored. `reason` is a short, stable code used in metrics and dead letters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
