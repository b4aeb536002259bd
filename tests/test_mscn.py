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


# ------------------------------------------------------------------------------------------- the paper, directly
# MSCN has no public code: these loops implement the seed paper's Sec. 5 literally, one image, channel and pixel
# at a time, and draw their random numbers in the order pretrain/masking.py documents (per batch: the per-image
# uniforms (focal?, channel-independent?, masked?), the grid cells' uniforms, the focal squares' top and left
# uniforms, then one N(0, 1) per masked pixel in (image, channel, row, column) order), so the vectorised code
# must give exactly the same views and loss.
def paper_masks_and_noise(x, ratio, cells, focal_prob, focal_keep, channel_prob, mask_prob, noise_std):
    """Sec. 5.2: per image, a focal mask (keep one random square) with focal_prob, else a random grid mask
    (round(ratio * cells^2) random cells); channel-independent masks with channel_prob, else one mask for all
    channels; masked pixels <- N(0, noise_std^2)."""
    b, c, h, w = x.shape
    n = cells * cells
    draws, cell_u = torch.rand(b, 3).tolist(), torch.rand(b, c, n).tolist()
    top_u, left_u = torch.rand(b, c, 1, 1).flatten(1).tolist(), torch.rand(b, c, 1, 1).flatten(1).tolist()
    side = round(focal_keep * min(h, w))
    mask = [[[[False] * w for _ in range(h)] for _ in range(c)] for _ in range(b)]
    for i in range(b):
        focal, independent, masked = (draws[i][k] < p for k, p in enumerate((focal_prob, channel_prob, mask_prob)))
        if not masked:
            continue
        for ch in range(c):
            src = ch if independent else 0  # a shared mask is channel 0's
            if focal:
                top, left = int(top_u[i][src] * (h - side + 1)), int(left_u[i][src] * (w - side + 1))
                for y in range(h):
                    for xx in range(w):
                        mask[i][ch][y][xx] = not (top <= y < top + side and left <= xx < left + side)
            else:
                chosen = set(sorted(range(n), key=lambda k: cell_u[i][src][k])[:round(ratio * n)])
                for y in range(h):
                    for xx in range(w):
                        mask[i][ch][y][xx] = (y * cells // h) * cells + xx * cells // w in chosen
    mask = torch.tensor(mask)
    out = x.clone()
    if noise_std > 0:
        noise = (torch.randn(int(mask.sum())) * noise_std).tolist()
        flat, flat_mask, k = out.view(-1), mask.view(-1).tolist(), 0
        for idx, m in enumerate(flat_mask):
            if m:
                flat[idx], k = noise[k], k + 1
    else:
        out[mask] = 0.0
    return out, mask


def paper_high_pass(x, sigma):
    """Sec. 5.1: x - G_sigma * x with the 2-D Gaussian (radius ceil(3 sigma), reflect padding) in one conv."""
    r = max(1, int(torch.tensor(3 * sigma).ceil()))
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1.0), torch.arange(-r, r + 1.0), indexing="ij")
    kernel = torch.exp(-(yy**2 + xx**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).expand(x.shape[1], 1, -1, -1)
    return x - F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), kernel, groups=x.shape[1])


