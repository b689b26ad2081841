"""Issue 17, method fidelity: dual-path class token, disjoint memory / validation, masks that survive the resize,
orientation views, fusion on one scale, ProGrad's SGD, and artifacts that record every choice."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hpad.artifact import build_artifact_bytes, read_artifact
from hpad.attention import LAAConfig, LocalityAwareEncoder
from hpad.errors import ConfigError
from hpad.mpts import (
    TrainConfig,
    apply_guided_step,
    augment_view,
    build_pool,
    mask_to_model,
    memory_distances_held_out,
    orientation_allowed,
    pool_on_device,
    project_conflicting,
    selection_score,
    train_prompts,
)
from hpad.oagm import OAGMConfig, ObjectRegion
from hpad.prompts import PromptSet
from hpad.scorer import Scorer, ScorerConfig, fuse, memory_distance
from tests.synthetic import make_object_image

LEGACY = LAAConfig(dual_path=False, kernel="qk", patch_mlp=True)


def _frames(n: int, seed: int, size: tuple[int, int] = (64, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _vanilla(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return visual(pixels)  # open_clip's own forward: the projected class token


# ------------------------------------------------------------------------------------------ dual path


@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.parametrize("kernel,mlp", [("vv", False), ("qk", True), ("qk", False)])
def test_dual_path_class_token_is_vanilla_clip(tiny_backbone, layers, kernel, mlp):
    visual = tiny_backbone.model.visual
    torch.manual_seed(4)
    pixels = torch.randn(3, 3, *tiny_backbone.image_size)
    encoder = LocalityAwareEncoder(visual, LAAConfig(layers=layers, kernel=kernel, patch_mlp=mlp))
    with torch.no_grad():
        tokens = encoder(pixels)
    torch.testing.assert_close(tokens.cls, _vanilla(visual, pixels), atol=1e-5, rtol=0)
    single = LocalityAwareEncoder(visual, LAAConfig(layers=layers, kernel=kernel, patch_mlp=mlp, dual_path=False))
    with torch.no_grad():
        assert (single(pixels).cls - tokens.cls).abs().max() > 1e-3  # one path: not CLIP's class token
        assert torch.equal(single(pixels).patches, tokens.patches)  # the patch path is the same either way


def test_vv_kernel_and_skipped_mlp_change_the_patch_path(tiny_backbone):
    visual = tiny_backbone.model.visual
    torch.manual_seed(5)
    pixels = torch.randn(1, 3, *tiny_backbone.image_size)
    outs = {}
    for name, config in {"vv": LAAConfig(), "qk": LAAConfig(kernel="qk"), "vv+mlp": LAAConfig(patch_mlp=True)}.items():
        with torch.no_grad():
            outs[name] = LocalityAwareEncoder(visual, config)(pixels).patches
    assert (outs["vv"] - outs["qk"]).abs().max() > 1e-3
    assert (outs["vv"] - outs["vv+mlp"]).abs().max() > 1e-3


def test_memory_taps_are_block_outputs(tiny_backbone):
    """ImageTokens.memory = the tapped blocks' patch tokens, each L2-normalised, over sqrt(blocks)."""
    visual = tiny_backbone.model.visual
    torch.manual_seed(6)
    pixels = torch.randn(2, 3, *tiny_backbone.image_size)
    config = LAAConfig(enabled=False)  # every block open_clip's own: the taps are plain block outputs
    encoder = LocalityAwareEncoder(visual, config, memory_blocks=(1, 3))
    with torch.no_grad():
        memory = encoder(pixels).memory
        x = visual._embeds(pixels)
        outs = []
        for block in visual.transformer.resblocks:
            x = block(x)
            outs.append(x[:, 1:])
    expected = torch.cat([torch.nn.functional.normalize(o, dim=-1) for o in (outs[0], outs[2])], -1) / np.sqrt(2)
    torch.testing.assert_close(memory, expected, atol=1e-5, rtol=0)
    assert LocalityAwareEncoder(visual, config)(pixels).memory is None
    with pytest.raises(ConfigError, match="outside"):
        LocalityAwareEncoder(visual, config, memory_blocks=(9,))


# ------------------------------------------------------------------------------------------ bugs


