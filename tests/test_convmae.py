"""ConvMAE: no leakage through the fused encoder, loss over masked patches only, exact patchify inverse."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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


def test_random_masking_keeps_the_lowest_noise_in_shuffle_order():
    noise = torch.rand(3, 16)
    ids_keep, mask, ids_restore = random_masking(3, 16, 0.75, "cpu", noise)
    assert torch.equal(ids_keep, noise.argsort(1)[:, :4])  # MAE's ids_shuffle[:, :len_keep], not sorted
    assert torch.equal(mask, (noise.argsort(1).argsort(1) >= 4).float())


def test_decoder_puts_each_visible_token_at_its_own_position():
    """The decoder input at position ids_keep[:, i] is visible token i (embedded) plus that position's
    embedding; with sorted ids_keep and the shuffle's ids_restore most visible tokens land elsewhere."""
    model = _model()
    torch.manual_seed(3)
    ids_keep, mask, ids_restore = random_masking(4, 16, 0.75, "cpu")
    latent = torch.randn(4, 4, 96)
    seen = {}
    hook = model.decoder_blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        model.forward_decoder(latent, ids_restore)
        hook.remove()
        expected = model.decoder_embed(latent) + model.decoder_pos_embed[0, ids_keep]
        assert torch.allclose(seen["x"].gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, 64)), expected, atol=1e-6)
        masked = mask.bool()
        assert torch.allclose(seen["x"][masked], (model.mask_token[0] + model.decoder_pos_embed[0]).expand(
            4, -1, -1)[masked], atol=1e-6)


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


def _tiny_images(root, n=16):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i}.png")
    return root


def test_pretrain_run_exports_an_encoder_the_audit_accepts(tmp_path):
    from pretrain.common import load_config, train
    from transfer.loading import load_backbone

    cfg = load_config("convmae", None, [f"data={_tiny_images(tmp_path / 'imgs')}", f"output_dir={tmp_path / 'run'}",
                                         "img_size=32", "batch_size=8", "epochs=1", "workers=0", "decoder_depth=1"])
    artifact = train(cfg, log=lambda *a: None)
    backbone, report = load_backbone(artifact)
    assert report.ok and backbone.arch == "convvit_tiny" and backbone.artifact_meta["arch_kwargs"] == {"img_size": 32}
    assert backbone.artifact_meta["provenance"]["method"] == "convmae"
    assert not any(k.startswith(("decoder", "stage1_output", "mask_token")) for k in backbone.trunk.state_dict())
    with Image.open(tmp_path / "run" / "pictures" / "reconstructions.png") as im:  # saved by common.train
        assert im.size == (2 + 6 * 34, 2 + 4 * 34)  # 6 images x (image, visible patches, recon, recon + visible)


def test_reconstruction_picture_keeps_visible_patches_and_draws_the_prediction_in_masked_ones(tmp_path):
    from pretrain.common import load_config
    from pretrain.convmae import build_model, pictures

    cfg = load_config("convmae", None, [f"data={_tiny_images(tmp_path / 'imgs', n=6)}", "img_size=32",
                                        "decoder_depth=1"])
    model = build_model(cfg)
    torch.manual_seed(0)
    grid = torch.from_numpy(np.array(pictures(model, cfg)["reconstructions"])).float() / 255
    side = cfg["img_size"]
    rows = [grid[2 + r * (side + 2):2 + r * (side + 2) + side, 2:2 + side] for r in range(4)]  # first column
    image, visible, recon, pasted = rows
    shown = visible.sum(-1) > 0  # visible patches keep the image, hidden ones are black
    assert shown.any() and not shown.all()
    assert (pasted - image)[shown].abs().max() <= 1 / 255 + 1e-6  # the visible patches pasted back
    assert torch.equal(pasted[~shown], recon[~shown])  # the prediction where patches were hidden

    def perfect(images):  # predicts every patch's standardised pixels (the norm_pix_loss target) exactly
        target = patchify(images)
        standardised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return None, standardised, random_masking(images.shape[0], target.shape[1], 0.75, images.device)[1]

    assert model.model.norm_pix_loss
    model.model.forward = perfect
    grid = torch.from_numpy(np.array(pictures(model, cfg)["reconstructions"])).float() / 255
    image, recon = grid[2:2 + side, 2:2 + side], grid[2 + 2 * (side + 2):2 + 2 * (side + 2) + side, 2:2 + side]
    assert (recon - image).abs().max() <= 2 / 255  # patch mean and std restored: the image comes back


def test_non_finite_loss_stops_with_the_last_good_checkpoint_kept(tmp_path):
    from pretrain.common import load_config, train

    cfg = load_config("convmae", None, [f"data={_tiny_images(tmp_path / 'imgs')}", f"output_dir={tmp_path / 'run'}",
                                         "img_size=32", "batch_size=4", "epochs=1", "workers=0", "decoder_depth=1",
                                         "ckpt_every=1", "warmup_epochs=0", "lr=1.0e+30"])
    with pytest.raises(SystemExit, match=r"non-finite loss .* at step \d+; the last good checkpoint .*checkpoint.pth"):
        train(cfg, log=lambda *a: None)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------- golden parity
