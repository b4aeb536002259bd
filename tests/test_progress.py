"""Progress output: tqdm on a terminal, plain lines (no carriage returns) in files, nothing when disabled."""
import io

from tqdm import tqdm

from transfer.progress import PlainProgress, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_files_get_plain_lines_every_few_seconds_and_one_at_the_end():
    out = io.StringIO()
    bar = progress(total=5, desc="mscn", file=out, every=0.0, unit="step")
    assert isinstance(bar, PlainProgress)
    bar.set_postfix(loss="1.2345")
    for _ in range(5):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 6  # every update (every=0) plus the final line
    assert lines[-1].startswith("mscn: 5/5 (") and lines[-1].endswith("step/s) loss=1.2345")


def test_rate_limited_and_iterable():
    out = io.StringIO()
    items = list(progress(range(100), desc="features", file=out, every=3600.0))
    assert items == list(range(100))
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]  # only the closing line
    assert out.getvalue().startswith("features: 100/100 (")


def test_terminal_gets_tqdm_and_disabled_prints_nothing():
    assert isinstance(progress(total=3, file=Terminal()), tqdm)
    out = io.StringIO()
    bar = progress(total=3, file=out, disable=True, every=0.0)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""
