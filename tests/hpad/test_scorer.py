"""Scorer: input formats, output shapes, batch invariance, determinism, few-shot memory, pure helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpad.attention import LAAConfig
from hpad.errors import ConfigError, FrameError
from hpad.prompts import PromptSet
from hpad.scorer import (
    Scorer,
    ScorerConfig,
    anomaly_probability,
    gaussian_blur,
    memory_distance,
    patch_maps_to_frames,
)


def _frames(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(100, 120, 3), (64, 64, 3), (37, 200), (90, 90, 1), (128, 96, 4), (64, 64, 3), (300, 250, 3), (12, 9)]
    return [rng.integers(0, 256, shapes[i % len(shapes)], dtype=np.uint8) for i in range(n)]


def test_shapes_and_ranges(tiny_scorer):
    frames = _frames(0, 8)
    scores, maps = tiny_scorer.score(frames)
    assert scores.shape == (8,) and scores.dtype == np.float32
    assert [m.shape for m in maps] == [f.shape[:2] for f in frames]
    assert all(m.dtype == np.float32 for m in maps)
    assert np.all((scores >= 0) & (scores <= 1))
    assert all(np.all((m >= 0) & (m <= 1)) for m in maps)


def test_batch_invariance_and_determinism(tiny_scorer):
    frames = _frames(1, 8)
    together = tiny_scorer.score(frames)
    again = tiny_scorer.score(frames)
    np.testing.assert_array_equal(together.pred_score, again.pred_score)
    for i, frame in enumerate(frames):
        alone = tiny_scorer.score([frame])
        assert abs(float(alone.pred_score[0]) - float(together.pred_score[i])) < 1e-4
        assert np.abs(alone.anomaly_map[0] - together.anomaly_map[i]).max() < 1e-4


def test_grayscale_equals_replicated_rgb(tiny_scorer):
    gray = _frames(2, 1)[0][:, :, 0]
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    a, b = tiny_scorer.score([gray]), tiny_scorer.score([rgb])
    assert a.pred_score[0] == pytest.approx(b.pred_score[0], abs=1e-6)
    np.testing.assert_allclose(a.anomaly_map[0], b.anomaly_map[0], atol=1e-6)


def test_empty_batch(tiny_scorer):
    scores, maps = tiny_scorer.score([])
    assert scores.shape == (0,) and maps == []


@pytest.mark.parametrize(
    "bad",
    [np.zeros((10, 10, 3), dtype=np.float32), np.zeros((10, 10, 2), dtype=np.uint8), np.zeros((0, 5, 3), np.uint8),
     np.zeros((4, 4, 4, 4), dtype=np.uint8), "not an array"],
)
def test_bad_frames_raise_frame_error(tiny_scorer, bad):
    with pytest.raises(FrameError):
        tiny_scorer.score([bad])


def test_prompt_dimension_mismatch_is_refused(tiny_scorer):
    wrong = PromptSet(category="x", text_features=torch.nn.functional.normalize(torch.randn(2, 32), dim=-1))
    with pytest.raises(ConfigError, match="embedding size"):
        tiny_scorer.score(_frames(3, 1), prompts=wrong)


def test_prompt_set_validation():
    with pytest.raises(ConfigError):
        PromptSet(category="x", text_features=torch.randn(3, 8))
    with pytest.raises(ConfigError):
        PromptSet(category="x", text_features=torch.full((2, 8), float("nan")))


def test_prompts_per_call_change_scores(tiny_scorer):
    frames = _frames(4, 2)
    base = tiny_scorer.score(frames)
    flipped = PromptSet(category="widget", text_features=tiny_scorer.prompts.text_features.flip(0).cpu())
    swapped = tiny_scorer.score(frames, prompts=flipped)
    np.testing.assert_allclose(base.pred_score + swapped.pred_score, 1.0, atol=1e-5)


def test_laa_changes_the_map(tiny_backbone):
    frames = _frames(5, 2)
    on = Scorer.zero_shot(tiny_backbone, "widget", ScorerConfig(laa=LAAConfig(enabled=True, layers=2)))
    off = Scorer.zero_shot(tiny_backbone, "widget", ScorerConfig(laa=LAAConfig(enabled=False)))
    assert np.abs(on.score(frames).anomaly_map[0] - off.score(frames).anomaly_map[0]).max() > 1e-5


def test_few_shot_memory_scores_reference_as_normal(tiny_backbone):
    scorer = Scorer.zero_shot(tiny_backbone, "widget", ScorerConfig(memory_weight=1.0, sigma=0))
    references = _frames(6, 2)
    memory = scorer.build_memory(references)
    n_patches = tiny_backbone.grid_size[0] * tiny_backbone.grid_size[1]
    width = tiny_backbone.model.visual.transformer.width
    assert scorer.memory_blocks == (1, 3)  # PromptAD's blocks 3 and 8 of 12, scaled to 4 blocks
    assert memory.shape == (2 * n_patches, 2 * width) == (2 * n_patches, scorer.memory_dim)
    prompts = scorer.prompts.with_memory(memory)
    seen = scorer.score(references[:1], prompts=prompts)
    unseen = scorer.score(_frames(7, 1), prompts=prompts)
    assert seen.pred_score[0] < 1e-3  # every patch has itself in memory: distance 0
    assert unseen.pred_score[0] > seen.pred_score[0] + 1e-3


def test_anomaly_probability_toy():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = anomaly_probability(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), text, logit_scale=10.0)
    assert p[0] == pytest.approx(1 / (1 + np.exp(10)), rel=1e-5)
    assert p[1] == pytest.approx(1 / (1 + np.exp(-10)), rel=1e-5)
    assert p[2] == pytest.approx(0.5)


def test_memory_distance_toy():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    patches = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]]])
    d = memory_distance(patches, memory, chunk=2)
    np.testing.assert_allclose(d.numpy(), [[0.0, 0.5, (1 - np.sqrt(0.5)) / 2]], atol=1e-6)


def test_gaussian_blur_keeps_constants_and_mass():
    const = torch.full((1, 1, 20, 30), 0.7)
    torch.testing.assert_close(gaussian_blur(const, 4.0), const)
    spike = torch.zeros(1, 1, 41, 41)
    spike[0, 0, 20, 20] = 1.0
    blurred = gaussian_blur(spike, 2.0)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-5)
    assert blurred[0, 0, 20, 20] == blurred.max()
    tiny = gaussian_blur(torch.rand(1, 1, 3, 3), 4.0)  # kernel larger than the map still works
    assert tiny.shape == (1, 1, 3, 3)


def test_patch_maps_to_frames_locates_a_hot_patch():
    scores = torch.zeros(1, 16)
    scores[0, 4 * 0 + 3] = 1.0  # grid (0, 3): top-right
    (m,) = patch_maps_to_frames(scores, (4, 4), (64, 64), 0.0, [(100, 200)])
    assert m.shape == (100, 200)
    y, x = np.unravel_index(np.argmax(m), m.shape)
    assert y < 25 and x > 150
