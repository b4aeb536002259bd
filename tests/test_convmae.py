"""ConvMAE: no leakage through the fused encoder, loss over masked patches only, exact patchify inverse."""
import torch

from pretrain.convmae import ConvMAE, patchify, random_masking, unpatchify
from transfer.convvit import build_convvit


def _model(seed=0):
    torch.manual_seed(seed)
    return ConvMAE(build_convvit("convvit_tiny"), decoder_dim=64, decoder_depth=1, decoder_heads=4).eval()


def test_patchify_unpatchify_exact_inverse():
    images = torch.randn(2, 3, 64, 96)
    patches = patchify(images)
    assert patches.shape == (2, 4 * 6, 16 * 16 * 3)
    assert torch.equal(unpatchify(patches, (64, 96)), images)
    assert torch.equal(patches[0, 1].view(16, 16, 3)[:, :, 0], images[0, 0, :16, 16:32])  # raster order


def test_random_masking_fixed_count_and_restore():
    ids_keep, mask, ids_restore = random_masking(5, 16, 0.75, "cpu")
    assert ids_keep.shape == (5, 4) and (mask.sum(1) == 12).all()
    assert (mask.gather(1, ids_keep) == 0).all()
    assert torch.equal(torch.arange(16).expand(5, 16).gather(1, ids_restore.argsort(1)).sort(1).values,
                       torch.arange(16).expand(5, 16))


def test_fused_encoder_output_ignores_masked_pixels():
    model = _model()
    images = torch.rand(2, 3, 64, 64)
    ids_keep, mask, _ = random_masking(2, 16, 0.75, "cpu")
    pixels = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 16 * 16 * 3), (64, 64)).bool()
    altered = torch.where(pixels, torch.randn_like(images) * 5, images)
    with torch.no_grad():
        latent = model.forward_encoder(images, ids_keep, mask)
        latent_altered = model.forward_encoder(altered, ids_keep, mask)
    assert latent.shape == (2, 4, 96)
    assert torch.allclose(latent, latent_altered, atol=1e-6)


def test_loss_counts_masked_patches_only_and_matches_formula():
    model = _model()
    images = torch.rand(2, 3, 64, 64)
    _, mask, _ = random_masking(2, 16, 0.75, "cpu")
    pred = torch.randn(2, 16, 768)
    loss = model.loss(images, pred, mask)
    changed_visible = torch.where(mask.bool().unsqueeze(-1), pred, pred + 10)
    assert torch.allclose(model.loss(images, changed_visible, mask), loss)
    target = patchify(images)
    expected = 0.0
    for b in range(2):
        for n in range(16):
            if mask[b, n]:
                t = target[b, n]
                t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
                expected += ((pred[b, n] - t) ** 2).mean()
    assert torch.allclose(loss, expected / mask.sum(), atol=1e-5)


def test_forward_trains_the_encoder():
    model = _model().train()
    loss, pred, mask = model(torch.rand(4, 3, 64, 64))
    loss.backward()
    assert pred.shape == (4, 16, 768) and torch.isfinite(loss)
    assert model.encoder.blocks1[0].attn.weight.grad.abs().sum() > 0
    assert model.encoder.pos_embed.grad is None  # the sin-cos table stays fixed