def test_memory_and_validation_images_are_disjoint(tiny_scorer):
    """Validation items made from a shot are scored against the OTHER shots' memory; against the full memory
    an unaugmented shot would match itself exactly (distance 0)."""
    shots = _frames(3, 11)
    bank = tiny_scorer.memory_bank(shots)  # [3, N, F]
    pool = pool_on_device(tiny_scorer, shots, torch.zeros(3, dtype=torch.long),
                          torch.zeros(3, *tiny_scorer.backbone.image_size), ["normal"] * 3)
    pool.sources = [0, 1, 2]
    held_out, kind = memory_distances_held_out(tiny_scorer, pool, bank)
    assert kind == "leave-one-out"
    features = tiny_scorer.memory_features(pool.tokens)
    naive = memory_distance(features, bank.reshape(-1, bank.shape[-1]))
    assert float(naive.max()) < 1e-5  # the bug: each image finds itself
    assert float(held_out.min()) > 1e-4
    for i in range(3):  # exactly the memory of the other two shots
        others = bank[[j for j in range(3) if j != i]].reshape(-1, bank.shape[-1])
        torch.testing.assert_close(held_out[i], memory_distance(features[i : i + 1], others)[0])
    pool.sources = [-1, -1, -1]  # real held-out normals see the whole memory
    assert memory_distances_held_out(tiny_scorer, pool, bank)[1] == "held-out"
    pool.sources = [0, 0, 0]
    assert memory_distances_held_out(tiny_scorer, pool, bank[:1])[1] == "none"  # k = 1: no other shot


def test_training_reports_how_memory_was_held_out(tiny_scorer):
    rng = np.random.default_rng(8)
    normals = [make_object_image(rng, (80, 80))[0] for _ in range(3)]
    config = TrainConfig(epochs=2, steps_per_epoch=1, batch_size=8, train_normals=4, train_anomalies=4,
                         val_normals=4, val_anomalies=4, n_ctx=2)
    loo = train_prompts(tiny_scorer, normals[:2], "widget", config)
    assert loo.metrics.data["memory_holdout"] == "leave-one-out" and loo.metrics.data["memory_images"] == 2
    tuner_like = train_prompts(tiny_scorer, normals[:2], "widget", config, val_normals=normals[2:])
    assert tuner_like.metrics.data["held_out_normals"] == 1
    assert tuner_like.metrics.data["memory_holdout"] == "leave-one-out"  # top-up views of the shots are LOO
    single = train_prompts(tiny_scorer, normals[:1], "widget", config)
    assert single.metrics.data["memory_holdout"] == "none"
    assert loo.metrics.selection["rule"] == "served" and "FPR" in loo.metrics.selection


def test_thin_masks_survive_the_resize():
    mask = np.zeros((900, 900), bool)
    mask[100:800, 451] = True  # a one-pixel scratch
    resized = mask_to_model(mask, (240, 240))
    assert resized.sum() >= 180 and set(resized.unique().tolist()) == {0.0, 1.0}
    area = torch.nn.functional.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(240, 240),
                                           mode="area")[0, 0]
    assert not bool((area > 0.5).any())  # the old rule lost it entirely
    assert not bool(mask_to_model(np.zeros((50, 70), bool), (32, 32)).any())


def test_no_sample_labelled_anomalous_with_an_empty_mask(tiny_scorer):
    rng = np.random.default_rng(9)
    normals = [make_object_image(rng, (400, 400))[0] for _ in range(2)]
    regions = [ObjectRegion(mask=np.ones((400, 400), bool), kind="object", score=1.0) for _ in normals]
    oagm = OAGMConfig(generators=(("scratch", 1.0),))  # thin defects on frames 6x the model size
    pool = build_pool(tiny_scorer, np.random.default_rng(3), normals, regions, 2, 12, oagm)
    anomalous = pool.labels == 1
    assert int(anomalous.sum()) + pool.dropped == 12
    assert bool((pool.masks[anomalous].sum(dim=(1, 2)) > 0).all())
    assert bool((pool.masks[~anomalous].sum(dim=(1, 2)) == 0).all())
    assert len(pool.sources) == len(pool) and set(pool.sources) <= {0, 1}


def test_orientation_views_off_for_objects():
    image = np.zeros((40, 60, 3), np.uint8)
    image[2:8, 3:9] = 200  # a marker in the top-left corner: any flip or turn moves it
    region = np.ones((40, 60), bool)
    obj = ObjectRegion(mask=region, kind="object", score=1.0)
    texture = ObjectRegion(mask=region, kind="full-frame", score=0.0)
    assert not orientation_allowed("auto", obj) and orientation_allowed("auto", texture)
    assert orientation_allowed("on", obj) and not orientation_allowed("off", texture)
    rng = np.random.default_rng(0)
    kept = [augment_view(rng, image, region, orientation=False)[0] for _ in range(12)]
    assert all(v.shape == image.shape and v[:10, :10].mean() > v[-10:, -10:].mean() + 50 for v in kept)
    rng = np.random.default_rng(0)
    turned = [augment_view(rng, image, region, orientation=True)[0] for _ in range(12)]
    assert any(v.shape != image.shape or v[:10, :10].mean() < 50 for v in turned)


