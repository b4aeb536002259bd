"""Golden parity of pretrain/adios.py with the reference implementation (YugeTen/adios).

    python benchmarks/parity/adios.py /path/to/adios-checkout --pl-bolts-scheduler FILE [-o tests/fixtures/adios_parity.pt]

The reference is a PyTorch Lightning / solo-learn code base that does not install next to this project's torch.
This script imports only what the ADIOS computations need, from the checkout, unchanged: the method classes
(`src/methods/{simclr,byol,simsiam}_adios[_s].py`), `src/methods/base_adios.py` (optimisers and schedulers),
`src/utils/{unet,blocks,momentum,metrics,lars}.py` and `src/losses/`. Shims stand in for what those modules
import but the computations do not use: `src.methods.base` (BaseModel / BaseMomentumModel: plain nn.Modules
holding the encoder, a dummy online classifier and the hyper-parameters Lightning would set) and pl_bolts, whose
LinearWarmupCosineAnnealingLR is executed from its own source file (`--pl-bolts-scheduler`, e.g.
pl_bolts/optimizers/lr_scheduler.py from the lightning-bolts 0.4.0 wheel; it only imports torch).

For every variant (SimCLR / BYOL / SimSiam, ADIOS and ADIOS-s, SimSiam's mask switches, the entropy term) both
models get the same weights (this project's init under a fixed seed, names mapped), the same two views and the
same ADIOS-s mask draws. Recorded from the reference: the encoder-step loss (`inpaint_forward`), the occluder
objective (`mask_forward`), the sparsity penalty and the entropy term (from `mask_forward` with alpha_s / alpha_e
switched on alone), the masks, and per-module gradient norms after each step's backward (the occluder step with
the reference's `flip_inpainter_grad(False)`; the encoder step's norms cover the encoder side only). Also the per-epoch lrs of every parameter group from the
reference's `configure_optimizers` schedulers, stepped once per epoch as its training_step does.

tests/test_adios_parity.py recomputes everything with pretrain/adios.py (`run_bench`) and compares, without the
reference code.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import math
import subprocess
import sys
import types
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pretrain.adios import ADIOS, frozen  # noqa: E402
from transfer.artifact import build_backbone, feature_dim  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "adios_parity.pt"
IMG, BATCH, N, WIDTH = 32, 4, 3, 4
HEADS = {"proj_hidden_dim": 16, "proj_output_dim": 8, "pred_hidden_dim": 16}
# name: (reference method module, class, framework, ADIOS-s, extra knobs)
VARIANTS = {
    "simclr_adios_s": ("simclr_adios_s", "SimCLR_ADIOS_S", "simclr", True, {"alpha_sparsity": 0.5}),
    "simclr_adios": ("simclr_adios", "SimCLR_ADIOS", "simclr", False, {"alpha_sparsity": 0.7,
                                                                      "alpha_entropy": 0.3}),
    "byol_adios_s": ("byol_adios_s", "BYOL_ADIOS_S", "byol", True, {"alpha_sparsity": 1.0}),
    "byol_adios": ("byol_adios", "BYOL_ADIOS", "byol", False, {"alpha_sparsity": 0.4, "alpha_entropy": 0.2}),
    "simsiam_adios": ("simsiam_adios", "SimSiam_ADIOS", "simsiam", False, {"alpha_sparsity": 0.5,
                                                                          "alpha_entropy": 0.2}),
    "simsiam_adios_s": ("simsiam_adios_s", "SimSiam_ADIOS_S", "simsiam", True, {"alpha_sparsity": 0.5}),
    "simsiam_adios_s_switches": ("simsiam_adios_s", "SimSiam_ADIOS_S", "simsiam", True,
                                 {"alpha_sparsity": 0.5, "use_symmetry_mask": False, "use_no_mask": True,
                                  "use_both_mask": False}),
}
# the lr schedules: lr, mask_lr, epochs, warm-up, train_mask_epoch, start lr; stepped for more than `epochs`
SCHEDULE = {"lr": 0.5, "mask_lr": 0.05, "max_epochs": 8, "warmup_epochs": 3, "train_mask_epoch": 2,
            "warmup_start_lr": 0.003, "min_lr": 0.0, "steps": 12}
SEED, MASK_SEEDS = 0, (11, 12)  # weights; the encoder step's and the occluder step's mask draws


# ----------------------------------------------------------------------------------------------- this project
def build_bench(variant: str) -> ADIOS:
    """This project's model for a variant, initialised under SEED."""
    _, _, framework, single, knobs = VARIANTS[variant]
    torch.manual_seed(SEED)
    return ADIOS(build_backbone("resnet18", width=WIDTH), framework, img_size=IMG, num_masks=N, single_mask=single,
                 mask_fbase=8, temperature=0.2, **HEADS, **knobs)


