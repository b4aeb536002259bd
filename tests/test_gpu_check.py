"""benchmarks/perf/gpu_check.py in its CPU mode: the stages run (tiny sizes) and report real measurements, a failing
or hanging stage becomes a row and the others still run. The GPU run itself happens on a lent GPU machine."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "perf"))

import gpu_check  # noqa: E402


def test_cpu_tiny_stages_table_and_json(tmp_path, capsys):
    out = tmp_path / "check.json"
    status = gpu_check.main(["--cpu-tiny", "--stages", "no-such-stage,pretrain:adios,linear", "--json", str(out),
                             "--work", str(tmp_path / "work"), "--peak-tflops", "1.0", "--stage-limit", "120"])
    assert status == 1  # the unknown stage failed; the exit status says so
    rows = json.loads(out.read_text())["rows"]
    assert [(r["stage"], r["status"]) for r in rows] == [
        ("no-such-stage", "failed"), ("pretrain:adios-imagenet100", "ok"), ("linear", "ok"), ("linear", "ok")]
    assert "unknown stage 'no-such-stage'" in rows[0]["error"]
    pre = rows[1]
    assert pre["config"] == "adios-cpu-tiny" and pre["paper_batch_per_gpu"] == 128 and pre["batch"] == 8
    assert pre["step_s"] > 0 and pre["tflop_per_step"] > 0
    assert abs(pre["images_s"] - 8 / pre["step_s"]) < 1e-9 and abs(pre["peak_share"] - pre["tflops"]) < 1e-12
    assert {r["arch"] for r in rows[2:]} == {"resnet50", "vit_tiny_patch16"}
    assert all(r["images_s"] > 0 and r["trunk_images_s"] > 0 and r["bound"] in ("data loading", "GPU")
               for r in rows[2:])
    table = capsys.readouterr().out
    assert "pretrain:adios-imagenet100" in table and "TFLOP/s" in table and "linear resnet50" in table


def test_a_hanging_stage_times_out_as_a_row(tmp_path):
    [row] = gpu_check.launch("linear", True, tmp_path, limit=1.0, peak=None)
    assert row["status"] == "timeout" and "1 s" in row["error"]


def test_paper_batches_per_gpu():
    from pretrain import common

    per_gpu = {c: common.load_config(c.split("-")[0], c)["batch_size"] // g for c, g in gpu_check.PAPER_GPUS.items()}
    assert per_gpu == {"mscn-imagenet": 512, "mscn-byol-imagenet": 512, "adios-imagenet100": 128,
                       "convmae-imagenet": 128, "siameseim-imagenet": 128}


def test_out_of_memory_halves_the_batch_and_says_so(monkeypatch, tmp_path):
    import torch

    tried = []

    def fake_stage(config, tiny, work, peak=None, batch=None):
        tried.append(batch)
        if batch is None or batch > 128:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"paper_batch_per_gpu": 512, "batch": batch}

    monkeypatch.setattr(gpu_check, "stage_pretrain", fake_stage)
    row = gpu_check.stage_pretrain_fitting("mscn-imagenet", True, tmp_path)
    assert tried == [None, 256, 128] and row["note"] == "OOM at the paper batch 512; ran 128"
