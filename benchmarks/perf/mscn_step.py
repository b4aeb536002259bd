"""Time share of MSCN's high-pass filter + masking in one pretraining step, and images/s.

    python benchmarks/perf/mscn_step.py [--config mscn-cpu-tiny] [--steps 5] [key=value ...]

Builds the configured model and optimiser, feeds random uint8 views (data loading excluded), and reports the
median time of: a full training step (prepare + forward + backward + LARS step), the high-pass filter alone,
the masks + noise alone, over all views of the batch. Runs on CUDA when available (synchronised timings).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from pretrain import common  # noqa: E402
from transfer.artifact import high_pass  # noqa: E402


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats + 1):  # first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="mscn")
    parser.add_argument("--config", default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = common.load_config(args.method, args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = common.method_module(args.method).build_model(cfg).to(device)
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt, sched = common.build_optimizer(model, cfg, steps_per_epoch=10 ** 6)
    autocast = common.autocast_for(device, cfg["precision"])
    b, s = cfg["batch_size"], cfg["img_size"]
    views = [torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device).contiguous(memory_format=fmt)
             for _ in range(cfg["num_views"])]
    normalised = [((v.float() / 255) - model.mean) / model.std for v in views]
    sigma = cfg["highpass_sigma"]

    step = timed(lambda: common.train_step(model, views, opt, sched, None, autocast), device, args.steps)
    hpf = timed(lambda: [high_pass(x, sigma) for x in normalised], device, args.steps) if sigma else 0.0
    filtered = [high_pass(x, sigma) if sigma else x for x in normalised]
    branches = [torch.cat(filtered[br::2]) for br in (0, 1)]
    mask = timed(lambda: [model.mask(x, br) for br, x in enumerate(branches)], device, args.steps)
    share = (hpf + mask) / step
    print(f"{args.method} [{cfg['config_name']}] on {device} ({torch.get_num_threads()} threads): {cfg['arch']} "
          f"width {cfg['width']}, {s} px, batch {b} x {cfg['num_views']} views")
    views_s = b * cfg["num_views"] / step
    print(f"  train step        {step * 1000:8.1f} ms   ({b / step:.1f} images/s, {views_s:.1f} views/s)")
    print(f"  high-pass filter  {hpf * 1000:8.1f} ms   ({100 * hpf / step:.1f}% of the step)")
    print(f"  masks + noise     {mask * 1000:8.1f} ms   ({100 * mask / step:.1f}% of the step)")
    print(f"  masking + high-pass share of the step: {100 * share:.1f}% (target <= 5%)")


if __name__ == "__main__":
    main()
