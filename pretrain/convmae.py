"""ConvMAE (Gao et al., NeurIPS'22): a masked autoencoder on the hybrid ConvViT encoder.

75% of the stage-3 (stride-16) tokens are masked per image; the mask is upsampled to stages 1-2, where it
multiplies the depthwise-conv inputs (masked convolution), and the transformer stage sees the visible tokens
only. Stage-1/2 features, brought to stride 16 by block-aligned convs, are added to the visible stage-3 tokens
before the final norm (multi-scale fusion). A ViT decoder predicts the normalised 16x16 pixels of the masked
patches; the loss is the MSE over masked patches only. Only the encoder is exported.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torchvision.transforms import v2 as T

from transfer.artifact import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, build_backbone
from transfer.convvit import PRESETS, ConvViT, xavier_init, sincos_pos_embed

PATCH = 16  # pixels per stage-3 token (4 * 2 * 2)
DEFAULT_CONFIG = "convmae-cpu-tiny"
DEFAULTS: dict[str, Any] = {  # the reference's ImageNet-1K recipe (configs/convmae-imagenet.yaml); configs override
    "arch": "convvit_base", "img_size": 224, "drop_path": 0.0,
    "mask_ratio": 0.75, "norm_pix_loss": True,
    "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16,
    "optimizer": "adamw", "betas": [0.9, 0.95], "weight_decay": 0.05,
    "lr": 1.5e-4, "lr_batch": 256, "batch_size": 3072, "epochs": 1600, "warmup_epochs": 40,
    # augmentation (main_pretrain.py): RandomResizedCrop(scale 0.2-1, bicubic) + flip only; see `view_transform`
    "crop_scale": [0.2, 1.0], "jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0,
}


def patchify(images: torch.Tensor, p: int = PATCH) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H/p * W/p, p*p*3), patches in raster order, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, size: tuple[int, int], p: int = PATCH) -> torch.Tensor:
    """Inverse of `patchify` for images of `size` (H, W)."""
    b = patches.shape[0]
    h, w = size[0] // p, size[1] // p
    x = patches.reshape(b, h, w, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, -1, h * p, w * p)


def random_masking(batch: int, tokens: int, ratio: float, device, noise: torch.Tensor | None = None):
    """Per-image random masks with the same masked count, as MAE/ConvMAE draw them: the tokens of lowest
    `noise` (uniform, (B, N); drawn when None) are kept. Returns (ids_keep (B, n) in shuffle order, mask (B, N)
    1 = masked, ids_restore) so that the decoder's `gather(cat(visible, mask tokens), ids_restore)` puts visible
    token i back at position ids_keep[:, i]."""
    keep = int(tokens * (1 - ratio))
    if noise is None:
        noise = torch.rand(batch, tokens, device=device)
    ids_shuffle = noise.argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, tokens, device=noise.device)
    mask.scatter_(1, ids_keep, 0)
    return ids_keep, mask, ids_restore


def _gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class ConvMAE(nn.Module):
    """ConvViT encoder + fusion convs + ViT decoder; `forward(images)` returns (loss, pred, mask)."""

    def __init__(self, encoder: ConvViT, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True):
        super().__init__()
        d1, d2, d3 = encoder.embed_dims
        self.encoder, self.mask_ratio, self.norm_pix_loss = encoder, mask_ratio, norm_pix_loss
        self.stage1_output_decode = nn.Conv2d(d1, d3, 4, stride=4)
        self.stage2_output_decode = nn.Conv2d(d2, d3, 2, stride=2)
        self.decoder_embed = nn.Linear(d3, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_dim, encoder.grid), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, PATCH * PATCH * 3)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference's `initialize_weights` (models_convmae.py): patch_embed3 Xavier-uniform as a linear
        layer, mask token N(0, 0.02), every Linear Xavier-uniform with zero bias and every LayerNorm (1, 0), in
        the encoder and the decoder alike; the other convs (stages 1-2, fusion) keep PyTorch's default init."""
        w = self.encoder.patch_embed3.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(xavier_init)

    def forward_encoder(self, images: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised visible stage-3 tokens with the fused stage-1/2 features, (B, n_visible, D)."""
        grid = self.encoder.grid
        s1, s2, tokens = self.encoder.forward_stages(images, keep=ids_keep, mask=mask.view(-1, grid, grid))
        fused1 = _gather_tokens(self.stage1_output_decode(s1).flatten(2).transpose(1, 2), ids_keep)
        fused2 = _gather_tokens(self.stage2_output_decode(s2).flatten(2).transpose(1, 2), ids_keep)
        return self.encoder.norm(tokens + fused1 + fused2)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, n_visible, d = x.shape
        x = torch.cat([x, self.mask_token.expand(b, ids_restore.shape[1] - n_visible, d)], dim=1)
        x = _gather_tokens(x, ids_restore) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE over the pixels of each patch (per-patch standardised targets), averaged over masked patches."""
        target = patchify(images).float()
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = ((pred.float() - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """(loss, pred (B, N, 768), mask (B, N)); `noise` (B, N) fixes the masking draw (drawn when None)."""
        ids_keep, mask, ids_restore = random_masking(images.shape[0], self.encoder.grid ** 2, self.mask_ratio,
                                                     images.device, noise)
        pred = self.forward_decoder(self.forward_encoder(images, ids_keep, mask), ids_restore)
        return self.loss(images, pred, mask), pred, mask


# ----------------------------------------------------------------------------------------------- pretrain/run.py
def num_views(cfg: dict) -> int:
    return 1


class BicubicCropFlip:
    """The reference's pretraining views: RandomResizedCrop (bicubic) + horizontal flip, as uint8, and the image's
    masking noise (uniform, one value per stage-3 token; `random_masking` keeps the lowest). Drawn here, from the
    sample's own seeded stream, the masks do not depend on the rank, the batch split or the number of processes."""

    def __init__(self, size: int, scale: tuple[float, float]):
        self.tokens = (size // PATCH) ** 2
        self.transform = T.Compose([
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.RandomHorizontalFlip(), T.PILToTensor()])

    def __call__(self, image):
        return [self.transform(image), torch.rand(self.tokens)]


def view_transform(cfg: dict) -> BicubicCropFlip:
    """One bicubic crop + flip per image; the colour/blur/solarize keys of other methods are refused."""
    extra = {k: cfg[k] for k in ("jitter_p", "gray_p", "blur_p", "solarize_p") if cfg[k]}
    if extra:
        raise SystemExit(f"convmae pretrains on crops and flips only (Alpha-VL/ConvMAE main_pretrain.py); "
                         f"remove {', '.join(f'{k}={v}' for k, v in extra.items())} from the config")
    return BicubicCropFlip(cfg["img_size"], tuple(cfg["crop_scale"]))


def preprocessing(cfg: dict) -> Preprocessing:
    return Preprocessing(IMAGENET_MEAN, IMAGENET_STD, "RGB", None)


def arch_kwargs(cfg: dict) -> dict:
    """The exported ConvViT's constructor arguments beyond its preset (the input size)."""
    return {} if cfg["img_size"] == PRESETS[cfg["arch"]]["img_size"] else {"img_size": cfg["img_size"]}


class ConvMAEPretraining(nn.Module):
    """The `pretrain/common.py` face of ConvMAE: uint8 views in, (loss, logs) out; `.backbone` is the encoder."""

    def __init__(self, cfg: dict):
        super().__init__()
        encoder = build_backbone(cfg["arch"], drop_path_rate=cfg["drop_path"], **arch_kwargs(cfg))
        self.model = ConvMAE(encoder, cfg["decoder_dim"], cfg["decoder_depth"], cfg["decoder_heads"],
                             cfg["mask_ratio"], cfg["norm_pix_loss"])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def backbone(self) -> ConvViT:
        return self.model.encoder

    def forward(self, views: list[torch.Tensor]):
        images = (views[0].float() - self.mean) / self.std
        noise = views[1] if len(views) > 1 else None  # per-image masking noise from the data (drawn when absent)
        loss, _, mask = self.model(images.contiguous(), noise)
        return loss, {"masked": mask.mean().detach()}


@torch.no_grad()
def pictures(model: ConvMAEPretraining, cfg: dict, num_images: int = 6) -> dict:
    """End-of-run pictures for `bench report` (pretrain/common.py saves them to OUTPUT_DIR/pictures/): rows of
    images, their visible patches, the reconstruction, and the reconstruction with the visible patches pasted
    (MAE's visualisation; with norm_pix_loss each predicted patch takes the true patch's mean and std)."""
    from torchvision.transforms.v2.functional import to_pil_image
    from torchvision.utils import make_grid

    from pretrain.adios import sample_images

    was_training = model.training
    model.eval()
    x = sample_images(cfg, num_images).to(model.mean.device)
    images = (x * 255 - model.mean) / model.std
    _, pred, mask = model.model(images)
    model.train(was_training)
    target = patchify(images)
    if model.model.norm_pix_loss:
        pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    size = images.shape[-2:]
    hidden = unpatchify(mask.unsqueeze(-1).expand_as(target), size)
    recon = unpatchify(pred.float(), size)
    to_unit = lambda t: ((t * model.std + model.mean) / 255).clamp(0, 1)  # noqa: E731
    rows = [x, x * (1 - hidden), to_unit(recon), to_unit(recon * hidden + images * (1 - hidden))]
    return {"reconstructions": to_pil_image(make_grid(torch.cat(rows).cpu(), nrow=len(x), padding=2, pad_value=1))}


def build_model(cfg: dict) -> ConvMAEPretraining:
    return ConvMAEPretraining(cfg)
