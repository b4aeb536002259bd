"""Errors that refuse a run before any work: raised by the engines and by benchmarks/ (specs, runner, sweep);
`bench` prints their message as one line."""


class SpecError(ValueError):
    """A benchmark, recipe, mode, budget or backbone that does not fit; the message names the fix."""
