"""ADIOS: occluder shapes and masks, the two steps touching only their own parameters, the penalty, the loss
formulas on a fixed batch, the exact BYOL EMA, export and the mask figure. Tiny models at 32 px."""
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain import adios
from pretrain.adios import (ADIOS, UNet, build_model, frozen, show_masks,
                            sparsity_penalty, tau_at, unet_blocks)
from pretrain.common import DEFAULTS as COMMON_DEFAULTS
from transfer.artifact import build_backbone, read_artifact

IMG, N = 32, 3


def _model(framework="simclr", single_mask=False, alpha_sparsity=0.5, **kw):
    torch.manual_seed(0)
    return ADIOS(build_backbone("resnet18", width=8), framework, img_size=IMG, num_masks=N, single_mask=single_mask,
                 mask_fbase=8, alpha_sparsity=alpha_sparsity, proj_hidden_dim=32, proj_output_dim=16,
                 pred_hidden_dim=32, **kw)


def _batch(b=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, IMG, IMG, generator=g), torch.randn(b, 3, IMG, IMG, generator=g)


def _params(modules):
    return {f"{i}.{k}": p.detach().clone() for i, m in enumerate(modules) for k, p in m.named_parameters()}


def _changed(before, modules):
    after = _params(modules)
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_unet_depth_follows_image_size_and_matches_the_reference_channel_plan():
    assert [unet_blocks(s) for s in (16, 32, 64, 96, 224)] == [3, 4, 5, 5, 6]
    c = 4
    plans = {32: [c, 2 * c, 2 * c, 2 * c], 64: [c, c, 2 * c, 2 * c, 2 * c], 224: [c, c, c, 2 * c, 2 * c, 2 * c]}
    dec_in = {32: [4 * c, 4 * c, 4 * c, 2 * c], 64: [4 * c, 4 * c, 4 * c, 2 * c, 2 * c],
              224: [4 * c, 4 * c, 4 * c, 2 * c, 2 * c, 2 * c]}
    for size, plan in plans.items():
        net = UNet(size, c)
        assert [blk[0].out_channels for blk in net.down] == plan
        assert [blk[0].in_channels for blk in net.up] == dec_in[size]
        assert net.fmap == {32: 4, 64: 4, 224: 7}[size]
    assert UNet(96, c).fmap == 6


@pytest.mark.parametrize("size", [16, 32, 48])
def test_masks_are_soft_and_sum_to_one_at_every_pixel(size):
    torch.manual_seed(0)
    model = ADIOS(build_backbone("resnet18", width=8), "simclr", img_size=size, num_masks=6, mask_fbase=8,
                  proj_hidden_dim=32, proj_output_dim=16)
    masks = model.occluder(torch.randn(3, 3, size, size))
    assert masks.shape == (3, 6, size, size)
    assert (masks >= 0).all() and (masks <= 1).all()
    assert torch.allclose(masks.sum(1), torch.ones(3, size, size), atol=1e-5)


@pytest.mark.parametrize("framework,single", [("simclr", False), ("byol", False), ("simsiam", True),
                                              ("byol", True)])
