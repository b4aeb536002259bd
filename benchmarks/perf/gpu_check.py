"""One-shot acceptance check of every CUDA path, for the first minutes on a GPU machine (H100/H200, < 8 minutes).

    python benchmarks/perf/gpu_check.py [--json gpu_check.json] [--stages pretrain,linear,detection,segmentation,ddp]
                                        [--budget-s 470] [--peak-tflops X] [--cpu-tiny]

Needs only the repository and `make install` (no data: synthetic JPEGs and a small miniature tree are written to a
temp dir). Stages, each in its own subprocess with its own time limit, so a crash, hang or OOM in one does not stop
the rest:

- pretrain:<config>  a few bf16 training steps of each method at its paper config's per-GPU batch (synthetic JPEGs
  through the method's real augmentation): step time, images/s, achieved TFLOP/s (torch.utils.flop_counter over
  one step: forward + backward) and its share of the GPU's dense bf16 peak, peak memory. A batch that does not fit
  is halved (and says so).
- linear             the linear probe's feature extraction (ResNet-50, ViT-B/16; 224 px centre crops from
                     JPEGs through the DataLoader) against the trunk alone on a resident batch: images/s of both and
                     which one bounds it (data loading or the GPU).
- detection          R50-C4 on VOC07+12 (`bench run voc07+12`): s/iter at the recipe's 2 images per GPU, real
                     image sizes (miniature images resized to the recipe's 480-800 px short side).
- segmentation       ADE20K UperNet R50 (`bench run ade20k`, mmseg): s/iter at 4 images per GPU, 512 px crops.
- ddp                with 2+ GPUs (or in --cpu-tiny when asked for): torchrun with 2 processes vs 1 for MSCN
                     pretraining steps (max weight difference) and the inat18 linear probe (top-1 of both).

Prints one table and writes JSON (`--json`). `--cpu-tiny` (automatic without CUDA) runs the same stages at tiny
sizes on CPU, so the script is tested in CI before any GPU is lent.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# Each pretraining config's paper setting: (global batch in the config) / (GPUs of the paper run) = per-GPU batch.
PAPER_GPUS = {
    "mscn-imagenet": 8,        # config header: torchrun --nproc_per_node 8, batch 4096 -> 512 per GPU
    "mscn-byol-imagenet": 8,   # same launch as mscn-imagenet
    "adios-imagenet100": 1,    # ADIOS reference: batch 128 on one GPU
    "convmae-imagenet": 24,    # ConvMAE PRETRAIN.md: 3 nodes x 8 GPUs x 128 per GPU = 3072
    "siameseim-imagenet": 32,  # SiameseIM: 32 GPUs x 128
}
TINY_CONFIGS = {"mscn-imagenet": "mscn-cpu-tiny", "mscn-byol-imagenet": "mscn-byol-cpu-tiny",
                "adios-imagenet100": "adios-cpu-tiny", "convmae-imagenet": "convmae-cpu-tiny",
                "siameseim-imagenet": "siameseim-cpu-tiny"}
# Dense bf16 tensor-core peak, TFLOP/s (NVIDIA H100/H200 and A100 datasheets; the sparse figures are twice these).
BF16_PEAK = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("A100", 312.0),
             ("L40S", 362.0))
STAGE_LIMITS = {"pretrain": 40, "linear": 40, "detection": 70, "segmentation": 70, "ddp": 90}  # sum 470 s


# ----------------------------------------------------------------------------------------------- helpers
def device_and_tiny(tiny: bool):
    import torch

    cuda = torch.cuda.is_available() and not tiny
    return torch.device("cuda" if cuda else "cpu"), not cuda


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def bf16_peak(device, override: float | None) -> float | None:
    import torch

    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK if key in name), None)


def synthetic_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """n smooth random JPEGs (w, h) -- realistic decode cost, no dataset needed."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        image = coarse.resize(size, Image.BICUBIC)
        noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(noisy.astype(np.uint8)).save(path, quality=90)
        files.append(path)
    return files


def timed_steps(step, device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        tic = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - tic)
    return statistics.median(times[1:])