# tests/fixtures/convmae_parity.pt: Alpha-VL/ConvMAE's MaskedAutoencoderConvViT (commit inside the fixture) run by
# benchmarks/parity/convmae.py on the same weights, images and masking noise at 224 px with tiny widths.
FIXTURE = Path(__file__).parent / "fixtures" / "convmae_parity.pt"


@pytest.fixture(scope="module")
def parity():
    from benchmarks.parity.convmae import bench_model, bench_name, images_from

    ref = torch.load(FIXTURE, weights_only=True)
    model = bench_model()
    missing, unexpected = model.load_state_dict({bench_name(n): t for n, t in ref["state_dict"].items()},
                                                strict=False)
    assert not unexpected and set(missing) == {"encoder.pos_embed", "decoder_pos_embed"}
    model.train()
    loss, pred, mask = model(images_from(ref["images_56px"]), noise=ref["noise"])
    loss.backward()
    grads = {n: p.grad.norm() if p.grad is not None else torch.tensor(0.0)  # unused: no gradient at all
             for n, p in model.named_parameters() if p.requires_grad}
    return ref, model, loss.detach(), pred.detach(), mask, {n: grads[bench_name(n)] for n in ref["grad_norms"]}


def test_parity_fixture_names_the_reference_commit(parity):
    ref = parity[0]
    assert len(ref["commit"]) == 40 and "Alpha-VL/ConvMAE" in ref["reference"]


def test_parity_loss_mask_and_predictions_equal_the_reference(parity):
    ref, _, loss, pred, mask, _ = parity
    assert torch.equal(mask, ref["mask"])
    assert abs(loss.item() - ref["loss"].item()) < 1e-5
    assert (pred[..., :8] - ref["pred_head"]).abs().max() < 1e-5
    assert (pred.norm(dim=-1) - ref["pred_norms"]).abs().max() < 1e-5


def test_parity_gradient_norms_equal_the_reference(parity):
    ref, *_, grads = parity
    assert set(grads) == set(ref["grad_norms"])  # every reference parameter, fusion convs and decoder included
    worst = max(grads, key=lambda n: abs(grads[n].item() - ref["grad_norms"][n]))
    assert abs(grads[worst].item() - ref["grad_norms"][worst]) < 1e-5, worst


def test_parity_fixed_position_tables_equal_the_reference(parity):
    ref, model = parity[:2]
    assert torch.equal(model.encoder.pos_embed, ref["pos_embed"])
    assert torch.equal(model.decoder_pos_embed, ref["pos_embed"])  # both tables are 16-d here


def test_initialisation_follows_the_reference():
    """Pooled over 16 seeds, every parameter's mean and spread after bench's init match the reference's init
    (Xavier patch_embed3 and Linears, zero biases, unit LayerNorms, default-init convs, mask token N(0, .02))."""
    from benchmarks.parity.convmae import bench_model, init_stats

    ref = torch.load(FIXTURE, weights_only=True)["init_stats"]
    ours = init_stats(bench_model, rename=lambda n: n.removeprefix("encoder."))
    assert set(ours) == set(ref)
    for name, (mean, std) in ref.items():
        if std == 0:  # constant init: zeros or ones
            assert ours[name][1] == 0 and ours[name][0] == mean, name
        else:
            assert 0.85 < ours[name][1] / std < 1.15, (name, ours[name], (mean, std))


def test_views_are_bicubic_crops_and_flips_only():
    from torchvision.transforms import v2 as T

    from pretrain import convmae
    from pretrain.common import load_config

    cfg = load_config("convmae", "convmae-imagenet")
    crop = convmae.view_transform(cfg).transform.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.interpolation == T.InterpolationMode.BICUBIC
    assert tuple(crop.scale) == (0.2, 1.0) and tuple(crop.size) == (224, 224)
    with pytest.raises(SystemExit, match="jitter_p=0.8"):
        convmae.view_transform({**cfg, "jitter_p": 0.8})


def test_imagenet_config_is_the_reference_command():
    """PRETRAIN.md at 4c97b4c9: 3 nodes x 8 GPUs x 128, blr 1.5e-4, wd 0.05, 1600 epochs, 40 warm-up, mask 0.75."""
    from pretrain.common import load_config

    cfg = load_config("convmae", "convmae-imagenet")
    assert (cfg["batch_size"], cfg["lr"], cfg["lr_batch"], cfg["weight_decay"]) == (3 * 8 * 128, 1.5e-4, 256, 0.05)
    assert (cfg["epochs"], cfg["warmup_epochs"], cfg["mask_ratio"], cfg["norm_pix_loss"]) == (1600, 40, 0.75, True)
    assert (cfg["betas"], cfg["min_lr"], cfg["precision"]) == ([0.9, 0.95], 0.0, "fp16")
