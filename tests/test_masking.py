"""MSCN masking components (pretrain/masking.py): ratios, focal squares, channel independence, noise."""
import torch

from pretrain.masking import apply_masks, focal_masks, grid_masks, mscn_masks

B, H = 200, 32


def test_grid_mask_ratio_matches_config():
    for ratio in (0.15, 0.5):
        m = grid_masks(B, 3, (H, H), cells=7, ratio=ratio)
        per_map = m.float().mean(dim=(2, 3))
        # exactly round(ratio * 49) cells per map; cells are 4 or 5 px at 32 px, so pixel fractions wobble a bit
        assert abs(per_map.mean().item() - ratio) < 0.02, per_map.mean()
        assert (per_map - ratio).abs().max() < 0.06
    assert not grid_masks(4, 3, (H, H), 7, 0.0).any()


def test_mscn_mask_ratio_over_the_batch():
    x = torch.zeros(B, 3, 64, 64)
    m = mscn_masks(x, ratio=0.15, cells=7, focal_prob=0.0, channel_prob=0.5, mask_prob=1.0)
    assert abs(m.float().mean().item() - 0.15) < 0.02


def _is_one_square(kept: torch.Tensor, side: int) -> bool:
    rows, cols = kept.any(1).nonzero().flatten(), kept.any(0).nonzero().flatten()
    contiguous = (rows.diff() == 1).all() and (cols.diff() == 1).all()
    return bool(contiguous and len(rows) == len(cols) == side and kept.sum() == side * side)


def test_focal_masks_keep_one_connected_square():
    m = focal_masks(50, 3, (H, H), keep=0.6)
    side = round(0.6 * H)
    assert all(_is_one_square(~m[b, c], side) for b in range(50) for c in range(3))
    # positions vary
    assert len({tuple((~m[b, 0]).nonzero()[0].tolist()) for b in range(50)}) > 5


def test_focal_probability_and_shape_inside_mscn_masks():
    x = torch.zeros(400, 3, H, H)
    m = mscn_masks(x, ratio=0.15, cells=7, focal_prob=0.4, focal_keep=0.5, channel_prob=0.0)
    side = round(0.5 * H)
    focal = torch.tensor([_is_one_square(~m[b, 0], side) for b in range(400)])
    assert abs(focal.float().mean().item() - 0.4) < 0.08
    grid_frac = m[~focal].float().mean().item()
    assert abs(grid_frac - 0.15) < 0.02


def test_channel_independent_masks_differ_across_channels():
    x = torch.zeros(400, 3, H, H)
    always = mscn_masks(x, focal_prob=0.0, channel_prob=1.0)
    differ = (always[:, 0] != always[:, 1]).flatten(1).any(1) | (always[:, 0] != always[:, 2]).flatten(1).any(1)
    assert differ.float().mean() > 0.99
    never = mscn_masks(x, focal_prob=0.4, channel_prob=0.0)
    assert (never == never[:, :1]).all()
    half = mscn_masks(x, focal_prob=0.0, channel_prob=0.5)
    frac = (half[:, 0] != half[:, 1]).flatten(1).any(1).float().mean().item()
    assert abs(frac - 0.5) < 0.1
    focal = mscn_masks(x, focal_prob=1.0, focal_keep=0.5, channel_prob=1.0)
    assert (focal[:, 0] != focal[:, 1]).flatten(1).any(1).float().mean() > 0.9


def test_mask_probability():
    x = torch.zeros(400, 3, H, H)
    m = mscn_masks(x, focal_prob=0.0, mask_prob=0.3)
    assert abs(m.flatten(1).any(1).float().mean().item() - 0.3) < 0.08
    assert not mscn_masks(x, mask_prob=0.0).any()


def test_noise_statistics_in_masked_areas():
    torch.manual_seed(0)
    x = torch.full((64, 3, H, H), 3.0)
    m = mscn_masks(x, ratio=0.3, focal_prob=0.0)
    out = apply_masks(x, m, noise_std=0.2)
    noise = out[m]
    assert noise.numel() > 10_000
    assert abs(noise.mean().item()) < 0.01
    assert abs(noise.std().item() - 0.2) < 0.01
    assert torch.equal(out[~m], x[~m])  # unmasked pixels untouched
    # noise is i.i.d. per pixel and per channel, not one value per cell
    assert (noise[1:] != noise[:-1]).all()
    zero = apply_masks(x, m, noise_std=0.0)
    assert (zero[m] == 0).all() and torch.equal(zero[~m], x[~m])


def test_masks_follow_the_input_device_and_batch():
    x = torch.zeros(5, 3, 20, 24)
    m = mscn_masks(x, ratio=0.2, cells=7, focal_prob=0.5)
    assert m.shape == x.shape and m.dtype == torch.bool and m.device == x.device
