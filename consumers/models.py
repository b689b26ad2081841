"""The model factory of every process that loads CLIP (``hpad serve``, ``hpad tune``): settings -> `Scorer`.

Scorers and tuner must load the very same model (prompt artifacts name their model and scorers refuse
artifacts of another one), so both build it here from their `consumers.settings.ModelSettings`.
"""

from __future__ import annotations

import torch

from consumers.events import ModelInfo
from consumers.settings import ModelSettings
from hpad.attention import LAAConfig
from hpad.backbone import WeightsSpec, load_backbone
from hpad.scorer import Scorer, ScorerConfig


def build_scorer(settings: ModelSettings, max_batch: int = 8) -> Scorer:
    """The model named by the settings, wrapped in a Scorer with the settings' LAA, sigma and batch size."""
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    spec = WeightsSpec(
        model=settings.model, pretrained=settings.weights_pretrained, checkpoint=settings.checkpoint,
        random_init=settings.random_init, cache_dir=settings.cache_dir, allow_download=settings.allow_download,
        seed=settings.seed,
    )
    backbone = load_backbone(spec, device=settings.device, precision=settings.precision)
    laa = LAAConfig(enabled=settings.laa, layers=settings.laa_layers, radius=settings.laa_radius)
    return Scorer(backbone, config=ScorerConfig(laa=laa, sigma=settings.sigma, max_batch=max_batch))


def model_info(scorer: Scorer, precision: str) -> ModelInfo:
    """What events and metrics say about the model in use."""
    b = scorer.backbone
    return ModelInfo(model=b.model_name, weights=b.weights_id, identity=b.identity, random_weights=b.random_weights,
                     device=str(b.device), precision=precision)
