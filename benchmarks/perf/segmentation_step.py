"""ADE20K UperNet at the `tiny` budget on the miniature data: wall time, seconds per training iteration and
mIoU/mAcc/aAcc per backbone.

    python benchmarks/perf/segmentation_step.py [--data-root DIR] [--backbones random-r50 random-vit FILE ...]
                                                [--max-iters N] [--workers 2] [--out DIR]

`random-r50` is a random-init slim ResNet-50 (width 16, recipe r50), `random-vit` a random-init ViT-Tiny/16
(recipe vit-b); any other argument is a backbone file, run with the recipe its family needs. Compare a briefly
pretrained artifact (e.g. `pretrain/run.py mscn --config mscn-cpu-tiny`) with random init at the same budget.
`s/iter` is the engine's train time (runner setup included) over the iterations run.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.runner import RunOptions, run_benchmark
from benchmarks.spec import get_spec
from transfer.artifact import random_artifact, save_artifact
from transfer.loading import load_backbone

RANDOM = {"random-r50": ("resnet50", {"width": 16}), "random-vit": ("vit_tiny_patch16", {})}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", help="miniature data root (default: written to a temp dir)")
    p.add_argument("--backbones", nargs="+", default=["random-r50", "random-vit"])
    p.add_argument("--max-iters", type=int, help="override the tiny budget's iterations (recorded)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", help="results folder (default: a temp dir)")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-seg-"))
    root = Path(args.data_root) if args.data_root else tmp / "data"
    if not args.data_root:
        from transfer.minidata import make_mini

        make_mini(root, seed=0, datasets=["ade20k"])
    out = Path(args.out) if args.out else tmp / "results"
    family_recipes = get_spec("ade20k").extra["family_recipes"]
    rows = []
    for name in args.backbones:
        if name in RANDOM:
            arch, kw = RANDOM[name]
            path = save_artifact(tmp / f"{name}.safetensors", random_artifact(arch, seed=0, **kw))
        else:
            path = Path(name)
        recipe = family_recipes[load_backbone(path)[0].family]
        overrides = {"max_iters": args.max_iters} if args.max_iters else {}
        t0 = time.perf_counter()
        [record_path] = run_benchmark(RunOptions(benchmark="ade20k", backbone=str(path), data_root=str(root),
                                                 recipe=recipe, budget="tiny", out=str(out), workers=args.workers,
                                                 overrides=overrides, name=name), log=lambda *a, **k: None)
        wall = time.perf_counter() - t0
        record = json.loads(Path(record_path).read_text())
        iters = record["extra"]["iterations"]
        rows.append((name, recipe, record["metrics"], wall, record["timings"]["train_s"] / max(iters, 1),
                     record["timings"]["test_s"], iters))
    print(f"{'backbone':<28}{'recipe':<11}{'mIoU':>7}{'mAcc':>7}{'aAcc':>7}{'wall s':>9}{'s/iter':>8}"
          f"{'test s':>8}{'iters':>7}")
    for name, recipe, m, wall, per_iter, test_s, iters in rows:
        print(f"{Path(name).name[:27]:<28}{recipe:<11}{m['mIoU']:>7.2f}{m['mAcc']:>7.2f}{m['aAcc']:>7.2f}"
              f"{wall:>9.1f}{per_iter:>8.3f}{test_s:>8.1f}{iters:>7}")


if __name__ == "__main__":
    main()
