"""`bench sweep` and `bench status`: backbones x benchmarks x trials, one independent cell per trial.

A cell is one `bench run BENCH --backbone B --first-trial T --trials 1` in its own process (local launcher) or
SLURM array task (submitit). A cell is done when its result record exists, so a sweep is idempotent: re-running
it after a crash or kill runs only the missing cells, and every record exists exactly once. Per-cell state files
(OUT/.sweep/CELL.json) and logs (OUT/logs/CELL.log) let `bench status` tell done / running / failed / missing.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from benchmarks.spec import get_spec, resolve
from leaderboard.records import existing_records, replaced_atomically


@dataclasses.dataclass(frozen=True)
class Cell:
    backbone: str       # absolute path
    backbone_hash: str
    benchmark: str
    trial: int

    @property
    def id(self) -> str:
        return f"{self.benchmark}__{Path(self.backbone).name.split('.')[0]}__t{self.trial}"


@dataclasses.dataclass
class SweepConfig:
    backbones: list[str]
    benchmarks: list[str]
    trials: int
    data_root: str
    out: str
    run_args: list[str] = dataclasses.field(default_factory=list)  # passed through to `bench run`
    recipe: str | None = None
    mode: str | None = None
    budget: str | None = None
    seed: int = 0


def expand(cfg: SweepConfig) -> list[Cell]:
    """The grid, backbone-major, each backbone identified by its weights hash (as records are)."""
    from transfer.loading import to_artifact

    cells = []
    for backbone in cfg.backbones:
        path = str(Path(backbone).resolve())
        art, _ = to_artifact(path, allow_partial="--allow-partial-load" in cfg.run_args)
        cells += [Cell(path, art.hash, bench, t) for bench in cfg.benchmarks for t in range(cfg.trials)]
    return cells


def check_sweep(cfg: SweepConfig) -> None:
    """Validate every benchmark, recipe, budget and pass-through override before anything is saved (a grid with
    a misspelled benchmark would break `bench status` for the whole folder); raises SpecError."""
    from benchmarks.spec import SpecError

    if cfg.trials < 1:
        raise SpecError(f"--trials {cfg.trials}: at least 1")
    for name in cfg.benchmarks:
        spec = get_spec(name)
        resolve(spec, cfg.recipe, cfg.budget, _overrides(cfg.run_args))
    for backbone in cfg.backbones:
        if not Path(backbone).is_file():
            raise SpecError(f"--backbones {backbone}: no such file")


def is_done(cell: Cell, cfg: SweepConfig) -> bool:
    spec = get_spec(cell.benchmark)
    recipe, overrides = resolve(spec, cfg.recipe, cfg.budget, _overrides(cfg.run_args))
    return bool(existing_records(cfg.out, benchmark=cell.benchmark, backbone_hash=cell.backbone_hash,
                                 recipe=recipe["name"], mode=cfg.mode or spec.default_mode, trial=cell.trial,
                                 overrides=overrides))


def _overrides(run_args: list[str]) -> dict:
    """Recipe overrides named in pass-through `bench run` arguments (--epochs 3 -> {'epochs': 3})."""
    from benchmarks.args import run_parser

    known = {"epochs", "max_iter", "batch_size", "crop_size", "resize_size", "lr"}
    args = run_parser().parse_args(["x", "--backbone", "b", "--data-root", "d", *run_args])
    return {k: getattr(args, k) for k in known if getattr(args, k) is not None}


def cell_command(cell: Cell, cfg: SweepConfig) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.cli", "run", cell.benchmark, "--backbone", cell.backbone,
           "--data-root", cfg.data_root, "--out", cfg.out, "--first-trial", str(cell.trial), "--trials", "1",
           "--seed", str(cfg.seed)]
    for flag, value in (("--recipe", cfg.recipe), ("--mode", cfg.mode), ("--budget", cfg.budget)):
        if value:
            cmd += [flag, value]
    return cmd + list(cfg.run_args)


def _state_path(out: str, cell: Cell) -> Path:
    return Path(out) / ".sweep" / f"{cell.id}.json"


def _write_state(out: str, cell: Cell, **state) -> None:
    path = _state_path(out, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp:  # a full disk leaves no temp file behind
        tmp.write_text(json.dumps({"cell": dataclasses.asdict(cell), "host": socket.gethostname(),
                                   "time": datetime.datetime.now().isoformat(timespec="seconds"), **state}))


def run_cell(cell: Cell, cfg: SweepConfig) -> int:
    """Run one cell in a child process, logging to OUT/logs/CELL.log; returns its exit code."""
    log = Path(cfg.out) / "logs" / f"{cell.id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cell_command(cell, cfg))}\n")
        f.flush()
        proc = subprocess.Popen(cell_command(cell, cfg), stdout=f, stderr=subprocess.STDOUT)
        _write_state(cfg.out, cell, state="running", pid=proc.pid, log=str(log))
        code = proc.wait()
    _write_state(cfg.out, cell, state="done" if code == 0 else "failed", returncode=code, log=str(log))
    return code


def save_grid(cfg: SweepConfig, cells: list[Cell]) -> None:
    """Add the cells (each with its sweep config) to OUT/.sweep/grid.json; sweeps into one OUT accumulate, so
    `bench status` shows every cell ever asked for there (e.g. one sweep per pretraining checkpoint)."""
    import fcntl

    path = Path(cfg.out) / ".sweep" / "grid.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent sweeps into one OUT merge, none is lost
        entries = {}
        if path.is_file():
            try:
                entries = {(e["cell"]["backbone_hash"], Cell(**e["cell"]).id): e
                           for e in json.loads(path.read_text())["cells"]}
            except (ValueError, KeyError, TypeError) as e:
                from benchmarks.spec import SpecError

                raise SpecError(f"{path}: corrupt sweep grid ({type(e).__name__}: {e}); not overwritten. Sweep "
                                "into a fresh --out (records already written are kept and skipped)") from None
        for cell in cells:
            entries[(cell.backbone_hash, cell.id)] = {"cell": dataclasses.asdict(cell),
                                                      "config": dataclasses.asdict(cfg)}
        with replaced_atomically(path) as tmp:
            tmp.write_text(json.dumps({"cells": list(entries.values())}, indent=1))


def sweep(cfg: SweepConfig, launcher: str = "local", slurm: dict | None = None, log=print) -> dict:
    """Run (local) or submit (slurm) every cell that has no record yet. Returns counts per outcome."""
    check_sweep(cfg)
    cells = expand(cfg)
    save_grid(cfg, cells)
    running = [c for c in cells if _running(cfg.out, c)]
    todo = [c for c in cells if c not in running and not is_done(c, cfg)]
    log(f"sweep: {len(cells)} cells, {len(cells) - len(todo) - len(running)} already done, "
        f"{len(running)} still running elsewhere (left alone), {len(todo)} to run ({launcher})")
    if launcher == "local":
        failed = 0
        for i, cell in enumerate(todo, 1):
            code = run_cell(cell, cfg)
            failed += code != 0
            log(f"[{i}/{len(todo)}] {cell.id}: {'done' if code == 0 else f'FAILED (exit {code})'}")
        return {"cells": len(cells), "ran": len(todo), "failed": failed}
    if launcher == "slurm":
        jobs = submit_slurm(todo, cfg, **(slurm or {}))
        log(f"submitted {len(jobs)} array tasks: {', '.join(j.job_id for j in jobs[:5])}{' ...' if len(jobs) > 5 else ''}")
        return {"cells": len(cells), "submitted": len(jobs), "jobs": jobs}
    raise ValueError(f"unknown launcher {launcher!r}: local or slurm")


def submit_slurm(cells: list[Cell], cfg: SweepConfig, partition: str | None = None, time_min: int = 240,
                 gpus: int = 1, cpus: int = 10, constraint: str | None = None, parallelism: int = 64,
                 cluster: str | None = None) -> list:
    """One SLURM job array through submitit; `cluster='debug'|'local'` runs it here (tests)."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(Path(cfg.out) / "slurm" / "%j"), cluster=cluster)
    params = {"timeout_min": time_min, "gpus_per_node": gpus, "cpus_per_task": cpus, "nodes": 1,
              "tasks_per_node": 1, "slurm_array_parallelism": parallelism}
    if partition:
        params["slurm_partition"] = partition
    if constraint:
        params["slurm_constraint"] = constraint
    executor.update_parameters(**{k: v for k, v in params.items()
                                  if executor.cluster == "slurm" or not k.startswith("slurm_")})
    return executor.map_array(run_cell, cells, [cfg] * len(cells))


