"""Linear-probe engine: schedule, grid of heads, agreement with scikit-learn, both modes end to end."""
import copy
import json
from pathlib import Path

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
    # the optimum is init-independent (convex); starting near zero reaches it within the 150 epochs
    heads = LinearHeads(xtr.shape[1], int(ytr.max()) + 1, 1, init="trunc_normal_0.01")
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
    cache = [t["extra"]["feature_cache"] for t in trials]
    assert cache[0]["hits"] == cache[0]["lookups"]  # trial 0: seed 0's passes, split and val, all cached
    assert cache[1]["hits"] == 1  # trial 1 draws its own passes and held-out split; only val is shared
    assert [t["extra"]["feature_passes"]["seed"] for t in trials] == [0, 1]
    assert all(t["extra"]["feature_passes"]["per_trial"] for t in trials)
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


def _lars_steps(lr: float, weight_decay: float, init: dict, grads: list[dict]):
    from transfer.linear import make_optimizer

    w = torch.nn.Parameter(torch.tensor(init["weight"]))
    b = torch.nn.Parameter(torch.tensor(init["bias"]))
    cfg = {"optimizer": "lars", "momentum": 0.9, "nesterov": False}
    opt = make_optimizer(cfg, [{"params": [w, b], "lr": lr, "weight_decay": weight_decay}])
    for g in grads:
        w.grad, b.grad = torch.tensor(g["weight"]), torch.tensor(g["bias"])
        opt.step()
    return w.detach(), b.detach()


def test_lars_one_step_follows_mae_equations():
    """The `mae` recipe's LARS adapts a weight matrix even with weight decay 0 (MAE util/lars.py):
    q = 0.001 ||p|| / ||g + wd p||, mu = g_q, p <- p - lr mu; 1-d parameters: plain momentum SGD, no decay."""
    init = {"weight": [[3.0, 4.0]], "bias": [1.0]}
    grads = [{"weight": [[0.6, 0.8]], "bias": [0.5]}]
    w, b = _lars_steps(6.4, 0.0, init, grads)
    # ||p|| = 5, ||g|| = 1 -> q = 0.005, update = [0.003, 0.004] x 6.4
    torch.testing.assert_close(w, torch.tensor([[3.0 - 0.0192, 4.0 - 0.0256]]))
    torch.testing.assert_close(b, torch.tensor([1.0 - 3.2]))
    w, _ = _lars_steps(1.0, 0.1, init, grads)  # g + wd p = [0.9, 1.2], norm 1.5 -> q = 0.005 / 1.5
    torch.testing.assert_close(w, torch.tensor([[3.0 - 0.003, 4.0 - 0.004]]))


def test_lars_matches_mae_reference_steps():
    """Three steps (momentum included) equal MAE's own LARS run on the same tensors (golden fixture written by
    tests/fixtures/make_mae_lars_golden.py from the reference checkout)."""
    golden = json.loads((Path(__file__).parent / "fixtures" / "mae_lars_golden.json").read_text())
    assert "efb2a806" in golden["source"]
    for case in golden["cases"]:
        w, b = _lars_steps(case["lr"], case["weight_decay"], golden["init"], golden["grads"])
        torch.testing.assert_close(w, torch.tensor(case["weight"]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b, torch.tensor(case["bias"]), rtol=1e-6, atol=1e-6)


def test_head_init_follows_recipe():
    """VISSL's eval_mlp keeps nn.Linear's default init; MAE's probe draws the weight from trunc_normal(std 0.01)."""
    from transfer.linear import head_for

    class Trunk:
        family, dim = "resnet", 32

    for name in ("places205", "inat18"):
        cfg, _ = resolve(get_spec(name), "vissl")
        torch.manual_seed(3)
        heads = head_for(Trunk, 7, 2, cfg)
        torch.manual_seed(3)
        reference = torch.nn.Linear(heads.linears[0].in_features, 7)  # places205: 2x2 res5 positions x 32
        torch.testing.assert_close(heads.linears[0].weight, reference.weight)
        torch.testing.assert_close(heads.linears[0].bias, reference.bias)
    cfg, _ = resolve(get_spec("inat18"), "mae")
    Trunk.family, Trunk.dim = "vit", 4096
    head = head_for(Trunk, 50, 1, cfg).linears[0]
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05) and head.weight.abs().max() <= 2.0
    assert torch.count_nonzero(head.bias) == 0