# ------------------------------------------------------------------------------------------ fusion


def test_fusion_rules():
    text = torch.tensor([0.2, 0.4, 0.9])
    memory = torch.tensor([0.05, 0.1, 0.2])
    torch.testing.assert_close(fuse(text, memory, 0.5, "linear"), 0.5 * text + 0.5 * memory)
    torch.testing.assert_close(fuse(text, memory, 0.5, "harmonic"), 2 / (1 / text + 1 / memory))
    at_scale = fuse(torch.tensor([0.4]), torch.tensor([0.1]), 0.5, "normalized", 0.4, 0.1)
    assert float(at_scale) == pytest.approx(0.5)  # both branches at their normal scale -> 0.5
    normalized = fuse(text, memory, 0.5, "normalized", 0.4, 0.1)
    assert bool((normalized.diff() > 0).all()) and float(normalized.max()) < 1.0
    # one scale: a memory distance 2x its normal level outweighs a text score at its normal level
    assert float(fuse(torch.tensor([0.4]), torch.tensor([0.2]), 0.5, "normalized", 0.4, 0.1)) > 0.5
    with pytest.raises(ConfigError):
        fuse(text, memory, 0.5, "max")


def test_selection_score_counts_false_alarms():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    clean = selection_score(labels, np.array([0.1, 0.2, 0.1, 0.2, 0.8, 0.9, 0.7, 0.95]))
    noisy = selection_score(labels, np.array([0.1, 0.2, 0.85, 0.9, 0.8, 0.9, 0.7, 0.95]))
    assert clean["FPR"] == 0.0 and clean["score"] == pytest.approx(1.0)
    assert noisy["FPR"] == 0.5 and noisy["score"] < clean["score"]


# ------------------------------------------------------------------------------------------ MPTS with SGD


def test_sgd_guided_update_never_ascends_the_guidance_loss():
    """With SGD the applied step is -lr * projected gradient, whose inner product with the meta gradient is
    >= 0: to first order the guidance loss cannot rise. Adam rescales each coordinate and can break it."""
    g_meta = torch.tensor([1.0, 2.0])
    g_task = torch.tensor([1.0, -3.0])  # conflicts: <g, g_meta> = -5
    guided = project_conflicting(g_task, g_meta)
    assert float(guided @ g_meta) >= -1e-6
    torch.testing.assert_close(guided, torch.tensor([2.0, -1.0]))
    for momentum in (0.0, 0.9):
        ctx = torch.nn.Parameter(torch.zeros(2))
        apply_guided_step(torch.optim.SGD([ctx], lr=0.1, momentum=momentum), ctx, g_task, g_meta, 1.0)
        assert float(ctx.detach() @ g_meta) <= 1e-6  # the update moved down (or across) the guidance loss
    adam_ctx = torch.nn.Parameter(torch.zeros(2))
    apply_guided_step(torch.optim.AdamW([adam_ctx], lr=0.1, weight_decay=0.0), adam_ctx, g_task, g_meta, 1.0)
    assert float(adam_ctx.detach() @ g_meta) > 1e-3  # Adam's sign-like step climbs it


def test_sgd_training_steps_keep_the_projection_property(tiny_scorer):
    """Real MPTS steps under the default SGD (no momentum, so each update is one applied gradient): every
    parameter change has a non-positive inner product with that step's meta gradient."""
    from hpad.mpts import meta_text_features, step_losses
    from hpad.prompts import PromptLearner

    rng = np.random.default_rng(10)
    normals = [make_object_image(rng, (80, 80))[0] for _ in range(2)]
    regions = [ObjectRegion(mask=np.ones((80, 80), bool), kind="object", score=1.0) for _ in normals]
    pool = build_pool(tiny_scorer, np.random.default_rng(1), normals, regions, 6, 6, OAGMConfig())
    config = TrainConfig(n_ctx=2, momentum=0.0)
    learner = PromptLearner(tiny_scorer.backbone.model, tiny_scorer.backbone.tokenizer, 2, "widget",
                            generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD([learner.ctx], lr=0.05, momentum=0.0)
    meta = meta_text_features(tiny_scorer, "widget")
    for _ in range(6):
        loss, guide, _ = step_losses(learner, pool, meta, tiny_scorer, config)
        g_task, = torch.autograd.grad(loss, learner.ctx, retain_graph=True)
        g_meta, = torch.autograd.grad(guide, learner.ctx)
        before = learner.ctx.detach().clone()
        apply_guided_step(optimizer, learner.ctx, g_task, g_meta, 1.0)
        change = (learner.ctx.detach() - before).reshape(-1)
        assert float(change @ g_meta.reshape(-1)) <= 1e-7 * float(g_meta.norm() * change.norm() + 1e-12)


def test_prograd_schedule():
    config = TrainConfig(epochs=10, lr=2e-3)
    assert config.optimizer == "sgd" and config.resolved_weight_decay == 5e-4
    lrs = [config.lr_at(e) for e in range(10)]
    assert lrs[0] == 1e-5 and lrs[1] == pytest.approx(2e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:])) and lrs[-1] < 2e-4
    assert TrainConfig(schedule="constant").lr_at(5) == TrainConfig().lr
    assert TrainConfig(optimizer="adamw").resolved_weight_decay == 0.0
    assert TrainConfig(epochs=1).lr_at(0) == TrainConfig().lr  # a one-epoch run is not all warm-up


