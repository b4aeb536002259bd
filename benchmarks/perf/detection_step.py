"""C4 detection at the `tiny` budget on the miniature data: a briefly pretrained slim ResNet-50 vs random init.

    python benchmarks/perf/detection_step.py [--benchmarks voc07+12,coco-c4-1x] [--data-root DIR]
                                             [--pretrain-epochs 30] [--trials 1] [--workers 2]

Writes the miniature data (unless --data-root), a random-init slim ResNet-50 (width 16) and the same network
trained supervised for a few epochs on the miniature classification data (`pretrain_backbone`), then runs
`bench run BENCH --budget tiny` (torchvision engine) on both and prints the headline metrics, wall time and
seconds per training iteration. A pretrained trunk should beat random init at the same budget.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from transfer.artifact import BackboneArtifact, build_backbone, random_artifact, save_artifact, trunk_state_dict

HEADLINE = {"voc07+12": ("AP50", "AP", "AP75"), "coco-c4-1x": ("APbb50", "APbb", "APmk50", "APmk"),
            "lvis-c4": ("APbb50", "APbb", "APmk")}


def pretrain_backbone(data_root, out, *, dataset: str = "inat18", epochs: int = 30, width: int = 16,
                      crop: int = 96, batch_size: int = 64, lr: float = 0.1, seed: int = 0, workers: int = 0,
                      log=print) -> Path:
    """Supervised pretraining of a slim ResNet-50 (BN + linear head, SGD, cosine) on a miniature
    classification set; writes and returns a bench artifact (provenance method `supervised-mini`)."""
    from torch.utils.data import DataLoader

    from torchvision.transforms import v2 as T

    from transfer.datasets import load_classification
    from transfer.linear import ImageList

    torch.manual_seed(seed)
    train = load_classification(dataset, data_root, "train")
    augment = T.Compose([T.RandomResizedCrop(crop, scale=(0.35, 1.0), antialias=True), T.RandomHorizontalFlip(),
                         T.ToImage(), T.ToDtype(torch.float32, scale=True)])
    data = DataLoader(ImageList(train.samples, augment), batch_size=batch_size, shuffle=True,
                      num_workers=workers, drop_last=True, generator=torch.Generator().manual_seed(seed))
    trunk = build_backbone("resnet50", width=width)
    model = nn.Sequential(trunk, nn.Linear(width * 32, train.num_classes))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(data))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        correct = seen = 0
        for images, labels in data:
            logits = model((images - mean) / std)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
        log(f"pretrain epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} train top-1 {100 * correct / seen:.1f} "
            f"({time.perf_counter() - t0:.0f}s)")
    art = BackboneArtifact("resnet50", trunk_state_dict(trunk), arch_kwargs={"width": width},
                           provenance={"method": "supervised-mini", "epochs": epochs, "data": f"mini {dataset}",
                                       "seed": seed})
    return save_artifact(out, art)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmarks", default="voc07+12", help="comma-separated detection benchmarks")
    p.add_argument("--data-root", help="miniature data root (generated in a temp dir if absent)")
    p.add_argument("--pretrained", help="pretrained artifact (default: pretrain one here)")
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", help="results folder (default: temp dir)")
    args = p.parse_args()

    from benchmarks.runner import RunOptions, run_benchmark

    work = Path(args.out or tempfile.mkdtemp(prefix="bench-det-perf-"))
    data_root = args.data_root or str(work / "data")
    if not args.data_root:
        from transfer.minidata import make_mini

        make_mini(data_root)
    backbones = {"random-init": save_artifact(work / "random-init.safetensors",
                                              random_artifact("resnet50", seed=0, width=16))}
    if args.pretrained:
        backbones["pretrained"] = Path(args.pretrained)
    else:
        t0 = time.perf_counter()
        backbones["pretrained"] = pretrain_backbone(data_root, work / "pretrained.safetensors",
                                                    epochs=args.pretrain_epochs, workers=args.workers)
        print(f"pretraining: {time.perf_counter() - t0:.0f}s", flush=True)
    for bench in args.benchmarks.split(","):
        for name, path in backbones.items():
            opts = RunOptions(benchmark=bench, backbone=str(path), data_root=data_root, budget="tiny",
                              trials=args.trials, out=str(work / "results"), workers=args.workers, name=name)
            t0 = time.perf_counter()
            records = [json.loads(r.read_text()) for r in run_benchmark(opts, log=lambda *a: None)]
            wall = time.perf_counter() - t0
            shown = "  ".join(f"{m} {sum(r['metrics'][m] for r in records) / len(records):5.1f}"
                              for m in HEADLINE[bench] if m in records[0]["metrics"])
            print(f"{bench:<11} {name:<12} {shown}   wall {wall:6.0f}s for {len(records)} trial(s), "
                  f"{records[0]['extra']['s_per_iter']:.2f} s/iter x {records[0]['extra']['iterations']} iter",
                  flush=True)
    print(f"results in {work / 'results'}")


if __name__ == "__main__":
    main()
