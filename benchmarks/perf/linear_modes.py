"""Cached mode vs the protocol as papers run it (one protocol run per LR of the grid), on the miniature data.

    python benchmarks/perf/linear_modes.py [--benchmarks places205,inat18] [--seeds 0,1,2]
                                           [--backbone FILE | --pretrain-epochs 30] [--data-root DIR] [--epochs N]

Without --backbone, a slim ResNet-50 is trained supervised on the miniature inat18 train set
(benchmarks/perf/detection_step.py `pretrain_backbone`) so that probes are far from chance. For each benchmark and
seed: one cached run (cold feature cache: its passes are extracted) and one protocol run per LR of the cached grid,
all at the `tiny` budget. Prints, per LR, val top-1 of the protocol run and of the cached head trained at that LR
(`extra.lr_selection.val_top1_by_lr`, diagnostics), the LR cached mode chose on held-out train vs the protocol
sweep's best, the measured wall-time ratio (all protocol runs / the cached run) and the ratio modelled for the real
schedules (Places205: 14 epochs on 2.45M images; iNat18: 84 epochs on 437k) from the per-image costs measured here.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from transfer.minidata import make_mini
from benchmarks.runner import RunOptions, run_benchmark
from benchmarks.spec import get_spec, resolve

REAL = {"places205": {"train": 2_448_873, "val": 20_500}, "inat18": {"train": 437_513, "val": 24_426}}


def run(benchmark, backbone, data_root, mode, seed, out, cache_dir, workers, overrides):
    opts = RunOptions(benchmark=benchmark, backbone=backbone, data_root=data_root, mode=mode, trials=1,
                      seed=seed, out=str(out), budget="tiny", overrides=overrides, workers=workers,
                      cache_dir=str(cache_dir))
    t0 = time.perf_counter()
    record = json.loads(run_benchmark(opts, log=lambda *a: None)[0].read_text())
    return time.perf_counter() - t0, record


def modelled_ratio(benchmark: str, cached: dict, protocols: list[dict], grid: int) -> float:
    """protocol total / cached wall time on the real dataset and schedule, from this run's per-image costs."""
    real, recipe = REAL[benchmark], resolve(get_spec(benchmark), "vissl")[0]
    c_extra, c_t = cached["extra"], cached["timings"]
    sel, passes = c_extra["lr_selection"], c_extra["feature_passes"]["count"]
    n_fit, n_hold = sel["fit_size"], sel["holdout_size"]
    n_val = cached["config"]["engine"]["val_images"]
    epochs_tiny = cached["config"]["recipe"]["epochs"]
    per_feature = c_t["features_s"] / (passes * n_fit + n_hold + n_val)
    per_head_image = c_t["train_s"] / (epochs_tiny * n_fit)          # the whole grid of heads, one image
    p = protocols[0]
    per_protocol_image = p["timings"]["train_s"] / (epochs_tiny * p["config"]["engine"]["train_images"])
    epochs, n_train = recipe["epochs"], real["train"]
    fit = n_train * n_fit / (n_fit + n_hold)
    protocol_total = grid * (epochs * n_train * per_protocol_image + real["val"] * per_feature)
    cached_total = ((passes * fit + (n_train - fit) + real["val"]) * per_feature + epochs * fit * per_head_image)
    return protocol_total / cached_total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmarks", default="places205,inat18")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data-root", help="miniature data root (generated in a temp dir if absent)")
    p.add_argument("--backbone", help="artifact (default: a slim ResNet-50 trained on the miniature inat18)")
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, help="epoch override applied to both modes (default: the tiny budget's)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-perf-"))
    data_root = args.data_root or str(work / "data")
    make_mini(data_root)
    backbone = args.backbone
    if backbone is None:
        from benchmarks.perf.detection_step import pretrain_backbone

        backbone = str(pretrain_backbone(data_root, work / "supervised-mini.safetensors",
                                         epochs=args.pretrain_epochs, workers=args.workers, log=lambda *a: None))
        print(f"backbone: slim ResNet-50 trained {args.pretrain_epochs} epochs on the miniature inat18 train set")
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = {"epochs": args.epochs}
    for benchmark in args.benchmarks.split(","):
        spec = get_spec(benchmark)
        base_lr = resolve(spec, "vissl", "tiny")[0]["lr"]
        lrs = [base_lr * m for m in spec.extra["cached"]["lr_multipliers"]]
        table = {lr: {"protocol": [], "cached": []} for lr in lrs}
        times, chosen, best, ratios = {"cached": [], "protocol": []}, [], [], []
        for seed in seeds:
            t_c, cached = run(benchmark, backbone, data_root, "cached", seed, work / "results",
                              work / f"cache-{benchmark}-{seed}", args.workers, overrides)
            by_lr = list(cached["extra"]["lr_selection"]["val_top1_by_lr"].values())  # grid order = lrs order
            scale = cached["config"]["recipe"]["batch_size"] / cached["config"]["recipe"]["lr_batch"]
            protocols, t_p = [], 0.0
            for i, lr in enumerate(lrs):
                t, rec = run(benchmark, backbone, data_root, "protocol", seed, work / "results", work / "unused",
                             args.workers, {**overrides, "lr": lr})
                t_p += t
                protocols.append(rec)
                table[lr]["protocol"].append(rec["metrics"]["top1"])
                table[lr]["cached"].append(by_lr[i])
            times["cached"].append(t_c)
            times["protocol"].append(t_p)
            chosen.append(cached["extra"]["lr_selection"]["chosen_lr"] / scale)
            best.append(max(lrs, key=lambda lr: table[lr]["protocol"][-1]))
            ratios.append(modelled_ratio(benchmark, cached, protocols, len(lrs)))
        print(f"\n{benchmark} (tiny budget, {cached['config']['recipe']['epochs']} epochs, seeds {seeds})")
        print(f"{'lr @ lr_batch':>14} | {'protocol top-1 (per seed)':>28} | {'cached head top-1 (per seed)':>30} | "
              f"mean diff")
        for lr in lrs:
            prot, cach = table[lr]["protocol"], table[lr]["cached"]
            diff = statistics.mean(c - q for c, q in zip(cach, prot))
            print(f"{lr:>14g} | {' '.join(f'{v:5.1f}' for v in prot):>28} | "
                  f"{' '.join(f'{v:5.1f}' for v in cach):>30} | {diff:+.2f}")
        print(f"held-out LR choice per seed: {[f'{c:g}' for c in chosen]}; protocol sweep best per seed: "
              f"{[f'{b:g}' for b in best]}")
        print(f"wall time: cached {statistics.mean(times['cached']):.1f} s, protocol sweep "
              f"{statistics.mean(times['protocol']):.1f} s ({len(lrs)} runs): measured ratio "
              f"{statistics.mean(times['protocol']) / statistics.mean(times['cached']):.1f}x")
        print(f"modelled ratio for the real schedule ({resolve(spec, 'vissl')[0]['epochs']} epochs on "
              f"{REAL[benchmark]['train']:,} images): {statistics.mean(ratios):.1f}x")


if __name__ == "__main__":
    main()
