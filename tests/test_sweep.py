"""bench sweep: idempotent grid runs that survive a kill half-way, the SLURM path via submitit, bench status."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.sweep import SweepConfig, status, sweep
from transfer.artifact import random_artifact, save_artifact

FAST = ["--epochs", "2", "--workers", "0"]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return [str(save_artifact(root / f"rand{s}.safetensors", random_artifact("resnet18", seed=s, width=8)))
            for s in (0, 1)]


def _records(out):
    return [json.loads(p.read_text()) for p in Path(out).glob("*.json")]


def test_local_sweep_killed_half_way_then_rerun(tmp_path, mini_root, backbones):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks.cli", "sweep", "--backbones", *backbones,
           "--benchmarks", "inat18", "places205", "--trials", "2", "--data-root", str(mini_root), "--out", str(out),
           "--budget", "tiny", "--", *FAST, "--cache-dir", str(tmp_path / "cache")]
    first = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(_records(out)) < 3 and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and the cell it is running, as a crash would
    first.wait()
    done_before = len(_records(out))
    assert 3 <= done_before < 8, "the kill should land half-way"

    rows = status(str(out))
    assert Counter(state for _, state, _ in rows)["done"] == done_before
    assert {state for _, state, _ in rows} <= {"done", "failed", "missing"}

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{done_before} already done" in again.stdout
    records = _records(out)
    cells = Counter((r["benchmark"], r["backbone"]["hash"], r["trial"]) for r in records)
    assert len(cells) == 8 and set(cells.values()) == {1}, cells
    assert {r["seed"] for r in records} == {0, 1}
    assert all(state == "done" for _, state, _ in status(str(out)))
    # a third run has nothing left to do
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "8 already done" in third.stdout and len(_records(out)) == 8


def test_slurm_path_with_submitit_debug_executor(tmp_path, mini_root, backbones):
    cfg = SweepConfig(backbones=backbones[:1], benchmarks=["places205"], trials=2, data_root=str(mini_root),
                      out=str(tmp_path / "results"), budget="tiny",
                      run_args=[*FAST, "--cache-dir", str(tmp_path / "cache")])
    outcome = sweep(cfg, launcher="slurm", slurm={"cluster": "debug", "partition": "gpu", "gpus": 1})
    assert outcome["submitted"] == 2
    assert [job.result() for job in outcome["jobs"]] == [0, 0]
    assert sorted(r["trial"] for r in _records(cfg.out)) == [0, 1]
    assert sweep(cfg, launcher="slurm", slurm={"cluster": "debug"})["submitted"] == 0


def test_status_reports_failed_cell_with_log(tmp_path, mini_root, backbones):
    cfg = SweepConfig(backbones=backbones[:1], benchmarks=["places205"], trials=1,
                      data_root=str(tmp_path / "no-such-root"), out=str(tmp_path / "results"), budget="tiny",
                      run_args=FAST)
    assert sweep(cfg)["failed"] == 1
    (cell, state, detail), = status(cfg.out)
    assert state == "failed" and "log" in detail
    log = Path(re.search(r"log (\S+)", detail).group(1)).read_text()
    assert "no-such-root" in log


def test_checkpoint_evaluations_accumulate_in_one_status(tmp_path, mini_root, backbones):
    """What pretraining does on its evaluation schedule: one detached sweep per saved checkpoint, one OUT."""
    from pretrain.common import evaluate_checkpoint

    out = tmp_path / "evals"
    procs = [evaluate_checkpoint(b, ["places205"], str(mini_root), str(out), budget="tiny",
                                 run_args=[*FAST, "--cache-dir", str(tmp_path / "cache")]) for b in backbones[:2]]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    rows = status(str(out))
    assert len(rows) == 2 and all(state == "done" for _, state, _ in rows), rows
    assert {r["backbone"]["name"] for r in _records(out)} == {"rand0", "rand1"}


def test_pretraining_schedules_checkpoint_evaluations(tmp_path, mini_root):
    from transfer.datasets import load_classification
    from pretrain.common import load_config, train

    images = tmp_path / "imgs"
    images.mkdir()
    for path, _ in load_classification("places205", mini_root, "train").samples[:16]:
        (images / path.name).write_bytes(path.read_bytes())
    evals = tmp_path / "evals"
    cfg = load_config("mscn", None, [f"data={images}", f"output_dir={tmp_path / 'run'}", "arch=resnet18", "width=8",
                                     "img_size=32", "batch_size=8", "epochs=1", "workers=0", "eval_every=1",
                                     "eval_benchmarks=[places205]", f"eval_data_root={mini_root}",
                                     f"eval_out={evals}", "eval_budget=tiny"])
    train(cfg, log=lambda *a: None)
    assert sorted(p.name for p in (tmp_path / "run").glob("backbone-step*.safetensors")) == \
        ["backbone-step1.safetensors", "backbone-step2.safetensors"]
    deadline = time.time() + 300
    while len(_records(evals)) < 2 and time.time() < deadline:
        time.sleep(1)
    assert sorted(r["backbone"]["name"] for r in _records(evals)) == ["backbone-step1", "backbone-step2"]
    assert all(state == "done" for _, state, _ in status(str(evals)))
