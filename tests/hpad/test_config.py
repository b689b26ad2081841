"""hpad.config: the one mapping of model flags / settings onto WeightsSpec and ScorerConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpad.attention import LAAConfig
from hpad.backbone import WeightsSpec
from hpad.config import scorer_config, weights_spec
from hpad.defaults import DEFAULT_MODEL
from hpad.errors import ConfigError
from hpad.scorer import ScorerConfig


def test_weights_spec_defaults_to_the_models_pretrained_tag():
    assert weights_spec().pretrained == "laion400m_e32" and weights_spec().model == DEFAULT_MODEL
    assert weights_spec(model="ViT-B-16").pretrained == "openai"
    assert weights_spec(model="hpad-tiny", random_init=True, seed=3) == WeightsSpec(model="hpad-tiny",
                                                                                    random_init=True, seed=3)
    spec = weights_spec(checkpoint=Path("w.safetensors"), cache_dir=Path("c"), allow_download=True)
    assert spec.pretrained is None and spec.checkpoint == Path("w.safetensors") and spec.allow_download
    with pytest.raises(ConfigError):
        weights_spec(pretrained="openai", random_init=True)


def test_scorer_config_keeps_the_defaults_it_is_not_given():
    assert scorer_config() == ScorerConfig()
    config = scorer_config(laa=False, laa_layers=2, laa_radius=3, sigma=0.0, max_batch=4)
    assert config == ScorerConfig(laa=LAAConfig(enabled=False, layers=2, radius=3), sigma=0.0, max_batch=4)


def test_service_settings_map_through_the_same_function():
    """`hpad serve`'s model settings and the library flags give the same spec (consumers.app.build_scorer)."""
    from consumers.settings import ModelSettings

    settings = ModelSettings()
    assert settings.weights_pretrained == weights_spec(model=settings.model).pretrained