def fingerprint(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Per tensor (sum, sum of squares) in float64: tells whether an init reproduces the fixture's weights."""
    return {k: (v.double().sum().item(), v.double().pow(2).sum().item()) for k, v in model.state_dict().items()
            if v.is_floating_point()}


def grad_norms(modules: dict[str, nn.Module]) -> dict[str, float]:
    return {name: math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in m.parameters() if p.grad is not None))
            for name, m in modules.items()}


def encoder_side(norms: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in norms.items() if k not in ("mask_encoder", "mask_head")}


def bench_modules(model: ADIOS) -> dict[str, nn.Module]:
    mods = {"encoder": model.encoder, "projector": model.projector, "mask_encoder": model.occluder.mask_encoder,
            "mask_head": model.occluder.mask_head}
    if model.predictor is not None:
        mods["predictor"] = model.predictor
    return mods


def run_bench(variant: str, x_orig: torch.Tensor, x_tr: torch.Tensor, ids_enc: torch.Tensor | None,
              ids_occ: torch.Tensor | None) -> dict:
    """pretrain/adios.py on normalised views: losses, penalty, entropy term, masks, per-module gradient norms."""
    model = build_bench(variant).train()
    out = {"fingerprint": fingerprint(model)}
    for p in model.parameters():
        p.grad = None
    loss, _ = model.encoder_loss(x_orig, x_tr, ids_enc)
    loss.backward()
    out["encoder_loss"], out["encoder_grads"] = loss.item(), encoder_side(grad_norms(bench_modules(model)))
    model.zero_grad(set_to_none=True)
    with frozen(model.encoder_parameters()):
        objective, logs = model.occluder_objective(x_orig, x_tr, ids_occ)
        (-objective).backward()
    out["occluder_objective"], out["occluder_grads"] = objective.item(), grad_norms(bench_modules(model))
    with torch.no_grad():
        masks = model.masks_of(x_orig, x_tr)
        areas = [m.mean((2, 3)) for m in masks]
        out["penalty"] = logs["mask_penalty"].item()
        out["neg_entropy"] = ((sum(_neg_entropy(a) for a in areas) if model.single_mask
                              else _neg_entropy(torch.cat(areas, 1))).item())
        out["masks"] = masks[-1]
    return out


def _neg_entropy(areas: torch.Tensor) -> torch.Tensor:
    from pretrain.adios import area_neg_entropy
    return area_neg_entropy(areas)


def bench_schedule() -> dict[str, list[float]]:
    """Per-epoch lrs of the encoder side, SimSiam's static predictor and the occluder from ADIOS.lr_at."""
    s = SCHEDULE
    torch.manual_seed(SEED)
    model = ADIOS(build_backbone("resnet18", width=WIDTH), "simsiam", img_size=IMG, num_masks=N, mask_fbase=8,
                  **HEADS, epochs=s["max_epochs"], train_mask_epoch=s["train_mask_epoch"],
                  warmup_epochs=s["warmup_epochs"], warmup_start_lr=s["warmup_start_lr"], min_lr=s["min_lr"])
    return {side: [model.lr_at(e, side, s["mask_lr"] if side == "occluder" else s["lr"])
                   for e in range(s["steps"])] for side in ("encoder", "static", "occluder")}


