"""ConvViT (ConvMAE's encoder): masked stages leak nothing from masked regions; stage masks are exact upsamplings."""
import pytest
import torch

from transfer.convvit import ConvViT, build_convvit, visible_multipliers


def _random_mask(batch, grid, keep, seed=0):
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(batch, grid * grid, generator=g).argsort(1)
    mask = torch.ones(batch, grid * grid)
    mask.scatter_(1, order[:, :keep], 0)
    return mask.view(batch, grid, grid), order[:, :keep].sort(1).values


def test_stage_masks_are_exact_upsamplings():
    mask, _ = _random_mask(2, 4, 4)
    vis1, vis2 = visible_multipliers(mask)
    assert vis2.shape == (2, 1, 8, 8) and vis1.shape == (2, 1, 16, 16)
    for i in range(4):
        for j in range(4):
            assert (vis2[:, 0, 2 * i:2 * i + 2, 2 * j:2 * j + 2] == 1 - mask[:, i:i + 1, j:j + 1]).all()
            assert (vis1[:, 0, 4 * i:4 * i + 4, 4 * j:4 * j + 4] == 1 - mask[:, i:i + 1, j:j + 1]).all()


def test_no_leakage_from_masked_pixels():
    torch.manual_seed(0)
    model = build_convvit("convvit_tiny").eval()
    x = torch.rand(2, 3, 64, 64)
    mask, keep = _random_mask(2, 4, 4)
    altered = x.clone()
    pixel_mask = mask.repeat_interleave(16, 1).repeat_interleave(16, 2).unsqueeze(1).bool().expand_as(x)
    altered[pixel_mask] = torch.randn(int(pixel_mask.sum()))
    with torch.no_grad():
        _, _, tokens = model.forward_stages(x, keep=keep, mask=mask)
        _, _, tokens_altered = model.forward_stages(altered, keep=keep, mask=mask)
        _, _, unmasked = model.forward_stages(altered, keep=keep)  # without the masked conv it would leak
    assert tokens.shape == (2, 4, 96)
    assert torch.allclose(tokens, tokens_altered, atol=1e-6)
    assert not torch.allclose(tokens, unmasked, atol=1e-3)


def test_image_size_must_divide_by_16_and_pyramid_strides():
    with pytest.raises(ValueError, match="divisible by 16"):
        ConvViT(img_size=72, embed_dims=(8, 8, 16), depths=(1, 1, 1), num_heads=2)
    model = build_convvit("convvit_tiny", img_size=96)
    feats = model.forward_pyramid(torch.rand(1, 3, 96, 96))
    assert [f.shape[-1] for f in feats] == [24, 12, 6] and [f.shape[1] for f in feats] == [32, 48, 96]


def test_sincos_table_has_mae_channel_order():
    from transfer.convvit import sincos_pos_embed

    table = sincos_pos_embed(8, 3)[0]  # dim 8: x channels [sin x, sin x/100, cos x, cos x/100], then the same for y
    row, col = 1, 2
    w = torch.tensor([1.0, 0.01])
    expected = torch.cat([torch.sin(col * w), torch.cos(col * w), torch.sin(row * w), torch.cos(row * w)])
    assert torch.allclose(table[row * 3 + col], expected, atol=1e-6)
