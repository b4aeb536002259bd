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
    trainable = {f"{i}.{k}" for i, m in enumerate(encoder_side) for k, p in m.named_parameters() if p.requires_grad}
    assert _changed(enc_before, encoder_side) == trainable  # every encoder/projector/predictor param moved
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
    assert {f"{i}.{k}" for i, m in enumerate(encoder_side) for k, p in m.named_parameters()
            if p.requires_grad} == trainable  # unfrozen again


def _cfg(**kw):
    cfg = {**COMMON_DEFAULTS, **adios.DEFAULTS, "framework": "byol", "width": 8, "img_size": IMG, "num_masks": N,
           "mask_fbase": 8, "proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 32, "epochs": 2,
           "batch_size": 6, "lr_batch": 6, "lr": 0.5, "mask_lr": 0.05, "warmup_epochs": 0, "train_mask_epoch": 0,
           "channels_last": False}
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("framework", ["byol", "simclr", "simsiam"])
def test_common_train_step_trains_both_sides_every_step_at_the_reference_per_epoch_lrs(framework):
    """common.build_optimizer + adios.train_step: one LARS, group families encoder (lr) / occluder (mask_lr) /
    SimSiam's static predictor; both sides move at every step from the first (train_mask_epoch only shortens the
    encoder's cosine, as in the reference); the lr is constant within an epoch and follows reference_lr."""
    from pretrain.common import build_optimizer
    cfg = _cfg(framework=framework, epochs=4, warmup_epochs=2, train_mask_epoch=1, warmup_start_lr=0.003)
    model = build_model(cfg)
    opt, sched = build_optimizer(model, cfg, steps_per_epoch=2, module=adios)
    sides = [g["adios_side"] for g in opt.param_groups]
    assert sides == ["encoder", "encoder"] + (["static", "static"] if framework == "simsiam" else []) + \
        ["occluder", "occluder"]
    assert opt.param_groups[0]["trust_clip"] and opt.param_groups[0]["weight_decay"] == cfg["weight_decay"]
    views = [(torch.rand(6, 3, IMG, IMG) * 255).to(torch.uint8) for _ in range(2)]
    static = [model.predictor] if framework == "simsiam" else []  # SimSiam's predictor: a static lr
    modules = {"enc": [m for m in model.encoder_side() if m not in static], "occ": [model.occluder],
               "static": static}
    extra = [model.momentum_encoder] if framework == "byol" else []
    # per epoch (2 steps each; pl_bolts reaches the base lr at warmup - 1): encoder 0.003, 0.5, 0.5, 0 (its
    # cosine ends at epoch 4 - train_mask_epoch = 3); occluder 0.003, 0.05, 0.05, then its cosine (to 0 at 4)
    enc_lrs = [0.003, 0.5, 0.5, 0.0]
    occ_lrs = [0.003, 0.05, 0.05, 0.05 * (1 + math.cos(math.pi / 2)) / 2]
    for step in range(8):
        epoch = step // 2
        before = {k: _params(v) for k, v in modules.items()}
        ema_before = _params(extra)
        logs = adios.train_step(model, views, opt, sched, progress=(step + 1) / 8)
        assert all(math.isfinite(float(v)) for v in logs.values())
        assert bool(_changed(before["enc"], modules["enc"])) == (epoch != 3)  # lr 0 in epoch 3
        assert bool(_changed(before["static"], modules["static"])) == (framework == "simsiam")
        assert _changed(before["occ"], modules["occ"]) and "mask_penalty" in logs  # from the first step
        assert bool(_changed(ema_before, extra)) == (framework == "byol" and step < 7)  # tau = 1 at the end
        lr = {g["adios_side"]: g["lr"] for g in opt.param_groups}  # the next step's lr, as common.py logs it
        next_epoch = (step + 1) // 2
        if next_epoch < 4:
            assert lr["occluder"] == pytest.approx(occ_lrs[next_epoch], abs=1e-12)
            assert lr["encoder"] == pytest.approx(enc_lrs[next_epoch], abs=1e-12)
            if framework == "simsiam":
                assert lr["static"] == (0.003 if next_epoch == 0 else 0.5)
    assert model.lr_at(4, "encoder", 0.5) == pytest.approx(0.5)  # past its horizon the cosine rises again
    assert all(p.grad is None for p in model.parameters())


def test_reference_lr_matches_pl_bolts_chainable_schedule_written_out():
    """Warm-up from the absolute start lr (reaching base at warmup - 1), cosine to eta_min at max_epochs, then
    the reference's chainable form rises again (the encoder's cosine ends train_mask_epoch epochs early)."""
    base, w, m, start = 0.8, 3, 7, 0.003
    expected = [start, start + (base - start) / 2, base, base]
    expected += [0.5 * base * (1 + math.cos(math.pi * (e - w) / (m - w))) for e in range(4, 12)]
    got = [adios.reference_lr(e, base, w, m, start) for e in range(12)]
    assert got == pytest.approx(expected, abs=1e-9)
    assert got[7] == pytest.approx(0.0, abs=1e-12) and got[9] > got[8] > 0  # past max_epochs: back up
    with pytest.raises(ValueError, match="train_mask_epoch"):
        _model("simclr", epochs=10, train_mask_epoch=8, warmup_epochs=2)


