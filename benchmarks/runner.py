"""`bench run`: resolve a benchmark's recipe, load the backbone through the audit, run the engine per trial,
and write one result record per trial (with the fully resolved config inside)."""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.spec import BenchmarkSpec, SpecError, get_spec, resolve
from leaderboard.records import new_record, write_record
from transfer.datasets import CACHE_ROOT
from transfer.loading import load_backbone


@dataclasses.dataclass
class RunOptions:
    benchmark: str
    backbone: str
    data_root: str
    recipe: str | None = None
    mode: str | None = None
    trials: int | None = None
    first_trial: int = 0
    seed: int = 0
    out: str = "results"
    budget: str | None = None
    overrides: dict = dataclasses.field(default_factory=dict)
    arch: str | None = None
    state_key: str | None = None
    prefix: str | None = None
    method: str | None = None
    name: str | None = None
    allow_partial_load: bool = False
    resume: bool = True  # engines with checkpoints (segmentation) continue a trial's last checkpoint
    device: str = "auto"
    num_gpus: int = 1
    workers: int = min(4, os.cpu_count() or 1)
    cache_dir: str = str(CACHE_ROOT / "features")


def pick_device(name: str) -> torch.device:
    """The device for this process: `name`, or under torchrun/auto the local rank's GPU (else the CPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def init_distributed(device: torch.device) -> int:
    """Join the torchrun process group when launched by torchrun (nccl on GPUs, gloo on CPU); returns rank."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank() if dist.is_initialized() else 0


def check_backbone_fits(spec: BenchmarkSpec, family: str, path: str) -> None:
    if family not in spec.accepts:
        from benchmarks.spec import load_specs

        fits = [s.name for s in load_specs().values() if family in s.accepts]
        raise SpecError(f"{path}: a {family} backbone does not fit {spec.name} (accepts {', '.join(spec.accepts)}); "
                        f"benchmarks that accept it: {', '.join(fits) or 'none yet'}")


def run_benchmark(opts: RunOptions, log=print) -> list[Path]:
    """Run every trial of one benchmark on one backbone; returns the written record paths."""
    spec = get_spec(opts.benchmark)
    device = pick_device(opts.device)
    rank = init_distributed(device) if spec.task != "detection" else 0  # detection launches its own workers
    if rank > 0:
        log = lambda *a, **k: None  # noqa: E731  (rank 0 logs and writes the records)
    mode = opts.mode or spec.default_mode
    cfg, overrides = resolve(spec, opts.recipe, opts.budget, opts.overrides)
    # ViT/ConvViT position embeddings follow the recipe's crop (resampled, noted in the audit), as in MAE's probes
    img_size = cfg.get("crop_size") if spec.task == "linear" else None
    backbone, report = load_backbone(opts.backbone, arch=opts.arch, method=opts.method,
                                     allow_partial=opts.allow_partial_load, state_key=opts.state_key,
                                     prefix=opts.prefix, img_size=img_size)
    check_backbone_fits(spec, backbone.family, opts.backbone)
    family_recipe = spec.extra.get("family_recipes", {}).get(backbone.family)
    if opts.recipe is None and family_recipe and family_recipe != cfg["name"]:  # e.g. ade20k: r50 / vit-b / convvit-b
        cfg, overrides = resolve(spec, family_recipe, opts.budget, opts.overrides)
    log(report.summary())
    engine = load_engine(spec.task)
    trials = opts.trials or spec.trials
    prov = backbone.artifact_meta["provenance"]
    backbone_info = {"name": opts.name or Path(opts.backbone).name.split(".")[0],
                     "hash": backbone.artifact_meta["weights_hash"], "path": str(Path(opts.backbone).resolve()),
                     "arch": backbone.arch, "method": prov.get("method", "external"), "epochs": prov.get("epochs")}
    written = []
    for trial in range(opts.first_trial, opts.first_trial + trials):
        seed = opts.seed + trial
        t0 = time.perf_counter()
        result, engine_cfg = engine(spec, backbone, cfg, mode, seed, device, opts)
        check_finite_metrics(result["metrics"], spec.name, trial)
        timings = {**result.get("timings", {}), "total_s": time.perf_counter() - t0}
        config = {"benchmark": spec.name, "task": spec.task, "dataset": spec.dataset, "recipe": cfg,
                  "mode": mode, "engine": engine_cfg, "data_root": str(Path(opts.data_root).resolve()),
                  "device": str(device), "world_size": int(os.environ.get("WORLD_SIZE", opts.num_gpus)),
                  "workers": opts.workers, "seed": seed, "budget": opts.budget,
                  "backbone": {**backbone_info, "preprocessing": backbone.artifact_meta["preprocessing"],
                               "arch_kwargs": backbone.artifact_meta["arch_kwargs"], "provenance": prov,
                               "load_audit": report.to_dict()},
                  "command": sys.argv}
        record = new_record(benchmark=spec.name, task=spec.task, recipe=cfg["name"], engine=engine_cfg["name"],
                            mode=mode, backbone=backbone_info, trial=trial, seed=seed, metrics=result["metrics"],
                            config=config, overrides=overrides, allow_partial_load=opts.allow_partial_load,
                            timings=timings, extra=result.get("extra"))
        if rank > 0:
            continue
        path = write_record(opts.out, record)
        written.append(path)
        shown = "  ".join(f"{k}={v:.2f}" for k, v in result["metrics"].items())
        log(f"[{spec.name} {cfg['name']} {mode} trial {trial}] {shown}  ({timings['total_s']:.1f}s) -> {path}")
    return written


