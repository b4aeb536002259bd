"""Golden parity fixture for ConvMAE pretraining: Alpha-VL/ConvMAE's own model vs pretrain/convmae.py.

    python benchmarks/parity/convmae.py /path/to/ConvMAE-checkout [-o tests/fixtures/convmae_parity.pt]

The checkout (git archive of github.com/Alpha-VL/ConvMAE; never committed here) is imported as it is; the only
shim is `numpy.float = float` for its util/pos_embed.py (removed in NumPy 1.24). Its `models_convmae.py` hard-codes
a 14 x 14 stage-3 grid, so both models run at 224 px, with tiny widths (4/8/16, depths 1/1/1, 16-d decoder) to keep
the fixture small. The script

1. builds the reference `MaskedAutoencoderConvViT`, perturbs every parameter (so biases and norms are not at their
   init values) and loads that one state dict into both models (bench's names: the encoder's under `encoder.`);
2. feeds the same images (56 px uint8 noise upsampled x4, stored small) and the same masking noise (the
   reference draws `torch.rand(N, L)` itself: the RNG is re-seeded so that it draws the stored tensor);
3. records the reference loss, the mask, the decoder predictions (per-token norms and the first 8 values of every
   token) and every parameter's gradient norm, plus the reference init statistics (mean / std of every parameter's
   values pooled over 16 seeds) and the checkout's commit, then runs bench on the same inputs and prints the
   differences.

tests/test_convmae.py compares bench with the fixture without the reference code.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "convmae_parity.pt"
TINY = dict(embed_dims=(4, 8, 16), depths=(1, 1, 1), num_heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2)
IMG, BATCH, SEED = 224, 2, 0
FIXED = ("pos_embed", "decoder_pos_embed")  # fixed sin-cos tables: each side computes its own


def reference_model(checkout: Path) -> nn.Module:
    """The reference MaskedAutoencoderConvViT at the tiny widths, norm-pix loss as in PRETRAIN.md."""
    np.float = float  # util/pos_embed.py uses np.float (removed in NumPy 1.24)
    sys.path.insert(0, str(checkout))
    import models_convmae

    return models_convmae.MaskedAutoencoderConvViT(
        img_size=[IMG, IMG // 4, IMG // 8], patch_size=[4, 2, 2], embed_dim=list(TINY["embed_dims"]),
        depth=list(TINY["depths"]), num_heads=TINY["num_heads"], decoder_embed_dim=TINY["decoder_dim"],
        decoder_depth=TINY["decoder_depth"], decoder_num_heads=TINY["decoder_heads"], mlp_ratio=[4, 4, 4],
        norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=True)


def bench_model() -> nn.Module:
    sys.path.insert(0, str(ROOT))
    from pretrain.convmae import ConvMAE
    from transfer.convvit import build_convvit

    encoder = build_convvit("convvit_tiny", embed_dims=TINY["embed_dims"], depths=TINY["depths"],
                            num_heads=TINY["num_heads"], img_size=IMG)
    return ConvMAE(encoder, TINY["decoder_dim"], TINY["decoder_depth"], TINY["decoder_heads"], 0.75, True)


ENCODER_PREFIXES = ("patch_embed", "blocks", "pos_embed", "norm.")


def bench_name(ref_name: str) -> str:
    """Reference parameter name -> bench's (the encoder lives under `encoder.`)."""
    return f"encoder.{ref_name}" if ref_name.startswith(ENCODER_PREFIXES) else ref_name


def images_from(small: torch.Tensor) -> torch.Tensor:
    """Stored 56 px uint8 images -> the normalised 224 px model input (nearest x4)."""
    x = small.float().div(255).repeat_interleave(4, 2).repeat_interleave(4, 3)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def run(model: nn.Module, images: torch.Tensor, noise: torch.Tensor, reference: bool):
    """(loss, pred, mask, {reference param name: grad norm}) of one training-mode forward/backward."""
    model.train().zero_grad()
    if reference:
        torch.manual_seed(SEED)  # the reference's random_masking draws torch.rand(N, L): exactly `noise`
        loss, pred, mask = model(images, mask_ratio=0.75)
    else:
        loss, pred, mask = model(images, noise=noise)
    loss.backward()
    return loss.detach(), pred.detach(), mask.detach(), model