def test_penalty_is_the_reference_formula_and_keeps_pushing_collapsed_masks_back():
    """1 / (sin(pi a) + 1e-10), mean over images, sum over masks; no clamp: at a = 1e-4 (a collapsing mask) the
    gradient is -pi cos(pi a) / sin(pi a)^2, about -3e7 (a clamp to [1e-3, 1 - 1e-3] made it 0)."""
    areas = torch.tensor([[1e-4, 0.3, 0.5], [0.2, 1 - 1e-4, 0.5]], dtype=torch.float64, requires_grad=True)
    penalty = sparsity_penalty(areas)
    penalty.backward()
    a = areas.detach()
    assert penalty.item() == pytest.approx((1 / (torch.sin(math.pi * a) + 1e-10)).mean(0).sum().item(), rel=1e-12)
    expected_grad = -math.pi * torch.cos(math.pi * a) / (torch.sin(math.pi * a) + 1e-10) ** 2 / 2
    torch.testing.assert_close(areas.grad, expected_grad, rtol=1e-9, atol=0)
    assert areas.grad[0, 0] < -1e7 and areas.grad[1, 1] > 1e7
    assert sparsity_penalty(torch.zeros(1, 1)).item() == pytest.approx(1e10)  # finite at an empty mask
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


def _cos(p, z):
    return (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(1).mean()


def test_byol_loss_matches_the_formula_and_single_mask_uses_the_chosen_mask():
    x1, x2 = _batch()
    ids = torch.tensor([0, 2, 1, 1, 0, 2])
    model = _model("byol", single_mask=True)
    loss, masks = model.encoder_loss(x1, x2, mask_ids=ids)
    with torch.no_grad():
        xm = x2 * (1 - masks[torch.arange(6), ids][:, None])
        p_o, p_m = (model.predictor(model.projector(model.encoder(x))) for x in (x1, xm))
        t_o, t_m = (model.momentum_projector(model.momentum_encoder(x)) for x in (x1, xm))
        expected = (2 - 2 * _cos(p_o, t_m)) + (2 - 2 * _cos(p_m, t_o))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def _simsiam_reference_terms(model, x1, x2, m1, m2, switches):
    """The reference's SimSiam ADIOS terms for one mask pair, written out (view 1 = x_orig, 2 = x_transformed)."""
    zp = lambda x: (lambda z: (z, model.predictor(z)))(model.projector(model.encoder(x)))  # noqa: E731
    (z1, p1), (z2, p2) = zp(x1), zp(x2)
    (z1m, p1m), (z2m, p2m) = zp(x1 * (1 - m1)), zp(x2 * (1 - m2))
    terms = [-_cos(p1m, z2), -_cos(p2m, z1)]
    if switches["use_symmetry_mask"]:
        terms += [-_cos(p2, z1m), -_cos(p1, z2m)]
    if switches["use_no_mask"]:
        terms += [-_cos(p1, z2), -_cos(p2, z1)]
    if switches["use_both_mask"]:
        terms += [-_cos(p1m, z2m), -_cos(p2m, z1m)]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("switches", [(True, True, True), (False, True, True), (True, False, True),
                                      (True, True, False), (False, False, False)])
@pytest.mark.parametrize("single", [False, True])
def test_simsiam_masks_both_views_and_averages_the_switched_terms(switches, single):
    """SimSiam ADIOS: both views masked (one occluder pass each; ADIOS-s: the same index in both), the mean of the
    switched terms per mask, summed over masks; the occluder's penalty covers both views' masks."""
    switches = dict(zip(("use_symmetry_mask", "use_no_mask", "use_both_mask"), switches))
    model = _model("simsiam", single_mask=single, alpha_sparsity=0.3, **switches)
    x1, x2 = _batch()
    ids = torch.tensor([0, 2, 1, 1, 0, 2])
    loss, _ = model.encoder_loss(x1, x2, mask_ids=ids)
    objective, logs = model.occluder_objective(x1, x2, mask_ids=ids)
    with torch.no_grad():
        mo, mt = model.occluder(x1), model.occluder(x2)
        pairs = ([(mo[torch.arange(6), ids][:, None], mt[torch.arange(6), ids][:, None])] if single
                 else [(mo[:, n:n + 1], mt[:, n:n + 1]) for n in range(N)])
        expected = sum(_simsiam_reference_terms(model, x1, x2, m1, m2, switches) for m1, m2 in pairs)
        penalty = sum((1 / torch.sin(math.pi * m.mean((2, 3)))).mean(0).sum() for m in (mo, mt))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert objective.item() == pytest.approx(expected.item() - 0.3 * penalty.item(), rel=1e-5, abs=1e-6)


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


@pytest.mark.parametrize("framework", ["simclr", "byol"])
def test_adios_step_descends_the_encoder_loss_and_ascends_the_occluder_objective(framework):
    """adios_step's own steps: with the other side's lr at 0, a small encoder step lowers the SSL loss and a small
    occluder step raises the occluder's objective (SSL loss minus the penalties)."""
    x1, x2 = _batch()
    for side in ("encoder", "occluder"):
        model = _model(framework, alpha_sparsity=0.5)
        lrs = {"encoder": 1e-3 if side == "encoder" else 0.0, "occluder": 1e-3 if side == "occluder" else 0.0}
        enc_opt = torch.optim.SGD(model.encoder_parameters(), lr=lrs["encoder"])
        occ_opt = torch.optim.SGD(model.occluder_parameters(), lr=lrs["occluder"])
        value = (lambda: model.encoder_loss(x1, x2)[0]) if side == "encoder" else \
            (lambda: model.occluder_objective(x1, x2)[0])
        with torch.no_grad():
            before = value().item()
        adios.adios_step(model, enc_opt, occ_opt, x1, x2)
        with torch.no_grad():
            after = value().item()
        assert (after < before) if side == "encoder" else (after > before), (side, before, after)


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