# ----------------------------------------------------------------------------------------------- the reference
def load_reference(checkout: Path, scheduler_file: Path) -> dict[str, types.ModuleType]:
    """The reference's ADIOS method modules, imported from `checkout` with shims for Lightning and solo-learn's
    base model; pl_bolts' scheduler executed from `scheduler_file`."""
    def package(name, path=None):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)] if path else []
        sys.modules[name] = mod
        return mod

    src = checkout / "src"
    package("src", src)
    package("src.utils", src / "utils")
    package("src.losses", src / "losses")
    package("src.methods", src / "methods")
    for name in ("pl_bolts", "pl_bolts.optimizers"):
        package(name)
    sched = types.ModuleType("pl_bolts.optimizers.lr_scheduler")
    exec(compile(scheduler_file.read_text(), str(scheduler_file), "exec"), sched.__dict__)
    sys.modules["pl_bolts.optimizers.lr_scheduler"] = sched

    base = types.ModuleType("src.methods.base")

    class BaseModel(nn.Module):
        """Stands in for solo-learn's BaseModel: the attributes ADIOS's methods and configure_optimizers read."""

        def __init__(self, encoder: nn.Module, batch_size: int, img_size: int, **hparams):
            super().__init__()
            self.encoder, self.batch_size, self.img_size = encoder, batch_size, img_size
            self.features_size = feature_dim(encoder)
            self.classifier = nn.Linear(self.features_size, 2)  # the online linear probe (not compared)
            self.accumulate_grad_batches = 1
            self.optimizer, self.extra_optimizer_args = "sgd", {"momentum": 0.9}
            # lars off: the schedules do not depend on it (LARSWrapper predates torch 2 schedulers)
            self.lars, self.eta_lars, self.grad_clip_lars, self.exclude_bias_n_norm = False, 0.02, True, True
            self.scheduler, self.weight_decay = "warmup_cosine", 1e-5
            self.__dict__.update(hparams)

        @property
        def learnable_params(self):
            return [{"name": "encoder", "params": self.encoder.parameters()},
                    {"name": "classifier", "params": self.classifier.parameters(), "lr": 0.1, "weight_decay": 0}]

        def log_dict(self, *args, **kwargs):
            pass

    class BaseMomentumModel(BaseModel):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.momentum_encoder = copy.deepcopy(self.encoder).requires_grad_(False)

    base.BaseModel, base.BaseMomentumModel = BaseModel, BaseMomentumModel
    sys.modules["src.methods.base"] = base
    sys.path.insert(0, str(checkout))
    return {v[0]: importlib.import_module(f"src.methods.{v[0]}") for v in VARIANTS.values()}