# ----------------------------------------------------------------------------------------------- stages
def stage_pretrain(config: str, tiny: bool, work: Path, peak_override=None, batch: int | None = None) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain import common

    device, tiny = device_and_tiny(tiny)
    method = config.split("-")[0]
    paper_batch = common.load_config(method, config)["batch_size"] // PAPER_GPUS[config]
    name = TINY_CONFIGS[config] if tiny else config
    batch = batch or (8 if tiny else paper_batch)
    cfg = common.load_config(method, name, [f"batch_size={batch}", "precision=bf16", "workers=0"])
    module = common.method_module(method)
    files = synthetic_jpegs(work / "pretrain-images", min(batch, 8 if tiny else 64),
                            (96, 80) if tiny else (500, 375))
    joint = hasattr(module, "view_transform")
    transform = module.view_transform(cfg) if joint else common.standard_augmentation(cfg)
    num_views = module.num_views(cfg) if hasattr(module, "num_views") else 2
    dataset = common.MultiViewDataset((files * math.ceil(batch / len(files)))[:batch], transform, num_views,
                                      0, cfg.get("share_view", False), joint)
    workers = 0 if tiny else min(16, os.cpu_count() or 1)
    views = next(iter(DataLoader(dataset, batch_size=batch, num_workers=workers)))
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    views = [v.to(device).contiguous(memory_format=fmt) if v.ndim == 4 else v.to(device) for v in views]
    torch.manual_seed(0)
    model = module.build_model(cfg).to(device).to(memory_format=fmt)
    optimizer, scheduler = common.build_optimizer(model, cfg, steps_per_epoch=10 ** 6, module=module)
    autocast = common.autocast_for(device, "bf16")
    step_fn = getattr(module, "train_step", common.train_step)
    step = lambda: step_fn(model, views, optimizer, scheduler, None, autocast, progress=0.5)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed_steps(step, device, 1 if tiny else 3)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    peak = bf16_peak(device, peak_override)
    tflops = flops / seconds / 1e12
    row = {"stage": f"pretrain:{config}", "config": name, "arch": cfg["arch"], "img_size": cfg["img_size"],
           "batch": batch, "paper_batch_per_gpu": paper_batch, "views": num_views, "step_s": seconds,
           "images_s": batch / seconds, "tflop_per_step": flops / 1e12, "tflops": tflops,
           "peak_share": tflops / peak if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}
    return row


def stage_pretrain_fitting(config: str, tiny: bool, work: Path, peak_override=None) -> dict:
    """stage_pretrain at the paper's per-GPU batch, halved on out-of-memory (at most twice)."""
    import torch

    batch = None
    for attempt in range(3):
        try:
            row = stage_pretrain(config, tiny, work, peak_override, batch)
            if attempt:
                row["note"] = f"OOM at the paper batch {row['paper_batch_per_gpu']}; ran {row['batch']}"
            return row
        except torch.OutOfMemoryError:
            from pretrain import common

            paper = common.load_config(config.split("-")[0], config)["batch_size"] // PAPER_GPUS[config]
            batch = (batch or paper) // 2
        gc.collect()  # outside the except block: the traceback (and the failed step's tensors) is gone
        torch.cuda.empty_cache()
    raise RuntimeError(f"out of memory down to batch {batch * 2}")


def stage_linear(tiny: bool, work: Path) -> list[dict]:
    import torch

    from transfer.artifact import Backbone, build_backbone, random_artifact
    from transfer.linear import extract_features, test_transform, trunk_features

    device, tiny = device_and_tiny(tiny)
    n, batch = (8, 4) if tiny else (1024, 256)
    crop, resize = (64, 73) if tiny else (224, 256)
    workers = 0 if tiny else min(10, os.cpu_count() or 1)
    files = synthetic_jpegs(work / "linear-images", min(n, 128), (96, 80) if tiny else (500, 375))
    samples = [(files[i % len(files)], 0) for i in range(n)]
    rows = []
    for arch, kwargs in (("resnet50", {"width": 16} if tiny else {}), ("vit_base_patch16", {"img_size": crop})):
        if tiny and arch.startswith("vit"):
            arch, kwargs = "vit_tiny_patch16", {"img_size": crop}
        backbone = Backbone(random_artifact(arch, **kwargs), build_backbone(arch, **kwargs)).eval().to(device)
        transform = test_transform(resize, crop)
        extract_features(backbone, samples[:batch], transform, device, batch, 0, "warm-up")
        synchronize(device)
        tic = time.perf_counter()
        extract_features(backbone, samples, transform, device, batch, workers, "extract")
        synchronize(device)
        end_to_end = n / (time.perf_counter() - tic)
        images = torch.rand(batch, 3, crop, crop)
        gpu = batch / timed_steps(lambda: trunk_features(backbone, images, device), device, 2 if tiny else 5)
        rows.append({"stage": "linear", "arch": arch, "batch": batch, "workers": workers, "crop": crop,
                     "images_s": end_to_end, "trunk_images_s": gpu,
                     "bound": "data loading" if end_to_end < 0.85 * gpu else "GPU"})
    return rows


