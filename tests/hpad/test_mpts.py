"""MPTS: the gradient projection on toy vectors, the losses, the prompt learner, and a short real training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpad.errors import ConfigError
from hpad.mpts import (
    TrainConfig,
    dice_loss,
    focal_loss,
    project_conflicting,
)
from hpad.prompts import PromptLearner, encode_texts

# ---------------------------------------------------------------------------------------- projection (pure)


def test_projection_conflicting_removes_the_conflict():
    g = torch.tensor([1.0, -2.0, 0.5])
    gm = torch.tensor([0.0, 1.0, 0.0])  # <g, gm> = -2 < 0
    out = project_conflicting(g, gm, lam=1.0)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 0.5]))
    assert torch.dot(out, gm).abs() < 1e-6  # orthogonal to the meta direction


def test_projection_partial_lambda():
    g = torch.tensor([1.0, -2.0])
    gm = torch.tensor([0.0, 2.0])  # dot = -4, ||gm||^2 = 4
    out = project_conflicting(g, gm, lam=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0]))  # g - 0.5 * (-4/4) * gm


def test_projection_aligned_and_orthogonal_are_unchanged():
    g = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(project_conflicting(g, torch.tensor([0.5, 0.5, 0.0])), g)  # aligned
    assert torch.equal(project_conflicting(g, torch.tensor([2.0, -1.0, 0.0])), g)  # orthogonal (dot = 0)
    assert torch.equal(project_conflicting(g, torch.zeros(3)), g)  # no guidance


def test_projection_works_on_shaped_tensors():
    g = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    gm = -g + 0.1 * torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    out = project_conflicting(g, gm)
    assert out.shape == g.shape
    assert torch.dot(out.reshape(-1), gm.reshape(-1)).abs() < 1e-4


# ---------------------------------------------------------------------------------------- losses


def test_focal_and_dice_losses():
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1
    perfect = target.clone()
    wrong = 1 - target
    assert focal_loss(perfect, target) < 1e-4 < focal_loss(wrong, target)
    assert dice_loss(perfect, target) < 0.05 < 0.9 < dice_loss(wrong, target)
    # focal down-weights easy examples: a confident-correct pixel costs less than with gamma 0
    half = torch.full((1, 4, 4), 0.8) * target + 0.2 * (1 - target)
    assert focal_loss(half, target, gamma=2.0) < focal_loss(half, target, gamma=0.0)


def test_train_config_validation():
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=-1)
    with pytest.raises(ConfigError, match="lam"):
        TrainConfig(lam=2.0)
    with pytest.raises(ConfigError, match="threshold_rule"):
        TrainConfig(threshold_rule="magic")


# ---------------------------------------------------------------------------------------- prompt learner


def test_prompt_learner_matches_frozen_text_encoder(tiny_backbone):
    """With the context set to real token embeddings the learner reproduces encode_text exactly."""
    model, tokenizer = tiny_backbone.model, tiny_backbone.tokenizer
    tokens = tokenizer(["X X X X bottle."] * 2)
    with torch.no_grad():
        ctx = model.token_embedding(tokens)[:, 1:5]
    learner = PromptLearner(model, tokenizer, n_ctx=4, class_name="bottle", init=ctx)
    reference = encode_texts(model, tokenizer, ["X X X X bottle."])[0]
    with torch.no_grad():
        out = learner()
    assert torch.allclose(out[0], reference, atol=1e-5) and torch.allclose(out[1], reference, atol=1e-5)
    assert learner.tokens.shape[1] < 77  # runs only up to the end-of-text token


def test_prompt_learner_gradients_reach_only_context(tiny_backbone):
    learner = PromptLearner(tiny_backbone.model, tiny_backbone.tokenizer, n_ctx=6, class_name="",
                            generator=torch.Generator().manual_seed(0))
    assert [name for name, p in learner.named_parameters() if p.requires_grad] == ["ctx"]
    out = learner()
    assert out.shape == (2, tiny_backbone.embed_dim)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    out[1].sum().backward()
    assert learner.ctx.grad is not None and learner.ctx.grad[1].abs().sum() > 0
    assert all(p.grad is None for p in tiny_backbone.model.parameters())


def test_prompt_learner_rejects_bad_init(tiny_backbone):
    with pytest.raises(ConfigError, match="initial context"):
        PromptLearner(tiny_backbone.model, tiny_backbone.tokenizer, n_ctx=4, init=torch.zeros(2, 5, 64))
    with pytest.raises(ConfigError, match="n_ctx"):
        PromptLearner(tiny_backbone.model, tiny_backbone.tokenizer, n_ctx=0)


def test_sentence_has_no_human_words_but_the_optional_class(tiny_backbone):
    learner = PromptLearner(tiny_backbone.model, tiny_backbone.tokenizer, n_ctx=3, class_name="metal_nut")
    assert learner.sentence == "X X X metal nut."
    bare = PromptLearner(tiny_backbone.model, tiny_backbone.tokenizer, n_ctx=3, class_name="")
    assert bare.sentence == "X X X."


# ---------------------------------------------------------------------------------------- training (tiny model)

TRAIN = dict(epochs=12, steps_per_epoch=4, batch_size=16, train_normals=16, train_anomalies=24,
             val_normals=8, val_anomalies=8, lr=5e-3, seed=0, patience=100, optimizer="adamw", schedule="constant",
             selection="loss", orientation="on")
# the text path on its own (legacy optimiser and selection); the synthetic blobs look the same flipped or turned,
# so flip/rot90 views are allowed (the default turns them off for objects)


@pytest.fixture(scope="module")
def normals():
    from tests.synthetic import make_object_image

    rng = np.random.default_rng(0)
    return [make_object_image(rng, (96, 96))[0] for _ in range(2)]


@pytest.fixture(scope="module")
def held_out(tiny_scorer, normals):
    """Fresh augmented normals + fresh OAGM anomalies (a seed the training never uses), encoded once."""
    from hpad.mpts import build_pool
    from hpad.oagm import OAGMConfig, object_masks

    regions = object_masks(tiny_scorer, normals, OAGMConfig())
    return build_pool(tiny_scorer, np.random.default_rng(777), normals, regions, 24, 24, OAGMConfig(), orientation="on")


@pytest.fixture(scope="module")
def trained(tiny_scorer, normals):
    from hpad.mpts import train_prompts

    return train_prompts(tiny_scorer, normals, "widget", TrainConfig(**TRAIN))


def test_training_loss_falls(trained):
    losses = [record["loss"] for record in trained.history]
    assert len(losses) == TRAIN["epochs"]
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
    assert trained.metrics.val_after.loss < trained.metrics.val_before.loss


def test_trained_prompts_separate_held_out_anomalies_better(tiny_scorer, trained, held_out):
    from hpad.mpts import evaluate_pool

    before = evaluate_pool(tiny_scorer, held_out, trained.initial_prompts)
    after = evaluate_pool(tiny_scorer, held_out, trained.prompts)
    assert after.image_AUROC > before.image_AUROC + 0.05, (before, after)
    assert after.pixel_AUROC > before.pixel_AUROC, (before, after)


def test_training_is_deterministic(tiny_scorer, normals, trained):
    from hpad.mpts import train_prompts

    again = train_prompts(tiny_scorer, normals, "widget", TrainConfig(**TRAIN))
    assert torch.equal(again.ctx, trained.ctx)
    assert again.prompts.threshold == trained.prompts.threshold


def test_result_is_a_scorable_calibrated_prompt_set(tiny_scorer, trained, normals):
    prompts = trained.prompts
    assert prompts.source == "learned" and prompts.model_identity == tiny_scorer.backbone.identity
    assert prompts.laa == tiny_scorer.config.laa
    assert prompts.memory is not None and prompts.memory.shape[1] == tiny_scorer.memory_dim
    assert prompts.method == tiny_scorer.method_record() and prompts.fusion_scales is not None
    assert 0.0 < prompts.threshold < 1.0 and 0.0 < prompts.pixel_threshold < 1.0
    scores, maps = tiny_scorer.score(normals, prompts=prompts)
    assert scores.shape == (2,) and maps[0].shape == normals[0].shape[:2]
    assert trained.ctx.shape == (2, 8, tiny_scorer.backbone.model.token_embedding.weight.shape[1])


def test_mpts_projection_is_active_and_ablation_differs(tiny_scorer, normals, trained):
    from hpad.mpts import train_prompts

    conflicts = [record["conflict"] for record in trained.history]
    assert any(c > 0 for c in conflicts), "the meta gradient never conflicted: guidance was never exercised"
    plain = train_prompts(tiny_scorer, normals, "widget", TrainConfig(**{**TRAIN, "mpts": False}))
    assert "conflict" not in plain.history[0]
    assert not torch.equal(plain.ctx, trained.ctx)


def test_warm_start_continues_from_given_context(tiny_scorer, normals, trained):
    from hpad.mpts import train_prompts

    warm = train_prompts(tiny_scorer, normals, "widget", TrainConfig(**{**TRAIN, "epochs": 1}), init_ctx=trained.ctx)
    torch.testing.assert_close(warm.initial_prompts.text_features, trained.prompts.text_features)
