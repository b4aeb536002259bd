"""Runs that must refuse rather than lose what is on disk or publish a wrong number (issue 18): pretraining
output dirs, resume, non-finite checkpoints, truncated checkpoints, YAML numbers."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain import common

TINY = ["arch=resnet18", "width=8", "img_size=32", "batch_size=8", "epochs=1", "warmup_epochs=0", "workers=0",
        "proj_hidden=32", "proj_out=16", "pred_hidden=32", "highpass_sigma=1.0", "lr=1.0", "lr_batch=8",
        "ckpt_every=1", "max_steps=1"]


def hashes(folder: Path) -> dict:
    """Every file under `folder` -> sha256 (the test's 'nothing on disk changed')."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((rng.random((36, 36, 3)) * 255).astype(np.uint8)).save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, images):
    """A one-step tiny run (checkpoint.pth, log.jsonl, config.yaml, backbone.safetensors)."""
    out = tmp_path_factory.mktemp("run")
    common.train(config(images, out), log=lambda *a, **k: None)
    return out


def config(images, out, *extra):
    return common.load_config("mscn", None, TINY + [f"data={images}", f"output_dir={out}", *extra])


def refuse(cfg, match: str, folder: Path):
    """train(cfg) exits with one message matching `match` and leaves every file under `folder` unchanged."""
    before = hashes(folder) if folder.exists() else None
    with pytest.raises(SystemExit, match=match) as e:
        common.train(cfg, log=lambda *a, **k: None)
    assert "\n" not in str(e.value.code)
    assert (hashes(folder) if folder.exists() else None) == before
    return str(e.value.code)


def test_output_dir_with_a_checkpoint_is_not_overwritten_without_resume(finished_run, images):
    msg = refuse(config(images, finished_run), r"already holds a run", finished_run)
    assert "--resume" in msg and "--force" in msg


def test_resume_without_a_checkpoint_refuses(tmp_path, images):
    refuse(config(images, tmp_path / "empty", "resume=true"), r"--resume: no checkpoint .*checkpoint.pth", tmp_path)
    assert not (tmp_path / "empty").exists()


def test_resume_with_a_changed_config_refuses_and_keeps_config_yaml(finished_run, images):
    msg = refuse(config(images, finished_run, "resume=true", "lr=0.5"), r"--resume with a changed config",
                 finished_run)
    assert "lr: 1.0 -> 0.5" in msg


def test_truncated_checkpoint_is_named_not_a_traceback(tmp_path, finished_run, images):
    run = tmp_path / "run"
    run.mkdir()
    for f in finished_run.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    (run / "checkpoint.pth").write_bytes((finished_run / "checkpoint.pth").read_bytes()[:5000])
    refuse(config(images, run, "resume=true", "max_steps=2"), r"checkpoint.pth: unreadable or truncated checkpoint",
           run)


def test_force_starts_over_without_mixing_the_log(tmp_path, finished_run, images):
    run = tmp_path / "run"
    run.mkdir()
    for f in finished_run.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    common.train(config(images, run, "force=true"), log=lambda *a, **k: None)
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]
    with pytest.raises(SystemExit, match="contradict"):
        common.train(config(images, run, "force=true", "resume=true"), log=lambda *a, **k: None)