VISSL = json.loads((Path(__file__).parent / "fixtures" / "vissl_linear_recipes.json").read_text())
RECIPE_KEYS = ("optimizer", "lr", "lr_batch", "batch_size", "momentum", "nesterov", "weight_decay", "epochs",
               "milestones", "gamma", "warmup_epochs", "crop_size", "resize_size", "feature", "feature_pool")


@pytest.mark.parametrize("benchmark, recipe, head", [("places205", "vissl", "res5"), ("inat18", "vissl", "res5avg")])
def test_vissl_recipes_equal_reference_configs_key_by_key(benchmark, recipe, head):
    """Fixture written by tests/fixtures/make_vissl_linear_fixture.py from VISSL's two linear configs."""
    from transfer.linear import head_for

    reference = VISSL[benchmark][head]
    cfg, _ = resolve(get_spec(benchmark), recipe)
    assert VISSL["source"].split("@ ")[1][:8] in cfg["source"] and VISSL[benchmark]["file"] in cfg["source"]
    assert {k: cfg[k] for k in RECIPE_KEYS} == {k: reference[k] for k in RECIPE_KEYS}
    assert cfg["head_init"] == "default" and reference["head_params_multiplier"] == 1.0

    class ResNet50:
        family, dim = "resnet", 2048

    heads = head_for(ResNet50, 10, 1, cfg)
    assert heads.linears[0].in_features == reference["head_in_dim"]          # 8192 (Places205) / 2048 (iNat18)
    assert heads.norm.num_features == 2048 and heads.norm.eps == reference["head_bn_eps"]
    # regularize_bn False / regularize_bias True: decay on the Linear's weight and bias, none on BN gamma/beta
    groups = heads.param_groups([0.1], cfg["weight_decay"])
    assert groups[0]["weight_decay"] == reference["weight_decay"] and groups[-1]["weight_decay"] == 0.0


def test_places205_res5avg_recipe_is_the_vissl_schedule_with_the_pooled_head():
    vissl, _ = resolve(get_spec("places205"), "vissl")
    pooled, _ = resolve(get_spec("places205"), "vissl-res5avg")
    assert {k: v for k, v in pooled.items() if k not in ("name", "source", "feature", "feature_pool")} == \
        {k: v for k, v in vissl.items() if k not in ("name", "source", "feature", "feature_pool")}
    assert (pooled["feature"], pooled["feature_pool"]) == ("res5avg", VISSL["inat18"]["res5avg"]["feature_pool"])


def test_res5_head_equals_vissl_eval_mlp(random_backbone):
    """res5 -> AvgPool2d(k, s) -> BatchNorm2d -> flatten -> Linear (VISSL eval_mlp), on a real trunk."""
    from transfer.linear import res5_grid, res5_pooled
    from transfer.loading import load_backbone

    backbone, _ = load_backbone(random_backbone)
    backbone.eval()
    torch.manual_seed(0)
    images = torch.rand(6, 3, 96, 96)   # res5 3x3 -> AvgPool2d(2, 1) -> 2x2
    t = backbone.trunk
    res5 = t.layer4(t.layer3(t.layer2(t.layer1(t.maxpool(t.relu(t.bn1(t.conv1(backbone.transform(images)))))))))
    pooled = torch.nn.AvgPool2d(2, 1)(res5)
    with torch.no_grad():
        feats = res5_pooled(backbone, images, (2, 1))
    assert res5_grid(96, (2, 1)) == 4 and feats.shape == (6, backbone.dim * 4)
    torch.testing.assert_close(feats, pooled.flatten(1))

    heads = LinearHeads(feats.shape[1], 5, 1, channels=backbone.dim)
    with torch.no_grad():
        heads.scale.uniform_(0.5, 1.5)
        heads.shift.uniform_(-0.5, 0.5)
    reference = torch.nn.Sequential(torch.nn.BatchNorm2d(backbone.dim), torch.nn.Flatten(), heads.linears[0])
    with torch.no_grad():
        reference[0].weight.copy_(heads.scale[0])
        reference[0].bias.copy_(heads.shift[0])
    for train in (True, False):
        heads.train(train), reference.train(train)
        torch.testing.assert_close(heads(feats)[0], reference(pooled), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="feature_pool"):
        res5_grid(64, (6, 1))


