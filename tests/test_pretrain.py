"""Shared pretraining loop (pretrain/common.py): config, schedule, resume bit-for-bit, export, DDP equivalence."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from pretrain import common, mscn
from transfer.artifact import read_artifact, weights_hash

TINY = ["arch=resnet18", "width=8", "img_size=32", "batch_size=8", "epochs=2", "warmup_epochs=1", "workers=0",
        "proj_hidden=32", "proj_out=16", "pred_hidden=32", "highpass_sigma=1.0", "lr=1.0", "lr_batch=8",
        "ckpt_every=2"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """An ImageFolder-style directory of 24 small images (labels are ignored by pretraining)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(24):
        folder = root / f"class{i % 3}"
        folder.mkdir(exist_ok=True)
        img = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
        img[: 10 + i % 20] //= 2
        Image.fromarray(img).save(folder / f"{i}.png")
    return root


def test_config_layers_and_overrides():
    cfg = common.load_config("mscn", None, ["lr=0.5", "mask_ratio=[0.2, 0.1]", "highpass_sigma=null"])
    assert cfg["method"] == "mscn" and cfg["config_name"] == "mscn-cpu-tiny"
    assert cfg["lr"] == 0.5 and cfg["mask_ratio"] == [0.2, 0.1] and cfg["highpass_sigma"] is None
    assert cfg["epochs"] == common.load_config("mscn")["epochs"]  # from the file, not the defaults
    with pytest.raises(SystemExit, match="unknown key"):
        common.load_config("mscn", None, ["mask_raito=0.2"])
    for name in ("mscn-cpu-tiny", "mscn-byol-cpu-tiny", "mscn-imagenet", "mscn-byol-imagenet"):
        cfg = common.load_config("mscn", name)
        assert cfg["framework"] in ("simclr", "byol")
    paper = common.load_config("mscn", "mscn-imagenet")
    assert (paper["arch"], paper["width"], paper["img_size"], paper["batch_size"]) == ("resnet50", 64, 224, 4096)
    assert (paper["epochs"], paper["warmup_epochs"], paper["temperature"]) == (800, 10, 0.2)
    assert common.load_config("mscn", "mscn-byol-imagenet")["epochs"] == 1000


def test_warmup_cosine_schedule():
    f = common.WarmupCosine(warmup=10, total=110)
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)  # MAE's lr_sched.py
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert all(f(k) >= f(k + 1) for k in range(10, 110))


def test_sampler_shards_and_resumes():
    full = list(common.EpochSampler(20, 4, seed=3))
    assert len(full) == 20 and len(set(full)) == 20
    late = common.EpochSampler(20, 4, seed=3)
    late.start = 2
    assert list(late) == full[8:]
    ranks = [list(common.EpochSampler(20, 2, seed=3, rank=r, world=2)) for r in (0, 1)]
    # global batch b = rank 0's 2 samples then rank 1's: the same order as one process with batch 4
    interleaved = [i for b in range(5) for r in (0, 1) for i in ranks[r][2 * b:2 * b + 2]]
    assert interleaved == full


def _run(tmp, image_dir, *extra):
    cfg = common.load_config("mscn", None, TINY + [f"data={image_dir}", f"output_dir={tmp}", *extra])
    path = common.train(cfg, log=lambda *a, **k: None)
    return [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()], path


def test_resume_reproduces_the_uninterrupted_run(tmp_path, image_dir):
    full_log, full_art = _run(tmp_path / "full", image_dir)
    assert [r["step"] for r in full_log] == [1, 2, 3, 4, 5, 6]
    part_log, _ = _run(tmp_path / "part", image_dir, "max_steps=3")
    assert [r["step"] for r in part_log] == [1, 2, 3]
    resumed_log, resumed_art = _run(tmp_path / "part", image_dir, "resume=true")
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in full_log]  # bit-for-bit, incl. steps 4-6
    assert [r["lr"] for r in resumed_log] == [r["lr"] for r in full_log]
    assert weights_hash(read_artifact(resumed_art).state_dict) == weights_hash(read_artifact(full_art).state_dict)
    # and the losses are not trivially equal: another seed gives another curve
    other_log, _ = _run(tmp_path / "other", image_dir, "seed=1")
    assert [r["loss"] for r in other_log] != [r["loss"] for r in full_log]


