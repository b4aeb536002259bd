"""Result records: one JSON file per trial (schema "bench.result/1"), written atomically, never overwritten.

A record holds the metrics of one trial of one benchmark on one backbone, together with everything needed to
reproduce or audit it: the fully resolved config, non-protocol overrides, package versions, git revision, host.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import math
import numbers
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import pandas as pd

SCHEMA = "bench.result/1"
TASKS = ("linear", "detection", "segmentation")
MODES = ("cached", "protocol", "train")
FIELDS = ("schema", "run_id", "created", "benchmark", "task", "recipe", "engine", "mode", "backbone", "trial",
          "seed", "metrics", "protocol", "overrides", "allow_partial_load", "config", "timings", "versions",
          "git_rev", "host", "extra")
BACKBONE_FIELDS = ("name", "hash", "arch", "method")
COLUMNS = ("run_id", "benchmark", "task", "recipe", "engine", "mode", "backbone", "backbone_hash", "method",
           "epochs", "arch", "trial", "seed", "protocol", "overrides", "allow_partial_load", "metric", "value",
           "path")

# (distribution, key in `versions`); the optional ones are recorded only when installed
CORE_PACKAGES = (("torch", "torch"), ("torchvision", "torchvision"), ("timm", "timm"), ("numpy", "numpy"),
                 ("pandas", "pandas"))
OPTIONAL_PACKAGES = (("detectron2", "detectron2"), ("mmsegmentation", "mmseg"), ("mmengine", "mmengine"),
                     ("mmcv", "mmcv"), ("mmcv-lite", "mmcv"))


class RecordError(ValueError):
    """A result record is malformed, or a record file cannot be read."""


class RecordWarning(UserWarning):
    """A record file was skipped while loading a results folder."""


# ---------------------------------------------------------------------------------------------------- creation

def is_protocol(mode, overrides, allow_partial_load) -> bool:
    """A run is the protocol only as the reference runs it: not in cached mode (fixed augmented passes, LR chosen
    on a held-out split, heads fit on part of train), with no overrides and a complete checkpoint load."""
    return mode != "cached" and not overrides and allow_partial_load is False


def new_record(*, benchmark, task, recipe, engine, mode, backbone: dict, trial: int, seed: int, metrics: dict,
               config: dict, overrides: dict | None = None, allow_partial_load=False, timings: dict | None = None,
               extra: dict | None = None) -> dict:
    """Build and validate a record for one trial; fills run_id, created, versions, git_rev, host and protocol."""
    overrides = _plain("overrides", overrides or {})
    record = {
        "schema": SCHEMA,
        "run_id": uuid.uuid4().hex,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "benchmark": benchmark, "task": task, "recipe": recipe, "engine": engine, "mode": mode,
        "backbone": _plain("backbone", backbone),
        "trial": _int(trial), "seed": _int(seed),
        "metrics": _metrics(metrics),
        "protocol": is_protocol(mode, overrides, allow_partial_load),
        "overrides": overrides,
        "allow_partial_load": allow_partial_load,
        "config": _plain("config", config),
        "timings": _plain("timings", timings or {}),
        "versions": versions(),
        "git_rev": git_rev(),
        "host": socket.gethostname(),
        "extra": _plain("extra", extra or {}),
    }
    validate_record(record)
    return record


def _plain(field: str, value):
    """A JSON-only deep copy of `value` (tuples become lists); non-JSON content raises RecordError."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise RecordError(f"{field} is not plain JSON: {e}") from None


def _metrics(metrics) -> dict:
    if not isinstance(metrics, dict):
        raise RecordError(f"metrics must be a dict, got {type(metrics).__name__}")
    return {k: float(v) if _is_number(v) else v for k, v in metrics.items()}


def _int(v):
    return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@contextmanager
def replaced_atomically(path: Path):
    """Yields a temporary path beside `path` to write; when the block succeeds it replaces `path` in one step, and
    on any error (a full disk, an interrupt) it is removed, so `path` is either the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@lru_cache(maxsize=1)
def versions() -> dict:
    """Versions of Python and the packages that shape results, read from metadata (nothing heavy is imported)."""
    out = {"python": platform.python_version()}
    for dist, key in CORE_PACKAGES:
        out[key] = _dist_version(dist, key) or "not installed"
    for dist, key in OPTIONAL_PACKAGES:
        found = _dist_version(dist, key)
        if found and key not in out:
            out[key] = found
    torch = sys.modules.get("torch")  # already imported by the caller: record the CUDA build for free
    if torch is not None and getattr(torch, "version", None) is not None:
        out["cuda"] = getattr(torch.version, "cuda", None)
    return out


def _dist_version(dist: str, module: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # importable without pip metadata (e.g. a source checkout on PYTHONPATH)
        return "unknown" if dist == module and importlib.util.find_spec(module) is not None else None
    except (ImportError, ValueError):
        return None


@lru_cache(maxsize=1)
def git_rev() -> str:
    """`git rev-parse HEAD` of the repository holding this file (+"+dirty" when tracked files changed),
    or 'unknown' outside git."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rev = out.stdout.strip()
    return (rev + ("+dirty" if dirty else "")) if out.returncode == 0 and rev else "unknown"


