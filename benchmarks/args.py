"""`bench run`'s arguments and the argparse types of every verb: shared by the CLI (benchmarks/cli.py) and the
sweep, which validates pass-through `bench run` arguments with the same parser (benchmarks/sweep.py)."""
from __future__ import annotations

import argparse

from transfer.datasets import CACHE_ROOT


def bounded_number(kind, low: float, inclusive: bool = True):
    """An argparse type: `kind` (int/float) >= low (or > low); argparse turns the ValueError into exit 2."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not (value >= low if inclusive else value > low) or value != value:
            raise argparse.ArgumentTypeError(f"{text} must be {'>=' if inclusive else '>'} {low}")
        return value
    parse.__name__ = kind.__name__
    return parse


positive_int, non_negative_int = bounded_number(int, 1), bounded_number(int, 0)
positive_float = bounded_number(float, 0, inclusive=False)


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N (whether this machine has it is checked by `bench run` itself: a sweep may
    parse run arguments on a login node without GPUs)."""
    import re

    if text not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: one of auto, cpu, cuda, cuda:N")
    return text


def add_layout_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="architecture, when it cannot be inferred from the checkpoint")
    p.add_argument("--state-key", help="dotted path of the entry holding the weights (default: automatic)")
    p.add_argument("--prefix", help="key prefix of the trunk weights (default: detected layout)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `bench run`."""
    p.add_argument("benchmark", help="benchmark name (see `bench list`)")
    p.add_argument("--backbone", required=True, help="backbone artifact or checkpoint file")
    p.add_argument("--data-root", required=True, help="folder holding the datasets in their real layouts")
    p.add_argument("--recipe", help="recipe id (default: the benchmark's default)")
    p.add_argument("--mode", choices=["cached", "protocol"], help="linear probes: cached (default) or protocol")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="segmentation: start over instead of resuming from the work dir's last checkpoint")
    p.add_argument("--trials", type=positive_int, help="number of trials (seeds seed..seed+N-1)")
    p.add_argument("--first-trial", type=non_negative_int, default=0, help="index of the first trial (seed = seed + index)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", default="results", help="results folder (default ./results)")
    p.add_argument("--budget", help="non-protocol preset for CPU/miniature runs, e.g. tiny (recorded)")
    p.add_argument("--epochs", type=positive_int, help="override the recipe's epochs (recorded as non-protocol)")
    p.add_argument("--max-iter", type=positive_int,
                   help="detection/segmentation: override the training iterations (steps and warm-up scale with it; "
                        "non-protocol)")
    p.add_argument("--batch-size", type=positive_int, help="override the global batch size: the recipe's linear-scaling rule scales the LR and, for "
                        "iteration schedules, iterations / steps / warm-up inversely (recorded, non-protocol)")
    p.add_argument("--crop-size", type=positive_int, help="override the crop size (recorded)")
    p.add_argument("--resize-size", type=positive_int, help="override the test resize (recorded)")
    p.add_argument("--lr", type=positive_float, help="override the LR (linear probes: at the recipe's lr_batch; recorded, non-protocol)")
    add_layout_options(p)
    p.add_argument("--method", help="method label for the leaderboard (default: from the artifact)")
    p.add_argument("--name", help="backbone name for the leaderboard (default: file name)")
    p.add_argument("--allow-partial-load", action="store_true",
                   help="accept a checkpoint that leaves trunk weights uninitialised (recorded, non-protocol)")
    p.add_argument("--device", default="auto", type=device_name, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--gpus", type=positive_int, default=1,
                   help="processes (one per GPU): torchrun for linear probes and mmseg, the detection engine's own "
                        "launcher for detection; on a CPU-only machine N gloo processes. The global batch is kept (batch / N per GPU); "
                        "where memory forbids it, add --batch-size (linear-scaling rule)")
    p.add_argument("--workers", type=non_negative_int, help="data-loading workers (default min(4, cores))")
    p.add_argument("--cache-dir", default=str(CACHE_ROOT / "features"), help="feature cache for --mode cached")


def run_parser() -> argparse.ArgumentParser:
    """`bench run`'s parser on its own (the sweep parses pass-through run arguments with it)."""
    p = argparse.ArgumentParser(prog="bench run")
    add_run_arguments(p)
    return p