def test_cached_refit_trains_one_head_on_all_of_train(mini_root, random_backbone, tmp_path):
    """cached.refit: after the held-out LR choice, one head at that LR on the fit passes + held-out passes."""
    from transfer.datasets import load_classification
    from transfer.linear import run_cached
    from transfer.loading import load_backbone

    backbone, _ = load_backbone(random_backbone)
    cfg, _ = resolve(get_spec("places205"), "vissl", "tiny", {"epochs": 2})
    cached = {**get_spec("places205").extra["cached"], "refit": True}
    train, val = (load_classification("places205", mini_root, s) for s in ("train", "val"))
    result = run_cached(backbone, train, val, cfg, cached, 0, CPU, 0, tmp_path)
    sel = result["extra"]["lr_selection"]
    assert sel["refit"]["lr"] == sel["chosen_lr"] and sel["refit"]["train_size"] == len(train.samples)
    full_batches = [b for b in range(0, len(train.samples), cfg["batch_size"]) if len(train.samples) - b > 1]
    assert sel["refit"]["steps"] == 2 * len(full_batches)  # 2 epochs over all of train
    assert sel["refit"]["grid_head_top1"] == sel["val_top1_by_lr"][str(sel["chosen_lr"])]  # both recorded
    assert sel["refit"]["features_s"] > 0 and result["extra"]["feature_cache"]["lookups"] == 4 + 2


def test_mae_recipe_crops_as_mae_util_crop_with_bicubic():
    """MAE's main_linprobe.py: util/crop.py RandomResizedCrop(224, interpolation=3), Resize(256, interpolation=3);
    VISSL: torchvision's crop and Resize, bilinear. The draw below copies util/crop.py's get_params equations."""
    import math as m

    from PIL import Image
    from torchvision.transforms import v2 as T

    from transfer.linear import MAERandomResizedCrop, recipe_transforms

    def mae_get_params(height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        target_area = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = min(int(round(m.sqrt(target_area * aspect_ratio))), width)
        h = min(int(round(m.sqrt(target_area / aspect_ratio))), height)
        return (torch.randint(0, height - h + 1, size=(1,)).item(), torch.randint(0, width - w + 1, size=(1,)).item(),
                h, w)

    crop = MAERandomResizedCrop(64)
    for seed, (height, width) in enumerate([(100, 150), (37, 300), (300, 20)]):  # the last two clamp a side
        torch.manual_seed(seed)
        ours = crop.params(height, width)
        torch.manual_seed(seed)
        assert ours == mae_get_params(height, width)
    mae_train, mae_test = recipe_transforms(resolve(get_spec("inat18"), "mae")[0])
    assert isinstance(mae_train.transforms[0], MAERandomResizedCrop)
    assert mae_train.transforms[0].interpolation == mae_test.transforms[0].interpolation == \
        T.InterpolationMode.BICUBIC
    image = Image.new("RGB", (300, 37), (10, 200, 30))
    assert mae_train(image).shape == (3, 224, 224) and mae_test(image).shape == (3, 224, 224)
    vissl_train, vissl_test = recipe_transforms(resolve(get_spec("places205"), "vissl")[0])
    assert type(vissl_train.transforms[0]) is T.RandomResizedCrop
    assert vissl_train.transforms[0].interpolation == vissl_test.transforms[0].interpolation == \
        T.InterpolationMode.BILINEAR