def test_each_step_changes_only_its_own_parameters(framework, single):
    model = _model(framework, single)
    enc_opt = torch.optim.SGD(model.encoder_parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    occ_opt = torch.optim.SGD(model.occluder_parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    x1, x2 = _batch()
    encoder_side = model.encoder_side()
    others = [model.occluder] + ([model.momentum_encoder, model.momentum_projector] if framework == "byol" else [])

    # encoder step alone
    enc_before, others_before = _params(encoder_side), _params(others)
    loss, _ = model.encoder_loss(x1, x2)
    enc_opt.zero_grad()
    loss.backward()
    enc_opt.step()
    assert _changed(enc_before, encoder_side) == set(enc_before)  # every encoder/projector/predictor param moved
    assert not _changed(others_before, others)
    assert all(p.grad is None for p in model.occluder_parameters())

    # occluder step alone (the encoder frozen, as adios_step does it)
    enc_before, occ_before = _params(encoder_side), _params([model.occluder])
    enc_opt.zero_grad(set_to_none=True)
    with frozen(model.encoder_parameters()):
        objective, _ = model.occluder_objective(x1, x2)
        occ_opt.zero_grad()
        (-objective).backward()
        occ_opt.step()
    assert not _changed(enc_before, encoder_side)
    assert _changed(occ_before, [model.occluder]) == set(occ_before)
    assert all(p.grad is None for p in model.encoder_parameters())
    assert all(p.requires_grad for p in model.encoder_parameters())  # unfrozen again


def _cfg(**kw):
    cfg = {**COMMON_DEFAULTS, **adios.DEFAULTS, "framework": "byol", "width": 8, "img_size": IMG, "num_masks": N,
           "mask_fbase": 8, "proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 32, "epochs": 2,
           "batch_size": 6, "lr_batch": 6, "lr": 0.5, "mask_lr": 0.05, "warmup_epochs": 0, "channels_last": False}
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("framework", ["byol", "simclr"])
def test_common_train_step_with_one_lars_moves_each_side_in_its_own_step(framework):
    """common.build_optimizer + adios.train_step: one LARS, two group families (lr / mask_lr), two steps."""
    from pretrain.common import build_optimizer
    cfg = _cfg(framework=framework, train_mask_epoch=1)
    model = build_model(cfg)
    opt, sched = build_optimizer(model, cfg, steps_per_epoch=2, module=adios)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.5, 0.05, 0.05])
    assert opt.param_groups[0]["trust_clip"] and opt.param_groups[0]["weight_decay"] == cfg["weight_decay"]
    views = [(torch.rand(6, 3, IMG, IMG) * 255).to(torch.uint8) for _ in range(2)]
    sides = {"enc": model.encoder_side(), "occ": [model.occluder]}
    extra = [model.momentum_encoder] if framework == "byol" else []
    for step, occluder_trains in ((0, False), (1, False), (2, True)):  # train_mask_epoch 1 = step 2 of 2/epoch
        before = {k: _params(v) for k, v in sides.items()}
        ema_before = _params(extra)
        logs = adios.train_step(model, views, opt, sched, progress=(step + 1) / 4)
        assert all(math.isfinite(float(v)) for v in logs.values())
        assert _changed(before["enc"], sides["enc"]) == set(before["enc"])
        assert bool(_changed(before["occ"], sides["occ"])) == occluder_trains
        assert ("mask_penalty" in logs) == occluder_trains
        assert bool(_changed(ema_before, extra)) == (framework == "byol")
    assert all(p.grad is None for p in model.parameters())


def test_penalty_is_finite_at_area_zero_and_one_and_smallest_at_half():
    areas = torch.tensor([[0.0, 1.0, 0.5], [1e-12, 1 - 1e-12, 0.5]], requires_grad=True)
    penalty = sparsity_penalty(areas)
    penalty.backward()
    assert torch.isfinite(penalty) and torch.isfinite(areas.grad).all()
    assert penalty.item() == pytest.approx(2 / math.sin(math.pi * 1e-3) + 1.0, rel=1e-5)
    grid = torch.linspace(0.05, 0.95, 19)[:, None]
    values = torch.stack([sparsity_penalty(a[None]) for a in grid])
    assert values.argmin().item() == 9 and values.min().item() == pytest.approx(1.0)


