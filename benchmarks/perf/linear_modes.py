"""Wall time and top-1 of `--mode protocol` vs `--mode cached` on the same backbone and miniature data.

    python benchmarks/perf/linear_modes.py [--benchmark places205] [--data-root DIR] [--backbone FILE]

Both modes run the same recipe at the `tiny` budget (64 px crops) for the recipe's full epoch count; the
cached mode also trains its grid of LRs. Prints one line per mode and the protocol/cached time ratio.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from transfer.minidata import make_mini
from benchmarks.runner import RunOptions, run_benchmark
from transfer.artifact import random_artifact, save_artifact


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", default="places205")
    p.add_argument("--data-root", help="miniature data root (generated in a temp dir if absent)")
    p.add_argument("--backbone", help="artifact (default: random-init slim ResNet-50)")
    p.add_argument("--epochs", type=int, help="epoch override applied to both modes")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-perf-"))
    data_root = args.data_root or str(work / "data")
    make_mini(data_root)
    backbone = args.backbone or str(save_artifact(work / "random.safetensors", random_artifact("resnet50", width=16)))
    rows = {}
    for mode in ("protocol", "cached"):
        opts = RunOptions(benchmark=args.benchmark, backbone=backbone, data_root=data_root, mode=mode, trials=1,
                          out=str(work / "results"), budget="tiny", overrides={"epochs": args.epochs},
                          workers=args.workers, cache_dir=str(work / f"cache-{mode}"))
        t0 = time.perf_counter()
        record = json.loads(run_benchmark(opts, log=lambda *a: None)[0].read_text())
        rows[mode] = (time.perf_counter() - t0, record["metrics"]["top1"], record)
        print(f"{args.benchmark} {mode:<9} wall {rows[mode][0]:7.1f} s   top-1 {rows[mode][1]:5.1f}", flush=True)
    chosen = rows["cached"][2]["extra"]["lr_selection"]["chosen_lr"]
    print(f"cached mode chose lr {chosen:g} on the held-out split (recipe lr "
          f"{rows['cached'][2]['extra']['lr_selection']['recipe_lr']:g})")
    print(f"ratio protocol/cached wall time: {rows['protocol'][0] / rows['cached'][0]:.2f}x; "
          f"top-1 difference cached - protocol: {rows['cached'][1] - rows['protocol'][1]:+.1f} points")
    t0 = time.perf_counter()
    run_benchmark(RunOptions(benchmark=args.benchmark, backbone=backbone, data_root=data_root, mode="cached",
                             trials=1, out=str(work / "results"), budget="tiny", overrides={"epochs": args.epochs},
                             workers=args.workers, cache_dir=str(work / "cache-cached")), log=lambda *a: None)
    print(f"cached mode again (features from the cache): wall {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
