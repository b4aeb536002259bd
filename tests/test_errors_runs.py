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