def map_to_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This project's parameter names -> the reference's (occluder.mask_encoder. -> mask_encoder.,
    occluder.mask_head. -> mask_head.0., the Conv2d in front of the reference's Softmax)."""
    out = {}
    for k, v in state.items():
        k = k.replace("occluder.mask_head.", "mask_head.0.").replace("occluder.", "")
        out[k] = v
    return out


def build_reference(modules, variant: str, encoder: nn.Module, lr: float = 0.5, mask_lr: float = 0.05, **hp):
    module_name, cls_name, framework, _, knobs = VARIANTS[variant]
    knobs = dict(knobs)
    args = {"output_dim": HEADS["proj_output_dim"], "proj_hidden_dim": HEADS["proj_hidden_dim"],
            "mask_lr": mask_lr, "alpha_sparsity": knobs.pop("alpha_sparsity"),
            "alpha_entropy": knobs.pop("alpha_entropy", 0.0), "N": N, "mask_fbase": 8, "unet_norm": "gn"}
    if framework == "simclr":
        args["temperature"] = 0.2
    else:
        args["pred_hidden_dim"] = HEADS["pred_hidden_dim"]
    if framework == "simsiam":
        args.update(num_blocks=int(math.log2(IMG) - 1), use_symmetry_mask=knobs.get("use_symmetry_mask", True),
                    use_no_mask=knobs.get("use_no_mask", True), use_both_mask=knobs.get("use_both_mask", True))
    cls = getattr(modules[module_name], cls_name)
    return cls(dataset="imagenet100", encoder=encoder, batch_size=BATCH, img_size=IMG, lr=lr, **hp, **args)


def reference_grad_norms(ref: nn.Module) -> dict[str, float]:
    mods = {"encoder": ref.encoder, "projector": ref.projector, "mask_encoder": ref.mask_encoder,
            "mask_head": ref.mask_head}
    if hasattr(ref, "predictor"):
        mods["predictor"] = ref.predictor
    return grad_norms(mods)


def run_reference(modules, variant: str, x_orig: torch.Tensor, x_tr: torch.Tensor) -> dict:
    bench = build_bench(variant)
    ref = build_reference(modules, variant, copy.deepcopy(bench.encoder))
    missing, unexpected = ref.load_state_dict(map_to_reference(bench.state_dict()), strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing), (missing, unexpected)
    ref.train()
    batch = [torch.arange(BATCH), [x_orig, x_tr], torch.zeros(BATCH, dtype=torch.long)]
    single = VARIANTS[variant][3]
    out = {"fingerprint": fingerprint(bench)}

    ref.flip_inpainter_grad(status=True)
    ref.zero_grad(set_to_none=True)
    torch.manual_seed(MASK_SEEDS[0])
    loss = ref.inpaint_forward(batch) if hasattr(ref, "inpaint_forward") else ref.adios_forward(batch, "inpaint")
    loss.backward()
    # the trained side only: ADIOS-s's reference does not detach the mask in this step, so the occluder gets
    # gradients too, which its optimiser zeroes before the occluder step (no effect on training)
    out["encoder_loss"], out["encoder_grads"] = loss.item(), encoder_side(reference_grad_norms(ref))

    ref.zero_grad(set_to_none=True)
    ref.flip_inpainter_grad(status=False)
    torch.manual_seed(MASK_SEEDS[1])
    mask_forward = ref.mask_forward if hasattr(ref, "mask_forward") else lambda b: ref.adios_forward(b, "mask")
    objective = mask_forward(batch)
    (-objective).backward()
    out["occluder_objective"], out["occluder_grads"] = objective.item(), reference_grad_norms(ref)

    alpha1, alpha2 = ref.alpha1, ref.alpha2
    with torch.no_grad():  # the penalty and the entropy term, from the reference's own mask_forward
        values = {}
        for a1, a2 in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0)):
            ref.alpha1, ref.alpha2 = a1, a2
            torch.manual_seed(MASK_SEEDS[1])
            values[a1, a2] = mask_forward(batch).item()
        ref.alpha1, ref.alpha2 = alpha1, alpha2
        out["penalty"] = values[0.0, 0.0] - values[1.0, 0.0]
        out["neg_entropy"] = values[0.0, 1.0] - values[0.0, 0.0]
        out["masks"] = ref.mask_head(ref.mask_encoder(x_tr))
    for i, seed in enumerate(MASK_SEEDS):  # the draws the reference made (nothing else uses the RNG before them)
        torch.manual_seed(seed)
        out[("ids_enc", "ids_occ")[i]] = torch.randint(low=0, high=N, size=(BATCH,)) if single else None
    return out


