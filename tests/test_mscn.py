"""MSCN model (pretrain/mscn.py): high-pass preprocessing, masking order, pair losses, BYOL EMA."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from pretrain import mscn
from pretrain.common import DEFAULTS
from transfer.artifact import InputTransform, high_pass

S = 32


def tiny_cfg(**kw):
    cfg = {**DEFAULTS, **mscn.DEFAULTS, "arch": "resnet18", "width": 8, "img_size": S, "proj_hidden": 32,
           "proj_out": 16, "pred_hidden": 32, "highpass_sigma": 1.0, "channels_last": False}
    cfg.update(kw)
    return cfg


def smooth_images(b=8, seed=0):
    """uint8 images with strong per-channel offsets and low-frequency structure (like photos)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, 4, 4, generator=g)
    img = F.interpolate(coarse, size=(S, S), mode="bilinear", align_corners=False)
    img = 0.2 + 0.6 * img + 0.05 * torch.rand(b, 3, S, S, generator=g)
    return (img * 255).round().to(torch.uint8)


def test_high_pass_output_has_zero_mean_per_channel():
    model = mscn.MSCN(tiny_cfg())
    x = smooth_images(16)
    normalised = (x.float() / 255 - model.mean) / model.std
    assert normalised.mean(dim=(0, 2, 3)).abs().max() > 0.3  # the input is far from zero mean
    out = model.preprocess(x)
    assert out.mean(dim=(2, 3)).abs().max() < 0.02  # per image and channel
    assert torch.allclose(out, high_pass(normalised, 1.0))
    # the artifact's test-time transform computes the same thing
    prep = InputTransform(mscn.preprocessing(tiny_cfg()))
    assert torch.allclose(prep(x.float() / 255), out, atol=1e-5)
    assert torch.equal(mscn.MSCN(tiny_cfg(highpass_sigma=None)).preprocess(x), normalised)


def test_masks_come_after_the_other_augmentations():
    """With zero fill, a prepared view equals the augmented view after normalisation + high-pass exactly,
    except on a masked set that is an exact union of grid cells (or the outside of one square) in the OUTPUT
    pixel grid and is exactly zero: nothing (crop, flip, jitter, blur, normalisation, filter) came after it."""
    torch.manual_seed(0)
    model = mscn.MSCN(tiny_cfg(noise_std=0.0, mask_ratio=0.3, focal_prob=0.0, channel_prob=0.0))
    views = [smooth_images(8, seed=i) for i in range(4)]
    prepared = model.prepare(views)
    cell = torch.arange(S) * 7 // S
    for v, p in zip(views, prepared):
        ref = model.preprocess(v)
        changed = p != ref
        assert changed.any()
        assert (p[changed] == 0).all()
        for b in range(8):
            mask = changed[b, 0]
            cells = torch.zeros(7, 7)
            cells.index_put_((cell.view(-1, 1).expand(S, S), cell.view(1, -1).expand(S, S)), mask.float(),
                             accumulate=True)
            sizes = torch.bincount((cell.view(-1, 1) * 7 + cell.view(1, -1)).flatten(), minlength=49).view(7, 7)
            assert ((cells == 0) | (cells == sizes)).all()  # whole cells only


def test_both_branches_are_masked_with_their_own_magnitude():
    torch.manual_seed(0)
    model = mscn.MSCN(tiny_cfg(noise_std=0.0, mask_ratio=[0.3, 0.1], focal_prob=0.0))
    views = [smooth_images(64, seed=i) for i in range(4)]
    prepared = model.prepare(views)
    frac = [(p != model.preprocess(v)).float().mean().item() for v, p in zip(views, prepared)]
    assert abs(frac[0] - 0.3) < 0.04 and abs(frac[2] - 0.3) < 0.04  # branch 0: views 0 and 2
    assert abs(frac[1] - 0.1) < 0.04 and abs(frac[3] - 0.1) < 0.04  # branch 1: views 1 and 3


@pytest.mark.parametrize("framework", ["simclr", "byol"])
def test_loss_covers_every_pair_of_views(framework):
    torch.manual_seed(0)
    model = mscn.MSCN(tiny_cfg(framework=framework))
    assert model.pairs(4) == list(itertools.combinations(range(4), 2))
    x = [torch.randn(8, 3, S, S, requires_grad=True) for _ in range(4)]
    torch.manual_seed(1)
    loss = model.loss(x)
    torch.manual_seed(1)
    if framework == "simclr":
        z = [model.projector(model.backbone(v)) for v in x]
        pair = [mscn.info_nce(z[i], z[j], 0.2) for i, j in itertools.combinations(range(4), 2)]
    else:
        p = [model.predictor(model.projector(model.backbone(v))) for v in x]
        t = [model.target_projector(model.target_backbone(v)).detach() for v in x]
        pair = [mscn.byol_loss(p[i], t[j]) + mscn.byol_loss(p[j], t[i]) for i, j in itertools.combinations(range(4), 2)]
    assert len(pair) == 6
    assert torch.allclose(loss, torch.stack(pair).mean(), atol=1e-6)
    loss.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in x)  # every view reaches the loss


def test_info_nce_matches_the_textbook_formula():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    t = 0.2
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / t
    n = 6
    expected = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        others = [sim[i, k] for k in range(2 * n) if k != i]
        expected.append(-(sim[i, pos] - torch.logsumexp(torch.stack(others), 0)))
    assert torch.allclose(mscn.info_nce(z1, z2, t), torch.stack(expected).mean(), atol=1e-5)


def test_heads_follow_the_paper():
    simclr = mscn.MSCN(tiny_cfg(proj_hidden=2048, proj_out=256))
    layers = [type(m).__name__ for m in simclr.projector]
    assert layers == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]  # BN after every layer
    byol = mscn.MSCN(tiny_cfg(framework="byol", proj_hidden=4096, proj_out=256, pred_hidden=4096))
    assert [type(m).__name__ for m in byol.projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert byol.predictor[0].in_features == 256 and byol.predictor[0].out_features == 4096
    assert byol.predictor[-1].out_features == 256
    assert not any(p.requires_grad for p in byol.target_backbone.parameters())


def test_byol_ema_schedule_and_update():
    model = mscn.MSCN(tiny_cfg(framework="byol"))
    assert model.tau(0.0) == pytest.approx(0.996) and model.tau(1.0) == pytest.approx(1.0)
    assert model.tau(0.5) == pytest.approx(0.998)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_backbone.parameters()]
    model.after_step(0.0)
    for b, po, pt in zip(before, model.backbone.parameters(), model.target_backbone.parameters()):
        assert torch.allclose(pt, 0.996 * b + 0.004 * po, atol=1e-6)
    snapshot = [p.clone() for p in model.target_backbone.parameters()]
    model.after_step(1.0)  # tau = 1: frozen
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.target_backbone.parameters()))


def test_ablation_switches():
    torch.manual_seed(0)
    views = [smooth_images(4, seed=i) for i in range(2)]
    off = mscn.MSCN(tiny_cfg(mask_prob=0.0, num_views=2))
    assert all(torch.equal(p, off.preprocess(v)) for v, p in zip(views, off.prepare(views)))
    loss, _ = off(views)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError):
        mscn.MSCN(tiny_cfg(framework="moco"))