def status(out: str) -> list[tuple[str, str, str]]:
    """(cell id, state, detail) for every cell of the sweep saved under `out`."""
    from benchmarks.spec import SpecError

    path = Path(out) / ".sweep" / "grid.json"
    try:
        entries = [(Cell(**e["cell"]), SweepConfig(**e["config"])) for e in json.loads(path.read_text())["cells"]]
    except (ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{path}: corrupt sweep grid ({type(e).__name__}: {e}); rerun the `bench sweep` commands "
                        "into a fresh --out (records already written are kept and skipped)") from None
    rows = []
    for cell, cfg in entries:
        if is_done(cell, cfg):
            rows.append((cell.id, "done", ""))
            continue
        path = _state_path(out, cell)
        if not path.is_file():
            rows.append((cell.id, "missing", ""))
            continue
        try:
            state = json.loads(path.read_text())
            state["state"]
        except (ValueError, KeyError, TypeError):
            rows.append((cell.id, "failed", f"corrupt state file {path} (a killed writer); rerun the sweep"))
            continue
        if state["state"] == "running" and not _alive(state):
            rows.append((cell.id, "failed", f"interrupted (pid {state['pid']} gone); log {state['log']}"))
        elif state["state"] == "done":  # exited 0 but no record: treat as failed
            rows.append((cell.id, "failed", f"exited 0 without a record; log {state['log']}"))
        else:
            detail = f"log {state['log']}" + (f" (exit {state['returncode']})" if "returncode" in state else "")
            rows.append((cell.id, state["state"], detail))
    return rows


def _running(out: str, cell: Cell) -> bool:
    path = _state_path(out, cell)
    if not path.is_file():
        return False
    try:
        state = json.loads(path.read_text())
        return state["state"] == "running" and _alive(state)
    except (ValueError, KeyError, TypeError):
        return False  # a corrupt state file: the cell is run again


def _alive(state: dict) -> bool:
    if state.get("host") != socket.gethostname():
        return True  # another machine's process: trust its state file
    try:
        os.kill(state["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