def grad_norms(model: nn.Module, names) -> dict[str, float]:
    params = dict(model.named_parameters())
    return {n: params[n].grad.norm().item() for n in names}


def init_stats(build, seeds=range(16), rename=lambda n: n) -> dict[str, torch.Tensor]:
    """(mean, std) of every trainable parameter's values pooled over models built with `seeds`."""
    values: dict[str, list[torch.Tensor]] = {}
    for s in seeds:
        torch.manual_seed(s)
        for n, p in build().named_parameters():
            if p.requires_grad:
                values.setdefault(rename(n), []).append(p.detach().flatten())
    return {n: torch.stack([torch.cat(v).mean(), torch.cat(v).std()]) for n, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", type=Path, help="extracted Alpha-VL/ConvMAE (git archive)")
    parser.add_argument("-o", "--out", type=Path, default=FIXTURE)
    parser.add_argument("--commit", help="the checkout's commit (default: git rev-parse in the checkout)")
    args = parser.parse_args()
    if not (args.checkout / "models_convmae.py").exists():
        raise SystemExit(f"{args.checkout}: no models_convmae.py; pass an extracted Alpha-VL/ConvMAE checkout")
    commit = args.commit or subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
    if not commit:
        raise SystemExit(f"{args.checkout} is not a git work tree: pass --commit <the archived commit>")
    torch.use_deterministic_algorithms(True)

    ref_init = init_stats(lambda: reference_model(args.checkout))
    torch.manual_seed(SEED)
    ref = reference_model(args.checkout)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n not in FIXED:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    state = {n: t.clone() for n, t in ref.state_dict().items() if n not in FIXED}
    small = torch.randint(0, 256, (BATCH, 3, IMG // 4, IMG // 4), generator=g, dtype=torch.uint8)
    images = images_from(small)
    torch.manual_seed(SEED)
    noise = torch.rand(BATCH, (IMG // 16) ** 2)

    loss, pred, mask, ref = run(ref, images, noise, reference=True)
    expected_mask = (noise.argsort(1).argsort(1) >= int(noise.shape[1] * 0.25)).float()
    assert torch.equal(mask, expected_mask), "the reference did not draw the stored masking noise"
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    fixture = {
        "reference": "github.com/Alpha-VL/ConvMAE models_convmae.py MaskedAutoencoderConvViT", "commit": commit,
        "config": {**TINY, "img_size": IMG, "mask_ratio": 0.75, "norm_pix_loss": True},
        "state_dict": state, "images_56px": small, "noise": noise,
        "loss": loss, "mask": mask, "pred_head": pred[..., :8].clone(), "pred_norms": pred.norm(dim=-1),
        "grad_norms": grad_norms(ref, names),
        "pos_embed": ref.pos_embed.detach().clone(),  # decoder_pos_embed: the same table (both 16-d)
        "init_stats": ref_init,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB), reference commit {commit}")

    bench = bench_model()
    missing, unexpected = bench.load_state_dict({bench_name(n): t for n, t in state.items()}, strict=False)
    assert not unexpected and set(missing) == {"encoder.pos_embed", "decoder_pos_embed"}, (missing, unexpected)
    b_loss, b_pred, b_mask, bench = run(bench, images, noise, reference=False)
    b_grads = grad_norms(bench, [bench_name(n) for n in names])
    print(f"loss: reference {loss.item():.6f}, bench {b_loss.item():.6f}, |diff| {(loss - b_loss).abs().item():.2e}")
    print(f"mask equal: {torch.equal(mask, b_mask)}; pred max |diff| {(pred - b_pred).abs().max().item():.2e}")
    print(f"grad norms max |diff| {max(abs(v - b_grads[bench_name(n)]) for n, v in fixture['grad_norms'].items()):.2e}")
    print(f"pos_embed max |diff| {(ref.pos_embed - bench.encoder.pos_embed).abs().max().item():.2e}, decoder "
          f"{(ref.decoder_pos_embed - bench.decoder_pos_embed).abs().max().item():.2e}")
    b_init = init_stats(bench_model, rename=lambda n: n.removeprefix("encoder."))
    worst = max(((ref_init[n] - b_init[n]).abs().max().item(), n) for n in ref_init)
    print(f"init statistics max |diff| {worst[0]:.3g} ({worst[1]})")


if __name__ == "__main__":
    main()