# -------------------------------------------------------------------------------------------------- validation

def validate_record(rec: dict) -> None:
    """Raise RecordError listing every problem of `rec`; return None when it is a valid bench.result/1 record."""
    if not isinstance(rec, dict):
        raise RecordError(f"a record is a JSON object, got {type(rec).__name__}")
    if rec.get("schema") != SCHEMA:
        raise RecordError(f"schema is {rec.get('schema')!r}, expected {SCHEMA!r}")
    missing = [f for f in FIELDS if f not in rec]
    if missing:
        raise RecordError(f"missing fields: {', '.join(missing)}")
    errors = _field_errors(rec)
    if errors:
        raise RecordError("; ".join(errors))


def _field_errors(rec: dict) -> list[str]:
    errors = []
    if not (isinstance(rec["run_id"], str) and re.fullmatch(r"[0-9a-f]{32}", rec["run_id"])):
        errors.append(f"run_id must be 32 lowercase hex characters, got {rec['run_id']!r}")
    if not _is_iso_time(rec["created"]):
        errors.append(f"created must be an ISO-8601 time, got {rec['created']!r}")
    for key in ("benchmark", "recipe", "engine", "git_rev", "host"):
        if not (isinstance(rec[key], str) and rec[key]):
            errors.append(f"{key} must be a non-empty string, got {rec[key]!r}")
    if rec["task"] not in TASKS:
        errors.append(f"task must be one of {', '.join(TASKS)}, got {rec['task']!r}")
    if rec["mode"] not in MODES:
        errors.append(f"mode must be one of {', '.join(MODES)}, got {rec['mode']!r}")
    for key in ("trial", "seed"):
        if not (isinstance(rec[key], int) and not isinstance(rec[key], bool) and rec[key] >= 0):
            errors.append(f"{key} must be an integer >= 0, got {rec[key]!r}")
    for key in ("backbone", "metrics", "overrides", "config", "timings", "versions", "extra"):
        if not isinstance(rec[key], dict):
            errors.append(f"{key} must be an object, got {type(rec[key]).__name__}")
    if isinstance(rec["backbone"], dict):
        errors += _backbone_errors(rec["backbone"])
    if isinstance(rec["metrics"], dict):
        errors += _metric_errors(rec["metrics"])
    if not isinstance(rec["allow_partial_load"], bool):
        errors.append("allow_partial_load must be true or false")
    expected = is_protocol(rec["mode"], rec["overrides"], rec["allow_partial_load"])
    if rec["protocol"] is not expected:
        errors.append(f"protocol must be {str(expected).lower()} (true only outside cached mode, without overrides "
                      f"and without allow_partial_load), got {rec['protocol']!r}")
    return errors


def _backbone_errors(bb: dict) -> list[str]:
    errors = [f"backbone.{k} must be a non-empty string" for k in BACKBONE_FIELDS
              if not (isinstance(bb.get(k), str) and bb.get(k))]
    epochs = bb.get("epochs")
    if epochs is not None and not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 0):
        errors.append(f"backbone.epochs must be an integer >= 0 or null, got {epochs!r}")
    return errors


def _metric_errors(metrics: dict) -> list[str]:
    if not metrics:
        return ["metrics is empty"]
    return [f"metric {name!r} must be a finite number, got {value!r}" for name, value in metrics.items()
            if not (isinstance(name, str) and name and _is_number(value) and math.isfinite(value))]


def _is_iso_time(value) -> bool:
    try:
        datetime.datetime.fromisoformat(value)
        return True
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------------ writing

def record_filename(record: dict) -> str:
    """The file name `write_record` tries first: BENCH__BACKBONE__RECIPE__ENGINE__MODE__tTRIAL__RUNID8.json."""
    parts = [record["benchmark"], record["backbone"]["name"], record["recipe"], record["engine"], record["mode"]]
    parts = [_safe(p) for p in parts] + [f"t{record['trial']}", record["run_id"][:8]]
    return "__".join(parts) + ".json"


def _safe(part: str) -> str:
    """File-name-safe version of one name component ('voc07+12' -> 'voc07-12')."""
    part = re.sub(r"[^A-Za-z0-9.-]+", "-", str(part)).strip(".-")
    return part[:64] or "x"


