"""Pretrain a backbone: `python pretrain/run.py METHOD [--config NAME|FILE] [--data DIR] [--resume] [key=value ...]`.

Methods are modules of this package (`mscn`, ...); configs live in pretrain/configs/ (`<method>-cpu-tiny`,
`<method>-imagenet`, ...). Multi-GPU: `torchrun --nproc_per_node N pretrain/run.py METHOD ...`. The run writes
`runs/pretrain/<config>/` (or `output_dir=...`): config.yaml, log.jsonl (one line per step), checkpoint.pth and
the exported backbone artifact backbone.safetensors (for `bench run --backbone`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any directory

from pretrain.common import load_config, method_module, train  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pretrain/run.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="pretraining method (module of pretrain/), e.g. mscn")
    parser.add_argument("--config", help="config name in pretrain/configs/ or a YAML path (default: the method's)")
    parser.add_argument("--data", help="ImageFolder / ImageNet directory (default: the miniature data)")
    parser.add_argument("--output-dir", help="run directory (default: runs/pretrain/<config>)")
    parser.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint.pth")
    parser.add_argument("--force", action="store_true", help="start over in an --output-dir that holds a run "
                        "(its checkpoint and log.jsonl are replaced)")
    parser.add_argument("--show-masks", metavar="CKPT", help="methods with learned masks (adios): save a PNG grid "
                        "of images and their masks from a checkpoint, then exit")
    parser.add_argument("-o", "--output", default="masks.png", help="PNG written by --show-masks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, values in YAML")
    args = parser.parse_intermixed_args(argv)
    if args.show_masks:
        module = method_module(args.method)
        if not hasattr(module, "show_masks"):
            raise SystemExit(f"{args.method} learns no masks; --show-masks is for adios")
        if not Path(args.show_masks).is_file():
            raise SystemExit(f"--show-masks {args.show_masks}: no such checkpoint (a run's <output-dir>/checkpoint.pth)")
        print(module.show_masks(args.show_masks, args.output))
        return
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data={args.data}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume:
        overrides.append("resume=true")
    if args.force:
        overrides.append("force=true")
    from transfer.datasets import LayoutError, error_text

    try:
        train(load_config(args.method, args.config, overrides))
    except LayoutError as e:  # e.g. a corrupt image, re-raised from a data-loader worker
        raise SystemExit(f"pretrain/run.py: error: {error_text(e)}") from None
    except OSError as e:  # disk full: save_checkpoint removes its temp file, the last checkpoint is kept
        raise SystemExit(f"pretrain/run.py: error: {e.filename or ''} {e.strerror or e}; free space and continue "
                         "with --resume") from None


if __name__ == "__main__":
    main()
