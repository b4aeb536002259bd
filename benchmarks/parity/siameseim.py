"""Golden parity of pretrain/siameseim.py with OpenGVLab/Siamese-Image-Modeling (models_sim.py, util/).

    python -m benchmarks.parity.siameseim /path/to/Siamese-Image-Modeling [--out tests/fixtures/siameseim_parity.pt]

The reference checkout (fetched and extracted outside the project, never committed) is imported with run-time
shims for the APIs it used that newer numpy/torch/timm dropped. A tiny SiameseIMViT (32 px, 8 px patches, one
block per part) is built; its weights are copied into bench's SiameseIM under bench's names; both get the same
uint8 views, the same BEiT block masks (both generators driven by the same `random.Random` seeds) and the same
crops (both flip/crop samplers driven by the same torch seed). Recorded, from the reference: the relative-position
embedding, the UniGrad loss, the predictions and the target features, every parameter's gradient norm, and after
one SGD step the EMA update (mm = 0.99; the norm of each target parameter's change) and the second loss. `tests/test_siameseim_parity.py` recomputes bench's
side with `bench_outputs` (no reference code) and compares to 1e-5. The script prints the largest differences.
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import types
from argparse import Namespace
from functools import partial
from pathlib import Path

import numpy as np
import torch

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "siameseim_parity.pt"
CONFIG = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2, "decoder_dim": 16,
          "projector_depth": 1, "predictor_depth": 1, "decoder_heads": 2, "neg_weight": 0.02,
          "batch": 4, "mask_patches": 6, "min_mask_patches": 2, "sgd_lr": 0.5, "momentum": 0.99}
MASK_CASES = [(14, 118, 16, seed) for seed in range(6)] + [(4, 6, 2, seed) for seed in range(6)]  # grid, n, min
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# reference name prefix -> bench name prefix (online, then the momentum target)
NAMES = [("patch_embed.", "encoder.patch_embed."), ("cls_token", "encoder.cls_token"),
         ("pos_embed", "encoder.pos_embed"), ("blocks.", "encoder.blocks."), ("decoder_embed.", "decoder_embed."),
         ("mask_token", "mask_token"), ("decoder_pos_embed", "decoder_pos_embed"),
         ("projector_decoder_blocks.", "projector_decoder_blocks."),
         ("predictor_decoder_blocks.", "predictor_decoder_blocks."), ("decoder_pos_mlp.", "decoder_pos_mlp."),
         ("decoder_pred.", "decoder_pred."), ("mm_patch_embed.", "target.encoder.patch_embed."),
         ("mm_cls_token", "target.encoder.cls_token"), ("mm_blocks.", "target.encoder.blocks."),
         ("mm_decoder_embed.", "target.decoder_embed."), ("mm_projector_decoder_blocks.", "target.projector.")]


# ----------------------------------------------------------------------------------------------- bench's side
def build_bench_model(cfg: dict):
    import timm

    from pretrain.siameseim import SiameseIM

    encoder = timm.create_model("vit_tiny_patch16_224", img_size=cfg["img_size"], patch_size=cfg["patch_size"],
                                embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"],
                                num_classes=0, final_norm=False)
    return SiameseIM(encoder, cfg["decoder_dim"], cfg["projector_depth"], cfg["predictor_depth"],
                     cfg["decoder_heads"], "bn", cfg["neg_weight"])


def normalise(views: torch.Tensor) -> torch.Tensor:
    return (views.float() / 255 - MEAN) / STD


def bench_outputs(fixture: dict) -> dict:
    """bench's SiameseIM on the fixture's weights, views, masks and crops: the quantities the fixture records."""
    from pretrain.siameseim import block_mask, relative_pos_embed

    cfg = fixture["config"]
    model = build_bench_model(cfg).train()
    state = dict(fixture["state"])
    missing = set(model.state_dict()) - set(state)
    if missing - {k for k in missing if k.startswith("target.")}:
        raise KeyError(f"fixture lacks {sorted(missing)[:5]}")
    model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k.startswith("target.")}, **state})
    for name, online in model.online_modules().items():  # the target starts as the online copy (as both inits do)
        model.target[name].load_state_dict(online.state_dict())
    view1, view2 = normalise(fixture["views"][0]), normalise(fixture["views"][1])
    masks, crops = fixture["masks"], fixture["crops"]
    grid = cfg["img_size"] // cfg["patch_size"]
    out = {"block_masks": torch.stack([torch.from_numpy(block_mask(g, n, random.Random(s), m))
                                       for g, n, m, s in MASK_CASES if g == 14]),
           "block_masks_small": torch.stack([torch.from_numpy(block_mask(g, n, random.Random(s), m))
                                             for g, n, m, s in MASK_CASES if g == 4]),
           "rel_embed": relative_pos_embed(crops, grid, cfg["decoder_dim"])}
    captured = {}
    model.decoder_pred.register_forward_hook(lambda m, i, o: captured.__setitem__("pred", o[:, -grid * grid:]))
    model.target["projector"][-1].register_forward_hook(lambda m, i, o: captured.__setitem__("target", o[:, 1:]))
    loss = model(view1, view2, masks, crops)
    loss.backward()
    out.update(loss1=loss.detach(), pred=captured["pred"].detach(), target=captured["target"].detach(),
               grad_norms={n: p.grad.norm() for n, p in model.named_parameters() if p.grad is not None})
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= cfg["sgd_lr"] * p.grad
    before = {n: p.detach().clone() for n, p in model.target.named_parameters()}
    model.update_target(cfg["momentum"])
    out["ema"] = {n: (p - before[n]).double().norm() for n, p in model.target.named_parameters()}
    with torch.no_grad():
        out["loss2"] = model(view1, view2, masks, crops)
    return out


def spatial_crops(seeds: list[int], image) -> torch.Tensor:
    """bench's crop parameters (B, 11) for one image, each drawn after torch.manual_seed(seed)."""
    from pretrain.siameseim import SiameseViews

    views = SiameseViews(CONFIG["img_size"], CONFIG["img_size"] // CONFIG["patch_size"], CONFIG["mask_patches"],
                         CONFIG["min_mask_patches"], scale=(0.2, 1.0))
    crops = []
    for seed in seeds:
        torch.manual_seed(seed)
        crops.append(views.spatial(image)[2])
    return torch.stack(crops)