def check_finite_metrics(metrics: dict, benchmark: str, trial: int) -> None:
    """A NaN/inf metric (a diverged engine) never becomes a record."""
    bad = {k: v for k, v in metrics.items() if not (isinstance(v, (int, float)) and abs(v) < float("inf"))}
    if bad:
        raise FloatingPointError(f"{benchmark} trial {trial}: non-finite metrics {bad}; no record written. Lower the "
                                 "LR (--lr) or check the backbone")


def run_linear(spec: BenchmarkSpec, backbone, cfg: dict, mode: str, seed: int, device, opts: RunOptions):
    """Engine `torch-linear`: the linear-probe benchmarks (transfer/linear.py)."""
    from transfer.datasets import check_layout, load_classification
    from transfer import linear

    check_layout(spec.dataset, opts.data_root)
    train = load_classification(spec.dataset, opts.data_root, "train")
    val = load_classification(spec.dataset, opts.data_root, "val")
    engine_cfg = {"name": "torch-linear", "head": "bn+linear" if backbone.family == "resnet" else "bn(no affine)+linear",
                  "features": linear.feature_description(backbone, cfg),
                  "num_classes": val.num_classes, "train_images": len(train.samples),
                  "val_images": len(val.samples), "evaluation": "after the last epoch"}
    if mode == "protocol":
        return linear.run_protocol(backbone, train, val, cfg, seed, device, opts.workers), engine_cfg
    if mode == "cached":
        cached = spec.extra["cached"]
        engine_cfg["cached"] = cached
        return linear.run_cached(backbone, train, val, cfg, cached, seed, device, opts.workers,
                                 Path(opts.cache_dir)), engine_cfg
    raise SpecError(f"benchmark {spec.name} has no mode {mode!r}; modes: protocol, cached")


# task -> "module:function"; each engine is imported only when a benchmark of its task runs, and is called as
# engine(spec, backbone, cfg, mode, seed, device, opts) -> (result {"metrics", "timings"?, "extra"?}, engine_cfg {"name", ...})
ENGINES = {"linear": "benchmarks.runner:run_linear",
           "detection": "transfer.detection:run_detection",
           "segmentation": "transfer.segmentation:run_segmentation"}


def load_engine(task: str):
    """The engine function for a benchmark task (imported lazily: detection and mmseg stacks are heavy)."""
    module, name = ENGINES[task].split(":")
    return getattr(importlib.import_module(module), name)