def write_record(results_dir, record: dict) -> Path:
    """Write `record` as a new JSON file in `results_dir` (created if needed); returns its path.

    Atomic and never overwrites: the JSON goes to a temp file in the same folder and is fsynced, then hard-linked
    to the final name (os.link fails when that name exists, then `-1`, `-2`, ... is tried) and the temp is removed.
    """
    validate_record(record)
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600 files; results are meant to be shared
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        final = _link_new_name(tmp, folder, record_filename(record))
    finally:
        os.unlink(tmp)
    _fsync_dir(folder)
    return final


def _link_new_name(tmp: str, folder: Path, name: str) -> Path:
    stem = name[:-len(".json")]
    for i in range(10_000):
        final = folder / (f"{stem}-{i}.json" if i else name)
        try:
            os.link(tmp, final)
            return final
        except FileExistsError:
            continue
    raise RecordError(f"no free file name for {name} in {folder}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------------ reading

def read_record(path) -> dict:
    """One validated record from `path`; RecordError (naming the file) when unreadable or invalid."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
        validate_record(rec)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecordError) as e:
        raise RecordError(f"{path}: {e}") from None
    return rec


def _reject_constant(name: str):
    raise RecordError(f"non-standard JSON constant {name}")


def iter_records(results_dir, strict: bool = False):
    """Yield (path, record) for every valid *.json record under `results_dir` (recursively, sorted by path,
    skipping hidden folders).

    Invalid files and repeated run_ids are skipped with a RecordWarning naming the file and the reason;
    with strict=True they raise RecordError instead.
    """
    folder = Path(results_dir)
    if not folder.is_dir():
        return
    seen = {}
    for path in sorted(folder.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts[:-1]):
            continue  # bookkeeping folders (e.g. a sweep's .sweep/ state files) hold no records
        try:
            rec = read_record(path)
            if rec["run_id"] in seen:
                raise RecordError(f"{path}: run_id {rec['run_id']} already read from {seen[rec['run_id']]}")
        except RecordError as e:
            if strict:
                raise
            warnings.warn(f"skipping record file {e}", RecordWarning, stacklevel=3)
            continue
        seen[rec["run_id"]] = path
        yield path, rec


def load_records(results_dir, strict: bool = False) -> pd.DataFrame:
    """All records under `results_dir` as a long DataFrame: one row per (record, metric); see COLUMNS."""
    return records_frame(iter_records(results_dir, strict=strict))


def records_frame(records) -> pd.DataFrame:
    """(path, record) pairs (as from `iter_records`) as the long DataFrame of `load_records`."""
    rows = [_row(path, rec, metric, value) for path, rec in records for metric, value in rec["metrics"].items()]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["epochs"] = df["epochs"].astype("Int64")
    df["value"] = df["value"].astype(float)
    return df


def _row(path: Path, rec: dict, metric: str, value: float) -> dict:
    bb = rec["backbone"]
    return {"run_id": rec["run_id"], "benchmark": rec["benchmark"], "task": rec["task"], "recipe": rec["recipe"],
            "engine": rec["engine"], "mode": rec["mode"], "backbone": bb["name"], "backbone_hash": bb["hash"],
            "method": bb["method"], "epochs": bb.get("epochs"), "arch": bb["arch"], "trial": rec["trial"],
            "seed": rec["seed"], "protocol": rec["protocol"], "overrides": overrides_key(rec["overrides"]),
            "allow_partial_load": rec["allow_partial_load"], "metric": metric, "value": float(value),
            "path": str(path)}


def overrides_key(overrides: dict) -> str:
    """Canonical JSON string of an overrides dict ('{}' for protocol runs); used as a grouping key."""
    return json.dumps(overrides, sort_keys=True)


# Keys of existing_records() that address the backbone sub-object (same names as the load_records columns).
_BACKBONE_KEYS = {"backbone": "name", "backbone_name": "name", "backbone_hash": "hash", "method": "method",
                  "arch": "arch", "epochs": "epochs", "backbone_path": "path"}


def existing_records(results_dir, strict: bool = False, **match) -> list[dict]:
    """Valid records under `results_dir` whose fields equal every `match` value.

    Keys are top-level record fields (benchmark, recipe, engine, mode, trial, seed, protocol, overrides, ...) or
    backbone fields: backbone / backbone_name, backbone_hash, method, arch, epochs, backbone_path.
    E.g. existing_records(d, benchmark="places205", backbone_hash=h, recipe="vissl", mode="cached", trial=0).
    """
    unknown = [k for k in match if k not in FIELDS and k not in _BACKBONE_KEYS]
    if unknown:
        raise TypeError(f"existing_records: unknown field(s) {', '.join(unknown)}")
    return [rec for _, rec in iter_records(results_dir, strict=strict)
            if all(_field(rec, k) == v for k, v in match.items())]


def _field(rec: dict, key: str):
    if key in _BACKBONE_KEYS:
        return rec["backbone"].get(_BACKBONE_KEYS[key])
    return rec[key]