def source_image():
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = (rng.random((45, 60, 3)) * 255).astype(np.uint8)
    pixels[:, :20] //= 3  # some structure, so crops and flips matter
    return Image.fromarray(pixels)


# ----------------------------------------------------------------------------------------------- reference side
def import_reference(ref: Path):
    """models_sim, pos_embed, masking_generator of the checkout, with shims for what newer libraries removed."""
    np.float, np.int = float, int  # util/pos_embed.py, util/masking_generator.py (numpy < 1.24)
    sys.modules.setdefault("turtle", types.SimpleNamespace(update=None))  # models_sim: `from turtle import update`
    six = types.ModuleType("torch._six")
    six.inf = float("inf")
    sys.modules["torch._six"] = six  # util/misc.py
    import timm.layers

    helpers = types.ModuleType("timm.models.layers.helpers")
    helpers.to_2tuple = timm.layers.to_2tuple
    sys.modules["timm.models.layers.helpers"] = helpers  # models_vit.py
    sys.path.insert(0, str(ref))
    import models_sim
    from util import augmentation, masking_generator, pos_embed

    return models_sim, pos_embed, masking_generator, augmentation


def reference_model(models_sim, cfg: dict):
    from util.misc import LayerNorm

    args = Namespace(decoder_embed_dim=cfg["decoder_dim"], use_abs_pos_emb=True, drop_path_rate=0.0,
                     init_values=None, loss_type="sim", projector_depth=cfg["projector_depth"],
                     predictor_depth=cfg["predictor_depth"], use_proj_ln=False, use_pred_ln=False,
                     train_patch_embed=False, online_ln=False, neg_weight=cfg["neg_weight"],
                     with_blockwise_mask=True)
    return models_sim.SiameseIMViT(img_size=cfg["img_size"], patch_size=cfg["patch_size"],
                                   embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"],
                                   decoder_embed_dim=cfg["decoder_dim"], decoder_num_heads=cfg["decoder_heads"],
                                   mlp_ratio=4, norm_layer=partial(LayerNorm, eps=1e-6), args=args)


def bench_name(name: str) -> str | None:
    for ref_prefix, bench_prefix in NAMES:
        if name.startswith(ref_prefix) and not (ref_prefix == "pos_embed" and name != "pos_embed"):
            return bench_prefix + name[len(ref_prefix):]
    return None  # mm_mask_token: the reference keeps but never uses it


def reference_crops(augmentation, seeds: list[int], image) -> torch.Tensor:
    """DataAugmentationForSIM's spatial draws (both flips, then both crops) as (B, 11) crop parameters."""
    flip = augmentation.RandomHorizontalFlip()
    crop = augmentation.SingleRandomResizedCrop(CONFIG["img_size"], scale=(0.2, 1.0), interpolation=3)
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        (image1, flip1), (image2, flip2) = flip(image), flip(image)
        _, i1, j1, h1, w1, width = crop(image1)
        _, i2, j2, h2, w2, _ = crop(image2)
        rows.append([i1, j1, h1, w1, float(flip1), i2, j2, h2, w2, float(flip2), width])
    return torch.tensor(rows, dtype=torch.float64)


