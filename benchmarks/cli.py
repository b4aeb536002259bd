"""The `bench` command: list, run, report, data, backbone, inspect."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks.args import (add_layout_options, add_run_arguments, bounded_number, non_negative_int, positive_float,
                             positive_int)


def check_device(text: str) -> None:
    """Exit 2 (a usage error), before any work, when --device names CUDA this machine does not have."""
    if not text.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(text.split(":")[1]) if ":" in text else 0
    if index >= count:
        have = "CUDA is not available on this machine" if not count else f"this machine has {count} CUDA device(s)"
        print(f"bench run: error: argument --device: {text}: {have}; use --device cpu or auto", file=sys.stderr)
        sys.exit(2)


def cmd_list(args) -> None:
    from benchmarks.spec import load_specs

    for spec in load_specs().values():
        print(f"{spec.name:<12} {spec.task:<13} dataset={spec.dataset:<10} recipes={','.join(spec.recipes)} "
              f"(default {spec.default_recipe})  metrics={','.join(spec.metrics)}  "
              f"backbones={','.join(spec.accepts)}  engines={','.join(spec.engines)}  "
              f"budgets={','.join(spec.budgets) or '-'}\n{'':<13}{spec.description}")


def cmd_run(args) -> None:
    from benchmarks.runner import RunOptions, run_benchmark
    from benchmarks.spec import get_spec

    check_device(args.device)
    if args.gpus > 1 and "WORLD_SIZE" not in os.environ and get_spec(args.benchmark).task != "detection":
        relaunch_under_torchrun(args.gpus)

    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "crop_size": args.crop_size,
                 "resize_size": args.resize_size, "lr": args.lr, "max_iter": args.max_iter}
    opts = RunOptions(benchmark=args.benchmark, backbone=args.backbone, data_root=args.data_root,
                      recipe=args.recipe, mode=args.mode, trials=args.trials, first_trial=args.first_trial,
                      seed=args.seed, out=args.out,
                      budget=args.budget, overrides=overrides, arch=args.arch, method=args.method, name=args.name,
                      allow_partial_load=args.allow_partial_load, device=args.device, cache_dir=args.cache_dir,
                      state_key=args.state_key, prefix=args.prefix, num_gpus=args.gpus, resume=args.resume,
                      **({"workers": args.workers} if args.workers is not None else {}))
    run_benchmark(opts)


def relaunch_under_torchrun(nproc: int) -> None:
    """Re-run this `bench run` command as `torchrun --nproc-per-node N` (one process per GPU, or gloo
    processes on a CPU-only machine) and exit with its status."""
    import subprocess

    argv = sys.argv[1:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "benchmarks.cli", *argv]
    print(f"bench run: launching {nproc} processes: {' '.join(cmd)}", flush=True)
    sys.exit(subprocess.call(cmd))


def cmd_sweep(args) -> None:
    from benchmarks.sweep import SweepConfig, sweep

    cfg = SweepConfig(backbones=args.backbones, benchmarks=args.benchmarks, trials=args.trials,
                      data_root=str(Path(args.data_root).resolve()), out=str(Path(args.out).resolve()),
                      run_args=args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args,
                      recipe=args.recipe, mode=args.mode, budget=args.budget, seed=args.seed)
    slurm = {"partition": args.partition, "time_min": args.time, "gpus": args.gpus, "constraint": args.constraint,
             "cluster": args.cluster}
    outcome = sweep(cfg, launcher=args.launcher, slurm=slurm)
    if outcome.get("failed"):
        sys.exit(f"bench sweep: {outcome['failed']} cells failed; see `bench status --out {args.out}`")


def cmd_status(args) -> None:
    from benchmarks.sweep import status

    grid = Path(args.out) / ".sweep" / "grid.json"
    if not grid.is_file():
        sys.exit(f"bench status: {args.out} holds no sweep (no {grid}); pass the --out of a `bench sweep`")
    rows = status(args.out)
    for cell, state, detail in rows:
        print(f"{state:<8} {cell}  {detail}")
    counts = {s: sum(r[1] == s for r in rows) for s in ("done", "running", "failed", "missing")}
    print("  ".join(f"{k}={v}" for k, v in counts.items()))


def cmd_report(args) -> None:
    from benchmarks.spec import load_specs
    from leaderboard.render import render_report

    if args.format in ("html", "png") and not args.output:
        sys.exit(f"bench report --format {args.format} writes files: add -o DIR (e.g. -o report)")
    if args.output and args.format not in ("html", "png"):
        sys.exit(f"bench report: -o is for --format html|png; --format {args.format} prints to stdout")
    if not Path(args.results).is_dir():
        sys.exit(f"bench report: no results folder {args.results}; pass the --out of `bench run` / `bench sweep`")
    metric_order = {name: list(spec.metrics) for name, spec in load_specs().items()}
    print(render_report(args.results, fmt=args.format, references=not args.no_references, out_dir=args.output,
                        metric_order=metric_order))


def cmd_data_mini(args) -> None:
    from transfer.minidata import make_mini

    check_mini_root(Path(args.root), args.force)
    summary = make_mini(args.root, seed=args.seed, scale=args.scale, image_size=args.image_size)
    for dataset, splits in summary.items():
        print(f"{dataset:<10} " + "  ".join(f"{s}={n}" for s, n in splits.items()))
    print(f"miniature datasets written under {Path(args.root).resolve()}")


def cmd_data_check(args) -> None:
    from benchmarks.datacheck import check, report

    quick = args.sample if args.quick else None
    problems, listed = check(args.data_root, args.benchmarks, quick=quick, workers=args.workers,
                             full=args.full_decode)
    print(report(problems, listed, args.data_root, quick))
    if problems:
        sys.exit(1)


def check_mini_root(root: Path, force: bool) -> None:
    """`bench data mini` writes only into an empty folder or one it wrote itself (its marker), unless --force."""
    if force or not root.exists() or (root / ".bench-mini.json").is_file():
        return
    if not root.is_dir():
        sys.exit(f"bench data: error: --root {root} is a file, not a folder")
    if any(root.iterdir()):
        sys.exit(f"bench data: error: --root {root} is not empty and was not written by `bench data mini` (no "
                 ".bench-mini.json); its files could be overwritten. Choose an empty folder, or add --force")


def cmd_backbone_random(args) -> None:
    from transfer.artifact import check_arch, random_artifact, save_artifact

    check_arch(args.arch)
    kwargs = {"width": args.width} if args.width else {}
    art = random_artifact(args.arch, seed=args.seed, **kwargs)
    print(f"{save_artifact(args.output, art)}: random-init {args.arch} {kwargs or ''} {art.hash}")


def cmd_backbone_convert(args) -> None:
    from transfer.artifact import save_artifact
    from transfer.loading import to_artifact

    art, report = to_artifact(args.file, arch=args.arch, method=args.method, allow_partial=args.allow_partial_load,
                              state_key=args.state_key, prefix=args.prefix)
    if args.highpass_sigma is not None:
        art.preprocessing.highpass_sigma = args.highpass_sigma
    if not report.ok:
        art.provenance["partial_load"] = report.to_dict()
    print(report.summary())
    print(f"{save_artifact(args.output, art)}: {art.arch} {art.hash}")


def cmd_inspect(args) -> None:
    from transfer.loading import to_artifact

    art, report = to_artifact(args.file, arch=args.arch, allow_partial=True, state_key=args.state_key,
                              prefix=args.prefix)
    params = sum(v.numel() for k, v in art.state_dict.items() if "running_" not in k and "num_batches" not in k)
    print(f"format: {report.format}\narch: {art.arch} {art.arch_kwargs or ''}\nparameters: {params / 1e6:.2f}M\n"
          f"preprocessing: {art.preprocessing.to_dict()}\nprovenance: {art.provenance}\nweights: {art.hash}")
    print(report.summary(max_keys=20))
    print("audit: OK" if report.ok else "audit: REFUSED for `bench run` (missing, mis-shaped or unplaceable trunk weights)")
    if not report.ok:
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description="Transfer evaluation of self-supervised backbones.")
    sub = p.add_subparsers(dest="verb", required=True)

    sub.add_parser("list", help="benchmarks with task, dataset, recipes, metrics, accepted backbones"
                   ).set_defaults(fn=cmd_list)

    r = sub.add_parser("run", help="run a benchmark on a backbone; writes one result record per trial")
    add_run_arguments(r)
    r.set_defaults(fn=cmd_run)

    sw = sub.add_parser("sweep", help="run backbones x benchmarks x trials; skips cells whose records exist")
    sw.add_argument("--backbones", nargs="+", required=True)
    sw.add_argument("--benchmarks", nargs="+", required=True)
    sw.add_argument("--trials", type=positive_int, default=1)
    sw.add_argument("--data-root", required=True)
    sw.add_argument("--out", default="results")
    sw.add_argument("--recipe")
    sw.add_argument("--mode", choices=["cached", "protocol"])
    sw.add_argument("--budget")
    sw.add_argument("--seed", type=non_negative_int, default=0)
    sw.add_argument("--launcher", choices=["local", "slurm"], default="local",
                    help="local: one cell after another here; slurm: one submitit job array")
    sw.add_argument("--partition", help="SLURM partition")
    sw.add_argument("--time", type=positive_int, default=240, help="SLURM time limit per cell, minutes")
    sw.add_argument("--gpus", type=positive_int, default=1, help="GPUs per cell")
    sw.add_argument("--constraint", help="SLURM constraint")
    sw.add_argument("--cluster", help="submitit cluster override: slurm, local or debug")
    sw.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: extra `bench run` arguments")
    sw.set_defaults(fn=cmd_sweep)

    st = sub.add_parser("status", help="done / running / failed (with log) / missing cells of a sweep")
    st.add_argument("--out", default="results")
    st.set_defaults(fn=cmd_status)

    rep = sub.add_parser("report", help="leaderboard tables: measured rows (mean ± std) beside published rows")
    rep.add_argument("--results", default="results", help="results folder (default ./results)")
    rep.add_argument("--format", choices=["markdown", "csv", "json", "html", "png"], default="markdown",
                     help="markdown/csv/json print to stdout; html writes DIR/index.html (one self-contained page: "
                          "tables, charts, runs), png one chart per benchmark into DIR")
    rep.add_argument("-o", "--output", metavar="DIR", help="folder for --format html|png")
    rep.add_argument("--no-references", action="store_true", help="hide the published reference rows")
    rep.set_defaults(fn=cmd_report)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_verb", required=True)
    mini = data.add_parser("mini", help="write the miniature datasets in the real layouts (deterministic)")
    mini.add_argument("--root", required=True)
    mini.add_argument("--seed", type=non_negative_int, default=0)
    mini.add_argument("--scale", type=positive_float, default=1.0, help="multiply the number of images per set")
    mini.add_argument("--image-size", type=bounded_number(int, 16), default=96, help="base image size in pixels")
    mini.add_argument("--force", action="store_true",
                      help="write into a non-empty --root that `bench data mini` did not create (files may be replaced)")
    mini.set_defaults(fn=cmd_data_mini)
    chk = data.add_parser("check", help="verify real (or miniature) datasets: published split sizes, class lists, "
                          "missing / unreadable / truncated images; exits 1 with a summary if anything is wrong")
    chk.add_argument("--data-root", required=True)
    chk.add_argument("benchmarks", nargs="*", help="benchmarks or datasets (voc, coco, lvis, ade20k, inat18, "
                     "places205, imagenet); default: every benchmark's dataset")
    chk.add_argument("--quick", action="store_true", help="open only --sample randomly drawn files per split")
    chk.add_argument("--sample", type=positive_int, default=1000, metavar="N", help="files per split under --quick (1000)")
    chk.add_argument("--workers", type=positive_int, help="parallel file readers (default 4 x cores, at most 32)")
    chk.add_argument("--full-decode", action="store_true", help="decode every image, not just header and end marker")
    chk.set_defaults(fn=cmd_data_check)

    bb = sub.add_parser("backbone", help="backbone artifacts").add_subparsers(dest="backbone_verb", required=True)
    rnd = bb.add_parser("random", help="write a random-init artifact (the random-init reference row)")
    rnd.add_argument("--arch", required=True,
                     help="resnet18/34/50/101/152, vit_{tiny,small,base,large}_patch16, convvit_{tiny,base}")
    rnd.add_argument("--width", type=positive_int, help="ResNet stem width (64 = standard; smaller = slim CPU variant)")
    rnd.add_argument("--seed", type=non_negative_int, default=0)
    rnd.add_argument("-o", "--output", required=True)
    rnd.set_defaults(fn=cmd_backbone_random)

    conv = bb.add_parser("convert", help="audit any supported checkpoint and write it as a bench artifact")
    conv.add_argument("file")
    conv.add_argument("-o", "--output", required=True)
    conv.add_argument("--method", help="method label recorded in the artifact (e.g. moco-v2)")
    conv.add_argument("--highpass-sigma", type=float, help="MSCN high-pass sigma the backbone needs at test time")
    conv.add_argument("--allow-partial-load", action="store_true", help="write even if trunk tensors are missing")
    add_layout_options(conv)
    conv.set_defaults(fn=cmd_backbone_convert)

    ins = sub.add_parser("inspect", help="detected format, architecture and load audit of a checkpoint")
    ins.add_argument("file")
    add_layout_options(ins)
    ins.set_defaults(fn=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from transfer.artifact import ArtifactError
    from benchmarks.spec import SpecError

    try:
        args.fn(args)
    except (ArtifactError, SpecError, FloatingPointError) as e:
        sys.exit(f"bench {args.verb}: error: {e}")
    except OSError as e:  # disk full, permissions, a vanished file: the writers remove their own temp files
        sys.exit(f"bench {args.verb}: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}; "
                 "free space or fix permissions and rerun (finished results are kept, unfinished ones redone)")
    except Exception as e:
        from transfer.datasets import LayoutError, error_text

        if isinstance(e, LayoutError):
            sys.exit(f"bench {args.verb}: error: {error_text(e)}")
        raise


if __name__ == "__main__":
    main()