def test_exported_artifact_records_method_config_and_preprocessing(tmp_path, image_dir):
    _, path = _run(tmp_path, image_dir, "framework=byol", "max_steps=1")
    art = read_artifact(path)
    assert art.arch == "resnet18" and art.arch_kwargs == {"width": 8}
    assert art.preprocessing.highpass_sigma == 1.0
    assert art.provenance["method"] == "mscn" and art.provenance["framework"] == "byol"
    assert art.provenance["config"]["mask_ratio"] == mscn.DEFAULTS["mask_ratio"]
    assert art.provenance["steps"] == 1
    assert not any(k.startswith(("target_", "projector", "predictor", "fc.")) for k in art.state_dict)
    ckpt = torch.load(Path(tmp_path) / "checkpoint.pth", weights_only=True)  # plain tensors and values
    assert {"model", "optimizer", "scheduler", "scaler", "step", "rng", "config"} <= set(ckpt)
    # the trunk loads into a fresh backbone
    from transfer.artifact import build_backbone
    build_backbone("resnet18", width=8).load_state_dict(art.state_dict, strict=False)


# ----------------------------------------------------------------------------------------------- DDP
def _ddp_cfg(framework):
    # a small LR: with 4 images per BN batch, large steps amplify float-rounding differences step after step
    return common.load_config("mscn", None, TINY + [f"framework={framework}", "mask_prob=0", "lr=0.05"])


def _views(seed=0, n=8, v=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(v)]


def _steps(model, cfg, views_per_step, world=1):
    opt, sched = common.build_optimizer(common.unwrap(model), cfg, steps_per_epoch=4)
    losses = []
    for i, views in enumerate(views_per_step):
        logs = common.train_step(model, views, opt, sched, progress=(i + 1) / 8)
        losses.append(logs["loss"].item())
    return losses


def _worker(rank, world, init_file, framework, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = _ddp_cfg(framework)
    model = common.sync_batchnorm(mscn.build_model(cfg).to(memory_format=torch.channels_last), torch.device("cpu"))
    model = torch.nn.parallel.DistributedDataParallel(model)
    per = 8 // world
    steps = [[v[rank * per:(rank + 1) * per] for v in _views(s)] for s in range(2)]
    losses = _steps(model, cfg, steps, world)
    if rank == 0:
        torch.save({"state": common.unwrap(model).state_dict(), "losses": losses}, out)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("framework", ["simclr", "byol"])
def test_ddp_two_processes_match_one_process(tmp_path, framework):
    """2 gloo processes x 4 images == 1 process x 8 images: gathered negatives, all-reduce BatchNorm
    (SyncBatchNorm's CPU stand-in), averaged gradients, EMA. Masks are off here (per-rank RNG streams differ
    by design); the masking itself is per image and tested elsewhere."""
    torch.manual_seed(0)
    cfg = _ddp_cfg(framework)
    single = mscn.build_model(cfg).to(memory_format=torch.channels_last)
    single_losses = _steps(single, cfg, [_views(s) for s in range(2)])
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), framework, str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=False)
    # the logged loss of rank 0 is the mean over its anchors; compare the trained weights instead
    ref = single.state_dict()
    for key, value in result["state"].items():
        if value.dtype.is_floating_point:
            assert torch.allclose(value, ref[key], atol=1e-4, rtol=1e-3), key
        else:
            assert torch.equal(value, ref[key]), key
    torch.manual_seed(0)
    init = mscn.build_model(cfg).state_dict()
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref if k.startswith("backbone.") and "weight" in k)
    assert moved > 1e-3  # the steps did change the weights, well beyond the tolerance


def test_sample_images_are_centre_crops_of_the_data(image_dir):
    x = common.sample_images({"data": str(image_dir), "img_size": 24}, 5)
    assert x.shape == (5, 3, 24, 24) and 0 <= x.min() and x.max() <= 1
    files, where = common.image_files(str(image_dir))
    assert len(files) == 24 and where == str(image_dir)