def reference_outputs(ref: Path) -> dict:
    models_sim, pos_embed, masking_generator, augmentation = import_reference(ref)
    cfg, b = CONFIG, CONFIG["batch"]
    grid = cfg["img_size"] // cfg["patch_size"]
    masks = {}
    for g, n, m, seed in MASK_CASES:
        random.seed(seed)
        generator = masking_generator.MaskingGenerator((g, g), n, min_num_patches=m, fixed_num_masking_patches=True)
        masks.setdefault(g, []).append(torch.from_numpy(generator().astype(bool)))
    crops = reference_crops(augmentation, list(range(100, 100 + b)), source_image())
    i1, j1, h1, w1, f1, i2, j2, h2, w2, f2, width = crops.unbind(1)
    rel_pos = ((i2 - i1) / h1, (j2 - j1) / w1, h2 / h1, w2 / w1, f1 != f2, (width - j1 - j2) / w1)
    rel_pos = tuple(r.float() for r in rel_pos)

    torch.manual_seed(0)
    model = reference_model(models_sim, cfg).train()
    views = torch.randint(0, 256, (2, b, 3, cfg["img_size"], cfg["img_size"]), dtype=torch.uint8)
    x1, x2 = normalise(views[0]), normalise(views[1])
    mask = torch.stack(masks[grid][:b])
    state = {bench_name(k): v.clone() for k, v in model.state_dict().items()
             if bench_name(k) and not bench_name(k).startswith("target.")}
    captured = {}
    model.decoder_pred.register_forward_hook(lambda m, i, o: captured.__setitem__("pred", o[:, -grid * grid:]))
    model.mm_projector_decoder_blocks[-1].register_forward_hook(
        lambda m, i, o: captured.__setitem__("target", o[:, 1:]))
    loss, _ = model(x1, x2, rel_pos, cfg["momentum"], True, mask=mask)
    loss.backward()
    grad_norms = {bench_name(n): p.grad.norm() for n, p in model.named_parameters() if p.grad is not None}
    pred, target = captured["pred"].detach(), captured["target"].detach()
    target_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("mm_")}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= cfg["sgd_lr"] * p.grad
        loss2, _ = model(x1, x2, rel_pos, cfg["momentum"], True, mask=mask)  # mm_update, then the target pass
    # the EMA update: the norm of each target parameter's change (the target uses the online fixed pos_embed)
    ema = {bench_name(n)[len("target."):]: (p - target_before[n]).double().norm() for n, p in model.named_parameters()
           if n.startswith("mm_") and bench_name(n)}
    ema["encoder.pos_embed"] = torch.zeros((), dtype=torch.float64)
    rel_embed = pos_embed.get_2d_sincos_pos_embed_relative(*rel_pos, cfg["decoder_dim"], grid)
    return {"config": cfg, "state": state, "views": views, "masks": mask, "crops": crops,
            "block_masks": torch.stack(masks[14]), "block_masks_small": torch.stack(masks[4]),
            "rel_embed": rel_embed, "loss1": loss.detach(), "pred": pred, "target": target, "grad_norms": grad_norms,
            "ema": ema, "loss2": loss2.detach()}


def compare(expected: dict, actual: dict) -> dict[str, float]:
    """Largest absolute difference per recorded quantity (dicts: over their entries)."""
    diffs = {}
    for key in ("block_masks", "block_masks_small", "rel_embed", "loss1", "pred", "target", "grad_norms", "ema",
                "loss2"):
        e, a = expected[key], actual[key]
        if isinstance(e, dict):
            if set(e) != set(a):
                raise KeyError(f"{key}: reference-only {sorted(set(e) - set(a))}, bench-only {sorted(set(a) - set(e))}")
            diffs[key] = max((e[k].double() - a[k].double()).abs().max().item() for k in e)
        else:
            diffs[key] = (e.double() - a.double()).abs().max().item()
    return diffs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, help="extracted checkout of OpenGVLab/Siamese-Image-Modeling")
    parser.add_argument("--commit", help="the checkout's commit (default: `git rev-parse HEAD` there)")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args(argv)
    commit = args.commit or subprocess.run(["git", "-C", str(args.reference), "rev-parse", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
    if not commit:
        raise SystemExit(f"{args.reference} is not a git checkout: pass --commit HASH")
    import torch.distributed as dist

    if not dist.is_initialized():  # compute_unigrad_loss all-reduces the correlation unconditionally
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    fixture = {"reference": "OpenGVLab/Siamese-Image-Modeling", "commit": commit, **reference_outputs(args.reference)}
    dist.destroy_process_group()
    fixture["bench_crops_match"] = bool(torch.equal(spatial_crops(list(range(100, 100 + CONFIG["batch"])),
                                                                  source_image()), fixture["crops"]))
    diffs = compare(fixture, bench_outputs(fixture))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    print(f"reference {commit} -> {args.out} ({args.out.stat().st_size // 1024} KB)")
    print(f"crop parameters from the same torch seed equal: {fixture['bench_crops_match']}")
    for key, value in diffs.items():
        print(f"max |bench - reference| {key:18s} {value:.3g}")


if __name__ == "__main__":
    main()