def _nt_xent_loop(z1, z2, t):
    """NT-Xent written anchor by anchor: -log(exp(s_pos/t) / sum_{k != i} exp(s_ik/t)), mean over 2B anchors."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        sims = [(z[i] @ z[k]) / t for k in range(2 * n)]
        pos = sims[(i + n) % (2 * n)]
        denom = sum(torch.exp(s) for k, s in enumerate(sims) if k != i)
        total += -torch.log(torch.exp(pos) / denom)
    return total / (2 * n)


def test_simclr_losses_match_the_formula_on_a_fixed_batch():
    model = _model("simclr", alpha_sparsity=0.7, alpha_entropy=0.3)
    x1, x2 = _batch()
    torch.manual_seed(5)
    objective, logs = model.occluder_objective(x1, x2)
    loss, _ = model.encoder_loss(x1, x2)

    with torch.no_grad():
        masks = model.occluder(x2)
        z1 = model.projector(model.encoder(x1))
        ssl = sum(_nt_xent_loop(z1, model.projector(model.encoder(x2 * (1 - masks[:, n:n + 1]))), 0.2)
                  for n in range(N))
        a = masks.sum((2, 3)) / (IMG * IMG)
        penalty = sum((1 / torch.sin(math.pi * a[:, n])).mean() for n in range(N))
        p = a.softmax(1)
        neg_entropy = (p * p.log()).sum()  # summed over the batch, as the reference
    assert loss.item() == pytest.approx(ssl.item(), rel=1e-4)
    assert objective.item() == pytest.approx(ssl.item() - 0.7 * penalty.item() + 0.3 * neg_entropy.item(),
                                             rel=1e-4)
    assert logs["mask_penalty"].item() == pytest.approx(penalty.item(), rel=1e-5)


def test_byol_and_simsiam_losses_match_the_formula_and_single_mask_uses_the_chosen_mask():
    x1, x2 = _batch()
    ids = torch.tensor([0, 2, 1, 1, 0, 2])
    for framework in ("byol", "simsiam"):
        model = _model(framework, single_mask=True)
        loss, masks = model.encoder_loss(x1, x2, mask_ids=ids)
        with torch.no_grad():
            xm = x2 * (1 - masks[torch.arange(6), ids][:, None])
            z_o, z_m = model.projector(model.encoder(x1)), model.projector(model.encoder(xm))
            p_o, p_m = model.predictor(z_o), model.predictor(z_m)
            cos = lambda p, z: (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(1).mean()
            if framework == "byol":
                t_o = model.momentum_projector(model.momentum_encoder(x1))
                t_m = model.momentum_projector(model.momentum_encoder(xm))
                expected = (2 - 2 * cos(p_o, t_m)) + (2 - 2 * cos(p_m, t_o))
            else:
                expected = -cos(p_o, z_m) / 2 - cos(p_m, z_o) / 2
        assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_occluder_step_raises_the_ssl_loss():
    """A small occluder step ascends the SSL loss by about lr * |grad|^2 (first order)."""
    model = _model("simclr", alpha_sparsity=0.0)
    lr = 1e-5
    occ_opt = torch.optim.SGD(model.occluder_parameters(), lr=lr)
    x1, x2 = _batch()
    before, _ = model.occluder_objective(x1, x2)
    with frozen(model.encoder_parameters()):
        occ_opt.zero_grad()
        (-before).backward()
        occ_opt.step()
    expected_rise = lr * sum(p.grad.pow(2).sum() for p in model.occluder_parameters()).item()
    with torch.no_grad():
        after, _ = model.occluder_objective(x1, x2)
    assert after.item() - before.item() == pytest.approx(expected_rise, rel=0.5)
    assert after.item() > before.item()


def test_byol_ema_update_is_exact():
    model = _model("byol")
    with torch.no_grad():
        for p in model.encoder_parameters():
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for m in (model.encoder, model.projector) for p in m.parameters()]
    target = [p.detach().clone() for m in (model.momentum_encoder, model.momentum_projector) for p in m.parameters()]
    tau = tau_at(0.3, 0.99)
    assert tau == pytest.approx(1 - 0.01 * (math.cos(math.pi * 0.3) + 1) / 2)
    assert tau_at(0.0) == pytest.approx(0.99) and tau_at(1.0) == pytest.approx(1.0)
    model.update_momentum(tau)
    new = [p for m in (model.momentum_encoder, model.momentum_projector) for p in m.parameters()]
    for t, o, n in zip(target, online, new):
        torch.testing.assert_close(n, tau * t + (1 - tau) * o, rtol=0, atol=1e-6)


def test_common_train_exports_the_online_encoder_and_show_masks_saves_a_png(tmp_path):
    """Two steps of common.train on a folder of images; the artifact is the online encoder with ADIOS's
    normalisation; the checkpoint draws a mask grid."""
    from PIL import Image

    from pretrain.common import train
    data = tmp_path / "images"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        img = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(40, 40), mode="bilinear")[0]
        Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(data / f"{i}.png")
    cfg = _cfg(data=str(data), output_dir=str(tmp_path / "run"), workers=0, max_steps=2, ckpt_every=1,
               method="adios", config_name="test")
    path = train(cfg, log=lambda *a, **k: None)
    art = read_artifact(path)
    assert art.arch == "resnet18" and art.arch_kwargs == {"width": 8}
    assert art.provenance["method"] == "adios" and art.provenance["framework"] == "byol"
    assert art.preprocessing.std[0] == pytest.approx(0.228 * 255)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)
    online, ema = ckpt["model"]["encoder.conv1.weight"], ckpt["model"]["momentum_encoder.conv1.weight"]
    assert torch.equal(art.state_dict["conv1.weight"], online) and not torch.equal(online, ema)

    png = show_masks(tmp_path / "run" / "checkpoint.pth", tmp_path / "masks.png", num_images=4)
    img = Image.open(png)
    assert img.size == (2 * (2 + (N + 2) * (IMG + 2)), 2 * (2 + 4 * (IMG + 2)))  # 4 rows: image, N masks, partition
    full = Image.new("RGB", (2 * (2 + (N + 2) * (IMG + 2)), 2 * (2 + 6 * (IMG + 2))))  # 6 images
    full.thumbnail((384, 384))  # what leaderboard.runs.save_pictures keeps
    with Image.open(tmp_path / "run" / "pictures" / "masks.png") as end_of_run:  # saved by common.train
        assert end_of_run.size == full.size
