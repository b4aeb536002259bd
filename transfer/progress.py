"""Progress of long loops: a tqdm bar on a terminal; in a file (SLURM logs, CI) a plain line every few seconds
instead of carriage-return updates."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


class PlainProgress:
    """tqdm's update / set_postfix / close / iteration, printed as `desc: n/total (rate/s) k=v` lines at most
    every `every` seconds, plus one at the end."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", initial: int = 0,
                 every: float = 10.0, file=None, unit: str = "it"):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.n, self.every, self.unit = iterable, total, desc, initial, every, unit
        self.file = file or sys.stderr
        self.postfix: dict = {}
        self.start = self.last = time.perf_counter()
        self.start_n = initial
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.every:
            self._print()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print()

    def _print(self) -> None:
        self.last = now = time.perf_counter()
        rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
        of = f"/{self.total:,}" if self.total is not None else ""
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n:,}{of} ({rate:.1f} {self.unit}/s){extra}", file=self.file, flush=True)


class _Silent(PlainProgress):
    def _print(self) -> None:
        pass


def progress(iterable=None, total: int | None = None, desc: str = "", disable: bool = False, initial: int = 0,
             every: float = 10.0, file=None, unit: str = "it", **tqdm_options):
    """A progress tracker for `iterable` (or `total` updates): tqdm on a terminal, plain lines otherwise, none
    when `disable` (e.g. ranks other than 0)."""
    stream = file or sys.stderr
    if disable:
        return _Silent(iterable, total, desc, initial, every, stream, unit)
    if stream.isatty():
        return tqdm(iterable, total=total, desc=desc, initial=initial, file=stream, unit=unit, dynamic_ncols=True,
                    **tqdm_options)
    return PlainProgress(iterable, total, desc, initial, every, stream, unit)