def _mini_root(work: Path, datasets) -> Path:
    from transfer.minidata import make_mini

    root = work / "mini"
    make_mini(root, seed=0, scale=0.05, datasets=datasets)
    return root


def stage_bench_run(stage: str, benchmark: str, tiny: bool, work: Path) -> dict:
    """A few training iterations of `bench run` (detection / segmentation) on a random-init slim or full R50."""
    from benchmarks.runner import RunOptions, run_benchmark
    from benchmarks.spec import get_spec
    from transfer.artifact import random_artifact, save_artifact

    device, tiny = device_and_tiny(tiny)
    dataset = get_spec(benchmark).dataset
    root = _mini_root(work, [dataset])
    backbone = save_artifact(work / f"r50-{benchmark}.safetensors",
                             random_artifact("resnet50", **({"width": 16} if tiny else {})))
    iters_key = "max_iters" if benchmark == "ade20k" else "max_iter"
    overrides = {iters_key: 3 if tiny else 20}
    if benchmark != "ade20k":
        overrides["precise_bn_iters"] = 1 if tiny else 2
    if not tiny:  # the recipe's images per GPU: detection 16 over 8 GPUs, mmseg R50 16 over 4 GPUs
        overrides["batch_size"] = 4 if benchmark == "ade20k" else 2
    opts = RunOptions(benchmark=benchmark, backbone=str(backbone), data_root=str(root), out=str(work / "results"),
                      trials=1,
                      budget="tiny" if tiny else None, overrides=overrides, workers=0 if tiny else 4,
                      recipe="r50" if benchmark == "ade20k" else None, device=str(device), name=f"gpu-check-{benchmark}")
    tic = time.perf_counter()
    [record_path] = run_benchmark(opts, log=lambda *a, **k: None)
    record = json.loads(Path(record_path).read_text())
    iterations = record["extra"].get("iterations") or overrides[iters_key]
    return {"stage": stage, "benchmark": benchmark,
            "engine": record.get("engine"), "iterations": iterations,
            "batch": overrides.get("batch_size", "tiny"), "s_iter": record["timings"]["train_s"] / max(iterations, 1),
            "wall_s": time.perf_counter() - tic}


# ----------------------------------------------------------------------------------------------- DDP equality
def ddp_worker(out: str, tiny: bool, steps: int = 2) -> None:
    """Run under torchrun (or alone): MSCN steps on fixed uint8 views, global batch split over the processes."""
    import torch

    from pretrain import common

    device, rank, world = common.setup_distributed()
    if tiny:
        device = torch.device("cpu")
    # masks off (each rank draws its own by design); a small LR (tests/test_pretrain.py's DDP test: large steps on
    # 4-image BN batches amplify float rounding); fp32 with TF32 off, so only the reduction order differs
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    tiny_model = ["arch=resnet18", "width=8", "img_size=32", "proj_hidden=32", "proj_out=16", "highpass_sigma=1.0"]
    global_batch, size = (8, 32) if tiny else (64, 224)
    cfg = common.load_config("mscn", "mscn-cpu-tiny" if tiny else "mscn-imagenet",
                             ["mask_prob=0", "lr=0.05", f"lr_batch={global_batch}", f"batch_size={global_batch}",
                              "precision=fp32", *(tiny_model if tiny else [])])
    torch.manual_seed(0)
    model = common.method_module("mscn").build_model(cfg).to(device).to(memory_format=torch.channels_last)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(common.sync_batchnorm(model, device),
                                                          device_ids=[device.index] if device.type == "cuda" else None)
    optimizer, scheduler = common.build_optimizer(common.unwrap(model), cfg, steps_per_epoch=4)
    per = global_batch // world
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        views = [torch.randint(0, 256, (global_batch, 3, size, size), generator=g, dtype=torch.uint8)
                 for _ in range(common.method_module("mscn").num_views(cfg))]
        views = [v[rank * per:(rank + 1) * per].to(device).contiguous(memory_format=torch.channels_last)
                 for v in views]
        common.train_step(model, views, optimizer, scheduler, progress=(s + 1) / 8)
    if rank == 0:
        torch.save({k: v.cpu() for k, v in common.unwrap(model).state_dict().items()}, out)
    if world > 1:
        torch.distributed.destroy_process_group()


