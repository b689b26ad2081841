"""The default CLIP model and its default weights tag: the one place they are written down.

Kept free of heavy imports (no torch, no open_clip) so that settings modules and the service supervisor can
use them without loading the model stack. `hpad.backbone` re-exports both names.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_PRETRAINED", "FALLBACK_PRETRAINED", "default_pretrained_tag"]

DEFAULT_MODEL = "ViT-B-16-plus-240"  # the paper's backbone (Chen et al. 2024)
DEFAULT_MODEL_PRETRAINED = "laion400m_e32"  # open_clip tag of DEFAULT_MODEL's weights
FALLBACK_PRETRAINED = "openai"  # tag assumed for any other architecture when no weights source is given


def default_pretrained_tag(model: str) -> str:
    """The open_clip pretrained tag loaded for ``model`` when no weights source (tag, checkpoint, random) is set."""
    return DEFAULT_MODEL_PRETRAINED if model == DEFAULT_MODEL else FALLBACK_PRETRAINED