def test_non_finite_state_is_never_saved_over_the_last_good_checkpoint(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = tmp_path / "checkpoint.pth"
    common.save_checkpoint(path, model, opt, sched, None, 1, {}, 0)
    before = hashes(tmp_path)
    model[1].running_var[0] = float("inf")  # a BN statistic blown up by the step that produced the NaN loss
    with pytest.raises(SystemExit, match=r"non-finite model state at step 2 .*1\.running_var.*keeps the last good"):
        common.save_checkpoint(path, model, opt, sched, None, 2, {}, 0)
    assert hashes(tmp_path) == before  # and no temp file left behind


def test_yaml_1_1_exponents_are_numbers():
    cfg = common.load_config("mscn", None, ["lr=1e-3", "weight_decay=5e-4", "arch=resnet18"])
    assert cfg["lr"] == 1e-3 and isinstance(cfg["lr"], float) and cfg["weight_decay"] == 5e-4
    assert cfg["arch"] == "resnet18"


# ----------------------------------------------------------------------------------------------- engines
def test_moved_or_copied_segmentation_work_dir_resumes_its_own_checkpoint(tmp_path):
    from transfer.segmentation import SegmentationError, resume_checkpoint

    old, new = tmp_path / "old" / "work", tmp_path / "new" / "work"
    for work in (old, new):  # a copy: the original folder still exists
        work.mkdir(parents=True)
        torch.save({"meta": {"iter": 3}, "where": str(work)}, work / "iter_3.pth")
        (work / "last_checkpoint").write_text(str(old / "iter_3.pth"))  # mmengine writes an absolute path
    assert resume_checkpoint(new) == new / "iter_3.pth"  # never the other folder's checkpoint
    (new / "last_checkpoint").write_text(str(old / "iter_9.pth"))
    with pytest.raises(SegmentationError, match=r"names .*iter_9.pth, which is not in this work dir; .*--no-resume"):
        resume_checkpoint(new)
    (new / "last_checkpoint").write_text(str(old / "iter_3.pth"))
    (new / "iter_3.pth").write_bytes((old / "iter_3.pth").read_bytes()[:200])
    before = hashes(new)
    with pytest.raises(SegmentationError, match=r"iter_3.pth: truncated or unreadable checkpoint"):
        resume_checkpoint(new)
    assert hashes(new) == before


def test_diverged_engines_write_no_record():
    from benchmarks.runner import check_finite_metrics
    from transfer.segmentation import SegmentationError, check_finite_model

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    check_finite_model(model, Path("w"))
    model[0].weight.data[0, 0] = float("nan")
    with pytest.raises(SegmentationError, match=r"training diverged: 1 tensors hold NaN/inf \(e.g. 0.weight\); no record"):
        check_finite_model(model, Path("w"))
    check_finite_metrics({"mIoU": 0.47, "aAcc": 80.0}, "ade20k", 0)
    with pytest.raises(FloatingPointError, match="non-finite metrics"):
        check_finite_metrics({"mIoU": float("nan")}, "ade20k", 0)


def test_linear_message_names_a_flag_that_exists():
    from benchmarks.cli import build_parser

    source = Path(common.__file__).resolve().parent.parent / "transfer" / "linear.py"
    flags = {a for action in build_parser()._subparsers._group_actions[0].choices["run"]._actions
             for a in action.option_strings}
    import re

    for flag in re.findall(r"(--[a-z][a-z-]+)", source.read_text()):
        assert flag in flags, f"transfer/linear.py suggests {flag}, which `bench run` does not have"


def test_every_budget_can_resume_before_its_end():
    """A killed tiny run must have a checkpoint to resume from (interval < iterations)."""
    from benchmarks.spec import load_specs

    for spec in load_specs().values():
        for name, budget in spec.budgets.items():
            if "checkpoint_interval" in budget:
                assert budget["checkpoint_interval"] < budget["max_iters"], (spec.name, name)


def test_a_nan_metric_never_becomes_a_record(tmp_path, monkeypatch):
    from benchmarks import runner
    from transfer.artifact import random_artifact, save_artifact

    backbone = save_artifact(tmp_path / "r18.safetensors", random_artifact("resnet18", width=8))
    fake_engine = lambda spec, backbone, cfg, mode, seed, device, opts: ({"metrics": {"top1": float("nan"),  # noqa
                                                                                      "top5": 50.0}}, {"name": "x"})
    monkeypatch.setattr(runner, "load_engine", lambda task: fake_engine)
    out = tmp_path / "results"
    with pytest.raises(FloatingPointError, match=r"inat18 trial 0: non-finite metrics \{'top1': nan\}; no record"):
        runner.run_benchmark(runner.RunOptions("inat18", str(backbone), str(tmp_path), out=str(out), trials=1,
                                               device="cpu"), log=lambda *a, **k: None)
    assert not out.exists()


@pytest.mark.parametrize("override", ["epochs=0", "batch_size=0", "lr=-1", "lr=abc", "workers=-1", "max_steps=0",
                                      "img_size=-4"])
def test_pretraining_values_are_checked_before_any_work(override):
    with pytest.raises(SystemExit, match=rf"{override.split('=')[0]}=.*must be"):
        common.load_config("mscn", None, [override])


def test_pretraining_on_a_truncated_image_is_one_line_and_can_be_rerun(tmp_path, images):
    from pretrain.run import main

    data = tmp_path / "imgs"
    data.mkdir()
    for f in images.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    bad = data / "3.png"
    bad.write_bytes(bad.read_bytes()[:120])
    argv = ["mscn", "--data", str(data), "--output-dir", str(tmp_path / "run"), *TINY]
    for _ in range(2):  # the failed first attempt wrote no step: the rerun is not refused as "already a run"
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert str(e.value.code).startswith(f"pretrain/run.py: error: {bad}: unreadable or corrupt image")
        assert "\n" not in str(e.value.code)


def test_segmentation_stops_at_the_first_non_finite_loss():
    from types import SimpleNamespace

    from mmseg.registry import HOOKS
    from transfer.segmentation import SegmentationError

    hook = HOOKS.build(dict(type="FiniteLossHook"))  # found from the mmseg scope the runner uses
    runner = SimpleNamespace(iter=41, work_dir="w")
    hook.after_train_iter(runner, 0, outputs={"loss": torch.tensor(1.5)})
    with pytest.raises(SegmentationError, match=r"non-finite loss \(nan\) at iteration 42; no record written"):
        hook.after_train_iter(runner, 0, outputs={"loss": torch.tensor(float("nan"))})


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint_and_no_temp(tmp_path, monkeypatch):
    import errno

    model = torch.nn.Conv2d(3, 4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = tmp_path / "checkpoint.pth"
    common.save_checkpoint(path, model, opt, sched, None, 1, {}, 0)
    before = hashes(tmp_path)

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        common.save_checkpoint(path, model, opt, sched, None, 2, {}, 0)
    assert hashes(tmp_path) == before