def textbook_info_nce(z1, z2, t):
    """Every one of the 2N anchors: -log exp(s_pos / t) / sum_{k != anchor} exp(s_k / t), cosine s; mean
    (in float64: the sum over anchors is the only rounding that differs from the vectorised code)."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n, total = z1.shape[0], 0.0
    for a in range(2 * n):
        sims = [z[a] @ z[k] / t for k in range(2 * n) if k != a]
        total = total - (z[a] @ z[(a + n) % (2 * n)] / t - torch.logsumexp(torch.stack(sims), 0))
    return total / (2 * n)


def paper_loss(model, views, cfg):
    """Sec. 5.2-5.3: normalise + high-pass every view, mask each branch's views (view v on branch v % 2) with
    that branch's magnitudes, then the framework's loss on EVERY pair of views, averaged over the pairs."""
    x = [paper_high_pass((v.float() / 255 - model.mean) / model.std, cfg["highpass_sigma"]) for v in views]
    for branch in (0, 1):
        idx = list(range(branch, len(x), 2))
        knobs = [cfg[k][branch] if isinstance(cfg[k], list) else cfg[k] for k in
                 ("mask_ratio", "focal_prob", "focal_keep", "channel_prob", "mask_prob", "noise_std")]
        masked, _ = paper_masks_and_noise(torch.cat([x[i] for i in idx]), knobs[0], model.cells, *knobs[1:])
        for i, m in zip(idx, masked.chunk(len(idx))):
            x[i] = m
    pairs = [(i, j) for i in range(len(x)) for j in range(i + 1, len(x))]
    if cfg["framework"] == "simclr":
        z = [model.projector(model.backbone(v)) for v in x]
        losses = [textbook_info_nce(z[i], z[j], cfg["temperature"]) for i, j in pairs]
    else:
        p = [model.predictor(model.projector(model.backbone(v))) for v in x]
        t = [model.target_projector(model.target_backbone(v)) for v in x]
        cos = lambda a, b: sum(a[k].double() @ b[k].double() / (a[k].double().norm() * b[k].double().norm())  # noqa
                               for k in range(len(a))) / len(a)
        losses = [(2 - 2 * cos(p[i], t[j])) + (2 - 2 * cos(p[j], t[i])) for i, j in pairs]
    return sum(losses) / len(pairs), x


@pytest.mark.parametrize("kw", [
    dict(mask_ratio=[0.3, 0.1], focal_prob=0.5, channel_prob=0.5, noise_std=0.2),
    dict(mask_ratio=0.15, focal_prob=0.0, channel_prob=1.0, noise_std=0.0, focal_keep=0.6),
    dict(mask_ratio=0.5, focal_prob=1.0, channel_prob=0.0, noise_std=0.5, focal_keep=[0.5, 0.8], mask_prob=0.7),
])
def test_masks_and_noise_equal_the_papers_loops(kw):
    cfg = tiny_cfg(**kw)
    x = torch.randn(6, 3, S, S) + 3.0
    for branch in (0, 1):
        knobs = {k: cfg[k][branch] if isinstance(cfg[k], list) else cfg[k] for k in
                 ("mask_ratio", "focal_prob", "focal_keep", "channel_prob", "mask_prob", "noise_std")}
        torch.manual_seed(branch)
        ours = mscn.apply_masks(x.clone(), mscn.mscn_masks(x, knobs["mask_ratio"], 7, knobs["focal_prob"],
                                                           knobs["focal_keep"], knobs["channel_prob"],
                                                           knobs["mask_prob"]), knobs["noise_std"])
        torch.manual_seed(branch)
        paper, mask = paper_masks_and_noise(x, knobs["mask_ratio"], 7, knobs["focal_prob"], knobs["focal_keep"],
                                            knobs["channel_prob"], knobs["mask_prob"], knobs["noise_std"])
        assert mask.any() and not mask.all()
        assert torch.equal(ours, paper)


@pytest.mark.parametrize("framework", ["simclr", "byol"])
def test_training_loss_equals_the_papers_equations(framework):
    """The whole MSCN step (high-pass, both branches masked with their own magnitudes, noise, 2 extra views,
    every pair) against the loops above on the same random draws."""
    cfg = tiny_cfg(framework=framework, mask_ratio=[0.3, 0.1], focal_prob=0.5, channel_prob=0.8, noise_std=0.2)
    torch.manual_seed(0)
    model = mscn.MSCN(cfg).train()
    views = [smooth_images(8, seed=i) for i in range(4)]
    torch.manual_seed(5)
    expected, paper_views = paper_loss(model, views, cfg)
    torch.manual_seed(5)
    assert torch.allclose(torch.stack(model.prepare(views)), torch.stack(paper_views), atol=1e-5)
    torch.manual_seed(5)
    loss, _ = model(views)
    # the high-pass (separable vs one 2-D conv) differs by float32 rounding (~1e-6), which the network carries
    assert abs(loss.item() - expected.item()) < 1e-5 * abs(expected.item())


def test_imagenet_configs_use_the_base_methods_views():
    """App. A.1 follows SimCLR (colour jitter strength 1: 0.8/0.8/0.8/0.2, p 0.8, grayscale 0.2, blur 0.5)
    and BYOL (0.4/0.4/0.2/0.1, symmetric on both branches)."""
    from pretrain.common import load_config

    simclr = load_config("mscn", "mscn-imagenet")
    assert (simclr["color_jitter"], simclr["jitter_p"], simclr["gray_p"], simclr["blur_p"]) == (
        [0.8, 0.8, 0.8, 0.2], 0.8, 0.2, 0.5)
    assert simclr["crop_scale"] == [0.08, 1.0] and simclr["blur_sigma"] == [0.1, 2.0]
    byol = load_config("mscn", "mscn-byol-imagenet")
    assert (byol["color_jitter"], byol["jitter_p"], byol["gray_p"]) == ([0.4, 0.4, 0.2, 0.1], 0.8, 0.2)
