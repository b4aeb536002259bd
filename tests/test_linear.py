"""Linear-probe engine: schedule, grid of heads, agreement with scikit-learn, both modes end to end."""
import copy
import json

import numpy as np
import pytest
import torch

from benchmarks.runner import RunOptions, run_benchmark
from benchmarks.spec import get_spec, resolve
from transfer.artifact import random_artifact, save_artifact
from transfer.linear import LinearHeads, evaluate_heads, feature_batches, fit_heads, lr_factor

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


def test_nan_loss_is_one_clear_error():
    heads = LinearHeads(8, 3)
    x = torch.full((16, 8), float("nan"))
    cfg = {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 0.0, "epochs": 1,
           "milestones": [], "gamma": 0.1, "warmup_epochs": 0}
    with pytest.raises(FloatingPointError, match="loss is nan"):
        fit_heads(heads, lambda e: [(x, torch.zeros(16, dtype=torch.long))], 1, cfg, [0.1], CPU)