def stage_ddp(tiny: bool, work: Path, timeout: float) -> list[dict]:
    """torchrun 2 processes vs 1: MSCN weights after 2 steps, then the inat18 probe's top-1 (one row each)."""
    deadline = time.monotonic() + timeout
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def run(cmd):
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=REPO,
                       timeout=max(1.0, deadline - time.monotonic()))

    rows = []
    for what, part in (("mscn 2 steps, 2 processes vs 1", _ddp_pretrain), ("inat18 probe, 2 processes vs 1",
                                                                         _ddp_probe)):
        tic = time.perf_counter()
        try:
            row = {"stage": "ddp", "what": what, **part(tiny, work, run)}
            row["status"] = "ok" if row["equal"] else "mismatch"
        except Exception as e:  # noqa: BLE001 - one failing part must not hide the other
            detail = getattr(e, "stderr", None) or ""
            row = {"stage": "ddp", "what": what, "status": "failed",
                   "error": (detail.strip().splitlines()[-1:] or [repr(e)])[0][:200]}
        rows.append({**row, "wall_s": time.perf_counter() - tic})
    return rows


def _ddp_pretrain(tiny: bool, work: Path, run) -> dict:
    import torch

    tiny_flag = ["--cpu-tiny"] if tiny else []
    script = str(Path(__file__).resolve())
    run([sys.executable, script, "--ddp-worker", str(work / "one.pt"), *tiny_flag])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script,
         "--ddp-worker", str(work / "two.pt"), *tiny_flag])
    one, two = torch.load(work / "one.pt"), torch.load(work / "two.pt")
    diff = max((one[k].float() - two[k].float()).abs().max().item() for k in one if one[k].is_floating_point())
    return {"max_abs_diff": diff, "equal": diff < 1e-3}


def _ddp_probe(tiny: bool, work: Path, run) -> dict:
    from transfer.artifact import random_artifact, save_artifact

    root = _mini_root(work, ["inat18"])
    artifact = save_artifact(work / "r50-probe.safetensors", random_artifact("resnet50", width=16))
    top1 = {}
    for gpus in (1, 2):
        out = work / f"probe-{gpus}-{time.time_ns()}"
        run([sys.executable, "-m", "benchmarks.cli", "run", "inat18", "--backbone", str(artifact), "--data-root",
             str(root), "--budget", "tiny", "--epochs", "2", "--out", str(out), "--gpus", str(gpus), "--workers",
             "0", "--cache-dir", str(work / f"cache-{gpus}"), "--mode", "cached", "--trials", "1"]
            + (["--device", "cpu"] if tiny else []))
        [record] = list(out.rglob("*.json"))
        top1[gpus] = json.loads(record.read_text())["metrics"]["top1"]
    return {"top1_1": top1[1], "top1_2": top1[2], "max_abs_diff": abs(top1[1] - top1[2]),
            "equal": abs(top1[1] - top1[2]) < 0.5}


# ----------------------------------------------------------------------------------------------- driver
def run_stage(stage: str, tiny: bool, work: Path, peak: float | None, limit: float | None = None) -> list[dict]:
    if stage.startswith("pretrain:"):
        return [stage_pretrain_fitting(stage.split(":", 1)[1], tiny, work, peak)]
    if stage == "linear":
        return stage_linear(tiny, work)
    if stage == "detection":
        return [stage_bench_run(stage, "voc07+12", tiny, work)]
    if stage == "segmentation":
        return [stage_bench_run(stage, "ade20k", tiny, work)]
    if stage == "ddp":
        return stage_ddp(tiny, work, (limit or STAGE_LIMITS["ddp"]) - 5)
    raise SystemExit(f"unknown stage {stage!r}")


def expand(stages: list[str]) -> list[str]:
    out = []
    for stage in stages:
        if stage == "pretrain":
            out += [f"pretrain:{c}" for c in PAPER_GPUS]
        elif stage.startswith("pretrain:") and stage.split(":", 1)[1] not in PAPER_GPUS:
            matches = [c for c in PAPER_GPUS if c.startswith(stage.split(":", 1)[1])]
            out += [f"pretrain:{matches[0]}"] if matches else [stage]
        else:
            out.append(stage)
    return out


