"""Every tensor path on a (fake) CUDA device: preprocessing, LAA encoder, scoring, few-shot memory, masks, tiled
scoring (crops, blend, masks of tiled frames), OAGM saliency, one MPTS step and the tuner's labelled pool.

On this CPU-only machine the device is torch's FakeTensorMode (`tests.fake_cuda`): an op that mixes cuda and
cpu tensors raises, and so does integer resampling on cuda (no such CUDA kernel). The same paths run on a
real GPU in ``tests/test_gpu.py`` (marker ``gpu``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from hpad.attention import LAAConfig
from hpad.mpts import TrainConfig, apply_guided_step, build_pool, meta_text_features, step_losses
from hpad.oagm import OAGMConfig, ObjectRegion, feature_saliency_tensor
from hpad.prompts import PromptLearner
from hpad.scorer import Scorer, ScorerConfig, memory_distance, pack_mask_bits
from tests.fake_cuda import CudaKernelError, fake_cuda, fake_module, is_fake_cuda


def _frames(n: int, shape: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


@pytest.fixture
def fake(tiny_backbone):
    with fake_cuda(tiny_backbone) as env:
        yield env


@pytest.fixture
def fake_scorer(fake, tiny_scorer):
    # prompt sets are born on the host (artifacts, training, zero-shot) and moved to the scorer's device
    return Scorer(fake.backbone, tiny_scorer.prompts)


def test_guard_refuses_integer_resampling_on_cuda(fake):
    batch = torch.zeros(1, 3, 50, 60, dtype=torch.uint8, device="cuda")
    with pytest.raises(CudaKernelError, match=r"no CUDA kernel for torch\.uint8"):
        torch.nn.functional.interpolate(batch, size=(32, 32), mode="bilinear", antialias=True)
    ok = torch.nn.functional.interpolate(batch.float(), size=(32, 32), mode="bilinear", antialias=True)
    assert is_fake_cuda(ok)


def test_guard_sees_device_mixing(fake):
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    with pytest.raises(FakeTensorDeviceMismatchError):
        torch.zeros(2, 3, device="cuda") @ torch.zeros(3, 2)


def test_preprocess_resizes_on_cuda(fake, fake_scorer):
    size = fake.backbone.image_size
    frames = _frames(3, (50, 70, 3)) + _frames(1, (*size, 3)) + _frames(1, (40, 40))
    pixels = fake_scorer.preprocess(frames)
    assert is_fake_cuda(pixels)
    assert tuple(pixels.shape) == (5, 3, *size) and pixels.dtype == fake.backbone.dtype


def test_preprocess_mixes_device_decoded_and_host_frames(fake, fake_scorer):
    """gpu_decode: JPEGs arrive decoded on the device, PNGs of the same size as host arrays, in one batch."""
    on_device = torch.zeros(3, 50, 70, dtype=torch.uint8, device="cuda")
    pixels = fake_scorer.preprocess([on_device, *_frames(2, (50, 70, 3)), on_device])
    assert is_fake_cuda(pixels) and tuple(pixels.shape) == (4, 3, *fake.backbone.image_size)


def test_laa_encoder_and_scoring_on_cuda(fake, fake_scorer):
    tokens = fake_scorer.encoder(fake_scorer.preprocess(_frames(2, (64, 48, 3))))
    assert is_fake_cuda(tokens.cls) and is_fake_cuda(tokens.patches)
    mask = fake_scorer.encoder._allowed  # the LAA mask as CUDA's memory-efficient attention takes it
    assert is_fake_cuda(mask) and mask.dtype == fake.backbone.dtype and mask.stride(0) % 16 == 0
    prompts = fake_scorer.check_prompts(fake_scorer.prompts)
    scores = fake_scorer.score_tensors(tokens, prompts)
    assert is_fake_cuda(scores.pred_score) and is_fake_cuda(scores.maps)
    assert tuple(scores.maps.shape) == (2, *fake.backbone.image_size)
    assert fake.guard.syncs == 0  # scoring a batch never waits on the device


def test_memory_and_masks_on_cuda(fake, fake_scorer):
    encoded = fake_scorer.encode(_frames(2, (64, 64, 3)))
    assert encoded.memory is not None and is_fake_cuda(encoded.memory)  # intermediate-block memory features
    features = fake_scorer.memory_features(encoded)
    memory = torch.nn.functional.normalize(features.reshape(-1, features.shape[-1]), dim=-1)
    distance = memory_distance(features, memory)
    assert is_fake_cuda(distance)
    prompts = fake_scorer.check_prompts(fake_scorer.prompts.with_memory(memory.cpu(), (0.5, 0.2, 0.5, 0.2)))
    assert is_fake_cuda(prompts.memory)
    scores = fake_scorer.score_tensors(encoded, prompts)
    bits, counts = pack_mask_bits(scores.maps, (90, 130), 0.5)  # what ScoredBatch.masks runs
    assert is_fake_cuda(bits) and bits.dtype == torch.uint8 and tuple(bits.shape) == (2, 90, 17)
    assert is_fake_cuda(counts)
    assert fake.guard.syncs == 0


def test_tiles_cropped_scored_and_blended_on_cuda(fake, fake_scorer):
    """A frame decoded on the device (nvJPEG) and a host frame at half scale, both tiled inside an ROI: crops,
    the one encoder pass over all tiles, the blend and the full-size mask all stay on the device."""
    from hpad.tiled_scoring import blend_tile_maps, crop_tiles
    from hpad.tiling import OFF, Box, TileSpec, plan_tiles

    size = fake.backbone.image_size
    plan = plan_tiles((200, 260), size, TileSpec("grid", 3, 2, 0.25), Box(10, 20, 240, 170), OFF)
    on_device = torch.zeros(3, 200, 260, dtype=torch.uint8, device="cuda")
    crops = crop_tiles(on_device, plan) + crop_tiles(_frames(1, (100, 130, 3))[0], plan)  # the host one at 1/2
    assert all(is_fake_cuda(c) for c in crops[:6]) and len(crops) == 12
    prompts = fake_scorer.check_prompts(fake_scorer.prompts)
    scored = fake_scorer.score_tensors(fake_scorer.encode(crops), prompts)
    for part in (scored.maps[:6], scored.maps[6:]):
        blended = blend_tile_maps(part, plan)
        assert is_fake_cuda(blended) and tuple(blended.shape) == (200, 260) and blended.dtype == torch.float32
        bits, counts = pack_mask_bits(blended[None], (200, 260), 0.5)  # what FrameScores.masks runs
        assert is_fake_cuda(bits) and tuple(bits.shape) == (1, 200, 33) and is_fake_cuda(counts)
    assert is_fake_cuda(scored.pred_score[:6].amax())  # the frame's score: max over its tiles, on the device
    assert fake.guard.syncs == 0


@pytest.mark.parametrize("fusion", ["normalized", "harmonic", "linear"])
@pytest.mark.parametrize("laa", [LAAConfig(), LAAConfig(dual_path=False, kernel="qk", patch_mlp=True),
                                 LAAConfig(kernel="qk", patch_mlp=True)])
def test_method_options_on_cuda(fake, tiny_scorer, fusion, laa):
    """Every encoder path (dual / single, v-v / q-k, with and without the patch MLP) and every fusion on the
    device, memory from the vanilla path too; nothing waits on the device."""
    scorer = Scorer(fake.backbone, tiny_scorer.prompts, ScorerConfig(laa=laa, fusion=fusion, memory_path="vanilla"))
    encoded = scorer.encode(_frames(3, (64, 48, 3)))
    assert all(is_fake_cuda(t) for t in encoded)
    features = scorer.memory_features(encoded)
    memory = torch.nn.functional.normalize(features.reshape(-1, features.shape[-1]), dim=-1)
    prompts = scorer.check_prompts(scorer.prompts.with_memory(memory.cpu(), (0.5, 0.2, 0.5, 0.2)))
    scores = scorer.score_tensors(encoded, prompts)
    assert is_fake_cuda(scores.pred_score) and is_fake_cuda(scores.maps)
    assert fake.guard.syncs == 0


def test_held_out_memory_calibration_on_cuda(fake, fake_scorer):
    """Training's leave-one-out memory distances, fusion scales' inputs and served fusion on the device."""
    from hpad.mpts import memory_distances_held_out, served_branches

    normals = _frames(3, (48, 48, 3))
    regions = [ObjectRegion(mask=np.ones((48, 48), bool), kind="object", score=1.0) for _ in normals]
    pool = build_pool(fake_scorer, np.random.default_rng(0), normals, regions, 3, 3, OAGMConfig())
    bank = fake_scorer.memory_bank(normals)
    distance, kind = memory_distances_held_out(fake_scorer, pool, bank)
    assert kind == "leave-one-out" and is_fake_cuda(distance)
    branches = served_branches(fake_scorer, pool, fake_scorer.prompts, distance)
    image, patch = fake_scorer.fused_scores(branches.image, branches.patch, branches.distance, (0.5, 0.2, 0.5, 0.2))
    assert is_fake_cuda(image) and is_fake_cuda(patch)


def test_oagm_feature_saliency_on_cuda(fake, fake_scorer):
    patches = fake_scorer.encode(_frames(2, (64, 64, 3))).patches
    saliency = feature_saliency_tensor(patches, fake.backbone.grid_size)
    assert is_fake_cuda(saliency) and tuple(saliency.shape) == (2, *fake.backbone.grid_size)
    assert is_fake_cuda(feature_saliency_tensor(patches, fake.backbone.grid_size, reference="mean"))


def test_one_mpts_step_on_cuda(fake, fake_scorer, tiny_backbone):
    config = TrainConfig(n_ctx=2, batch_size=4, train_normals=2, train_anomalies=2)
    normals = _frames(2, (48, 48, 3))
    regions = [ObjectRegion(mask=np.ones((48, 48), bool), kind="object", score=1.0) for _ in normals]
    pool = build_pool(fake_scorer, np.random.default_rng(0), normals, regions, 2, 2, OAGMConfig())
    assert all(is_fake_cuda(t) for t in (pool.tokens.cls, pool.labels, pool.masks))
    # built on the host model (its template needs the token ids), then moved as `.to("cuda")` would
    with unset_fake_temporarily():
        host = PromptLearner(tiny_backbone.model, tiny_backbone.tokenizer, config.n_ctx, "widget",
                             generator=torch.Generator().manual_seed(0))
    learner = fake_module(host, fake.mode)
    assert is_fake_cuda(learner.ctx) and is_fake_cuda(learner.tokens)
    optimizer = torch.optim.AdamW([learner.ctx], lr=1e-3)
    meta_text = meta_text_features(fake_scorer, "widget")
    assert is_fake_cuda(meta_text)
    loss, guide, parts = step_losses(learner, pool, meta_text, fake_scorer, config)
    assert is_fake_cuda(loss) and guide is not None and is_fake_cuda(guide)
    assert set(parts) == {"image_ce", "focal", "dice"} and all(is_fake_cuda(v) for v in parts.values())
    # torch's autograd engine needs a real CUDA context for the backward pass (tests/test_gpu.py runs it);
    # the gradients it would return have ctx's device and shape
    conflict = apply_guided_step(optimizer, learner.ctx, torch.ones_like(learner.ctx), -torch.ones_like(learner.ctx),
                                 config.lam)
    assert is_fake_cuda(conflict) and is_fake_cuda(learner.ctx.grad) and is_fake_cuda(learner.ctx)
    assert fake.guard.syncs == 0  # a training step queues work; losses are read once per epoch


def test_tuner_labelled_pool_on_cuda(fake, fake_scorer):
    from tuner.job import encode_labelled

    images = _frames(2, (40, 56, 3))
    masks = [np.zeros((40, 56), bool), np.ones((40, 56), bool)]
    pool = encode_labelled(fake_scorer, images, masks)
    assert all(is_fake_cuda(t) for t in (pool.tokens.cls, pool.labels, pool.masks))


def test_padded_additive_laa_mask_equals_the_boolean_one(tiny_backbone):
    """The mask layout used off the CPU (additive, rows padded to 16) gives the CPU's boolean-mask result."""
    from hpad.attention import locality_blocked, masked_block_forward

    visual = tiny_backbone.model.visual
    block = visual.transformer.resblocks[-1]
    grid = tuple(visual.grid_size)
    blocked = locality_blocked(grid[0], grid[1], 1)
    length = blocked.shape[-1]
    storage = torch.zeros(length, -(-length // 16) * 16)
    additive = storage[:, :length].masked_fill_(blocked, float("-inf"))
    x = torch.randn(3, length, visual.transformer.width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(masked_block_forward(block, x, additive), masked_block_forward(block, x, ~blocked),
                                   atol=1e-5, rtol=1e-5)


def test_device_bit_packing_equals_numpy():
    from hpad.scorer import pack_bits

    binary = torch.from_numpy(np.random.default_rng(0).random((3, 7, 45)) > 0.5)
    assert np.array_equal(pack_bits(binary).numpy(), np.packbits(binary.numpy(), axis=-1))
