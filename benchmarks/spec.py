"""Declarative benchmark specs (benchmarks/specs/*.yaml) and recipe resolution.

A spec names the task, dataset layout, metrics, accepted backbone families, engines, and its recipes (the
values of shared/PROTOCOLS.md). `resolve` merges a recipe with a budget preset and explicit overrides and
returns both the resolved config and the overrides that made it non-protocol.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from functools import lru_cache
from pathlib import Path

import yaml

SPEC_DIR = Path(__file__).parent / "specs"
CACHE_ROOT = Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "bench"))


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    task: str
    dataset: str
    description: str
    num_classes: int | None
    metrics: tuple[str, ...]
    accepts: tuple[str, ...]
    engines: tuple[str, ...]
    default_recipe: str
    default_mode: str
    trials: int
    recipes: dict
    extra: dict  # task-specific sections (e.g. `cached`, `budgets`)

    @property
    def budgets(self) -> dict:
        return self.extra.get("budgets", {})


class SpecError(ValueError):
    pass


@lru_cache(maxsize=None)
def load_specs() -> dict[str, BenchmarkSpec]:
    """All benchmark specs by name."""
    specs = {}
    for path in sorted(SPEC_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        fields = {f.name for f in dataclasses.fields(BenchmarkSpec)} - {"extra"}
        spec = BenchmarkSpec(**{k: raw[k] for k in fields if k in raw and k not in ("metrics", "accepts", "engines")},
                             metrics=tuple(raw["metrics"]), accepts=tuple(raw["accepts"]),
                             engines=tuple(raw["engines"]),
                             extra={k: v for k, v in raw.items() if k not in fields})
        specs[spec.name] = spec
    return specs


def get_spec(name: str) -> BenchmarkSpec:
    specs = load_specs()
    if name not in specs:
        raise SpecError(f"unknown benchmark {name!r}; known: {', '.join(specs)} (see `bench list`)")
    return specs[name]


def resolve(spec: BenchmarkSpec, recipe: str | None = None, budget: str | None = None,
            overrides: dict | None = None) -> tuple[dict, dict]:
    """(resolved recipe config, non-protocol overrides). Overrides win over the budget preset."""
    recipe = recipe or spec.default_recipe
    if recipe not in spec.recipes:
        raise SpecError(f"benchmark {spec.name} has no recipe {recipe!r}; recipes: {', '.join(spec.recipes)}")
    cfg = copy.deepcopy(spec.recipes[recipe])
    if budget and budget not in spec.budgets:
        raise SpecError(f"benchmark {spec.name} has no budget {budget!r}; budgets: {', '.join(spec.budgets)}")
    preset = dict(spec.budgets[budget]) if budget else {}
    user = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in {**preset, **user}:
        if key not in cfg:
            raise SpecError(f"override {key!r} is not a field of recipe {spec.name}/{recipe}: {', '.join(cfg)}")
    # a shortened run keeps its schedule's shape: milestones / steps scale with the epochs / iterations
    for length, schedule in (("epochs", "milestones"), ("max_iter", "steps")):
        if not isinstance(cfg.get(schedule), list):
            continue
        for layer, base in ((preset, cfg), (user, {**cfg, **preset})):
            if length in layer and schedule not in layer and layer[length] != base[length]:
                layer[schedule] = [max(1, round(m * layer[length] / base[length])) for m in base[schedule]]
                if "warmup_iters" in cfg and length == "max_iter" and "warmup_iters" not in layer:
                    layer["warmup_iters"] = min(base["warmup_iters"], max(1, layer[length] // 5))
    applied = {**preset, **user}
    changed = {k: v for k, v in applied.items() if cfg[k] != v}
    cfg.update(changed)
    cfg["name"] = recipe
    return cfg, changed