# ------------------------------------------------------------------------------------------ artifacts


def _learned(scorer: Scorer, memory: bool = True) -> PromptSet:
    prompts = scorer.prompts
    bank = scorer.build_memory(_frames(2, 12)) if memory else None
    return PromptSet(category="widget", text_features=prompts.text_features, source="learned",
                     model_identity=scorer.backbone.identity, memory=bank, laa=scorer.config.laa,
                     method=scorer.method_record(), fusion_scales=(0.5, 0.2, 0.5, 0.2) if memory else None)


def test_artifact_records_every_choice_and_mismatch_is_refused(tiny_backbone, tiny_scorer):
    data = build_artifact_bytes(_learned(tiny_scorer), version=1)
    artifact = read_artifact(data, expected_identity=tiny_backbone.identity, expected_laa=tiny_scorer.config.laa)
    assert artifact.manifest["method"] == tiny_scorer.method_record()
    assert artifact.prompts.fusion_scales == (0.5, 0.2, 0.5, 0.2)
    tiny_scorer.check_prompts(artifact.prompts)  # the same choices: accepted
    cases = {
        "fusion": ScorerConfig(fusion="normalized"),
        "laa.dual_path": ScorerConfig(laa=LAAConfig(dual_path=False)),
        "laa.kernel": ScorerConfig(laa=LAAConfig(kernel="qk")),
        "memory_path": ScorerConfig(memory_path="vanilla"),
        "logit_scale": ScorerConfig(logit_scale=50.0),
        "memory_weight": ScorerConfig(memory_weight=0.3),
        "memory_blocks": ScorerConfig(memory_blocks=(1, 2)),
    }
    for name, config in cases.items():
        with pytest.raises(ConfigError, match=name.replace(".", r"\.") + ": learned with"):
            Scorer.zero_shot(tiny_backbone, "widget", config).check_prompts(artifact.prompts)
    # memory and fusion choices do not matter for a set without a memory
    plain = read_artifact(build_artifact_bytes(_learned(tiny_scorer, memory=False), version=1)).prompts
    Scorer.zero_shot(tiny_backbone, "widget", ScorerConfig(fusion="normalized", memory_weight=0.2)).check_prompts(plain)
    with pytest.raises(ConfigError, match=r"laa\.kernel"):
        Scorer.zero_shot(tiny_backbone, "widget", ScorerConfig(laa=LAAConfig(kernel="qk"))).check_prompts(plain)


def test_old_artifacts_read_as_the_old_choices(tiny_backbone):
    """An artifact from before the method record: read as single-path q-k LAA, memory on projected tokens, linear
    fusion. The new defaults refuse it naming the field; a scorer on the old options serves it."""
    old = Scorer.zero_shot(tiny_backbone, "widget", ScorerConfig(laa=LEGACY, memory_blocks=(), fusion="linear"))
    prompts = PromptSet(category="widget", text_features=old.prompts.text_features, source="learned",
                        model_identity=tiny_backbone.identity, memory=old.build_memory(_frames(2, 13)))
    data = build_artifact_bytes(prompts, version=3, extra={"laa": {"enabled": True, "layers": 4, "radius": 1}})
    artifact = read_artifact(data)
    assert artifact.prompts.laa == LEGACY and artifact.manifest["method"] is None
    assert artifact.prompts.method["fusion"] == "linear" and artifact.prompts.method["memory_blocks"] == []
    old.check_prompts(artifact.prompts)
    with pytest.raises(ConfigError, match=r"laa\.dual_path: learned with False, this scorer runs True"):
        Scorer.zero_shot(tiny_backbone, "widget").check_prompts(artifact.prompts)
    with pytest.raises(Exception, match=r"laa\.dual_path"):
        read_artifact(data, expected_laa=LAAConfig())
