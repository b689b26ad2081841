"""Backbone loading: random init, local checkpoints, and the fast, actionable offline failure."""

from __future__ import annotations

import time

import pytest
import torch

from hpad.backbone import RANDOM_WEIGHTS_ID, WeightsSpec, load_backbone, save_checkpoint
from hpad.errors import ConfigError, WeightsNotFoundError


def test_random_init_is_labelled_and_reproducible(tiny_backbone):
    assert tiny_backbone.weights_id == RANDOM_WEIGHTS_ID
    assert tiny_backbone.random_weights
    assert "random weights" in tiny_backbone.weights_label
    assert tiny_backbone.grid_size == (8, 8)
    again = load_backbone(WeightsSpec(model="hpad-tiny", random_init=True, seed=0))
    for (name, a), b in zip(tiny_backbone.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = load_backbone(WeightsSpec(model="hpad-tiny", random_init=True, seed=1))
    assert not torch.equal(other.model.visual.conv1.weight, tiny_backbone.model.visual.conv1.weight)


def test_random_init_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbone(WeightsSpec(model="hpad-tiny", random_init=True, seed=5))
    assert torch.equal(torch.rand(3), expected)


def test_model_is_frozen_and_in_eval_mode(tiny_backbone):
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())
    assert not tiny_backbone.model.training


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_roundtrip(tmp_path, tiny_backbone, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(tiny_backbone.model.state_dict(), path)
    else:
        save_checkpoint(tiny_backbone.model, path)
    loaded = load_backbone(WeightsSpec(model="hpad-tiny", checkpoint=path))
    assert loaded.weights_id.startswith("sha256:") and len(loaded.weights_id) == 7 + 64
    assert not loaded.random_weights
    for a, b in zip(tiny_backbone.model.state_dict().values(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_of_other_architecture_is_refused(tmp_path, tiny_backbone):
    path = save_checkpoint(tiny_backbone.model, tmp_path / "tiny.safetensors")
    with pytest.raises(WeightsNotFoundError, match="same architecture"):
        load_backbone(WeightsSpec(model="hpad-small", checkpoint=path))


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_backbone(WeightsSpec(model="hpad-tiny", checkpoint=tmp_path / "nope.safetensors"))


def test_pickled_checkpoint_is_not_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(WeightsNotFoundError):
        load_backbone(WeightsSpec(model="hpad-tiny", checkpoint=path))


def test_missing_pretrained_tag_fails_fast_with_actionable_message(tmp_path):
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as info:
        load_backbone(WeightsSpec(model="ViT-B-16-plus-240", pretrained="laion400m_e32", cache_dir=tmp_path))
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert str(tmp_path) in message
    assert "--checkpoint" in message and "HPAD_CHECKPOINT" in message and "--allow-download" in message
    # behavioural bound (not a benchmark): without the offline switch huggingface_hub retries for ~46 s
    assert elapsed < 10, elapsed


def test_unknown_tag_and_model_and_sources_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="known tags"):
        load_backbone(WeightsSpec(model="ViT-B-16-plus-240", pretrained="no-such-tag"))
    with pytest.raises(ConfigError, match="unknown model"):
        load_backbone(WeightsSpec(model="ViT-Nope", random_init=True))
    with pytest.raises(ConfigError, match="exactly one weights source"):
        WeightsSpec(model="hpad-tiny", random_init=True, pretrained="openai")
    with pytest.raises(ConfigError, match="exactly one weights source"):
        WeightsSpec(model="hpad-tiny")
    with pytest.raises(ConfigError, match="fp16"):
        load_backbone(WeightsSpec(model="hpad-tiny", random_init=True), device="cpu", precision="fp16")


def test_default_model_and_tag_have_one_home() -> None:
    """The default model and its weights tag come from hpad.defaults (re-exported by hpad.backbone)."""
    from hpad import backbone, defaults

    assert backbone.DEFAULT_MODEL == defaults.DEFAULT_MODEL == WeightsSpec(random_init=True).model
    assert defaults.default_pretrained_tag(defaults.DEFAULT_MODEL) == "laion400m_e32"
    assert defaults.default_pretrained_tag("ViT-B-16") == "openai"
