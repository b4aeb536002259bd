"""CLI values and verbs that must answer with one line (exit 2 for usage, 1 for refused inputs), before any work
and without touching what is on disk (issue 18)."""
import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.cli import main

RUN = ["run", "inat18", "--backbone", "nowhere.safetensors", "--data-root", "nowhere"]


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def exits(argv, code: int, capsys) -> str:
    """main(argv) exits with `code`; returns its one-line message (stderr, or the SystemExit text)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    if isinstance(e.value.code, str):
        assert code == 1, e.value.code
        message = e.value.code
    else:
        assert e.value.code == code
        message = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "\n" not in message.strip()
    return message


@pytest.mark.parametrize("flag,value", [("--trials", "0"), ("--trials", "-1"), ("--lr", "-1"), ("--lr", "0"),
                                        ("--lr", "nan"), ("--gpus", "0"), ("--gpus", "-1"), ("--epochs", "0"),
                                        ("--batch-size", "0"), ("--crop-size", "0"), ("--workers", "-1"),
                                        ("--seed", "-1"), ("--max-iter", "0"), ("--epochs", "two")])
def test_bad_run_values_are_usage_errors_before_any_work(flag, value, capsys):
    message = exits(RUN + [flag, value], 2, capsys)
    assert f"argument {flag}" in message and value in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_device_cuda_without_cuda(capsys):
    message = exits(RUN + ["--device", "cuda"], 2, capsys)
    assert "CUDA is not available" in message and "--device cpu" in message
    assert "one of auto, cpu" in exits(RUN + ["--device", "gpu"], 2, capsys)


def test_sweep_values(capsys):
    for flag in ("--trials", "--gpus"):
        exits(["sweep", "--backbones", "b", "--benchmarks", "inat18", "--data-root", "d", flag, "0"], 2, capsys)


def test_report_of_a_missing_results_folder_fails(tmp_path, capsys):
    assert "no results folder" in exits(["report", "--results", str(tmp_path / "resluts")], 1, capsys)


def test_status_of_a_folder_that_is_no_sweep(tmp_path, capsys):
    assert "holds no sweep" in exits(["status", "--out", str(tmp_path)], 1, capsys)


def test_sweep_with_a_misspelled_benchmark_saves_nothing(tmp_path, capsys):
    from transfer.artifact import random_artifact, save_artifact

    backbone = save_artifact(tmp_path / "r18.safetensors", random_artifact("resnet18", width=8))
    out = tmp_path / "results"
    message = exits(["sweep", "--backbones", str(backbone), "--benchmarks", "inat18", "plcaes205", "--data-root",
                     str(tmp_path), "--out", str(out)], 1, capsys)
    assert "unknown benchmark 'plcaes205'" in message
    assert not out.exists()  # no grid saved: `bench status` is not broken by it
    assert "no recipe 'nope'" in exits(["sweep", "--backbones", str(backbone), "--benchmarks", "inat18",
                                          "--recipe", "nope", "--data-root", str(tmp_path), "--out", str(out)],
                                         1, capsys)
    assert not out.exists()


def test_backbone_random_bad_arch_and_width(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert "unknown architecture 'resnet9000'" in exits(["backbone", "random", "--arch", "resnet9000", "-o", str(out)],
                                                        1, capsys)
    assert "unknown architecture" in exits(["backbone", "random", "--arch", "vit_enormous_patch16", "-o", str(out)],
                                           1, capsys)
    assert "argument --width" in exits(["backbone", "random", "--arch", "resnet18", "--width", "-4", "-o", str(out)],
                                       2, capsys)
    assert not out.exists()


def test_data_mini_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    real = tmp_path / "datasets"
    (real / "places205" / "trainvalsplit_places205").mkdir(parents=True)
    (real / "places205" / "trainvalsplit_places205" / "train_places205.csv").write_text("a/abbey/1.jpg 0\n")
    before = hashes(real)
    message = exits(["data", "mini", "--root", str(real)], 1, capsys)
    assert str(real) in message and "--force" in message and ".bench-mini.json" in message
    assert hashes(real) == before
    from benchmarks.cli import check_mini_root

    check_mini_root(tmp_path / "new", force=False)  # an absent or empty folder, or its own, is fine
    (real / ".bench-mini.json").write_text("{}")
    check_mini_root(real, force=False)


def test_disk_full_is_one_message_and_leaves_no_temp_file(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    message = exits(["backbone", "random", "--arch", "resnet18", "--width", "8", "-o", str(tmp_path / "r.st")], 1,
                    capsys)
    assert "No space left on device" in message and "free space" in message
    assert list(tmp_path.iterdir()) == []  # neither the artifact nor its temp file


def test_real_processes_exit_2_and_1_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    usage = subprocess.run([sys.executable, "-m", "benchmarks.cli", *RUN, "--trials", "0"], capture_output=True,
                           text=True, env=env)
    assert usage.returncode == 2 and "--trials: 0 must be >= 1" in usage.stderr and "Traceback" not in usage.stderr
    refused = subprocess.run([sys.executable, "-m", "benchmarks.cli", "report", "--results", str(tmp_path / "typo")],
                             capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().count("\n") == 0 and "typo" in refused.stderr


def test_status_and_sweep_on_a_corrupt_grid(tmp_path, capsys):
    from transfer.artifact import random_artifact, save_artifact

    grid = tmp_path / "out" / ".sweep" / "grid.json"
    grid.parent.mkdir(parents=True)
    grid.write_text('{"cells": [{"cell": ')  # a writer killed half-way (or a hand edit)
    before = hashes(tmp_path)
    assert f"{grid}: corrupt sweep grid" in exits(["status", "--out", str(tmp_path / "out")], 1, capsys)
    backbone = save_artifact(tmp_path / "r18.safetensors", random_artifact("resnet18", width=8))
    before["r18.safetensors"] = hashes(tmp_path)["r18.safetensors"]
    assert "not overwritten" in exits(["sweep", "--backbones", str(backbone), "--benchmarks", "inat18",
                                       "--data-root", str(tmp_path), "--out", str(tmp_path / "out")], 1, capsys)
    after = hashes(tmp_path)
    after.pop("out/.sweep/grid.lock", None)  # the (empty) lock file the sweep took
    assert after == before


def test_a_corrupt_cell_state_file_is_a_failed_row(tmp_path):
    from benchmarks.sweep import Cell, SweepConfig, _state_path, save_grid, status

    out = str(tmp_path / "out")
    cfg = SweepConfig(backbones=["b.safetensors"], benchmarks=["inat18"], trials=1, data_root=str(tmp_path), out=out)
    cell = Cell(str(tmp_path / "b.safetensors"), "sha256:0123", "inat18", 0)
    save_grid(cfg, [cell])
    _state_path(out, cell).write_text('{"state": "runn')  # a writer killed half-way
    [(cell_id, state, detail)] = status(out)
    assert cell_id == cell.id and state == "failed" and "corrupt state file" in detail
