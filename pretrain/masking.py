"""MSCN masks (Jing et al., "Masked Siamese ConvNets", Sec. 5.2), vectorised over the batch on its device.

A view is masked after every other augmentation and after normalisation + high-pass filter, so a masked zero
means "no information" and the mask edges are invisible. Per image:

- with probability `focal_prob` a focal mask (keep one random square, `focal_keep` of the side; mask the rest),
  otherwise a random grid mask (the image cut into `grid_cells` x `grid_cells` cells, round(ratio * cells^2)
  of them masked; 32 px cells at 224 px = 7 x 7 cells at any resolution);
- with probability `channel_prob` a channel-independent mask (every colour channel draws its own mask),
  otherwise one mask shared by all channels;
- masked pixels are replaced by Gaussian noise N(0, noise_std^2) (0 gives zero fill).

No Python loop over images: every draw is one tensor op over the batch.
"""
from __future__ import annotations

import torch


def grid_cells(batch: int, channels: int, cells: int, ratio: float, device=None) -> torch.Tensor:
    """(batch, channels, cells, cells) bool: exactly round(ratio * cells^2) random cells True per map."""
    n = cells * cells
    ranks = torch.rand(batch, channels, n, device=device).argsort(dim=-1).argsort(dim=-1)
    return (ranks < int(round(ratio * n))).view(batch, channels, cells, cells)


def upsample_cells(cell_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of a cell mask to `size` pixels (cells of unequal size when it does not divide)."""
    cells_h, cells_w = cell_mask.shape[-2:]
    rows = torch.arange(size[0], device=cell_mask.device) * cells_h // size[0]
    cols = torch.arange(size[1], device=cell_mask.device) * cells_w // size[1]
    return cell_mask.index_select(-2, rows).index_select(-1, cols)


def grid_masks(batch: int, channels: int, size: tuple[int, int], cells: int, ratio: float,
               device=None) -> torch.Tensor:
    """(batch, channels, H, W) bool, True = masked: exactly round(ratio * cells^2) random cells per map."""
    return upsample_cells(grid_cells(batch, channels, cells, ratio, device), size)


def focal_lines(batch: int, channels: int, size: tuple[int, int], keep: float, device=None):
    """Rows (batch, channels, H, 1) and columns (batch, channels, 1, W) outside one random square of side
    keep * min(H, W); their `|` is the focal mask."""
    h, w = size
    side = max(1, min(h, w, int(round(keep * min(h, w)))))
    y0 = (torch.rand(batch, channels, 1, 1, device=device) * (h - side + 1)).floor()
    x0 = (torch.rand(batch, channels, 1, 1, device=device) * (w - side + 1)).floor()
    yy = torch.arange(h, device=device).view(1, 1, h, 1)
    xx = torch.arange(w, device=device).view(1, 1, 1, w)
    return (yy < y0) | (yy >= y0 + side), (xx < x0) | (xx >= x0 + side)


def focal_masks(batch: int, channels: int, size: tuple[int, int], keep: float, device=None) -> torch.Tensor:
    """(batch, channels, H, W) bool, True = masked: everything outside one random square of side keep * min(H, W)."""
    rows, cols = focal_lines(batch, channels, size, keep, device)
    return rows | cols


def mscn_masks(x: torch.Tensor, ratio: float = 0.15, cells: int = 7, focal_prob: float = 0.4,
               focal_keep: float = 0.9, channel_prob: float = 0.8, mask_prob: float = 1.0) -> torch.Tensor:
    """The MSCN mask for every image of `x` (B, C, H, W): (B, C, H, W) bool, True = masked.

    Each image independently: masked at all with `mask_prob`; focal (else grid) with `focal_prob`;
    channel-independent (else channel 0's mask for every channel) with `channel_prob`. The per-image choices are
    made on the low-resolution parts (cells, focal rows/columns); only three ops run at full resolution.
    """
    b, c, h, w = x.shape
    dev = x.device
    draws = torch.rand(b, 3, device=dev)
    use_focal, independent, masked = draws[:, 0] < focal_prob, draws[:, 1] < channel_prob, draws[:, 2] < mask_prob

    def per_image(t: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        """Channel 0's map for shared-mask images; all False for images not masked or of the other kind."""
        view = (b,) + (1,) * (t.dim() - 1)
        return torch.where(independent.view(view), t, t[:, :1].expand_as(t)) & (masked & kind).view(view)

    # grid cells of grid-mask images, then the focal rows and columns of focal-mask images OR-ed in place
    mask = upsample_cells(per_image(grid_cells(b, c, cells, ratio, dev), ~use_focal), (h, w))
    rows, cols = focal_lines(b, c, (h, w), focal_keep, dev)
    mask |= per_image(rows, use_focal)
    mask |= per_image(cols, use_focal)
    return mask


def apply_masks(x: torch.Tensor, mask: torch.Tensor, noise_std: float = 0.2, inplace: bool = False) -> torch.Tensor:
    """Masked pixels -> i.i.d. N(0, noise_std^2) noise (zeros when noise_std is 0); the rest unchanged.
    `inplace` writes into x (for a tensor the caller owns, e.g. a fresh torch.cat)."""
    if noise_std <= 0:
        return x.masked_fill_(mask, 0.0) if inplace else x.masked_fill(mask, 0.0)
    if x.is_cuda:  # one full-size draw, no host sync
        return torch.where(mask, torch.randn(x.shape, device=x.device, dtype=x.dtype) * noise_std, x)
    # CPU: draw only the masked pixels' noise (~5x fewer normals; randn_like on channels_last is also slow there)
    noise = torch.randn(int(torch.count_nonzero(mask)), dtype=x.dtype).mul_(noise_std)
    return x.masked_scatter_(mask, noise) if inplace else x.masked_scatter(mask, noise)
