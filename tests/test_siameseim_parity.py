"""SiameseIM equals the reference (OpenGVLab/Siamese-Image-Modeling, commit in the fixture) to 1e-5.

tests/fixtures/siameseim_parity.pt was written by `python -m benchmarks.parity.siameseim REF_CHECKOUT`: the
reference model's weights (under bench's names), views, BEiT masks, crops, and the reference's relative-position
embedding, loss, predictions, target features, per-parameter gradient norms, EMA update and post-update loss.
Here bench's side is recomputed from those inputs alone.
"""
from pathlib import Path

import pytest
import torch

from benchmarks.parity.siameseim import MASK_CASES, bench_outputs, compare, spatial_crops, source_image

FIXTURE = Path(__file__).parent / "fixtures" / "siameseim_parity.pt"


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=False)


@pytest.fixture(scope="module")
def outputs(fixture):
    return bench_outputs(fixture)


def test_fixture_names_the_reference_commit(fixture):
    assert fixture["reference"] == "OpenGVLab/Siamese-Image-Modeling" and len(fixture["commit"]) == 40
    assert len(fixture["block_masks"]) + len(fixture["block_masks_small"]) == len(MASK_CASES)


def test_block_masks_equal_the_reference_generator(fixture, outputs):
    assert torch.equal(outputs["block_masks"], fixture["block_masks"])
    assert torch.equal(outputs["block_masks_small"], fixture["block_masks_small"])
    assert (fixture["block_masks"].flatten(1).sum(1) == 118).all()


def test_crops_from_the_same_seed_equal_the_reference(fixture):
    assert torch.equal(spatial_crops(list(range(100, 100 + len(fixture["crops"]))), source_image()),
                       fixture["crops"])
    assert fixture["crops"][:, 4].ne(fixture["crops"][:, 9]).any()  # a relative flip is among the cases


@pytest.mark.parametrize("key", ["rel_embed", "loss1", "pred", "target", "grad_norms", "ema", "loss2"])
def test_outputs_equal_the_reference(fixture, outputs, key):
    assert compare(fixture, outputs)[key] < 1e-5