def launch(stage: str, tiny: bool, work: Path, limit: float, peak: float | None) -> list[dict]:
    """One stage in a child process with a time limit; failures become rows, never exceptions."""
    result = work / f"{stage.replace(':', '_')}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-stage", stage, "--work", str(work),
           "--result", str(result), "--stage-limit", str(limit)] + (["--cpu-tiny"] if tiny else []) + (["--peak-tflops", str(peak)] if peak else [])
    tic = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    except subprocess.TimeoutExpired:
        return [{"stage": stage, "status": "timeout", "error": f"stage limit {limit:.0f} s reached",
                 "wall_s": time.perf_counter() - tic}]
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return [{"stage": stage, "status": "failed", "error": tail[0][:200], "wall_s": time.perf_counter() - tic}]
    rows = json.loads(result.read_text())
    for row in rows:
        row.setdefault("status", "ok")
        row.setdefault("wall_s", time.perf_counter() - tic)
    return rows


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def table(rows: list[dict]) -> str:
    columns = [("stage", "stage"), ("status", "status"), ("batch", "batch"), ("step_s", "step s"),
               ("s_iter", "s/iter"), ("images_s", "img/s"), ("trunk_images_s", "trunk img/s"), ("tflops", "TFLOP/s"),
               ("peak_share", "of peak"), ("peak_mem_gib", "mem GiB"), ("bound", "bound"),
               ("max_abs_diff", "max diff"), ("equal", "equal"), ("wall_s", "wall s")]
    used = [(k, h) for k, h in columns if any(k in r for r in rows)]
    label = lambda r: " ".join(filter(None, [r["stage"], r.get("arch") if r["stage"] == "linear" else "",  # noqa: E731
                                             r.get("what", "").split(",")[0]]))
    cells = [[h for _, h in used]] + [[fmt(r.get(k)) if k != "stage" else label(r) for k, _ in used] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(used))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    notes = [f"  {label(r)}: {r.get('error') or r.get('note')}" for r in rows if r.get("error") or r.get("note")]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:] + notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default="pretrain,linear,detection,segmentation,ddp",
                   help="comma list: pretrain (all methods), pretrain:<config prefix>, linear, detection, "
                        "segmentation, ddp")
    p.add_argument("--cpu-tiny", action="store_true", help="tiny sizes on CPU (automatic without CUDA)")
    p.add_argument("--json", default="gpu_check.json", help="where to write the rows")
    p.add_argument("--budget-s", type=float, default=470, help="total time limit; stages share what is left")
    p.add_argument("--stage-limit", type=float, help="override every stage's own time limit (seconds)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak when not in the built-in table")
    p.add_argument("--work", help="scratch folder (default: a new temp dir)")
    p.add_argument("--run-stage", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--ddp-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    tiny = args.cpu_tiny or not torch.cuda.is_available()
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, tiny)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-gpu-check-"))
    if args.run_stage:
        rows = run_stage(args.run_stage, tiny, work, args.peak_tflops, args.stage_limit)
        Path(args.result).write_text(json.dumps(rows))
        return 0

    gpus = torch.cuda.device_count() if not tiny else 0
    device = torch.cuda.get_device_name(0) if not tiny else f"CPU ({torch.get_num_threads()} threads), tiny sizes"
    print(f"gpu_check on {device}; {gpus} GPU(s); torch {torch.__version__}; work dir {work}", flush=True)
    rows, start = [], time.monotonic()
    for stage in expand(args.stages.split(",")):
        if stage == "ddp" and not tiny and gpus < 2:
            rows.append({"stage": "ddp", "status": "skipped", "note": f"{gpus} GPU: needs 2+"})
            continue
        left = args.budget_s - (time.monotonic() - start)
        limit = min(args.stage_limit or STAGE_LIMITS[stage.split(":")[0]], left)
        if limit < 5:
            rows.append({"stage": stage, "status": "skipped", "note": "total budget spent"})
            continue
        new = launch(stage, tiny, work, limit, args.peak_tflops)
        for row in new:
            print(f"  {row['stage']}: {row['status']} ({row['wall_s']:.1f} s)", flush=True)
        rows += new
    print(table(rows))
    Path(args.json).write_text(json.dumps({"device": device, "gpus": gpus, "torch": torch.__version__, "tiny": tiny,
                                           "total_s": time.monotonic() - start, "rows": rows}, indent=1))
    print(f"rows -> {args.json}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
