"""Locality-Aware Attention: the mask's shape and the locality it guarantees."""

from __future__ import annotations

import pytest
import torch

from hpad.attention import LAAConfig, LocalityAwareEncoder, locality_blocked
from hpad.errors import ConfigError


def test_mask_structure():
    blocked = locality_blocked(4, 5, 1)
    n = 4 * 5
    assert blocked.shape == (n + 1, n + 1)
    assert not blocked[0].any(), "class token attends globally"
    assert blocked[1:, 0].all(), "patches never attend to the class token"
    # patch (1, 2) -> index 1*5+2 = 7 (+1 for the class token) sees exactly its 3x3 neighbourhood
    row = ~blocked[1 + 7, 1:]
    seen = {(int(i) // 5, int(i) % 5) for i in torch.nonzero(row).flatten()}
    assert seen == {(y, x) for y in (0, 1, 2) for x in (1, 2, 3)}
    # corner patch sees a 2x2 window; radius 2 gives 5x5 in the interior
    assert (~blocked[1, 1:]).sum() == 4
    assert (~locality_blocked(7, 7, 2)[1 + 24, 1:]).sum() == 25


def _tokens_after(encoder: LocalityAwareEncoder, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder(pixels).patches[0]  # [N, D]


def _perturb_patch(pixels: torch.Tensor, gy: int, gx: int, patch: int) -> torch.Tensor:
    out = pixels.clone()
    out[:, :, gy * patch : (gy + 1) * patch, gx * patch : (gx + 1) * patch] += torch.randn(1, 3, patch, patch)
    return out


@pytest.fixture()
def pixels(tiny_backbone):
    torch.manual_seed(0)
    return torch.randn(1, 3, *tiny_backbone.image_size)


@pytest.mark.parametrize("options", [
    {"dual_path": False, "kernel": "qk", "patch_mlp": True},  # the paper's LAA (hpad before issue 17)
    {},  # the defaults: dual path, v-v kernel, no MLP on the patch path
    {"kernel": "qk", "patch_mlp": True},  # dual path with CLIP's own attention on the patch path
])
def test_locality_all_blocks_masked(tiny_backbone, pixels, options):
    """LAA on every block, radius 1, 4 blocks: patch (0,0) depends only on patches within distance 4, with or
    without the dual path (whose class token is vanilla CLIP's, tests/hpad/test_method.py) and either kernel."""
    depth = len(tiny_backbone.model.visual.transformer.resblocks)
    config = LAAConfig(enabled=True, layers=depth, radius=1, **options)
    encoder = LocalityAwareEncoder(tiny_backbone.model.visual, config)
    patch = tiny_backbone.patch_size[0]
    base = _tokens_after(encoder, pixels)
    far = _tokens_after(encoder, _perturb_patch(pixels, 7, 6, patch))  # Chebyshev distance 7 > 4
    near = _tokens_after(encoder, _perturb_patch(pixels, 1, 1, patch))  # distance 1
    assert torch.allclose(far[0], base[0], atol=1e-6, rtol=0)
    assert (near[0] - base[0]).abs().max() > 1e-3
    # the perturbed patch itself and its neighbours do change
    assert (far[7 * 8 + 6] - base[7 * 8 + 6]).abs().max() > 1e-3


@pytest.mark.parametrize("kernel", ["qk", "vv"])
def test_locality_last_block_stack(tiny_backbone, kernel):
    """Within the masked stack (last 2 blocks, radius 1) outputs depend only on inputs within 2 patches."""
    visual = tiny_backbone.model.visual
    encoder = LocalityAwareEncoder(visual, LAAConfig(enabled=True, layers=2, radius=1, kernel=kernel))
    torch.manual_seed(1)
    x = torch.randn(1, 65, visual.transformer.width)
    last = visual.transformer.resblocks[2:]
    assert encoder.first_masked == 2

    def run(tokens):
        with torch.no_grad():
            for offset, block in enumerate(last):
                tokens = encoder.block_forward(2 + offset, block, tokens)
        return tokens

    base = run(x)
    i = 1 + 3 * 8 + 3  # patch (3, 3)
    width = x.shape[-1]
    # random directions: a constant shift would be removed by LayerNorm and prove nothing
    far = x.clone()
    far[0, 1 + 3 * 8 + 6] += torch.randn(width)  # (3, 6): distance 3 > 2
    far[0, 0] += torch.randn(width)  # the class token is invisible to patches too
    near = x.clone()
    near[0, 1 + 4 * 8 + 4] += torch.randn(width)  # (4, 4): distance 1, inside the window
    assert torch.allclose(run(far)[0, i], base[0, i], atol=1e-6, rtol=0)
    assert (run(near)[0, i] - base[0, i]).abs().max() > 1e-4
    # the class token still sees everything
    assert (run(far)[0, 0] - base[0, 0]).abs().max() > 1e-4


def test_without_laa_far_patches_change_output(tiny_backbone, pixels):
    patch = tiny_backbone.patch_size[0]
    for config in (LAAConfig(enabled=False), LAAConfig(enabled=True, layers=2, radius=1)):
        # with LAA off, or with only the last blocks masked, early global blocks mix everything
        encoder = LocalityAwareEncoder(tiny_backbone.model.visual, config)
        base = _tokens_after(encoder, pixels)
        far = _tokens_after(encoder, _perturb_patch(pixels, 7, 6, patch))
        assert (far[0] - base[0]).abs().max() > 1e-4, config


def test_laa_off_matches_open_clip_forward(tiny_backbone, pixels):
    encoder = LocalityAwareEncoder(tiny_backbone.model.visual, LAAConfig(enabled=False))
    with torch.no_grad():
        ours = encoder(pixels)
        visual = tiny_backbone.model.visual
        visual.output_tokens = True
        try:
            pooled, tokens = visual(pixels)
        finally:
            visual.output_tokens = False
    assert torch.allclose(ours.cls, pooled, atol=1e-6)
    assert torch.allclose(ours.patches, tokens @ visual.proj, atol=1e-6)


def test_batch_invariance_of_encoder(tiny_backbone):
    encoder = LocalityAwareEncoder(tiny_backbone.model.visual, LAAConfig())
    torch.manual_seed(2)
    batch = torch.randn(5, 3, *tiny_backbone.image_size)
    with torch.no_grad():
        together = encoder(batch).patches
        alone = torch.cat([encoder(batch[i : i + 1]).patches for i in range(5)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_bad_configs():
    with pytest.raises(ConfigError):
        LAAConfig(layers=-1)
    with pytest.raises(ConfigError):
        LAAConfig(radius=-2)
    with pytest.raises(ConfigError, match="exceeds"):
        LAAConfig(layers=99).active_layers(4)


def test_fast_masked_block_equals_additive_mask_path(tiny_backbone):
    """The SDPA boolean-mask fast path computes exactly what open_clip's block does with the -inf mask."""
    from hpad.attention import masked_block_forward

    visual = tiny_backbone.model.visual
    encoder = LocalityAwareEncoder(visual, LAAConfig(layers=4, radius=1))
    torch.manual_seed(3)
    x = torch.randn(3, 65, visual.transformer.width)
    with torch.no_grad():
        for block in visual.transformer.resblocks:
            fast = masked_block_forward(block, x, encoder._allowed_mask(x))
            reference = block(x, attn_mask=encoder._attn_mask(x))
            assert torch.allclose(fast, reference, atol=1e-5)


def test_run_blocks_stops_before_a_block(tiny_backbone, pixels):
    """run_blocks(x, stop=-1) gives the class-token path's tokens entering the last block: one more cls_block_forward
    ends the tower."""
    visual = tiny_backbone.model.visual
    blocks = visual.transformer.resblocks
    encoder = LocalityAwareEncoder(visual, LAAConfig(layers=2, radius=1))
    with torch.no_grad():
        x = visual._embeds(pixels)
        before_last = encoder.run_blocks(x, stop=-1)
        assert torch.equal(encoder.run_blocks(x, stop=len(blocks) - 1), before_last)
        assert torch.equal(encoder.run_blocks(x, stop=0), x)
        full = encoder.cls_block_forward(len(blocks) - 1, blocks[-1], before_last)
        assert torch.equal(full, encoder.run_blocks(x))
