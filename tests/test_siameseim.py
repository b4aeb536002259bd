"""SiameseIM: relative positions, visible-only encoding, the UniGrad loss formula, exact EMA, the reference's
initialisation, BEiT block masks, BatchNorm conversion for several processes."""
import random

import numpy as np
import pytest
import timm
import torch

from pretrain.siameseim import (SiameseIM, TokenBatchNorm, block_mask, momentum_at, relative_pos_embed,
                                sincos_table, unigrad_loss)

GRID, DIM = 8, 32


def _crops(i1=0, j1=0, h1=64, w1=64, f1=0, i2=0, j2=0, h2=64, w2=64, f2=0, W=64):
    return torch.tensor([[i1, j1, h1, w1, f1, i2, j2, h2, w2, f2, W]], dtype=torch.float64)


def _model(norm="ln"):
    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=48, depth=2,
                                num_heads=3, num_classes=0, final_norm=False)
    return SiameseIM(encoder, decoder_dim=DIM, projector_depth=1, predictor_depth=1, decoder_heads=2, norm=norm)


def test_identical_crops_give_the_absolute_table_and_zero_scale_terms():
    emb = relative_pos_embed(_crops(i1=5, j1=7, h1=40, w1=30, i2=5, j2=7, h2=40, w2=30), GRID, DIM)[0]
    assert torch.allclose(emb[:, :DIM], sincos_table(DIM, GRID)[0], atol=1e-6)
    scale = emb[:, DIM:].view(GRID * GRID, 2, 2, DIM // 4)  # (scale_h, scale_w) x (sin, cos)
    assert torch.allclose(scale[:, :, 0], torch.zeros(1)) and torch.allclose(scale[:, :, 1], torch.ones(1))


def test_offset_scale_and_flip_move_the_positions():
    base = relative_pos_embed(_crops(), GRID, DIM)[0]
    shifted = relative_pos_embed(_crops(j2=16), GRID, DIM)[0]  # view 2 starts 2 view-1 patches to the right
    cols = slice(DIM // 2, DIM)  # channels: rows, then columns
    assert torch.allclose(shifted[:, cols].view(GRID, GRID, -1)[:, :-2],
                          base[:, cols].view(GRID, GRID, -1)[:, 2:], atol=1e-6)
    assert torch.allclose(shifted[:, :DIM // 2], base[:, :DIM // 2])  # rows unchanged
    mirrored = relative_pos_embed(_crops(f2=1), GRID, DIM)[0].view(GRID, GRID, -1)[..., cols]
    assert torch.allclose(mirrored, base.view(GRID, GRID, -1)[..., cols].flip(1), atol=1e-6)
    zoomed = relative_pos_embed(_crops(h2=32), GRID, DIM)[0]
    assert not torch.allclose(zoomed[:, DIM:], base[:, DIM:])


def _isolated_patches(mask):
    """Masked patches with no masked 4-neighbour (what a random fill leaves; blocks never do)."""
    m = np.pad(mask, 1)
    neighbours = m[:-2, 1:-1] | m[2:, 1:-1] | m[1:-1, :-2] | m[1:-1, 2:]
    return int((mask & ~neighbours).sum())


def test_block_mask_has_the_fixed_count_and_keeps_placing_blocks():
    rng = random.Random(0)
    masks = [block_mask(14, 118, rng) for _ in range(40)]
    assert all(m.sum() == 118 for m in masks)
    assert len({m.tobytes() for m in masks}) == 40
    # BEiT keeps placing ever smaller blocks once fewer than min_patches remain: no random single patches (a
    # generator that stops at < 16 remaining and fills at random leaves ~4 per mask)
    assert sum(_isolated_patches(m) for m in masks) / len(masks) < 0.5
    small = block_mask(8, 38, rng, min_patches=4)
    assert small.sum() == 38


def test_initialisation_follows_the_reference():
    model = _model(norm="bn")
    enc = model.encoder
    assert torch.equal(enc.pos_embed, sincos_table(48, GRID, cls_token=True)) and not enc.pos_embed.requires_grad
    assert torch.equal(model.decoder_pos_embed, sincos_table(DIM, GRID, cls_token=True))
    assert not any(p.requires_grad for p in enc.patch_embed.parameters())
    w = enc.patch_embed.proj.weight.flatten(1)
    assert w.abs().max() <= (6 / sum(w.shape)) ** 0.5 and w.std() > 0.5 * (2 / sum(w.shape)) ** 0.5  # Xavier
    assert 0.01 < enc.cls_token.std() < 0.03 and 0.01 < model.mask_token.std() < 0.03
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            bound = (6 / sum(m.weight.shape)) ** 0.5
            assert m.bias.abs().max() == 0 and m.weight.abs().max() <= bound, name
            assert m.weight.abs().max() > 0.9 * bound, name  # uniform up to the bound, not N(0, 0.02)
    # fixed tables and the frozen patch embedding are never optimised, so never weight-decayed
    from pretrain.common import param_groups
    trained = {id(p) for g in param_groups(model, 0.05) for p in g["params"]}
    assert id(enc.pos_embed) not in trained and id(enc.patch_embed.proj.weight) not in trained
    assert id(enc.cls_token) in trained
    # the target starts as the online copy
    online = {f"{n}.{k}": v for n, mod in model.online_modules().items() for k, v in mod.state_dict().items()}
    assert all(torch.equal(v, online[k]) for k, v in model.target.state_dict().items())


def test_batchnorm_conversion_keeps_the_token_transpose():
    from pretrain.common import AllReduceBatchNorm, sync_batchnorm

    model = _model(norm="bn").train()
    x = torch.randn(4, 5, DIM)
    before = model.predictor_decoder_blocks[0].norm1(x)
    sync_batchnorm(model, torch.device("cpu"))
    norm = model.predictor_decoder_blocks[0].norm1
    assert isinstance(norm, TokenBatchNorm) and isinstance(norm.bn, AllReduceBatchNorm)
    assert isinstance(model.target["projector"][0].norm2.bn, AllReduceBatchNorm)
    assert torch.allclose(norm(x), before, atol=1e-6)

    class TransposingBN(torch.nn.BatchNorm1d):
        def forward(self, x):
            return super().forward(x.transpose(1, 2)).transpose(1, 2)

    with pytest.raises(TypeError, match="overrides BatchNorm.forward"):
        sync_batchnorm(torch.nn.Sequential(TransposingBN(4)), torch.device("cpu"))


def test_only_visible_tokens_enter_the_online_encoder():
    model = _model().eval()
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    view1, view2 = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    mask = torch.from_numpy(np.stack([block_mask(GRID, 38, random.Random(s), 4) for s in (1, 2)]))
    crops = torch.cat([_crops(), _crops(j2=8)])
    with torch.no_grad():
        pred = model.predict(view1, mask, crops)
        pixels = mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand_as(view1)
        pred_altered = model.predict(torch.where(pixels, torch.randn_like(view1), view1), mask, crops)
    assert seen[0] == (2, 1 + 64 - 38, 48)
    assert pred.shape == (2, 64, DIM) and torch.allclose(pred, pred_altered, atol=1e-6)


def test_loss_matches_the_formula():
    torch.manual_seed(1)
    pred, target = torch.randn(2, 5, 6), torch.randn(2, 5, 6) * 3 + 1
    p, t = pred.reshape(10, 6).double(), target.reshape(10, 6).double()
    t = (t - t.mean(1, keepdim=True)) / (t.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    corr = sum(torch.outer(t[i], t[i]) for i in range(10)) / 10
    pos = sum(((p[i] - t[i]) ** 2).sum() for i in range(10)) / 10
    neg = sum(p[i] @ corr @ p[i] for i in range(10)) / 10
    assert torch.allclose(unigrad_loss(pred, target, 0.02).double(), (pos + 0.02 * neg) / 6, atol=1e-5)
    assert torch.allclose(unigrad_loss(torch.zeros(2, 5, 6), target), torch.tensor(1.0), atol=1e-4)
    more = unigrad_loss(pred, target, 0.04) - unigrad_loss(pred, target, 0.0)
    assert more > 0 and torch.allclose(more, 2 * (unigrad_loss(pred, target, 0.02) - unigrad_loss(pred, target, 0.0)))


def test_ema_update_is_exact_and_target_gets_no_gradient():
    model = _model(norm="bn").train()
    loss = model(torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64),
                 torch.from_numpy(np.stack([block_mask(GRID, 38, random.Random(s), 4) for s in range(4)])),
                 torch.cat([_crops()] * 4))
    loss.backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert model.encoder.patch_embed.proj.weight.grad is None  # frozen patch embedding
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    before = {k: v.clone() for k, v in model.target.named_parameters()}
    buffers = {k: v.clone() for k, v in model.target.named_buffers()}
    online = {f"{n}.{k}": v.clone() for n, mod in model.online_modules().items() for k, v in mod.named_parameters()}
    m = momentum_at(0.3, 0.995)
    model.update_target(m)
    for key, value in model.target.named_parameters():
        assert torch.allclose(value, m * before[key] + (1 - m) * online[key], atol=1e-7), key
    assert all(torch.equal(v, buffers[k]) for k, v in model.target.named_buffers())  # its own BN statistics
    assert momentum_at(0.0) == pytest.approx(0.995) and momentum_at(1.0) == pytest.approx(1.0)


def test_views_carry_crop_parameters_that_place_view2_in_view1():
    from PIL import Image

    from pretrain.siameseim import SiameseViews

    torch.manual_seed(3)
    views = SiameseViews(size=64, grid=GRID, num_masked=38, min_patches=4)
    v1, v2, mask, crops = views(Image.new("RGB", (120, 90), (120, 30, 200)))
    assert v1.shape == v2.shape == (3, 64, 64) and mask.shape == (GRID, GRID) and mask.sum() == 38
    i1, j1, h1, w1, f1, i2, j2, h2, w2, f2, W = crops.tolist()
    assert W == 120 and 0 <= j1 and j1 + w1 <= 120 and 0 <= i1 and i1 + h1 <= 90 and f1 in (0, 1) and f2 in (0, 1)


def test_pretrain_run_exports_the_online_encoder(tmp_path):
    from PIL import Image

    from pretrain.common import load_config, train
    from transfer.loading import load_backbone

    (tmp_path / "imgs").mkdir()
    for i in range(8):
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png")
    cfg = load_config("siameseim", None, [f"data={tmp_path / 'imgs'}", f"output_dir={tmp_path / 'run'}",
                                           "img_size=32", "mask_patches=10", "batch_size=4", "epochs=1", "workers=0"])
    artifact = train(cfg, log=lambda *a: None)
    backbone, report = load_backbone(artifact)
    assert report.ok and backbone.artifact_meta["arch_kwargs"]["patch_size"] == 8
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)["model"]
    online = {k[len("model.encoder."):]: v for k, v in ckpt.items() if k.startswith("model.encoder.")}
    target = {k[len("model.target.encoder."):]: v for k, v in ckpt.items() if k.startswith("model.target.encoder.")}
    exported = backbone.trunk.state_dict()
    assert all(torch.equal(exported[k], online[k]) for k in exported)
    assert any(not torch.equal(exported[k], target[k]) for k in exported if k.startswith("blocks."))


def test_imagenet_config_is_the_reference_recipe():
    """configs/pretrain/dist_sim_base_1600ep.sh and main_pretrain.py defaults of OpenGVLab/Siamese-Image-Modeling
    (bbdec308), key for key."""
    from pretrain.common import load_config

    cfg = load_config("siameseim", "siameseim-imagenet")
    expected = {"arch": "vit_base_patch16", "img_size": 224, "patch_size": 16, "decoder_dim": 768,
                "projector_depth": 2, "predictor_depth": 4, "decoder_heads": 16, "head_norm": "bn",
                "mask_patches": 118, "min_mask_patches": 16, "neg_weight": 0.02, "base_momentum": 0.995,
                "optimizer": "adamw", "betas": [0.9, 0.95], "weight_decay": 0.05, "clip_grad": 1.0,
                "lr": 6.25e-5, "lr_batch": 256, "batch_size": 4096, "epochs": 1600, "warmup_epochs": 40,
                "crop_scale": [0.08, 1.0]}
    assert {k: cfg[k] for k in expected} == expected
