"""Linear-probe engine: schedule, grid of heads, agreement with scikit-learn, both modes end to end."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.runner import RunOptions, run_benchmark
from benchmarks.spec import get_spec, resolve
from transfer.artifact import random_artifact, save_artifact
from transfer.linear import LinearHeads, best_head, evaluate_heads, feature_batches, fit_heads, lr_factor

CPU = torch.device("cpu")


def test_lr_schedule_steps_and_cosine():
    steps = {"epochs": 14, "milestones": [4, 8, 12], "gamma": 0.1, "warmup_epochs": 0}
    assert [lr_factor(steps, e) for e in (0, 3.9, 4, 8, 13)] == pytest.approx([1, 1, 0.1, 0.01, 0.001])
    cosine = {"epochs": 90, "milestones": "cosine", "gamma": None, "warmup_epochs": 10}
    assert lr_factor(cosine, 5) == pytest.approx(0.5) and lr_factor(cosine, 10) == pytest.approx(1.0)
    assert lr_factor(cosine, 50) == pytest.approx(0.5) and lr_factor(cosine, 90) == pytest.approx(0.0)


def test_recipes_follow_protocols():
    inat, _ = resolve(get_spec("inat18"), "vissl")
    assert (inat["epochs"], inat["milestones"], inat["lr"], inat["weight_decay"], inat["nesterov"]) == \
        (84, [24, 48, 72], 0.01, 5e-4, True)
    places, _ = resolve(get_spec("places205"), "vissl")
    assert (places["epochs"], places["milestones"], places["batch_size"]) == (14, [4, 8, 12], 256)
    vicreg, _ = resolve(get_spec("places205"), "vicreg")
    assert (vicreg["lr"], vicreg["weight_decay"], vicreg["epochs"]) == (0.003, 1e-4, 28)
    short, overrides = resolve(get_spec("inat18"), "vissl", budget="tiny", overrides={"epochs": 21})
    assert overrides == {"crop_size": 64, "resize_size": 73, "batch_size": 64, "epochs": 21,
                         "milestones": [6, 12, 18]}
    assert resolve(get_spec("inat18"), "vissl", overrides={"epochs": 84})[1] == {}


def test_grid_heads_train_independently():
    """A grid of G heads trained together equals G heads trained one by one at their own LRs."""
    torch.manual_seed(0)
    x, y = torch.randn(96, 16), torch.randint(0, 4, (96,))
    cfg = {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "epochs": 5,
           "milestones": [3], "gamma": 0.1, "warmup_epochs": 0}
    lrs = [0.01, 0.1, 1.0]
    grid = LinearHeads(16, 4, num_heads=3)
    singles = []
    for g in range(3):
        single = LinearHeads(16, 4, num_heads=1)
        single.linears[0].load_state_dict(grid.linears[g].state_dict())
        singles.append(single)
    batches = lambda e: feature_batches(x, y, 32, seed=e)  # noqa: E731
    fit_heads(grid, batches, 3, cfg, lrs, CPU)
    for g, single in enumerate(singles):
        fit_heads(single, batches, 3, cfg, [lrs[g]], CPU)
        torch.testing.assert_close(single.linears[0].weight, grid.linears[g].weight)
        torch.testing.assert_close(single.scale[0], grid.scale[g])
        assert evaluate_heads(single, x, y, CPU)[0][0] == pytest.approx(evaluate_heads(grid, x, y, CPU)[0][g])


def test_lr_choice_breaks_top1_ties_by_heldout_loss():
    torch.manual_seed(0)
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    heads = LinearHeads(8, 3, num_heads=2)
    heads.eval()
    losses = evaluate_heads(heads, x, y, CPU, batch_size=16)[2]  # batched sum = per-head mean
    for g in range(2):
        assert losses[g] == pytest.approx(F.cross_entropy(heads(x)[g], y).item(), rel=1e-5)
    assert best_head([30.0, 33.3, 33.3], [1.2, 1.9, 1.6]) == 2  # tie on top-1: lower loss wins
    assert best_head([36.7, 33.3, 33.3], [2.0, 1.0, 1.0]) == 0  # top-1 first


def test_nan_loss_is_one_clear_error():
    heads = LinearHeads(8, 3)
    x = torch.full((16, 8), float("nan"))
    cfg = {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 0.0, "epochs": 1,
           "milestones": [], "gamma": 0.1, "warmup_epochs": 0}
    with pytest.raises(FloatingPointError, match="loss is nan"):
        fit_heads(heads, lambda e: [(x, torch.zeros(16, dtype=torch.long))], 1, cfg, [0.1], CPU)


# ----------------------------------------------------------------------------------------------- on miniature data
@pytest.fixture(scope="module")
def random_backbone(tmp_path_factory):
    path = tmp_path_factory.mktemp("bb") / "random-r18w16.safetensors"
    return str(save_artifact(path, random_artifact("resnet18", seed=0, width=16)))


@pytest.fixture(scope="module")
def places_features(mini_root, random_backbone):
    """Centre-crop features of the miniature Places205 train and val sets."""
    from transfer.datasets import load_classification
    from transfer.linear import extract_features, test_transform
    from transfer.loading import load_backbone

    backbone, _ = load_backbone(random_backbone)
    out = []
    for split in ("train", "val"):
        data = load_classification("places205", mini_root, split)
        out += list(extract_features(backbone, data.samples, test_transform(73, 64), CPU, 64, 0, split))
    return out


def test_linear_head_agrees_with_sklearn(places_features):
    """BN + Linear trained by SGD to convergence ~ L2-regularised multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr, ytr, xva, yva = places_features
    wd, epochs = 5e-4, 150
    cfg = {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": wd, "epochs": epochs,
           "milestones": [100, 130], "gamma": 0.1, "warmup_epochs": 0}
    torch.manual_seed(0)
    heads = LinearHeads(xtr.shape[1], int(ytr.max()) + 1, 1)
    fit_heads(heads, lambda e: feature_batches(xtr, ytr, 64, seed=e), len(xtr) // 64 + 1, cfg, [0.1], CPU)
    ours = evaluate_heads(heads, xva, yva, CPU)[0][0]

    scaler = StandardScaler().fit(xtr.numpy())
    clf = LogisticRegression(C=1.0 / (wd * len(xtr)), max_iter=5000)
    clf.fit(scaler.transform(xtr.numpy()), ytr.numpy())
    theirs = 100.0 * (clf.predict(scaler.transform(xva.numpy())) == yva.numpy()).mean()
    assert ours > 100.0 / (int(ytr.max()) + 1) + 5, "the probe must learn something"
    assert abs(ours - theirs) <= 2.0, (ours, theirs)


def _run(mini_root, backbone, tmp_path, **kw):
    opts = RunOptions(benchmark=kw.pop("benchmark", "places205"), backbone=backbone, data_root=str(mini_root),
                      out=str(tmp_path / "results"), budget="tiny", workers=0,
                      cache_dir=str(tmp_path / "cache"), **kw)
    return [json.loads(p.read_text()) for p in run_benchmark(opts, log=lambda *a: None)]


def test_cached_mode_end_to_end_and_cache_hits(mini_root, random_backbone, tmp_path):
    first, = _run(mini_root, random_backbone, tmp_path, mode="cached", overrides={"epochs": 4})
    assert first["engine"] == "torch-linear" and first["mode"] == "cached" and not first["protocol"]
    assert first["overrides"]["epochs"] == 4 and first["overrides"]["crop_size"] == 64
    sel = first["extra"]["lr_selection"]
    assert sel["split"] == "held-out train" and float(sel["chosen_lr"]) in map(float, sel["heldout_top1_by_lr"])
    assert first["extra"]["feature_cache"]["hits"] == 0
    assert first["config"]["backbone"]["load_audit"]["counts"]["missing"] == 0
    assert first["config"]["recipe"]["epochs"] == 4 and first["config"]["recipe"]["weight_decay"] == 5e-4
    trials = _run(mini_root, random_backbone, tmp_path, mode="cached", overrides={"epochs": 4}, trials=2)
    assert [t["trial"] for t in trials] == [0, 1] and [t["seed"] for t in trials] == [0, 1]
    assert all(t["extra"]["feature_cache"]["hits"] == t["extra"]["feature_cache"]["lookups"] for t in trials)
    assert trials[0]["metrics"] == first["metrics"]  # same seed, same cached features: same numbers


def test_protocol_mode_end_to_end(mini_root, random_backbone, tmp_path):
    rec, = _run(mini_root, random_backbone, tmp_path, mode="protocol", overrides={"epochs": 2},
                benchmark="inat18")
    assert rec["mode"] == "protocol" and 0 <= rec["metrics"]["top1"] <= 100
    assert rec["config"]["recipe"]["milestones"] == [1, 1, 2]  # 24/48/72 of 84, scaled to 2 epochs
    assert rec["extra"]["steps"] > 0
    curve = rec["extra"]["curve"]  # drawn by `bench report --format html`
    assert curve["step"] == list(range(1, rec["extra"]["steps"] + 1)) and curve["loss"][-1] == rec["extra"]["final_loss"]


def test_vit_backbone_uses_cls_token_and_bn_without_affine(mini_root, tmp_path):
    path = save_artifact(tmp_path / "vit.safetensors", random_artifact("vit_tiny_patch16", img_size=64))
    rec, = _run(mini_root, str(path), tmp_path, mode="cached", overrides={"epochs": 2})
    assert rec["config"]["engine"]["head"] == "bn(no affine)+linear"
    assert rec["config"]["engine"]["features"] == "CLS token"


def test_two_process_run_equals_one_process(mini_root, random_backbone, tmp_path):
    """`bench run --gpus 2` (2 gloo processes) gives the 1-process result for the same global batch."""
    import subprocess
    import sys

    def bench(out, *extra):
        cmd = [sys.executable, "-m", "benchmarks.cli", "run", "places205", "--backbone", random_backbone,
               "--data-root", str(mini_root), "--budget", "tiny", "--epochs", "3", "--workers", "0",
               "--out", str(tmp_path / out), "--cache-dir", str(tmp_path / f"cache-{out}"), *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        records = [json.loads(p.read_text()) for p in (tmp_path / out).glob("*.json")]
        assert len(records) == 1, "rank 0 alone writes the record"
        return records[0]

    for mode in ("cached", "protocol"):
        one, two = bench(f"one-{mode}", "--mode", mode), bench(f"two-{mode}", "--mode", mode, "--gpus", "2")
        assert two["config"]["world_size"] == 2 and one["config"]["world_size"] == 1
        assert two["metrics"]["top1"] == pytest.approx(one["metrics"]["top1"], abs=1e-6)
        assert two["extra"]["final_loss"] == pytest.approx(one["extra"]["final_loss"], rel=1e-4)