def reference_schedule(modules) -> dict[str, list[float]]:
    """Per-epoch lrs from SimSiam_ADIOS_S.configure_optimizers (inpainter: encoder, classifier, projector,
    predictor with static_lr; mask: mask_encoder, mask_head), both schedulers stepped once per epoch."""
    s = SCHEDULE
    torch.manual_seed(SEED)
    ref = build_reference(modules, "simsiam_adios_s", build_backbone("resnet18", width=WIDTH), lr=s["lr"],
                          mask_lr=s["mask_lr"], max_epochs=s["max_epochs"], warmup_epochs=s["warmup_epochs"],
                          train_mask_epoch=s["train_mask_epoch"], warmup_start_lr=s["warmup_start_lr"],
                          min_lr=s["min_lr"])
    (opt_i, opt_m), (sch_i, sch_m) = ref.configure_optimizers()
    lrs = {"encoder": [], "projector": [], "static": [], "occluder": [], "mask_head": []}
    for _ in range(s["steps"]):
        gi, gm = opt_i.param_groups, opt_m.param_groups
        for key, lr in zip(lrs, (gi[0]["lr"], gi[2]["lr"], gi[3]["lr"], gm[0]["lr"], gm[1]["lr"])):
            lrs[key].append(lr)
        sch_i.step()
        sch_m.step()
    return lrs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="an extracted YugeTen/adios checkout (never committed)")
    parser.add_argument("--pl-bolts-scheduler", type=Path, required=True,
                        help="pl_bolts/optimizers/lr_scheduler.py (lightning-bolts >= 0.4.0, as the reference pins)")
    parser.add_argument("--commit", help="the checkout's commit (default: `git rev-parse HEAD` in it)")
    parser.add_argument("-o", "--output", type=Path, default=FIXTURE)
    args = parser.parse_args(argv)
    if not (args.checkout / "src" / "methods" / "base_adios.py").exists():
        raise SystemExit(f"{args.checkout}: not a YugeTen/adios checkout (no src/methods/base_adios.py)")
    commit = args.commit or subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
    if not commit:
        raise SystemExit(f"{args.checkout}: no git metadata; pass --commit HASH")
    modules = load_reference(args.checkout, args.pl_bolts_scheduler)

    g = torch.Generator().manual_seed(1)
    views = [(torch.rand(BATCH, 3, IMG, IMG, generator=g) * 255).to(torch.uint8) for _ in range(2)]
    x_orig, x_tr = (build_bench("simclr_adios_s").prepare(v) for v in views)
    fixture = {"reference": "YugeTen/adios", "commit": commit, "pl_bolts": "lightning-bolts 0.4.0 lr_scheduler.py",
               "views_uint8": views, "seed": SEED, "mask_seeds": MASK_SEEDS, "variants": {},
               "schedule": {"config": SCHEDULE, "reference": reference_schedule(modules)}}
    worst = 0.0
    for variant in VARIANTS:
        ref = run_reference(modules, variant, x_orig, x_tr)
        bench = run_bench(variant, x_orig, x_tr, ref["ids_enc"], ref["ids_occ"])
        diffs = compare(ref, bench)
        worst = max(worst, max(diffs.values()))
        print(f"{variant:26s} " + "  ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        if variant != "simclr_adios_s":
            ref.pop("masks")  # one variant's masks keep the fixture small
        fixture["variants"][variant] = ref
    sched_diff = max(abs(a - b) for side, ref_side in (("encoder", "encoder"), ("encoder", "projector"),
                                                          ("static", "static"), ("occluder", "occluder"),
                                                          ("occluder", "mask_head"))
                     for a, b in zip(bench_schedule()[side], fixture["schedule"]["reference"][ref_side]))
    print(f"lr schedules               max |diff| {sched_diff:.2e}")
    print(f"largest difference to the reference: {max(worst, sched_diff):.2e}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.output)
    print(f"-> {args.output} ({args.output.stat().st_size / 1024:.0f} KB)")


def compare(ref: dict, bench: dict) -> dict[str, float]:
    """Largest absolute difference per recorded output (gradient norms and losses relative to max(1, |ref|))."""
    rel = lambda a, b: abs(a - b) / max(1.0, abs(a))  # noqa: E731
    diffs = {k: rel(ref[k], bench[k]) for k in ("encoder_loss", "occluder_objective", "penalty", "neg_entropy")}
    diffs["grads"] = max(rel(ref[f"{step}_grads"][m], bench[f"{step}_grads"][m])
                         for step in ("encoder", "occluder") for m in ref[f"{step}_grads"])
    if "masks" in ref:
        diffs["masks"] = (ref["masks"] - bench["masks"]).abs().max().item()
    return diffs


if __name__ == "__main__":
    main()
