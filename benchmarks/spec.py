"""Declarative benchmark specs (benchmarks/specs/*.yaml) and recipe resolution.

A spec names the task, dataset layout, metrics, accepted backbone families, engines, and its recipes (the
values of shared/PROTOCOLS.md). `resolve` merges a recipe with a budget preset and explicit overrides and
returns both the resolved config and the overrides that made it non-protocol.
"""
from __future__ import annotations

import copy
import dataclasses
from functools import lru_cache
from pathlib import Path

import yaml

from transfer.errors import SpecError

SPEC_DIR = Path(__file__).parent / "specs"


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

    def benchmarks_accepting(self, family: str) -> list[str]:
        """Every benchmark whose spec accepts a `family` backbone (engines name them when refusing one)."""
        return [s.name for s in load_specs().values() if family in s.accepts]


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


# the CLI's generic names for the fields detectron2-style recipes call otherwise
ALIASES = {"batch_size": "ims_per_batch", "lr": "base_lr", "max_iter": "max_iters"}


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
    user = {ALIASES[k] if k not in cfg and ALIASES.get(k) in cfg else k: v for k, v in user.items()}
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
    recipe_cfg = copy.deepcopy(cfg)
    cfg.update(changed)
    scaling = linear_scaling(recipe_cfg, cfg, applied)
    if scaling:
        derived = {k: new for k, (_, new) in scaling["scaled"].items()}
        cfg.update(derived)
        changed.update(derived)  # derived values are non-protocol too, and shown with the row
        cfg["linear_scaling"] = scaling
    cfg["name"] = recipe
    return cfg, changed


def linear_scaling(recipe_cfg: dict, cfg: dict, applied: dict) -> dict | None:
    """The recipe's rule for another global batch (PROTOCOLS.md: "halve batch and LR and double iterations and
    steps"; detectron2's auto_scale_workers): the LR scales with batch / reference batch and iteration counts
    (max_iter, steps, warm-up, eval/checkpoint periods) inversely, so as many epochs are seen. Values the budget
    preset or the user set explicitly are kept. Recipes with `lr_batch` already scale their LR at run time."""
    batch_key = next((k for k in ("ims_per_batch", "batch_size") if k in recipe_cfg), None)
    lr_key = next((k for k in ("base_lr", "lr") if k in recipe_cfg), None)
    if batch_key is None or lr_key is None or "lr_batch" in recipe_cfg or cfg[batch_key] == recipe_cfg[batch_key]:
        return None
    factor = cfg[batch_key] / recipe_cfg[batch_key]
    scaled = {}
    if lr_key not in applied:
        scaled[lr_key] = (recipe_cfg[lr_key], recipe_cfg[lr_key] * factor)
    iter_key = next((k for k in ("max_iter", "max_iters") if k in recipe_cfg), None)
    if iter_key and iter_key not in applied:
        for key in (iter_key, "warmup_iters", "val_interval", "checkpoint_interval"):
            if key in recipe_cfg and key not in applied and recipe_cfg[key]:
                scaled[key] = (recipe_cfg[key], max(1, round(recipe_cfg[key] / factor)))
        if isinstance(recipe_cfg.get("steps"), list) and "steps" not in applied:
            scaled["steps"] = (recipe_cfg["steps"], [max(1, round(s / factor)) for s in recipe_cfg["steps"]])
    return {"batch_key": batch_key, "reference_batch": recipe_cfg[batch_key], "batch": cfg[batch_key],
            "factor": factor, "scaled": scaled}
